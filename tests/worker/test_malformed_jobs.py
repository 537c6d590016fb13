"""Malformed jobs fail with a readable error; the worker keeps running."""

from __future__ import annotations

import json
import uuid

import pytest
import redis.asyncio as aioredis

from tests.conftest import WorkerFactory, wait_until
from worker.client import Client
from worker.keys import Keys


async def _raw_job(redis: aioredis.Redis, keys: Keys, fields: dict[str, str]) -> str:
    job_id = str(uuid.uuid4())
    await redis.hset(keys.job(job_id), mapping={"id": job_id, "status": "pending", **fields})
    await redis.zadd(keys.pending, {job_id: 50e15})
    await redis.publish(keys.ch_job_submitted, json.dumps({"job_id": job_id}))
    return job_id


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"service_required": "simulation", "payload": "{not json"}, "payload is not valid JSON"),
        ({"service_required": "simulation"}, "payload is missing"),
        ({"payload": "{}"}, "service_required is missing"),
        ({"service_required": "simulation", "payload": "[1, 2]"}, "payload must be a JSON object"),
        ({"service_required": "simulation", "payload": "{}", "requirements": "{oops"},
         "requirements is not a JSON object"),
        ({"service_required": "simulation", "payload": "{}", "priority": "high"}, "priority is not a number"),
        ({"service_required": "simulation", "payload": '{"steps": -3}'}, "invalid simulation payload: steps"),
        ({"service_required": "simulation", "payload": "{}", "retry_count": "x"}, "retry_count must be a number"),
    ],
)
async def test_malformed_job_fails_readably_and_worker_goes_on(
    redis: aioredis.Redis, keys: Keys, client: Client, start_worker: WorkerFactory,
    fields: dict[str, str], expected: str,
) -> None:
    worker = await start_worker()
    bad = await _raw_job(redis, keys, fields)

    async def failed() -> bool:
        return (await client.get(bad)).get("status") == "failed"

    await wait_until(failed, within_s=15)
    job = await client.get(bad)
    assert expected in job["error"], job["error"]
    assert json.loads(await redis.hget(keys.failed, bad))["error"] == job["error"]
    assert await redis.zscore(keys.pending, bad) is None

    good = await client.submit("simulation", {"duration_s": 0.01, "steps": 1})
    kinds = [e.kind async for e in client.follow(good)]
    assert kinds[-1] == "completed"
    assert worker.state.value in ("idle", "busy")
