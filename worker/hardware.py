"""What this machine has: GPUs through NVML, the rest through psutil.

No driver, no GPU or an NVML error degrades to a CPU-only inventory with one log line.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)
GIB = 1024**3


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


@dataclass(frozen=True)
class Hardware:
    cpu_cores: int
    ram_gb: float
    disk_free_gb: float
    os: str
    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str = ""
    cuda_version: str = ""
    gpu_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml_gpus() -> tuple[list[Gpu], str, str]:
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = str(pynvml.nvmlSystemGetDriverVersion())
        cuda_raw = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            gpus.append(Gpu(
                index=index,
                uuid=str(pynvml.nvmlDeviceGetUUID(handle)),
                name=str(pynvml.nvmlDeviceGetName(handle)),
                memory_total_gb=round(memory.total / GIB, 2),
                memory_free_gb=round(memory.free / GIB, 2),
                compute_capability=f"{major}.{minor}",
                utilization_pct=float(util.gpu),
                temperature_c=float(temp),
            ))
        return gpus, driver, cuda
    finally:
        pynvml.nvmlShutdown()


def discover() -> Hardware:
    """Read the machine now. Never raises for a missing or broken GPU stack."""
    gpus: list[Gpu] = []
    driver = cuda = error = ""
    try:
        gpus, driver, cuda = _nvml_gpus()
    except Exception as exc:  # pynvml raises NVMLError subclasses and OSError when no driver
        error = f"{type(exc).__name__}: {exc}"
        log.info("no NVIDIA GPU available (%s); advertising a CPU-only worker", error)
    disk = psutil.disk_usage(os.getcwd())
    return Hardware(
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_gb=round(psutil.virtual_memory().total / GIB, 2),
        disk_free_gb=round(disk.free / GIB, 2),
        os=f"{platform.system()} {platform.release()}",
        gpus=gpus,
        driver_version=driver,
        cuda_version=cuda,
        gpu_error=error,
    )


def hardware_capabilities(hw: Hardware, gpu: Gpu | None) -> dict[str, Any]:
    """emp-job-queue's `hardware` capability block for a worker slot (one GPU or none)."""
    return {
        "gpu_memory_gb": gpu.memory_total_gb if gpu else 0,
        "gpu_model": gpu.name if gpu else "",
        "ram_gb": hw.ram_gb,
        "cpu_cores": hw.cpu_cores,
    }
