"""Hardware discovery: the NVML mapping, fed by a fake NVML, and the degraded paths."""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Any, NoReturn

import pytest

from tests.conftest import WorkerFactory, wait_until
from tests.worker.test_cli import _cli
from worker.client import Client
from worker.errors import ConfigError
from worker.hardware import (
    FakeNvml,
    FakeNvmlError,
    GpuReader,
    discover_with,
    hardware_capabilities,
    open_reader,
    parse_fake_gpus,
)
from worker.keys import Keys
from worker.queue import Queue, QueueConfig


@pytest.mark.parametrize(("spec", "expected"), [
    ("2x24GB", [(24.0, "Fake GPU 24GB")] * 2),
    ("24GB,80GB", [(24.0, "Fake GPU 24GB"), (80.0, "Fake GPU 80GB")]),
    ("1x80GB:NVIDIA H100 80GB HBM3", [(80.0, "NVIDIA H100 80GB HBM3")]),
    ("12.5g", [(12.5, "Fake GPU 12.5GB")]),
])
def test_fake_gpu_specs(spec: str, expected: list[tuple[float, str]]) -> None:
    assert parse_fake_gpus(spec) == expected


@pytest.mark.parametrize("spec", ["", "x24GB", "2x", "24TB", "0x24GB", "2x0GB", "100x24GB", "24GB,,8GB",
                                  "99999999999999x24GB", "60x8GB,8x8GB"])
def test_bad_fake_gpu_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fake_gpus(spec)


def test_fake_nvml_goes_through_the_nvml_mapping() -> None:
    reader = GpuReader(FakeNvml(parse_fake_gpus("24GB,80GB:NVIDIA H100")), "fake")
    hw = discover_with(reader)
    reader.close()
    assert hw.gpu_source == "fake" and hw.gpu_error == ""
    assert [g.index for g in hw.gpus] == [0, 1]
    small, big = hw.gpus
    assert (small.memory_total_gb, big.memory_total_gb) == (24.0, 80.0)
    assert big.name == "NVIDIA H100" and small.name == "Fake GPU 24GB"  # bytes names decoded
    assert small.uuid.startswith("GPU-") and small.uuid != big.uuid
    assert 0 < small.memory_free_gb < small.memory_total_gb
    assert small.compute_capability == "8.9" and hw.cuda_version == "12.4"
    # unsupported readings are empty, not errors, and do not make the GPU unhealthy
    assert small.ecc_uncorrected is None and small.remap_failure is None
    assert small.to_dict()["healthy"] is True
    assert hardware_capabilities(hw, big)["gpu_memory_gb"] == 80.0
    assert hardware_capabilities(hw, None)["gpu_memory_gb"] == 0
    assert hw.cpu_cores >= 1 and hw.ram_gb > 0


class _BrokenNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise FakeNvmlError("Driver Not Loaded")


class _LostGpu(FakeNvml):
    def nvmlDeviceGetMemoryInfo(self, handle: int) -> NoReturn:
        raise FakeNvmlError("GPU is lost")


class _FailingGpu(FakeNvml):
    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        return 1

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int) -> int:
        return 3

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return 0x40 | 0x1


def test_a_broken_driver_gives_a_cpu_only_inventory_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FakeNvmlError):
        GpuReader(_BrokenNvml([(24.0, "x")]), "fake")  # open_reader catches this for real NVML
    caplog.set_level(logging.INFO, logger="worker.hardware")
    hw = discover_with(None, "NVMLError_DriverNotLoaded: Driver Not Loaded")
    assert hw.gpus == [] and hw.gpu_source == "none" and "Driver Not Loaded" in hw.gpu_error
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.hardware"]
    assert len(lines) == 1 and "CPU-only" in lines[0]


def test_a_gpu_that_cannot_be_read_degrades_instead_of_crashing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.hardware")
    reader = GpuReader(_LostGpu([(24.0, "x")]), "fake")
    hw = discover_with(reader)
    (gpu,) = hw.gpus  # the slot exists, and takes no jobs while its GPU cannot be read
    assert "GPU is lost" in gpu.read_error and gpu.problems and gpu.memory_total_gb == 0
    assert len([r for r in caplog.records if r.name == "worker.hardware"]) == 1


class _OneLost(FakeNvml):
    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if handle == 2:
            raise FakeNvmlError("GPU is lost")
        return super().nvmlDeviceGetMemoryInfo(handle)


def test_one_unreadable_gpu_does_not_hide_the_others() -> None:
    hw = discover_with(GpuReader(_OneLost(parse_fake_gpus("4x24GB")), "fake"))
    assert [bool(g.problems) for g in hw.gpus] == [False, False, True, False]
    assert [g.memory_total_gb for g in hw.gpus] == [24.0, 24.0, 0.0, 24.0]


def test_health_signals_are_mapped() -> None:
    reader = GpuReader(_FailingGpu([(80.0, "x")]), "fake")
    gpu = reader.read(0)
    assert gpu.retired_pages_pending is True and gpu.ecc_uncorrected == 3
    assert gpu.slowdowns == ("hw_thermal",)
    assert gpu.problems and "reset" in gpu.problems[0]
    assert any("ECC" in w for w in gpu.warnings)
    assert gpu.to_dict()["healthy"] is False


def test_real_nvml_absent_here_is_reported_not_raised() -> None:
    reader, error = open_reader("")
    if reader is not None:  # a machine with a driver: the real reader works
        assert reader.count() >= 0
        reader.close()
    else:
        assert error


def test_bad_fake_spec_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="EMP_FAKE_GPUS='3xfoo'"):
        open_reader("3xfoo")


async def test_hardware_command_prints_json() -> None:
    code, out, _ = await _cli("hardware", "--json", EMP_FAKE_GPUS="24GB,80GB")
    assert code == 0
    data = json.loads(out)
    assert [g["memory_total_gb"] for g in data["gpus"]] == [24.0, 80.0]
    assert data["gpu_source"] == "fake" and data["cpu_cores"] >= 1
    code, _, err = await _cli("hardware", EMP_FAKE_GPUS="lots")
    assert code == 2 and "EMP_FAKE_GPUS='lots'" in err and len(err.strip().splitlines()) == 1


async def test_an_unhealthy_gpu_stops_its_slot_claiming_until_it_recovers(
    client: Client, keys: Keys, start_worker: WorkerFactory
) -> None:
    nvml = _Switchable([(80.0, "x")])
    reader = GpuReader(nvml, "fake")
    try:
        worker = await start_worker("gpu-slot", hardware={"gpu_memory_gb": 80}, gpu=reader.read(0),
                                    gpu_probe=functools.partial(reader.read, 0))
        nvml.broken = True
        await wait_until(lambda: worker.gpu_problem != "", within_s=10)
        job_id = await client.submit("simulation", {"duration_s": 0})

        async def advertised_unhealthy() -> bool:
            record = json.loads((await client.redis.hgetall(keys.worker("gpu-slot")))["capabilities"])
            return record["gpus"][0]["healthy"] is False

        await wait_until(advertised_unhealthy, within_s=10)
        beats: set[str] = set()

        async def two_more_beats() -> bool:  # the slot beat, yet did not claim (nor wait for the job's token)
            beats.add(await client.redis.hget(keys.worker("gpu-slot"), "last_heartbeat") or "")
            return len(beats) >= 3

        await wait_until(two_more_beats, within_s=10)
        assert (await client.get(job_id))["status"] == "pending"
        nvml.broken = False
        await wait_until(lambda: _completed(client, job_id), within_s=15)
    finally:
        reader.close()


class _Switchable(FakeNvml):
    broken = False

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        return (0, 2, 1, 0) if self.broken else (0, 0, 0, 0)


async def _completed(client: Client, job_id: str) -> bool:
    return (await client.get(job_id)).get("status") == "completed"


def test_the_fake_answers_the_same_calls_as_pynvml() -> None:
    """Every call GpuReader makes on the fake exists in pynvml with the same parameters."""
    import inspect

    import pynvml

    for name, method in inspect.getmembers(FakeNvml, inspect.isfunction):
        if not name.startswith("nvml"):
            continue
        real = getattr(pynvml, name, None)
        assert real is not None, f"pynvml has no {name}"
        fake_params = list(inspect.signature(method).parameters)[1:]  # without self
        required = [p for p in inspect.signature(real).parameters.values() if p.default is inspect.Parameter.empty]
        assert len(required) == len(fake_params), name
    for constant in ("NVML_TEMPERATURE_GPU", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC"):
        assert getattr(pynvml, constant) == getattr(FakeNvml, constant)
    assert issubclass(pynvml.NVMLError, Exception)


class _Hangs(FakeNvml):
    """GPU 1's memory read blocks until released (a GPU fallen off the bus)."""

    def __init__(self, gpus: list[tuple[float, str]]) -> None:
        super().__init__(gpus)
        self.hang = False
        self.release = threading.Event()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if handle == 1 and self.hang:
            self.release.wait(30)
        return super().nvmlDeviceGetMemoryInfo(handle)


async def test_a_hung_gpu_read_costs_no_other_slot_its_lease(
    client: Client, keys: Keys, start_worker: WorkerFactory
) -> None:
    nvml = _Hangs(parse_fake_gpus("2x24GB"))
    reader = GpuReader(nvml, "fake")
    try:
        slots = [await start_worker(f"s{i}", hardware={"gpu_memory_gb": 24}, gpu=reader.read(i),
                                    gpu_probe=functools.partial(reader.read, i), lease_s=2.0)
                 for i in (0, 1)]
        nvml.hang = True
        await wait_until(lambda: slots[1].gpu_problem != "", within_s=10)
        job_id = await client.submit("simulation", {"duration_s": 5, "steps": 5})  # outlives 2 leases
        reaper = Queue(client.redis, keys, QueueConfig(reap_period_ms=50))

        async def completed_while_reaping() -> bool:  # a live peer reaps any lease s0 lets lapse
            await reaper.heartbeat("peer", "idle", {}, 5, {})
            return await _completed(client, job_id)

        await wait_until(completed_while_reaping, within_s=20, interval=0.1)
        job = await client.get(job_id)
        assert job["worker_id"] == "s0" and job["attempt"] == "1" and job["retry_count"] == "0"
    finally:
        nvml.release.set()
        reader.close()
