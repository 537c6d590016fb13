"""Cancellation, graceful drain and Redis restarts, with real worker processes where it matters."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import WorkerFactory, wait_until
from tests.procs import WorkerProcess
from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.errors import StaleJob
from worker.keys import Keys


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def test_cancelling_a_running_job_stops_it_and_records_cancelled(
    client: Client, start_worker: WorkerFactory
) -> None:
    worker = await start_worker()
    job_id = await client.submit("simulation", {"duration_s": 60, "steps": 600})
    await wait_until(lambda: _is(client, job_id, "in_progress"))
    attempt = int((await client.get(job_id))["attempt"])

    assert await client.cancel(job_id) == "in_progress"
    await wait_until(lambda: not worker.running, within_s=5)  # the connector's work stopped
    job = await client.get(job_id)
    assert job["status"] == "cancelled"
    with pytest.raises(StaleJob):  # a late completion of that attempt cannot overwrite it
        await worker.queue.complete(job_id, worker.worker_id, attempt, "{}")
    assert await _status(client, job_id) == "cancelled"
    assert await client.redis.zscore(client.keys.pending, job_id) is None  # never retried
    assert await client.redis.zscore(client.keys.delayed, job_id) is None
    kinds = [e.kind for e in await client.events(job_id)]
    assert "completed" not in kinds and kinds[-1] == "cancelled"


async def _is(client: Client, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


async def test_cancelling_a_pending_job_removes_it(client: Client) -> None:
    job_id = await client.submit("simulation", {})
    assert await client.cancel(job_id) == "pending"
    assert await _status(client, job_id) == "cancelled"
    assert await client.redis.zscore(client.keys.pending, job_id) is None


async def test_sigterm_hands_a_long_job_back_without_spending_an_attempt(
    client: Client, redis_url: str, keys: Keys, start_worker: WorkerFactory
) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "drainer", EMP_GRACE_PERIOD_S="0.3") as proc:
        job_id = await client.submit("simulation", {"duration_s": 2, "steps": 20})
        await wait_until(lambda: _is(client, job_id, "in_progress"), within_s=15)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.output()
    job = await client.get(job_id)
    assert job["status"] == "pending" and job["retry_count"] == "0"
    assert not await client.redis.sismember(keys.workers_active, "drainer")
    assert (await client.redis.hget(keys.worker("drainer"), "status")) == "offline"

    await start_worker("finisher")
    await wait_until(lambda: _is(client, job_id, "completed"), within_s=20)
    job = await client.get(job_id)
    assert job["worker_id"] == "finisher" and job["retry_count"] == "0"


async def test_worker_reconnects_after_redis_restarts(keys: Keys) -> None:
    with EmbeddedRedis() as server:
        client = Client(connect(server.url), keys)
        async with WorkerProcess(server.url, keys.prefix, "survivor") as proc:
            first = await client.submit("simulation", {"duration_s": 0, "steps": 1})
            await wait_until(lambda: _is(client, first, "completed"), within_s=15)
            server.stop()
            await client.redis.aclose()
            server.start()  # same port, empty data
            client = Client(connect(server.url), keys)

            async def registered() -> bool:
                return bool(await client.redis.exists(keys.heartbeat("survivor")))

            await wait_until(registered, within_s=20, interval=0.1)
            second = await client.submit("simulation", {"duration_s": 0, "steps": 1})
            await wait_until(lambda: _is(client, second, "completed"), within_s=20)
            assert proc.running, proc.output()
        await client.redis.aclose()


async def test_no_redis_at_start_then_redis_appears(keys: Keys) -> None:
    server = EmbeddedRedis()  # the worker starts against a port nobody listens on yet
    async with WorkerProcess(server.url, keys.prefix, "patient") as proc:
        try:
            await wait_until(lambda: "cannot register worker" in proc.output(), within_s=20, interval=0.05)
            server.start()
            client = Client(connect(server.url), keys)
            job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1})
            await wait_until(lambda: _is(client, job_id, "completed"), within_s=30, interval=0.1)
            await client.redis.aclose()
            assert proc.running
        finally:
            proc.signal(signal.SIGTERM)
            await proc.wait()
            server.stop()
