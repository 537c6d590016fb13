"""The connector API through a real worker and Redis: interrupt before cancel with its reason,
ETA and structured progress, outputs, per-connector concurrency and the models TTL."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from connectors import Connector, Job, JobContext, JobResult, StopReason, hookimpl
from tests.conftest import WorkerFactory, wait_until
from worker.client import Client
from worker.protocol import parse_time


class Interruptible(Connector):
    """An engine that works until told to stop; records each interrupt and whether run() was
    still running (not yet cancelled) when it came."""

    name = "interruptible"
    service_types = ("interruptible",)
    interrupts: ClassVar[list[tuple[str, StopReason, bool]]] = []

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.stopped: dict[str, asyncio.Event] = {}

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        self.tasks[job.id] = asyncio.current_task()  # type: ignore[assignment]
        self.stopped[job.id] = asyncio.Event()
        ctx.progress(10, "working", eta_s=30, data={"node": "12"})
        await self.stopped[job.id].wait()  # the engine's work, until interrupted
        return {"partial": True}  # what an interrupted engine still returns

    async def interrupt(self, job: Job, reason: StopReason) -> None:
        task = self.tasks.get(job.id)
        Interruptible.interrupts.append((job.id, reason, task is not None and not task.cancelling()))
        self.stopped[job.id].set()


class Solo(Connector):
    """One job at a time; counts how many of its jobs ever ran together."""

    name = "solo"
    service_types = ("solo",)
    max_concurrent_jobs = 1
    now: ClassVar[int] = 0
    most: ClassVar[int] = 0
    release: ClassVar[asyncio.Event | None] = None

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        Solo.now += 1
        Solo.most = max(Solo.most, Solo.now)
        try:
            assert Solo.release is not None
            await Solo.release.wait()  # held until the test has seen a simulation job run beside it
        finally:
            Solo.now -= 1
        return {}


class Outputs(Connector):
    name = "outputs"
    service_types = ("outputs",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        ctx.add_output("note.txt", b"small note", content_type="text/plain")
        big = Path(job.payload["big_path"])
        ctx.add_output("big.bin", path=big, content_type="application/octet-stream")
        return {"seed": 7}


class Counting(Connector):
    name = "counting"
    service_types = ("counting",)
    health_calls: ClassVar[int] = 0
    model_calls: ClassVar[int] = 0

    async def health(self) -> Any:
        Counting.health_calls += 1
        return await super().health()

    async def models(self) -> dict[str, list[str]]:
        Counting.model_calls += 1
        return {"counting": ["m1"]}

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {}


class ApiPlugin:
    @hookimpl
    def emp_connectors(self) -> Sequence[type[Any]]:
        return [Interruptible, Solo, Outputs, Counting]


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def _is(client: Client, job_id: str, *statuses: str) -> bool:
    return await _status(client, job_id) in statuses


@pytest.mark.parametrize(("how", "reason", "final"), [
    ("cancel", StopReason.CANCELLED, "cancelled"),
    ("timeout", StopReason.TIMEOUT, "failed"),
    ("drain", StopReason.DRAIN, "pending"),
])
async def test_interrupt_comes_before_cancel_with_its_reason(
    client: Client, start_worker: WorkerFactory, how: str, reason: StopReason, final: str
) -> None:
    Interruptible.interrupts.clear()
    worker = await start_worker("int", connectors="interruptible", plugins=[ApiPlugin()], grace_period_s=0.2)
    payload: dict[str, Any] = {"timeout_seconds": 1} if how == "timeout" else {}
    job_id = await client.submit("interruptible", payload, max_retries=0)
    await wait_until(lambda: _is(client, job_id, "in_progress"))
    if how == "cancel":
        await client.cancel(job_id)
    elif how == "drain":
        worker.request_stop()
    await wait_until(lambda: bool(Interruptible.interrupts) and not worker.running, within_s=20)
    assert Interruptible.interrupts == [(job_id, reason, True)]
    await wait_until(lambda: _is(client, job_id, final), within_s=10)
    job = await client.get(job_id)
    assert "result" not in job or not json.loads(job["result"] or "{}").get("partial")  # never a success
    if how == "timeout":
        assert "timed out" in job["error"]


async def test_progress_carries_eta_and_structured_data(client: Client, start_worker: WorkerFactory) -> None:
    Interruptible.interrupts.clear()
    await start_worker("eta", connectors="interruptible", plugins=[ApiPlugin()])
    before = dt.datetime.now(dt.UTC)
    job_id = await client.submit("interruptible", {})
    await wait_until(lambda: _has_progress(client, job_id))
    [event] = [e for e in await client.events(job_id) if e.kind == "progress"]
    eta = parse_time(event.data["estimated_completion"])
    assert eta is not None and before + dt.timedelta(seconds=29) <= eta <= before + dt.timedelta(seconds=40)
    assert event.data["data"] == {"node": "12"} and "preview" not in event.data
    await client.cancel(job_id)


async def _has_progress(client: Client, job_id: str) -> bool:
    return any(e.kind == "progress" for e in await client.events(job_id))


async def test_a_connector_limit_is_per_connector_not_per_slot(client: Client, start_worker: WorkerFactory) -> None:
    Solo.now = Solo.most = 0
    Solo.release = asyncio.Event()
    await start_worker("mixed", connectors="solo,simulation", plugins=[ApiPlugin()], max_concurrent_jobs=3)
    solos = [await client.submit("solo", {}, priority=90) for _ in range(2)]
    await wait_until(lambda: Solo.now == 1)
    sim = await client.submit("simulation", {"duration_s": 0})
    await wait_until(lambda: _is(client, sim, "completed"))  # ran beside the solo job
    assert await _is(client, solos[1], "pending")  # the second solo waits for the first
    Solo.release.set()
    for job_id in solos:
        await wait_until(functools.partial(_is, client, job_id, "completed"))
    assert Solo.most == 1


async def test_outputs_inline_when_small_and_stored_when_large(
    client: Client, start_worker: WorkerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    store = tmp_path / "store"
    monkeypatch.setenv("EMP_OUTPUT_DIR", str(store))
    monkeypatch.setenv("EMP_OUTPUT_BASE_URL", "https://cdn.example/out")
    await start_worker("out", connectors="outputs", plugins=[ApiPlugin()])
    job_id = await client.submit("outputs", {"big_path": str(big)})
    await wait_until(lambda: _is(client, job_id, "completed", "failed"))
    job = await client.get(job_id)
    result = json.loads(job["result"])
    small, large = result["outputs"]
    assert result["seed"] == 7
    assert small == {"name": "note.txt", "size_bytes": 10, "content_type": "text/plain", "text": "small note"}
    name = f"{job_id}/001-big.bin"
    assert large == {"name": "big.bin", "size_bytes": 256 * 1024, "content_type": "application/octet-stream",
                     "url": f"https://cdn.example/out/{name}"}
    assert (store / name).read_bytes() == big.read_bytes()
    assert len(job["result"]) < 4096  # the large output is not in Redis


async def test_a_job_naming_a_store_this_worker_lacks_fails_clearly(
    client: Client, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100_000)
    await start_worker("nostore", connectors="outputs", plugins=[ApiPlugin()])
    job_id = await client.submit("outputs", {"big_path": str(big)}, ctx={"storage": {"provider": "gcs"}})
    await wait_until(lambda: _is(client, job_id, "failed"))
    job = await client.get(job_id)
    assert "ctx.storage.provider 'gcs' is not an output store on this worker" in job["error"]
    assert job["attempt"] == "1"


async def test_models_are_listed_once_per_ttl_not_every_beat(client: Client, start_worker: WorkerFactory) -> None:
    Counting.health_calls = Counting.model_calls = 0
    await start_worker("ttl", connectors="counting", plugins=[ApiPlugin()], models_ttl_s=60)
    await wait_until(lambda: Counting.health_calls >= 6, within_s=20)  # several refresh turns
    assert Counting.model_calls == 1
    job_id = await client.submit("counting", {}, requirements={"models": ["m1"]})
    await wait_until(lambda: _is(client, job_id, "completed"))
