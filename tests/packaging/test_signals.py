"""Stop signals as supervisors send them, to a real worker process: the same signal twice at once
(a group signal that also reaches a one-file binary's bootloader, which forwards it) is one stop
and the drain lets the job finish; a second signal a while later skips the drain."""

from __future__ import annotations

import asyncio
import signal

from tests.conftest import wait_until
from tests.procs import WorkerProcess
from worker.client import Client
from worker.keys import Keys


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def _running(client: Client, proc: WorkerProcess) -> str:
    job_id = await client.submit("simulation", {"duration_s": 3, "steps": 30})
    await wait_until(lambda: _is(client, job_id, "in_progress"), within_s=20)
    return job_id


async def _is(client: Client, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


async def _exit_code(proc: WorkerProcess, within_s: float) -> int:
    """The process's exit code; a process still running after `within_s` fails the test with its log."""
    try:
        return await proc.wait(within_s)
    except TimeoutError:
        raise AssertionError(f"still running after {within_s:.0f}s; its output:\n{proc.output()[-6000:]}") from None


async def test_a_doubled_signal_is_one_stop(client: Client, redis_url: str, keys: Keys) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "doubled", EMP_GRACE_PERIOD_S="30") as proc:
        job_id = await _running(client, proc)
        proc.signal(signal.SIGTERM)
        proc.signal(signal.SIGINT)  # the copy: another stop signal within the second
        assert await _exit_code(proc, 30) == 0, proc.output()
        assert "second stop signal" not in proc.output()
    assert await _status(client, job_id) == "completed"


async def test_a_later_second_signal_skips_the_drain(client: Client, redis_url: str, keys: Keys) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "impatient", EMP_GRACE_PERIOD_S="30") as proc:
        job_id = await _running(client, proc)
        proc.signal(signal.SIGTERM)
        await asyncio.sleep(1.3)  # the operator's pause before pressing Ctrl-C again (over StopSignals.ECHO_S)
        proc.signal(signal.SIGTERM)
        assert await _exit_code(proc, 30) == 0, proc.output()
        assert "second stop signal" in proc.output()
    job = await client.get(job_id)
    assert job["status"] == "pending" and job["retry_count"] == "0"  # handed back at once, not finished
