"""Leases, the reaper and fencing: a stale holder can no longer touch a job."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import wait_until
from worker.client import Client
from worker.errors import StaleJob
from worker.keys import Keys
from worker.queue import ProgressUpdate, Queue, QueueConfig

CAPS: dict[str, Any] = {"services": ["simulation"], "hardware": {}, "models": {}, "customer_access": {},
                        "custom": {}}


async def _reap_until(queue: Queue, client: Client, job_id: str, status: str) -> None:
    """Beat as another live worker (which runs the reaper) until the job reaches `status`."""
    async def reached() -> bool:
        await queue.heartbeat("reaper", "idle", {}, 5, {})
        return (await client.get(job_id)).get("status") == status

    await wait_until(reached, within_s=10, interval=0.05)


async def test_stale_worker_cannot_progress_complete_or_fail(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    short = Queue(redis, keys, QueueConfig(lease_ms=100, reap_period_ms=50))
    job_id = await client.submit("simulation", {})
    stale = await short.claim("worker-a", CAPS)
    assert stale is not None and stale.attempt == 1

    await _reap_until(short, client, job_id, "pending")
    job = await client.get(job_id)
    assert job["retry_count"] == "1" and "lease expired" in job["error"]
    fresh = await Queue(redis, keys, QueueConfig()).claim("worker-b", CAPS)
    assert fresh is not None and fresh.job_id == job_id and fresh.attempt == 2

    with pytest.raises(StaleJob):
        await short.progress(job_id, "worker-a", 1, ProgressUpdate(50, "late"))
    with pytest.raises(StaleJob):
        await short.complete(job_id, "worker-a", 1, "{}")
    with pytest.raises(StaleJob):
        await short.fail(job_id, "worker-a", 1, "late", retryable=True, backoff_ms=0)
    with pytest.raises(StaleJob):
        await short.hand_back(job_id, "worker-a", 1, "late")
    # the same worker id with the old attempt is refused too
    with pytest.raises(StaleJob):
        await short.complete(job_id, "worker-b", 1, "{}")

    await short.complete(job_id, "worker-b", 2, json.dumps({"ok": True}))
    assert (await client.get(job_id))["status"] == "completed"
    with pytest.raises(StaleJob):
        await short.complete(job_id, "worker-b", 2, "{}")  # exactly once
    events = [e.kind for e in await client.events(job_id)]
    assert events.count("completed") == 1


async def test_heartbeat_renews_a_long_job_so_it_is_never_reaped(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=300, reap_period_ms=10))
    job_id = await client.submit("simulation", {})
    claimed = await queue.claim("holder", CAPS)
    assert claimed is not None
    loop_deadline = (await redis.time())[0] + 2  # two seconds: over six lease lengths
    while (await redis.time())[0] < loop_deadline:
        beat = await queue.heartbeat("holder", "busy", {}, 5, {job_id: claimed.attempt})
        assert beat.lost == [] and beat.renewed == 1
        await queue.heartbeat("other", "idle", {}, 5, {})  # another live worker runs the reaper
    assert (await client.get(job_id))["status"] == "assigned"
    await queue.complete(job_id, "holder", claimed.attempt, "{}")


async def test_expired_job_with_no_retries_left_fails_for_good(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=50, reap_period_ms=10))
    job_id = await client.submit("simulation", {}, max_retries=0)
    assert await queue.claim("doomed", CAPS) is not None

    await _reap_until(queue, client, job_id, "failed")
    assert "lease expired" in json.loads(await redis.hget(keys.failed, job_id))["error"]
    assert await redis.zscore(keys.pending, job_id) is None
