from __future__ import annotations

import json

from tests.conftest import WorkerFactory
from worker.client import Client


async def test_submit_run_complete(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker()
    job_id = await client.submit("simulation", {"duration_s": 0.05, "steps": 5, "seed": 1}, priority=80)
    kinds = [e.kind async for e in client.follow(job_id)]
    assert kinds[0] == "claimed" and kinds[-1] == "completed"
    assert kinds.count("progress") >= 1
    job = await client.get(job_id)
    assert job["status"] == "completed"
    assert json.loads(job["result"])["steps"] == 5
    completed = json.loads(await client.redis.hget(client.keys.completed, job_id))
    assert completed["success"] is True
