"""Retries: original place kept, the failing worker steps aside, backoff delays, timeouts fail."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import WorkerFactory, wait_until
from worker.client import Client
from worker.keys import Keys
from worker.queue import Queue, QueueConfig

CAPS: dict[str, Any] = {"services": ["simulation"], "hardware": {}, "models": {}, "customer_access": {},
                        "custom": {}}


async def test_retry_keeps_its_place_and_avoids_the_worker_that_failed_it(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(retry_exclusion_ms=60_000))
    first = await client.submit("simulation", {})
    claimed = await queue.claim("w1", CAPS)
    assert claimed is not None and claimed.job_id == first
    newer = await client.submit("simulation", {})
    assert await queue.fail(first, "w1", claimed.attempt, "engine crashed", retryable=True, backoff_ms=0) == "retry"

    other = await queue.claim("w2", CAPS)  # the retried job is older than `newer`: it goes first
    assert other is not None and other.job_id == first
    await queue.hand_back(first, "w2", other.attempt, "test")
    await queue.heartbeat("w2", "idle", {"emp_caps": json.dumps(CAPS)}, 5, {})  # w2: live, idle, capable
    mine = await queue.claim("w1", CAPS)  # w1 failed `first` moments ago and w2 is free: w1 gets `newer`
    assert mine is not None and mine.job_id == newer


async def test_the_worker_that_failed_a_job_takes_it_again_when_no_other_is_free(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(retry_exclusion_ms=60_000))
    job_id = await client.submit("simulation", {})
    claimed = await queue.claim("w1", CAPS)
    assert claimed is not None
    assert await queue.fail(job_id, "w1", claimed.attempt, "engine crashed", retryable=True, backoff_ms=0) == "retry"
    await queue.heartbeat("w2", "busy", {"emp_caps": json.dumps(CAPS)}, 5, {})  # the only other one is busy
    again = await queue.claim("w1", CAPS)
    assert again is not None and again.job_id == job_id  # a preference, not a wait of 60 s


async def test_backoff_holds_a_retry_until_it_is_due(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(retry_exclusion_ms=0))
    job_id = await client.submit("simulation", {})
    claimed = await queue.claim("w1", CAPS)
    assert claimed is not None
    await queue.fail(job_id, "w1", claimed.attempt, "oom", retryable=True, backoff_ms=300)
    assert await queue.claim("w2", CAPS) is None  # delayed, not claimable yet
    assert await redis.zscore(keys.delayed, job_id) is not None

    async def promoted() -> bool:
        return (await queue.heartbeat("w2", "idle", {}, 5, {})).promoted == 1

    await wait_until(promoted, within_s=10, interval=0.05)
    again = await queue.claim("w2", CAPS)
    assert again is not None and again.job_id == job_id


async def test_permanent_failure_is_not_retried(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig())
    job_id = await client.submit("simulation", {}, max_retries=5)
    claimed = await queue.claim("w1", CAPS)
    assert claimed is not None
    assert await queue.fail(job_id, "w1", claimed.attempt, "bad input", retryable=False, backoff_ms=0) == "failed"
    assert (await client.get(job_id))["status"] == "failed"


async def test_job_timeout_stops_the_connector_and_fails_the_job(
    client: Client, start_worker: WorkerFactory
) -> None:
    worker = await start_worker(job_timeout_s=0.3)
    job_id = await client.submit("simulation", {"duration_s": 30, "steps": 300}, max_retries=0)

    async def failed() -> bool:
        return (await client.get(job_id)).get("status") == "failed"

    await wait_until(failed, within_s=15)
    assert "timed out after" in (await client.get(job_id))["error"]
    await wait_until(lambda: not worker.running, within_s=5)
