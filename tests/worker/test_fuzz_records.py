"""Fuzz: arbitrary bytes, types and numbers written into job hashes, index keys and pub/sub
messages beside good jobs. Invariant: the worker never exits, every good job completes, and
every bad one ends failed (with a readable error) or quarantined (with a reason), or completes,
or stays pending only when no worker could run it anyway.

(redis-py takes bytes keys though its stubs say str: hence the type ignores.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from tests.conftest import fast_settings, wait_until
from worker.agent import Worker
from worker.client import Client, connect
from worker.keys import Keys

SERVICE = b"simulation"
REAL_CLASS = hashlib.sha1(SERVICE + b"\n\n").hexdigest()  # the class of a job with no requirements

NUMBERS = st.sampled_from([b"nan", b"-nan", b"inf", b"-inf", b"1e400", b"-1e400", b"1e16", b"-1e16", b"0x10",
                           b"9223372036854775808", b"1.5", b"-3", b"0", b""])
JSONISH = st.sampled_from([b"{}", b"[]", b"null", b"{", b'{"steps": 1, "duration_s": 0}', b'{"hardware": 5}',
                           b'{"positive_requirements": 1}', b'{"models": [{}]}',
                           b'{"hardware": {"gpu_memory_gb": "x"}}',
                           b'{"a": ' * 100 + b"1" + b"}" * 100])
VALUES = st.one_of(st.binary(max_size=24), NUMBERS, JSONISH, st.integers().map(lambda n: str(n).encode()),
                   st.floats().map(lambda f: repr(f).encode()))
NAMES = st.one_of(
    st.sampled_from([b"payload", b"priority", b"workflow_priority", b"retry_count", b"max_retries", b"requirements",
                     b"customer_id", b"created_at", b"workflow_datetime", b"workflow_id", b"attempt", b"id",
                     b"emp_member", b"emp_class", b"emp_score", b"emp_pending_score", b"ctx", b"service_required"]),
    st.binary(min_size=1, max_size=8),
)
JOB_IDS = st.one_of(st.uuids().map(lambda u: str(u).encode()), st.binary(min_size=1, max_size=12))
BAD_JOBS = st.lists(st.tuples(JOB_IDS, st.dictionaries(NAMES, VALUES, max_size=4), st.booleans()), max_size=3)

INDEX_GARBAGE = st.lists(st.one_of(
    st.tuples(st.just("classes"), st.one_of(st.just(REAL_CLASS.encode()), st.binary(max_size=12)), VALUES),
    st.tuples(st.just("queue"), st.one_of(st.just(REAL_CLASS.encode()), st.binary(max_size=12)),
              st.one_of(st.binary(max_size=30), st.builds(lambda i: b"1:2:" + i, JOB_IDS))),
    st.tuples(st.just("seq"), st.sampled_from([b"abc", b"-5", b"9223372036854775807", b"1e400"]), st.none()),
    st.tuples(st.just("indexed"), JOB_IDS, st.none()),
    st.tuples(st.just("wrong_type_job"), JOB_IDS, st.none()),
    st.tuples(st.just("orphan_pending"), JOB_IDS, st.none()),
    st.tuples(st.just("wrong_type_queue"), st.just(REAL_CLASS.encode()), st.none()),
), max_size=4)
MESSAGES = st.lists(st.tuples(st.sampled_from(["job_submitted", "cancel_job"]),
                              st.one_of(st.binary(max_size=40), JSONISH,
                                        st.builds(lambda v: b'{"job_id": "' + v + b'"}', st.binary(max_size=10)))),
                    max_size=4)


async def _write_garbage(raw: aioredis.Redis, keys: Keys, garbage: list[tuple[str, bytes, Any]]) -> None:
    for kind, a, b in garbage:
        try:
            await _write_one(raw, keys, kind, a, b)
        except ResponseError:  # e.g. a ZADD to a key an earlier entry made a string: Redis refused it
            continue


async def _write_one(raw: aioredis.Redis, keys: Keys, kind: str, a: bytes, b: Any) -> None:
    if kind == "classes":
        await raw.hset(keys.classes, mapping={a: b})
    elif kind == "queue":
        await raw.zadd(keys.class_queue(a.decode("latin-1")).encode("latin-1"), {b: -1e6})
    elif kind == "seq":
        await raw.set(keys.seq, a)
    elif kind == "indexed":
        await raw.sadd(keys.indexed, a)
    elif kind == "wrong_type_job":
        await raw.set(keys.prefix.encode() + b"job:" + a, b"x")
        await raw.zadd(keys.pending, {a: 60e15})
    elif kind == "wrong_type_queue":
        await raw.set(keys.class_queue(a.decode()), b"x")
    else:
        await raw.zadd(keys.pending, {a: 60e15})


async def _resolved(raw: aioredis.Redis, keys: Keys, job_id: bytes, fields: dict[bytes, bytes]) -> bool:
    """Is the bad job where the invariant allows it to end? (asserting what it says when so)"""
    job = await raw.hgetall(keys.prefix.encode() + b"job:" + job_id)  # type: ignore[arg-type]
    status = job.get(b"status")
    if await raw.hexists(keys.quarantine, job_id):  # type: ignore[arg-type]
        assert json.loads(await raw.hget(keys.quarantine, job_id))["reason"]  # type: ignore[arg-type]
        return True
    if status == b"failed":
        error = job[b"error"].decode("ascii")
        assert error.strip() and len(error) <= 4000 and error.isprintable(), error
        return True
    if status == b"completed":
        return True
    unrunnable = fields.get(b"service_required") != SERVICE or fields.get(b"requirements", b"") not in (b"", b"{}")
    return status == b"pending" and unrunnable


async def _one(redis_url: str, bad_jobs: list[tuple[bytes, dict[bytes, bytes], bool]],
               garbage: list[tuple[str, bytes, Any]], messages: list[tuple[str, bytes]]) -> None:
    keys = Keys(f"fuzz:{uuid.uuid4().hex[:10]}:")
    raw = aioredis.Redis.from_url(redis_url, socket_timeout=10.0)
    client = Client(connect(redis_url), keys)
    worker = Worker(fast_settings(redis_url, keys, poll_interval_s=0.2), connect(redis_url), _connectors(),
                    worker_id="fuzz", hardware={})
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.state.value == "idle", within_s=10)
        await _write_garbage(raw, keys, garbage)
        written: dict[bytes, dict[bytes, bytes]] = {}
        for job_id, extra, publish in bad_jobs:
            fields = {b"id": job_id, b"status": b"pending", b"service_required": SERVICE,
                      b"payload": b'{"steps": 1, "duration_s": 0}', **extra}
            fields[b"status"] = b"pending"
            key = keys.prefix.encode() + b"job:" + job_id
            if await raw.exists(key):
                continue  # the same id drawn twice, or a wrong-type key of the garbage
            await raw.hset(key, mapping=fields)  # type: ignore[arg-type]
            await raw.zadd(keys.pending, {job_id: 50e15})
            if publish:
                await raw.publish(keys.ch_job_submitted, json.dumps({"job_id": job_id.decode("latin-1")}))
            written[job_id] = fields
        for channel, data in messages:
            await raw.publish(keys.prefix + channel, data)
        good = [await client.submit("simulation", {"duration_s": 0, "steps": 1}, priority=-100) for _ in range(3)]

        async def all_done() -> bool:
            statuses = [(await client.get(g)).get("status") for g in good]
            return statuses == ["completed"] * 3 and all([await _resolved(raw, keys, j, f) for j, f in written.items()])

        await wait_until(all_done, within_s=30, interval=0.05)
        assert not task.done(), "the worker stopped"
        assert worker.state.value in ("idle", "busy")
    finally:
        worker.request_stop()
        worker.fast_stop.set()
        await asyncio.wait_for(task, 20)
        await worker.redis.aclose()
        found = [k async for k in raw.scan_iter(match=f"{keys.prefix}*".encode())]
        if found:
            await raw.delete(*found)
        await raw.aclose()
        await client.redis.aclose()


def _connectors() -> list[Any]:
    from connectors.base import ConnectorConfig
    from connectors.manager import Plugins

    return Plugins().create_connectors(["simulation"], ConnectorConfig("fuzz"))


@pytest.mark.timeout(600)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_jobs=BAD_JOBS, garbage=INDEX_GARBAGE, messages=MESSAGES)
def test_hostile_records_never_stop_the_worker(redis_url: str, bad_jobs: list[tuple[bytes, dict[bytes, bytes], bool]],
                                               garbage: list[tuple[str, bytes, Any]],
                                               messages: list[tuple[str, bytes]]) -> None:
    asyncio.run(_one(redis_url, bad_jobs, garbage, messages))
