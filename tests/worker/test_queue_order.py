"""Claim order and atomicity, straight against the claim script."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from worker.client import Client, connect
from worker.keys import Keys
from worker.queue import Queue, QueueConfig

CAPS: dict[str, Any] = {"services": ["simulation"], "hardware": {"gpu_memory_gb": 24}, "models": {},
                        "customer_access": {}, "custom": {}}


async def _drain(queue: Queue, worker: str = "w1") -> list[str]:
    order = []
    while (claimed := await queue.claim(worker, CAPS)) is not None:
        order.append(claimed.job_id)
    return order


async def test_strict_priority(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    submitted = {}
    for n, priority in enumerate([10, 90, 50, 90, 10, 70, 50]):
        submitted[await client.submit("simulation", {"n": n}, priority=priority)] = priority
    order = await _drain(Queue(redis, keys, QueueConfig()))
    priorities = [submitted[j] for j in order]
    assert priorities == sorted(priorities, reverse=True)
    assert len(order) == len(submitted)


async def test_exact_fifo_within_a_priority_for_1000_jobs_of_the_same_millisecond(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """Jobs of one priority and one effective time (here all the same workflow datetime) keep their
    submission order (the index's sequence number), not an arbitrary one."""
    ids = [await client.submit("simulation", {"n": n}, priority=80, workflow_datetime_ms=1_767_225_600_000)
           for n in range(1000)]
    order = await _drain(Queue(redis, keys, QueueConfig()))
    assert order == ids


async def test_fifo_within_priority_holds_across_priorities(client: Client, redis: aioredis.Redis,
                                                            keys: Keys) -> None:
    high = [await client.submit("simulation", {}, priority=90) for _ in range(50)]
    low = [await client.submit("simulation", {}, priority=20) for _ in range(50)]
    more_high = [await client.submit("simulation", {}, priority=90) for _ in range(50)]
    order = await _drain(Queue(redis, keys, QueueConfig()))
    assert order == high + more_high + low


async def test_two_workers_racing_for_one_job_exactly_one_wins(
    client: Client, redis_url: str, keys: Keys
) -> None:
    conns = [connect(redis_url) for _ in range(2)]
    queues = [Queue(c, keys, QueueConfig()) for c in conns]
    try:
        for _round in range(50):
            job_id = await client.submit("simulation", {})
            results = await asyncio.gather(queues[0].claim("wa", CAPS), queues[1].claim("wb", CAPS))
            winners = [r for r in results if r is not None]
            assert len(winners) == 1
            assert winners[0].job_id == job_id
            job = await client.get(job_id)
            assert job["status"] == "assigned"
            assert job["worker_id"] in ("wa", "wb")
            assert await client.redis.zcard(keys.pending) == 0
    finally:
        for c in conns:
            await c.aclose()


async def test_service_mismatch_is_not_claimed(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    other = await client.submit("comfyui", {})
    mine = await client.submit("simulation", {}, priority=10)
    order = await _drain(Queue(redis, keys, QueueConfig()))
    assert order == [mine]
    assert (await client.get(other))["status"] == "pending"


async def test_retried_job_is_claimable_after_its_class_queue_emptied(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig())
    job_id = await client.submit("simulation", {})
    claimed = await queue.claim("w1", CAPS)
    assert claimed is not None
    assert await queue.claim("w1", CAPS) is None  # the empty class is dropped from emp:classes here
    assert await queue.fail(job_id, "w1", claimed.attempt, "engine crashed", retryable=True, backoff_ms=0) == "retry"
    again = await queue.claim("w2", CAPS)
    assert again is not None and again.job_id == job_id and again.attempt == 2
