"""The plugin's own tests, written only against the test kit."""

from __future__ import annotations

import asyncio

import pytest
from emp_echo import EchoConnector

from connectors import JobCancelled, PermanentJobError, StopReason
from connectors.testing import FakeJobContext, WorkerFactory, make_connector, make_job, run_job


async def test_echo_returns_its_text_greeting_and_output() -> None:
    connector = make_connector(EchoConnector, env={"EMP_ECHO_GREETING": "hi"})
    result, ctx = await run_job(connector, make_job("echo", {"text": "ping"}))
    assert result == {"text": "ping", "greeting": "hi"}
    assert ctx.updates[-1].progress == 50 and ctx.updates[-1].eta_s == 0.0
    [output] = ctx.outputs
    assert (output.name, output.data, output.content_type) == ("echo.txt", b"ping", "text/plain")


async def test_a_payload_without_text_is_a_permanent_error() -> None:
    with pytest.raises(PermanentJobError, match="'text'"):
        await run_job(make_connector(EchoConnector), make_job("echo", {}))


async def test_a_cancelled_job_stops_in_the_engine_work_and_hands_over_nothing() -> None:
    connector = make_connector(EchoConnector, env={"EMP_ECHO_DELAY_S": "30"})
    job = make_job("echo", {"text": "ping"})
    ctx = FakeJobContext(job)
    async with asyncio.timeout(10):  # a connector that ignored the cancel would run its 30 s
        with pytest.raises(JobCancelled):
            await run_job(connector, job, ctx, cancel_after=lambda c: bool(c.updates))
    assert ctx.stop_reason is StopReason.CANCELLED and ctx.outputs == []


async def test_echo_through_a_real_worker(emp_worker: WorkerFactory) -> None:
    async with emp_worker("echo") as worker:
        job = await worker.run_job("echo", {"text": "hello"})
    assert job["status"] == "completed" and '"text": "hello"' in job["result"]
