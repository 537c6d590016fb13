"""A job written exactly as emp-job-queue's API writes it is claimed, progressed and completed by
our worker, with the events their API and monitor consume on their channels."""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import WorkerFactory, published, wait_until
from worker.keys import Keys


async def _submit_like_their_api(redis: aioredis.Redis, keys: Keys, priority: int, payload: dict[str, Any]) -> str:
    job_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    created_ms = int(now.timestamp() * 1000)
    await redis.hset(keys.job(job_id), mapping={
        "id": job_id,
        "service_required": "simulation",
        "priority": str(priority),
        "payload": json.dumps(payload),
        "requirements": "",
        "customer_id": "",
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "status": "pending",
        "retry_count": "0",
        "max_retries": "3",
        "workflow_id": "",
        "workflow_priority": "",
        "workflow_datetime": "",
        "current_step": "",
        "total_steps": "",
        "ctx": "",
    })
    score = priority * 1e15 - math.floor(created_ms / 1000)
    await redis.zadd(keys.pending, {job_id: score})
    await redis.publish(keys.ch_job_submitted, json.dumps({
        "job_id": job_id, "service_required": "simulation", "priority": priority,
        "timestamp": int(time.time() * 1000)}))
    return job_id


async def test_job_from_their_api_is_claimed_progressed_completed(
    redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    channels = [keys.ch_job_claimed, keys.ch_progress, keys.ch_complete, keys.ch_failed]
    async with published(redis, channels) as events:
        await start_worker("their-api-worker")
        job_id = await _submit_like_their_api(redis, keys, 75, {"duration_s": 0.05, "steps": 4})
        await wait_until(lambda: len(events[keys.ch_complete]) == 1, within_s=15)

    (claimed,) = events[keys.ch_job_claimed]
    assert claimed["job_id"] == job_id and claimed["worker_id"] == "their-api-worker"
    assert claimed["status"] == "claimed" and isinstance(claimed["timestamp"], int)
    progress = events[keys.ch_progress]
    assert progress and all(p["job_id"] == job_id and p["status"] == "in_progress" for p in progress)
    assert progress[-1]["progress"] == 100 and progress[-1]["total_steps"] == 4
    (complete,) = events[keys.ch_complete]
    assert complete["status"] == "completed" and complete["progress"] == 100
    envelope = complete["result"]  # their JobResult: clients read result.data
    assert envelope["success"] is True and envelope["data"]["steps"] == 4
    assert isinstance(envelope["processing_time_ms"], int) and envelope["processing_time_ms"] >= 0
    assert events[keys.ch_failed] == []

    job = await redis.hgetall(keys.job(job_id))
    assert job["status"] == "completed" and job["worker_id"] == "their-api-worker"
    for field in ("assigned_at", "started_at", "completed_at", "processing_time"):
        assert job[field], field
    assert not await redis.exists(keys.active("their-api-worker"))
    done = json.loads(await redis.hget(keys.completed, job_id))
    assert done["success"] is True and done["data"] == envelope and done["completed_at"]
    assert (await redis.hgetall(keys.job_progress(job_id)))["progress"] == "100"
