"""Plugins that misbehave in the ways real ones do (a wrong Health, a set in a capability, bytes
in a result, NaN in progress, swallowed cancellation, their own CancelledError) cost no job and
no loop. Found in review; each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import pytest

from connectors import Connector, Health, HealthState, Job, JobContext, JobResult, hookimpl
from tests.conftest import WorkerFactory, wait_until
from worker.client import Client
from worker.guard import PluginFailed, guard


class BadHealth(Connector):
    name = "badhealth"
    service_types = ("badhealth",)
    bad = False

    async def health(self) -> Health:
        if BadHealth.bad:
            return Health("degraded", "string state")  # type: ignore[arg-type]
        return Health(HealthState.OK)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        await asyncio.sleep(float(job.payload.get("duration_s", 0)))  # the job's work
        return {"ok": True}


class Bytes(Connector):
    name = "bytesresult"
    service_types = ("bytesresult",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {"image": b"\x89PNG"}


class NanProgress(Connector):
    name = "nanprogress"
    service_types = ("nanprogress",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        ctx.progress(50, "half", data={"loss": float("nan")})
        await asyncio.sleep(0.3)  # the job's work
        return {"ok": True}


class Stubborn(Connector):
    """Ignores cancellation (e.g. awaits a shielded engine call)."""
    name = "stubborn"
    service_types = ("stubborn",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        end = time.monotonic() + float(job.payload["duration_s"])
        while time.monotonic() < end:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        return {"ok": True}


class SlowLoaded(Connector):
    """Finishes its job, then is slow to say what it has loaded (the window before the outcome)."""

    name = "slowloaded"
    service_types = ("slowloaded",)
    finished = False
    in_window = False

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        SlowLoaded.finished = True
        return {"ok": True}

    async def loaded_models(self) -> list[str]:
        if SlowLoaded.finished:
            SlowLoaded.in_window = True
            await asyncio.sleep(0.9)  # the slow engine call itself
        return []


class CancelHealth(Connector):
    name = "cancelhealth"
    service_types = ("cancelhealth",)
    mode = "ok"

    async def health(self) -> Health:
        if CancelHealth.mode == "cancel":
            CancelHealth.mode = "down"
            raise asyncio.CancelledError()  # e.g. a client library's internal timeout
        if CancelHealth.mode == "down":
            return Health(HealthState.DOWN, "engine gone")
        return Health(HealthState.OK)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {"ok": True}


class P:
    @hookimpl
    def emp_connectors(self) -> Sequence[type[Any]]:
        return [BadHealth, Bytes, NanProgress, Stubborn, SlowLoaded, CancelHealth]


class SetCaps:
    @hookimpl
    def emp_capabilities(self, worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any] | None:
        return {"features": {"nvenc", "fp8"}}  # a set: not JSON



async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def _final(client: Client, job_id: str) -> bool:
    return await _status(client, job_id) in ("completed", "failed")


async def _problem(client: Client, worker_id: str, text: str) -> bool:
    return any(text in p for w in await client.workers() if w.worker_id == worker_id for p in w.problems)


@pytest.mark.timeout(60)
async def test_a_wrong_health_value_never_costs_a_lease(client: Client, start_worker: WorkerFactory) -> None:
    BadHealth.bad = False
    w = await start_worker("bh", connectors="badhealth", plugins=[P()], lease_s=2.0, heartbeat_interval_s=0.3)
    await start_worker("peer", lease_s=2.0, heartbeat_interval_s=0.3)  # its reaper would requeue the job
    job_id = await client.submit("badhealth", {"duration_s": 6})
    await wait_until(lambda: job_id in w.running, within_s=10)
    BadHealth.bad = True
    await wait_until(lambda: _problem(client, "bh", "not a Health with a HealthState"), within_s=10)
    await wait_until(lambda: _final(client, job_id), within_s=30)
    job = await client.get(job_id)
    assert job["status"] == "completed" and job["attempt"] == "1" and job["retry_count"] == "0", job


async def test_a_capability_that_is_not_json_is_skipped(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("sc", plugins=[SetCaps()], heartbeat_interval_s=0.3)
    job_id = await client.submit("simulation", {"duration_s": 0})
    await wait_until(lambda: _final(client, job_id), within_s=15)
    assert await _status(client, job_id) == "completed"
    await wait_until(lambda: _problem(client, "sc", "emp_capabilities returned a value that is not JSON"))


async def test_a_result_that_is_not_json_fails_the_job_at_once(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("br", connectors="bytesresult", plugins=[P()])
    job_id = await client.submit("bytesresult", {})
    await wait_until(lambda: _final(client, job_id), within_s=15)  # not left to a lease expiry
    job = await client.get(job_id)
    assert job["status"] == "failed" and "result is not JSON" in job["error"] and job["attempt"] == "1"


async def test_nan_in_progress_data_is_dropped_and_the_job_completes(
    client: Client, start_worker: WorkerFactory
) -> None:
    await start_worker("np", connectors="nanprogress", plugins=[P()])
    job_id = await client.submit("nanprogress", {})
    await wait_until(lambda: _final(client, job_id), within_s=15)
    assert await _status(client, job_id) == "completed"


async def test_guard_bounds_a_coroutine_that_swallows_its_cancellation() -> None:
    async def stubborn() -> None:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)  # the stubborn plugin's own loop

    started = time.monotonic()
    with pytest.raises(PluginFailed, match=r"took over 0\.2s"):
        await guard("x", "interrupt()", stubborn(), 0.2)
    assert time.monotonic() - started < 1.0


@pytest.mark.timeout(60)
async def test_a_drained_job_whose_connector_ignores_cancel_is_handed_back(
    client: Client, start_worker: WorkerFactory
) -> None:
    w = await start_worker("st", connectors="stubborn", plugins=[P()], grace_period_s=0.5)
    job_id = await client.submit("stubborn", {"duration_s": 30})
    await wait_until(lambda: job_id in w.running, within_s=10)
    w.request_stop()
    await wait_until(lambda: w.state.value == "stopped", within_s=40)
    job = await client.get(job_id)
    assert job["status"] == "pending" and job["retry_count"] == "0", job


async def test_a_drain_after_the_run_finished_keeps_the_result(client: Client, start_worker: WorkerFactory) -> None:
    SlowLoaded.finished = SlowLoaded.in_window = False
    w = await start_worker("sl", connectors="slowloaded", plugins=[P()])
    job_id = await client.submit("slowloaded", {})
    await wait_until(lambda: SlowLoaded.in_window, within_s=10)  # run() returned; outcome not yet recorded
    w.request_stop()
    w.request_stop()  # fast stop
    await wait_until(lambda: w.state.value == "stopped", within_s=20)
    assert await _status(client, job_id) == "completed"


async def test_a_plugins_own_cancelled_error_does_not_end_the_refresh_loop(
    client: Client, start_worker: WorkerFactory
) -> None:
    CancelHealth.mode = "ok"
    w = await start_worker("ch", connectors="cancelhealth", plugins=[P()], heartbeat_interval_s=0.2)
    [engine] = w.engines
    CancelHealth.mode = "cancel"  # one CancelledError, then DOWN: the loop must live to see it
    await wait_until(lambda: not engine.can_claim and CancelHealth.mode == "down"
                     and engine.health.message == "engine gone", within_s=10)
