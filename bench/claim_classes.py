"""Claim cost against the number of requirement classes pending, and against a deep single class.

    .venv/bin/python bench/claim_classes.py [--classes 10,100,1000] [--claims 200]

A claim looks at the head of every class queue its worker could match (emp:classes), so its
cost grows with the number of distinct (service, requirements, customer) shapes pending, not
with the number of jobs. This prints the claim time with N classes of jobs the worker cannot
run ahead of one it can, as a ratio to the baseline: the same claim with 5,000 unrunnable jobs
all in one class. Runs its own redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.keys import Keys
from worker.queue import Queue, QueueConfig

CAPS: dict[str, Any] = {"services": ["bench"], "hardware": {"gpu_memory_gb": 24}, "models": {},
                        "customer_access": {}, "custom": {}, "loaded": []}


async def claim_times(url: str, prefix: str, classes: int, per_class: int, claims: int) -> list[float]:
    """ms per claim of a runnable job behind `classes` x `per_class` jobs needing 80 GB."""
    redis = connect(url)
    keys = Keys(prefix)
    client = Client(redis, keys)
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    for c in range(classes):
        for _ in range(per_class):
            await client.submit("bench", {}, priority=90,
                                requirements={"hardware": {"gpu_memory_gb": 80}, "shape": c})
    times = []
    for _ in range(claims):
        await client.submit("bench", {}, priority=10)
        start = time.perf_counter()
        got = await queue.claim("bench-worker", CAPS)
        times.append((time.perf_counter() - start) * 1000)
        assert got is not None
        await queue.complete(got.job_id, "bench-worker", got.attempt, "{}")
    await redis.aclose()
    return times


async def main(class_counts: list[int], claims: int) -> None:
    with EmbeddedRedis() as server:
        base = await claim_times(server.url, "base:", 1, 5000, claims)
        base_p50 = statistics.median(base)
        print(f"baseline: 1 class x 5000 unrunnable jobs   claim p50 {base_p50:6.3f} ms")
        for n in class_counts:
            times = await claim_times(server.url, f"c{n}:", n, 2, claims)
            p50 = statistics.median(times)
            print(f"{n:5d} classes x 2 unrunnable jobs        claim p50 {p50:6.3f} ms "
                  f"({p50 / base_p50:5.1f}x baseline)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="10,100,1000")
    parser.add_argument("--claims", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main([int(n) for n in args.classes.split(",")], args.claims))
