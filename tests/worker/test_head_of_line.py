"""No head-of-line blocking: thousands of higher-priority jobs this worker cannot run do not hide
the one it can."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from worker.client import Client
from worker.keys import Keys
from worker.protocol import emp_job_queue_score, submit_fields
from worker.queue import Queue, QueueConfig

SMALL_GPU: dict[str, Any] = {"services": ["comfyui"], "hardware": {"gpu_memory_gb": 24}, "models": {},
                             "customer_access": {}, "custom": {}}


async def test_24gb_worker_claims_its_job_behind_5000_jobs_needing_80gb(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig())
    big = submit_fields(service="comfyui", payload={}, priority=90, requirements={"hardware": {"gpu_memory_gb": 80}})
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(5000):
            job_id = str(uuid.uuid4())
            pipe.evalsha(queue._scripts["submit"].sha, 0, keys.prefix, job_id,
                         repr(emp_job_queue_score(90, int(time.time() * 1000))), json.dumps(big))
        await queue._scripts["submit"].registered_client.script_load(queue._scripts["submit"].script)
        await pipe.execute()
    fits = await client.submit("comfyui", {}, priority=10, requirements={"hardware": {"gpu_memory_gb": 16}})
    assert await redis.zcard(keys.pending) == 5001

    started = time.perf_counter()
    claimed = await queue.claim("small-gpu", SMALL_GPU)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert claimed is not None and claimed.job_id == fits
    print(f"claim behind 5000 unmatchable jobs: {elapsed_ms:.2f} ms")
    assert await redis.zcard(keys.pending) == 5000
    assert await queue.claim("small-gpu", SMALL_GPU) is None
