"""Chaos: worker processes SIGKILLed at random while 500 jobs run; every job completes exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter

import pytest

from tests.conftest import wait_until
from tests.procs import WorkerProcess
from worker.client import Client
from worker.keys import Keys

JOBS = int(os.environ.get("CHAOS_JOBS", "500"))
WORKERS = 4


@pytest.mark.timeout(240)
async def test_chaos_kills_lose_and_duplicate_nothing(client: Client, redis_url: str, keys: Keys) -> None:
    completions: Counter[str] = Counter()
    pubsub = client.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.ch_complete)

    async def count_completions() -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                completions[json.loads(message["data"])["job_id"]] += 1

    counter = asyncio.create_task(count_completions())
    rng = random.Random(1234)
    procs = [WorkerProcess(redis_url, keys.prefix, f"chaos-{i}").start() for i in range(WORKERS)]
    kills = 0
    started = time.monotonic()
    try:
        ids = [await client.submit("simulation", {"duration_s": rng.uniform(0.05, 0.15), "steps": 3},
                                   priority=rng.choice([30, 50, 80]), max_retries=100)
               for _ in range(JOBS)]

        async def all_completed() -> bool:
            return len(completions) == JOBS

        while not await all_completed() and time.monotonic() - started < 180:
            await asyncio.sleep(rng.uniform(0.7, 1.3))  # the chaos schedule: a kill every second or so
            victim = rng.randrange(WORKERS)
            procs[victim].signal(signal.SIGKILL)
            await procs[victim].wait()
            kills += 1
            procs[victim].log.close()
            procs[victim] = WorkerProcess(redis_url, keys.prefix, f"chaos-{victim}-{kills}").start()
        await wait_until(all_completed, within_s=60, interval=0.1)
    finally:
        for proc in procs:
            proc.signal(signal.SIGKILL)
            await proc.wait()
            proc.log.close()
        counter.cancel()
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    elapsed = time.monotonic() - started
    assert kills >= 5
    statuses = Counter([(await client.get(job_id)).get("status") for job_id in ids])
    assert statuses == Counter({"completed": JOBS}), statuses
    assert set(completions) == set(ids)
    assert max(completions.values()) == 1, [j for j, n in completions.items() if n > 1]
    assert await client.redis.hlen(keys.completed) == JOBS
    for job_id in ids:
        kinds = [e.kind for e in await client.events(job_id)]
        assert kinds.count("completed") == 1, (job_id, kinds)
    assert await client.redis.zcard(keys.pending) == 0
    requeued = sum([1 for job_id in ids if int((await client.get(job_id))["retry_count"]) > 0])
    print(f"chaos: {JOBS} jobs, {WORKERS} workers, {kills} SIGKILLs, {requeued} jobs recovered from "
          f"dead workers, 0 lost, 0 duplicated, {elapsed:.1f}s")
