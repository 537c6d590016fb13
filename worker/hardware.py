"""What this machine has: GPUs through NVML, the rest through psutil.

One reader (``GpuReader``) maps NVML's answers to ``Gpu`` records. It takes the NVML API as an
object: the real ``pynvml`` module, or ``FakeNvml`` built from ``EMP_FAKE_GPUS`` (e.g. ``2x24GB``
or ``24GB,80GB:NVIDIA H100``), so tests and demos go through the same mapping code as a GPU box.

No driver, no GPU or an NVML error degrades to a CPU-only inventory with one log line. Readings
a GPU does not support (ECC on consumer cards, row remapping before Ampere) are left empty.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import psutil

from worker.errors import ConfigError

log = logging.getLogger(__name__)
GIB = 1024**3
MAX_FAKE_GPUS = 64
READ_TIMEOUT_S = 2.0
T = TypeVar("T")

# NVML clock event reasons that mean the GPU is slowed by something other than being idle or
# at its application clocks (nvmlClocksEventReason* bits).
_SLOWDOWNS = {0x08: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "power_brake"}


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_gb: float
    memory_free_gb: float
    compute_capability: str = ""
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    pci_bus_id: str = ""
    ecc_uncorrected: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_pending: bool | None = None
    remap_failure: bool | None = None
    slowdowns: tuple[str, ...] = ()
    read_error: str = ""  # set when NVML could not read this GPU at all

    @classmethod
    def unreadable(cls, index: int, error: str) -> Gpu:
        """A GPU NVML lists but cannot read: its slot exists and takes no jobs until it reads again."""
        return cls(index=index, uuid="", name="unreadable GPU", memory_total_gb=0.0, memory_free_gb=0.0,
                   read_error=error)

    @property
    def problems(self) -> list[str]:
        """Health signals that call for a reset or replacement; a GPU with any takes no jobs."""
        found = [f"cannot be read: {self.read_error}"] if self.read_error else []
        if self.retired_pages_pending:
            found.append("retired memory pages pending (needs a GPU reset)")
        if self.remapped_rows_pending:
            found.append("memory row remapping pending (needs a GPU reset)")
        if self.remap_failure:
            found.append("memory row remapping failed (replace the GPU)")
        return found

    @property
    def warnings(self) -> list[str]:
        found = []
        if self.ecc_uncorrected:
            found.append(f"{self.ecc_uncorrected} uncorrected ECC error(s) since boot")
        found.extend(f"clocks slowed: {reason}" for reason in self.slowdowns)
        return found

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["slowdowns"] = list(self.slowdowns)
        data["healthy"] = not self.problems
        data["problems"] = self.problems
        data["warnings"] = self.warnings
        return data


@dataclass(frozen=True)
class Hardware:
    cpu_cores: int
    ram_gb: float
    disk_free_gb: float
    os: str
    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str = ""
    cuda_version: str = ""
    gpu_source: str = "none"  # nvml, fake or none
    gpu_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = [g.to_dict() for g in self.gpus]
        return data

    def host(self) -> dict[str, Any]:
        """The machine-wide facts a slot advertises beside its own GPU."""
        return {"os": self.os, "cpu_cores": self.cpu_cores, "ram_gb": self.ram_gb,
                "disk_free_gb": self.disk_free_gb, "driver_version": self.driver_version,
                "cuda_version": self.cuda_version, "gpu_source": self.gpu_source, "gpu_count": len(self.gpus)}


# --- the fake NVML ------------------------------------------------------------------------------

_FAKE_ITEM = re.compile(r"^(?:(\d+)\s*[xX]\s*)?(\d+(?:\.\d+)?)\s*(?:GB|G|GIB)?(?::(.+))?$", re.IGNORECASE)


def parse_fake_gpus(spec: str) -> list[tuple[float, str]]:
    """``2x24GB``, ``24GB,80GB`` or ``1x80GB:NVIDIA H100`` -> [(memory GiB, name), ...]."""
    gpus: list[tuple[float, str]] = []
    for item in (part.strip() for part in spec.split(",")):
        match = _FAKE_ITEM.match(item)
        if not item or not match:
            raise ValueError(f"{item!r} is not [COUNTx]MEMORYGB[:NAME], e.g. 2x24GB or 80GB:NVIDIA H100")
        count, memory = int(match.group(1) or 1), float(match.group(2))
        if count < 1 or not 1 <= memory <= 4096:
            raise ValueError(f"{item!r}: count must be at least 1 and memory 1-4096 GB")
        if len(gpus) + count > MAX_FAKE_GPUS:
            raise ValueError(f"at most {MAX_FAKE_GPUS} fake GPUs")
        name = (match.group(3) or f"Fake GPU {match.group(2)}GB").strip()[:96]
        gpus.extend([(memory, name)] * count)
    return gpus


class FakeNvmlError(Exception):
    pass


class _Memory:
    def __init__(self, total: int, used: int) -> None:
        self.total, self.used, self.free = total, used, total - used


class _Utilization:
    def __init__(self, gpu: int, memory: int) -> None:
        self.gpu, self.memory = gpu, memory


class _Pci:
    def __init__(self, bus_id: str) -> None:
        self.busId = bus_id


class FakeNvml:
    """The subset of the ``pynvml`` API that GpuReader calls, answering for configured GPUs.

    Like a consumer card, it does not support ECC or row remapping (it raises NotSupported).
    """

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def __init__(self, gpus: list[tuple[float, str]]) -> None:
        self.gpus = gpus
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "fake"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise FakeNvmlError("Invalid Argument")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        digest = hashlib.sha1(f"{handle}:{self.gpus[handle]}".encode()).hexdigest()
        return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle][1].encode()  # older pynvml versions return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        total = int(self.gpus[handle][0] * GIB)
        return _Memory(total, min(total, 512 * 1024**2))

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return (8, 9)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Utilization:
        return _Utilization(0, 0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 35

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 30_000

    def nvmlDeviceGetPciInfo(self, handle: int) -> _Pci:
        return _Pci(f"00000000:{handle + 1:02X}:00.0")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return 0x1  # idle

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int) -> int:
        raise FakeNvmlError("Not Supported")

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        raise FakeNvmlError("Not Supported")

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        raise FakeNvmlError("Not Supported")


# --- reading ------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuReader:
    """An open NVML session (real or fake): read every GPU at start, one GPU per heartbeat."""

    def __init__(self, nvml: Any, source: str) -> None:
        self.nvml = nvml
        self.source = source
        # Slots read their GPUs from worker threads; one lock per GPU, so that a GPU whose reads
        # hang (fallen off the bus) holds up only its own slot.
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()
        self._handles: dict[int, Any] = {}
        nvml.nvmlInit()
        self.open = True

    def close(self) -> None:
        with self._guard:
            if self.open:
                self.open = False
                self.nvml.nvmlShutdown()

    def _lock_of(self, index: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(index, threading.Lock())

    def _optional(self, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except self.nvml.NVMLError:  # NotSupported, NoPermission, ... on this GPU
            return None

    def driver(self) -> tuple[str, str]:
        cuda = int(self.nvml.nvmlSystemGetCudaDriverVersion())
        return _text(self.nvml.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{(cuda % 1000) // 10}"

    def count(self) -> int:
        return int(self.nvml.nvmlDeviceGetCount())

    def read(self, index: int) -> Gpu:
        """One GPU now. Raises the NVML error when the GPU cannot be read at all."""
        nvml = self.nvml
        lock = self._lock_of(index)
        if not lock.acquire(timeout=READ_TIMEOUT_S):
            raise TimeoutError(f"an earlier read of GPU {index} is still hanging")
        try:
            if not self.open:
                raise RuntimeError("the NVML session is closed")
            handle = self._handles.get(index)
            if handle is None:
                handle = self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            cc = self._optional(lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
            util = self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            temp = self._optional(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            power = self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            pci = self._optional(lambda: nvml.nvmlDeviceGetPciInfo(handle))
            reasons = self._optional(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
            ecc = self._optional(lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))
            retired = self._optional(lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
            remap = self._optional(lambda: nvml.nvmlDeviceGetRemappedRows(handle))
            return Gpu(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_total_gb=round(memory.total / GIB, 2),
                memory_free_gb=round(memory.free / GIB, 2),
                compute_capability=f"{cc[0]}.{cc[1]}" if cc else "",
                utilization_pct=float(util.gpu) if util is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=round(power / 1000, 1) if power is not None else None,
                pci_bus_id=_text(pci.busId) if pci is not None else "",
                ecc_uncorrected=int(ecc) if ecc is not None else None,
                retired_pages_pending=bool(retired) if retired is not None else None,
                remapped_rows_pending=bool(remap[2]) if remap is not None else None,
                remap_failure=bool(remap[3]) if remap is not None else None,
                slowdowns=tuple(n for bit, n in _SLOWDOWNS.items() if reasons and reasons & bit),
            )
        finally:
            lock.release()


def open_reader(fake_gpus: str = "") -> tuple[GpuReader | None, str]:
    """The GPU reader for this machine (or for EMP_FAKE_GPUS), or (None, why there is none)."""
    if fake_gpus:
        try:
            return GpuReader(FakeNvml(parse_fake_gpus(fake_gpus)), "fake"), ""
        except ValueError as exc:
            raise ConfigError(f"EMP_FAKE_GPUS={fake_gpus!r}: {exc}") from None
    try:
        import pynvml

        return GpuReader(pynvml, "nvml"), ""
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, OSError, ...
        return None, f"{type(exc).__name__}: {exc}"


def discover_with(reader: GpuReader | None, error: str = "") -> Hardware:
    """The machine now, GPUs from `reader`. Never raises for a broken GPU stack."""
    gpus: list[Gpu] = []
    driver = cuda = ""
    if reader is not None:
        try:
            driver, cuda = reader.driver()
            count = reader.count()
        except Exception as exc:
            count, error = 0, f"{type(exc).__name__}: {exc}"
        for index in range(count):  # one bad GPU must not hide the others
            try:
                gpus.append(reader.read(index))
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                log.error("GPU %d cannot be read (%s); its slot takes no jobs until it can", index, why)
                gpus.append(Gpu.unreadable(index, why))
    if error or not gpus:
        why = error or "NVML found no GPU"
        log.info("no NVIDIA GPU available (%s); advertising a CPU-only worker", why)
        error = why
    disk = psutil.disk_usage(os.getcwd())
    return Hardware(
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_gb=round(psutil.virtual_memory().total / GIB, 2),
        disk_free_gb=round(disk.free / GIB, 2),
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
        gpus=gpus,
        driver_version=driver,
        cuda_version=cuda,
        gpu_source=reader.source if reader is not None and gpus else "none",
        gpu_error=error if not gpus else "",
    )


def discover(fake_gpus: str = "") -> Hardware:
    """Read the machine once (the `emp-worker hardware` command)."""
    reader, error = open_reader(fake_gpus)
    try:
        return discover_with(reader, error)
    finally:
        if reader is not None:
            reader.close()


def hardware_capabilities(hw: Hardware, gpu: Gpu | None) -> dict[str, Any]:
    """emp-job-queue's `hardware` capability block for a worker slot (one GPU or none)."""
    return {
        "gpu_memory_gb": gpu.memory_total_gb if gpu else 0,
        "gpu_model": gpu.name if gpu else "",
        "ram_gb": hw.ram_gb,
        "cpu_cores": hw.cpu_cores,
    }

