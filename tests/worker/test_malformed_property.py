"""Property: whatever lands in a job hash, the job ends failed with a readable error, completes,
or is left untouched; the worker never crashes."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fast_settings, wait_until
from worker.agent import Worker
from worker.client import Client, connect
from worker.keys import Keys

JSONISH = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["{", "[]", "null", "{}", '{"steps": "x"}', '{"duration_s": -1}', '{"steps": 1e99}',
                     '{"a": ' * 200 + "1" + "}" * 200, '{"duration_s": 0, "steps": 1}']),
    st.integers().map(str),
    st.just("x" * 20_000),
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "service_required": st.one_of(st.sampled_from(["simulation", "", "unknown-svc"]), st.text(max_size=10),
                                      st.just("s" * 300)),
        "payload": JSONISH,
        "requirements": JSONISH,
        "priority": st.one_of(st.integers(-10**6, 10**6).map(str), st.text(max_size=5)),
        "created_at": st.one_of(st.text(max_size=30), st.just("2026-01-01T00:00:00Z"), st.just("1700000000000")),
        "retry_count": st.one_of(st.just("0"), st.text(max_size=5)),
        "max_retries": st.one_of(st.just("3"), st.text(max_size=5)),
        "customer_id": st.text(max_size=20),
        "workflow_datetime": st.one_of(st.text(max_size=15), st.integers(0, 2**45).map(str)),
    },
)


async def _one(redis_url: str, fields: dict[str, str]) -> None:
    keys = Keys(f"prop:{uuid.uuid4().hex[:10]}:")
    conn = connect(redis_url)
    client = Client(conn, keys)
    worker = Worker(fast_settings(redis_url, keys, poll_interval_s=0.2), connect(redis_url),
                    _connectors(), worker_id="prop", hardware={})
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.state.value == "idle", within_s=10)
        job_id = str(uuid.uuid4())
        await conn.hset(keys.job(job_id), mapping={"id": job_id, "status": "pending", **fields})
        await conn.zadd(keys.pending, {job_id: 50e15})
        await conn.publish(keys.ch_job_submitted, json.dumps({"job_id": job_id}))
        # a sentinel job behind it: once it is done, the worker has looked at ours
        sentinel = await client.submit("simulation", {"duration_s": 0, "steps": 1}, priority=-100)

        async def sentinel_done() -> bool:
            return (await client.get(sentinel)).get("status") == "completed"

        await wait_until(sentinel_done, within_s=20)
        await wait_until(lambda: not worker.running, within_s=20)
        job = await client.get(job_id)
        assert not task.done(), "the worker stopped"
        status = job.get("status")
        if status == "failed":
            assert job["error"].strip() and len(job["error"]) <= 4000 and job["error"].isprintable()
        elif status == "pending":
            assert {k: job.get(k) for k in fields} == fields  # untouched
        else:
            assert status == "completed", job
    finally:
        worker.request_stop()
        worker.fast_stop.set()
        await asyncio.wait_for(task, 20)
        await worker.redis.aclose()
        found = [k async for k in conn.scan_iter(match=f"{keys.prefix}*")]
        if found:
            await conn.delete(*found)
        await conn.aclose()


def _connectors() -> list[Any]:
    from connectors.base import ConnectorConfig
    from connectors.manager import Plugins

    return Plugins().create_connectors(["simulation"], ConnectorConfig("prop"))


@pytest.mark.timeout(300)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=FIELDS)
def test_malformed_job_hashes_never_crash_the_worker(redis_url: str, fields: dict[str, str]) -> None:
    asyncio.run(_one(redis_url, fields))
