"""Records written into Redis by something other than our submitter (their API, a script, a bug,
an operator with redis-cli) never stop work: each case found in review gets a test here.

A bad job ends failed with a readable error naming the field, or, when even that is impossible,
its id is parked in emp:quarantine with a reason; a bad index entry is dropped or rebuilt; the
worker goes on claiming, and a good job beside the bad one completes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping

import pytest
import redis.asyncio as aioredis

from tests.conftest import WorkerFactory, wait_until
from worker.agent import Worker
from worker.client import Client
from worker.keys import Keys

GOOD_PAYLOAD = b'{"duration_s": 0, "steps": 1}'


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client that writes and reads bytes as they are (the redis fixture deletes the keys)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10.0)
    yield client
    await client.aclose()


async def put_job(raw: aioredis.Redis, keys: Keys, fields: Mapping[bytes, bytes], *, job_id: str | None = None,
                  publish: bool = True) -> str:
    """A job as a foreign writer leaves it: the hash, jobs:pending and (optionally) job_submitted."""
    job_id = job_id or str(uuid.uuid4())
    await raw.hset(keys.job(job_id), mapping=dict(fields))
    await raw.zadd(keys.pending, {job_id: 50e15})
    if publish:
        await raw.publish(keys.ch_job_submitted, json.dumps({"job_id": job_id}))
    return job_id


def good_fields(job_id: str, **extra: bytes) -> dict[bytes, bytes]:
    return {b"id": job_id.encode(), b"status": b"pending", b"service_required": b"simulation",
            b"payload": GOOD_PAYLOAD, **{k.encode(): v for k, v in extra.items()}}


async def put_good(raw: aioredis.Redis, keys: Keys, *, publish: bool = True) -> str:
    job_id = str(uuid.uuid4())
    return await put_job(raw, keys, good_fields(job_id), job_id=job_id, publish=publish)


async def status_of(raw: aioredis.Redis, keys: Keys, job_id: str) -> str:
    value = await raw.hget(keys.job(job_id), "status")
    return value.decode() if value else ""


async def error_of(raw: aioredis.Redis, keys: Keys, job_id: str) -> str:
    value = await raw.hget(keys.job(job_id), "error")
    return value.decode() if value else ""


async def wait_status(raw: aioredis.Redis, keys: Keys, job_id: str, status: str, within_s: float = 15) -> None:
    async def reached() -> bool:
        return await status_of(raw, keys, job_id) == status

    try:
        await wait_until(reached, within_s=within_s, interval=0.02)
    except AssertionError:
        raise AssertionError(f"job {job_id} is {await status_of(raw, keys, job_id)!r}, not {status!r}: "
                             f"{await raw.hgetall(keys.job(job_id))}") from None


def assert_alive(worker: Worker) -> None:
    assert worker.state.value in ("idle", "busy"), worker.state


# --- bytes that are not text ------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "expected"), [
    ({b"payload": b'{"prompt": "\xff\xfe"}'}, "'payload' is not UTF-8 text (byte 0xff at offset 12)"),
    ({b"customer_id": b"\xc3("}, "'customer_id' is not UTF-8 text"),
    ({b"pay\xffload": b"1"}, "a field name is not UTF-8 text: 'pay\\xffload'"),
])
async def test_bytes_that_are_not_utf8_fail_the_job_naming_the_field(
    raw: aioredis.Redis, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
    fields: dict[bytes, bytes], expected: str,
) -> None:
    worker = await start_worker()
    job_id = str(uuid.uuid4())
    await put_job(raw, keys, {**good_fields(job_id), **fields}, job_id=job_id)
    await wait_status(raw, keys, job_id, "failed")
    error = await error_of(raw, keys, job_id)
    assert expected in error and error.isprintable(), error
    assert json.loads(await redis.hget(keys.failed, job_id))["error"] == error
    good = await put_good(raw, keys)
    await wait_status(raw, keys, good, "completed")
    assert_alive(worker)


# --- numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["priority", "workflow_priority"])
@pytest.mark.parametrize("value", [b"nan", b"1e400", b"-inf", b"1e16"])
async def test_a_priority_that_is_no_finite_number_fails_the_job_and_reconcile_goes_on(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory, field: str, value: bytes,
) -> None:
    worker = await start_worker(poll_interval_s=0.2)
    bad_id = str(uuid.uuid4())
    await put_job(raw, keys, {**good_fields(bad_id), field.encode(): value}, job_id=bad_id, publish=False)
    behind = await put_good(raw, keys, publish=False)  # found only by reconcile, after the bad one
    await wait_status(raw, keys, bad_id, "failed")
    error = await error_of(raw, keys, bad_id)
    assert f"{field} is not a finite number" in error and value.decode() in error, error
    await wait_status(raw, keys, behind, "completed")
    assert_alive(worker)


@pytest.mark.parametrize("field", ["retry_count", "max_retries"])
async def test_a_count_of_nan_or_inf_fails_the_job_readably(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory, field: str,
) -> None:
    worker = await start_worker()
    ids = []
    for value in (b"nan", b"inf"):
        job_id = str(uuid.uuid4())
        ids.append(await put_job(raw, keys, {**good_fields(job_id), field.encode(): value}, job_id=job_id))
    for job_id in ids:
        await wait_status(raw, keys, job_id, "failed")
        assert f"{field} must be a number" in await error_of(raw, keys, job_id)
    assert_alive(worker)


# --- the id field ---------------------------------------------------------------------------------------


async def test_a_job_hash_without_an_id_field_runs_under_its_key_id(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
) -> None:
    worker = await start_worker()
    job_id = str(uuid.uuid4())
    fields = good_fields(job_id)
    del fields[b"id"]
    await put_job(raw, keys, fields, job_id=job_id)
    await wait_status(raw, keys, job_id, "completed")
    assert await raw.hget(keys.job(job_id), "id") == job_id.encode()
    assert not await raw.exists(keys.job(""))
    assert_alive(worker)


async def test_a_job_hash_whose_id_names_another_job_fails_and_leaves_that_job_alone(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
) -> None:
    other = await put_good(raw, keys, publish=False)
    await raw.zrem(keys.pending, other)  # a job of someone else's, not queued
    before = await raw.hgetall(keys.job(other))
    worker = await start_worker()
    job_id = str(uuid.uuid4())
    await put_job(raw, keys, {**good_fields(job_id), b"id": other.encode()}, job_id=job_id)
    await wait_status(raw, keys, job_id, "failed")
    assert f"id field names job '{other}', not this job" in await error_of(raw, keys, job_id)
    assert await raw.hgetall(keys.job(other)) == before
    assert_alive(worker)


# --- indexes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["all classes", "the service's classes"])
@pytest.mark.parametrize("garbage", [b"{not json", b'{"service": 5, "requirements": {}}', b"[]", b"\xff"])
async def test_a_garbage_class_entry_never_stops_claims(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory, garbage: bytes, index: str,
) -> None:
    """Junk in emp:classes is dropped by the reaper's sweep, junk in emp:classes:{service} by the
    claim that reads it; neither stops a claim."""
    hash_key = keys.classes if index == "all classes" else keys.classes_of("simulation")
    await raw.hset(hash_key, mapping={"junk-class": garbage})
    worker = await start_worker()
    good = await put_good(raw, keys)
    await wait_status(raw, keys, good, "completed")

    async def dropped() -> bool:
        return not await raw.hexists(hash_key, "junk-class")

    await wait_until(dropped)
    assert_alive(worker)


async def test_a_garbage_class_entry_of_a_real_class_is_rebuilt_from_its_jobs(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory,
) -> None:
    job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1})
    class_id = (await client.get(job_id))["emp_class"]
    await raw.hset(keys.classes_of("simulation"), mapping={class_id: b"garbage"})
    await start_worker()
    await wait_status(raw, keys, job_id, "completed")


@pytest.mark.parametrize("member", [b"garbage", b"1:2:", b"0000000000001:000000000001:no-such-job", b"\xff:\xff:\xff"])
async def test_a_garbage_class_queue_member_never_stops_claims(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory, member: bytes,
) -> None:
    first = await client.submit("simulation", {"duration_s": 0, "steps": 1})
    class_id = (await client.get(first))["emp_class"]
    await raw.zadd(keys.class_queue(class_id), {member: -1000})  # ahead of every real entry
    worker = await start_worker()
    await wait_status(raw, keys, first, "completed")
    second = await put_good(raw, keys)
    await wait_status(raw, keys, second, "completed")
    assert await raw.zscore(keys.class_queue(class_id), member) is None
    assert_alive(worker)


async def test_an_entry_naming_a_job_of_another_class_is_dropped_not_claimed(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory,
) -> None:
    """A member forged into a class this worker matches must not hand it a job of another class."""
    foreign = await client.submit("simulation", {}, requirements={"hardware": {"gpu_memory_gb": 999}})
    mine = await client.submit("simulation", {"duration_s": 0, "steps": 1})
    class_id = (await client.get(mine))["emp_class"]
    forged = (await client.get(foreign))["emp_member"]
    await raw.zadd(keys.class_queue(class_id), {forged: -1000})
    await start_worker()
    await wait_status(raw, keys, mine, "completed")
    assert await status_of(raw, keys, foreign) == "pending"
    assert await raw.zscore(keys.class_queue(class_id), forged) is None


@pytest.mark.parametrize("kind", ["text", "hash", "huge"])
async def test_a_garbage_sequence_counter_starts_again(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory, kind: str,
) -> None:
    if kind == "hash":
        await raw.hset(keys.seq, "x", "y")
    else:
        await raw.set(keys.seq, b"abc" if kind == "text" else b"9223372036854775807")
    worker = await start_worker()
    good = await put_good(raw, keys)  # indexed by the claim: needs a sequence number
    await wait_status(raw, keys, good, "completed")
    assert int(await raw.get(keys.seq)) >= 1
    assert_alive(worker)


async def test_a_job_key_of_the_wrong_type_is_quarantined_and_reconcile_goes_on(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory,
) -> None:
    bad = str(uuid.uuid4())
    await raw.set(keys.job(bad), b"not a hash")
    await raw.zadd(keys.pending, {bad: 60e15})  # ahead of the good job
    worker = await start_worker(poll_interval_s=0.2)
    behind = await put_good(raw, keys, publish=False)
    await wait_status(raw, keys, behind, "completed")
    record = json.loads(await raw.hget(keys.quarantine, bad))
    assert "not a hash" in record["reason"] and record["at"]
    assert await raw.zscore(keys.pending, bad) is None
    assert [q.job_id for q in await client.quarantined()] == [bad]
    assert_alive(worker)


async def test_our_index_keys_of_the_wrong_type_are_rebuilt(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory,
) -> None:
    queued = await client.submit("simulation", {"duration_s": 0, "steps": 1})
    await raw.delete(keys.classes, keys.indexed)
    await raw.set(keys.classes, b"x")
    await raw.set(keys.indexed, b"y")
    await raw.set(keys.leases, b"z")
    worker = await start_worker(poll_interval_s=0.2)
    await wait_status(raw, keys, queued, "completed")
    assert_alive(worker)


async def test_a_stale_indexed_id_never_hides_a_new_job(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
) -> None:
    """Reconcile compared set sizes: one stale id in emp:indexed hid one job written without
    job_submitted (their cancel removes from jobs:pending, their API adds to it)."""
    await raw.sadd(keys.indexed, "stale-id")
    hidden = await put_good(raw, keys, publish=False)
    assert await raw.zcard(keys.pending) == await raw.scard(keys.indexed)  # the sizes agree
    worker = await start_worker(poll_interval_s=0.2)
    await wait_status(raw, keys, hidden, "completed")
    assert not await raw.sismember(keys.indexed, "stale-id")
    assert_alive(worker)


@pytest.mark.parametrize("bad_id", ["bad\nid", "bad\x00id", "x" * 300])
async def test_an_id_that_cannot_be_echoed_is_quarantined(
    raw: aioredis.Redis, keys: Keys, start_worker: WorkerFactory, bad_id: str,
) -> None:
    worker = await start_worker(poll_interval_s=0.2)
    await put_job(raw, keys, good_fields(bad_id), job_id=bad_id)
    behind = await put_good(raw, keys, publish=False)
    await wait_status(raw, keys, behind, "completed")
    assert await raw.hexists(keys.quarantine, bad_id)
    assert await raw.zscore(keys.pending, bad_id) is None
    assert_alive(worker)


# --- pub/sub ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [b"\xff\xfe", b'{"job_id": "\xff"}', b'{"job_id": ["x"]}',
                                     b'{"job_id": "x", "service_required": []}', b"[1]", b"null"])
async def test_an_unreadable_job_submitted_message_never_kills_the_listener(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory, message: bytes,
) -> None:
    worker = await start_worker(poll_interval_s=60.0)  # only the listener can wake it in time
    await raw.publish(keys.ch_job_submitted, message)
    for _ in range(2):  # picked up at once, twice: the listener is alive
        job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1})
        await wait_status(raw, keys, job_id, "completed", within_s=5)
    assert_alive(worker)


async def test_status_and_doctor_show_the_quarantine(raw: aioredis.Redis, keys: Keys, redis_url: str,
                                           start_worker: WorkerFactory) -> None:
    bad = "bad\x01id"
    await put_job(raw, keys, good_fields(bad), job_id=bad)
    await start_worker()
    await wait_until(lambda: raw.hexists(keys.quarantine, bad), within_s=15)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "status", "--json",
        env={**os.environ, "EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": keys.prefix},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    (parked,) = json.loads(out)["quarantined"]
    assert parked["job_id"] == "'bad\\x01id'" and "control or non-ASCII" in parked["reason"]
    assert parked["where"] in ("index", "claim") and parked["at"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "doctor",
        env={**os.environ, "EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": keys.prefix},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert "WARN  quarantine: 1 job id(s) that no worker could read or fail" in out.decode(), out.decode()


async def test_a_class_queue_of_the_wrong_type_is_replaced(
    raw: aioredis.Redis, client: Client, keys: Keys, start_worker: WorkerFactory,
) -> None:
    queued = await client.submit("simulation", {"duration_s": 0, "steps": 1})
    class_id = (await client.get(queued))["emp_class"]
    await raw.set(keys.class_queue(class_id), b"not a sorted set")  # the queued job's entry is gone with it
    worker = await start_worker(poll_interval_s=0.2)
    later = await client.submit("simulation", {"duration_s": 0, "steps": 1})  # indexing replaces the key
    await wait_status(raw, keys, later, "completed")
    await wait_status(raw, keys, queued, "completed")  # re-indexed by reconcile
    assert_alive(worker)
