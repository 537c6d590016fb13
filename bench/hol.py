"""Head of line: the claim time of a matchable job behind N unmatchable higher-priority jobs (in
one requirement class, and spread over many), against the same claim with an empty queue ahead."""

from __future__ import annotations

import statistics
import time

from bench.common import CAPS, Figure, submit_many
from worker.client import Client, connect
from worker.keys import Keys
from worker.queue import Queue, QueueConfig


async def claim_ms(url: str, prefix: str, blockers: int, classes: int, claims: int) -> float:
    """p50 ms of one claim of a runnable job behind `blockers` jobs needing 80 GB in `classes` shapes."""
    redis = connect(url)
    client = Client(redis, Keys(prefix))
    queue = Queue(redis, client.keys, QueueConfig(affinity_ms=0))

    async def blocker(i: int) -> str:
        return await client.submit("simulation", {}, priority=90,
                                   requirements={"hardware": {"gpu_memory_gb": 80}, "shape": i % classes})

    await submit_many(client, blockers, blocker)
    times = []
    for _ in range(claims):
        await client.submit("simulation", {}, priority=10)
        start = time.perf_counter()
        got = await queue.claim("hol-worker", CAPS)
        times.append((time.perf_counter() - start) * 1000)
        assert got is not None, "the matchable job was not claimed"
        await queue.complete(got.job_id, "hol-worker", got.attempt, "{}")
    await redis.aclose()
    return statistics.median(times)


async def run(url: str, blockers: int, claims: int, spread: int) -> list[Figure]:
    empty = await claim_ms(url, "hol0:", 0, 1, claims)
    one = await claim_ms(url, "hol1:", blockers, 1, claims)
    many = await claim_ms(url, "holn:", blockers, spread, claims)
    return [Figure("hol", f"claim p50 behind {blockers:,} unmatchable (1 class)", one, "ms", empty, "empty queue"),
            Figure("hol", f"claim p50 behind {blockers:,} unmatchable ({spread} classes)", many, "ms", empty,
                   "empty queue")]
