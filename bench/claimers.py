"""Claimer processes for the claim and drain baselines: each process runs asyncio tasks over
separate connections and claims (with the real script or a bare one) until the queue is empty."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.synchronize import Event
from typing import Any

import redis.asyncio as aioredis

from bench.common import BARE_CLAIM, BARE_COMPLETE, CAPS
from worker.client import connect
from worker.keys import Keys
from worker.queue import Queue, QueueConfig

MODES = ("real", "bare", "bare_cc")
START_TIMEOUT_S = 60


async def _claim_loop(url: str, prefix: str, mode: str, worker_id: str, start: Event) -> tuple[int, float, float]:
    redis: aioredis.Redis = connect(url)
    queue = Queue(redis, Keys(prefix), QueueConfig(affinity_ms=0))
    claim = redis.register_script(BARE_CLAIM)
    complete = redis.register_script(BARE_COMPLETE)
    await redis.ping()
    await asyncio.to_thread(start.wait, START_TIMEOUT_S)
    began, count = time.time(), 0
    bare_keys = [f"{prefix}pending", f"{prefix}job:"]
    while True:
        if mode == "real":
            if await queue.claim(worker_id, CAPS) is None:
                break
        else:
            got = await claim(keys=bare_keys, args=[worker_id])
            if got is None:
                break
            if mode == "bare_cc":
                await complete(keys=[f"{prefix}completed", f"{prefix}job:"], args=[worker_id, got])
        count += 1
    ended = time.time()
    await redis.aclose()
    return count, began, ended


def _child(url: str, prefix: str, mode: str, tasks: int, index: int, start: Event, out: Any, ready: Any) -> None:
    ready.put(index)  # imported: the start signal can go
    async def run() -> list[tuple[int, float, float]]:
        return list(await asyncio.gather(*(_claim_loop(url, prefix, mode, f"bench-{index}-{t}", start)
                                           for t in range(tasks))))

    out.put(asyncio.run(run()))


def run_claimers(url: str, prefix: str, mode: str, claimers: int, processes: int = 4) -> tuple[int, float]:
    """Claim until empty with `claimers` claimers over up to `processes` processes:
    (claims, claims per second from the first claimer's start to the last one's end)."""
    assert mode in MODES
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no event loop inherited
    procs = min(claimers, processes)
    start, out, ready = ctx.Event(), ctx.Queue(), ctx.Queue()
    children = [ctx.Process(target=_child, args=(url, prefix, mode, claimers // procs + (i < claimers % procs),
                                                 i, start, out, ready)) for i in range(procs)]
    for child in children:
        child.start()
    for _ in children:
        ready.get(timeout=START_TIMEOUT_S)
    start.set()
    results: list[tuple[int, float, float]] = []
    for _ in children:
        results += out.get(timeout=600)
    for child in children:
        child.join(30)
    total = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results) - min(r[1] for r in results)
    return total, total / elapsed if elapsed > 0 else 0.0
