"""The per-job path made lean (issue 15), straight against the scripts: a claim reads only the
classes of its worker's services, reconciles only while the index and jobs:pending differ in size
(the reaper covers what equal sizes hide), can mark its job started in the same step, and wake
tokens wake one worker per job and go on to the next while their job is pending."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker import scripts
from worker.client import Client
from worker.keys import Keys
from worker.queue import MAX_WAKE_HOPS, Claimed, Completion, ProgressUpdate, Queue, QueueConfig, parse_wake_token

CAPS: dict[str, Any] = {"services": ["simulation"], "hardware": {"gpu_memory_gb": 24}, "models": {},
                        "customer_access": {}, "custom": {}}


async def script_commands(redis: aioredis.Redis, keys: Keys, action: Callable[[], Awaitable[Any]]) -> list[str]:
    """The Redis commands scripts ran on this test's keys while `action()` ran (from MONITOR,
    between two markers this test sends, so that nothing before or after is counted)."""
    start, end = f"{keys.prefix}monitor-start", f"{keys.prefix}monitor-end"
    seen: list[str] = []
    async with redis.monitor() as monitor:
        begun = asyncio.Event()

        async def collect() -> None:
            while True:
                entry = await monitor.next_command()
                command = str(entry.get("command", ""))
                if start in command:
                    begun.set()
                elif end in command:
                    return
                elif begun.is_set() and entry.get("client_type") == "lua" and keys.prefix in command:
                    seen.append(command)

        reader = asyncio.create_task(collect())
        while not begun.is_set():  # MONITOR is on once it reports our own marker
            await redis.echo(start)
            await asyncio.wait([reader], timeout=0.2)
        await action()
        await redis.echo(end)
        await asyncio.wait_for(reader, 10)
    return seen


async def test_a_claim_reads_only_the_classes_of_its_services(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    for n in range(300):  # 300 classes of a service this worker does not run
        await client.submit("other-service", {}, requirements={"custom_key": f"value-{n}"})
    mine = await client.submit("simulation", {})
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    claimed: list[str] = []

    async def claim() -> None:
        got = await queue.claim("w1", CAPS)
        claimed.append(got.job_id if got else "")

    commands = await script_commands(redis, keys, claim)
    assert claimed == [mine]
    class_queues = {c for c in commands if re.search(r"emp:q:[0-9a-f]{40}", c)}
    mine_class = (await client.get(mine))["emp_class"]
    assert class_queues and all(mine_class in c for c in class_queues), class_queues
    assert not any("other-service" in c for c in commands)
    assert len(commands) <= 25, commands  # 117 before the registry and the gated reconcile


async def test_claims_reconcile_while_the_sizes_differ_and_the_reaper_finds_what_equal_sizes_hide(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """jobs:pending and emp:indexed of equal size can still disagree: a job their cancel took out
    of jobs:pending (still indexed, in a class no worker here looks at) and a job their API wrote
    without a job_submitted (pending, not indexed). Claims skip the membership sweep then; the
    reaper's step finds the foreign job."""
    stale = await client.submit("other-service", {})
    await redis.zrem(keys.pending, stale)  # their cancel: gone from jobs:pending, still indexed
    foreign = "foreign-job"
    await redis.hset(keys.job(foreign), mapping={"id": foreign, "service_required": "simulation",
                                                 "status": "pending", "priority": "50", "payload": "{}"})
    await redis.zadd(keys.pending, {foreign: 50})
    assert await redis.zcard(keys.pending) == await redis.scard(keys.indexed) == 1
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    assert await queue.claim("w1", CAPS) is None  # equal sizes: no sweep on the claim path
    beat = await queue.heartbeat("w1", "idle", {}, 30, {})  # the reaper's step (it holds the lock)
    assert beat.renewed == 0
    got = await queue.claim("w1", CAPS)
    assert got is not None and got.job_id == foreign
    assert not await redis.sismember(keys.indexed, stale)  # and the stale entry is dropped


async def test_a_job_indexed_before_the_per_service_registry_is_claimable_after_a_reaper_step(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """An index left by an earlier version (its class in emp:classes only) is taken over."""
    job_id = await client.submit("simulation", {})
    class_id = (await client.get(job_id))["emp_class"]
    await redis.hdel(keys.classes_of("simulation"), class_id)
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    await queue.heartbeat("w1", "idle", {}, 30, {})
    got = await queue.claim("w1", CAPS)
    assert got is not None and got.job_id == job_id
    assert await redis.hexists(keys.classes, class_id) or not await redis.exists(keys.class_queue(class_id))


async def test_a_claim_that_starts_its_job_writes_what_start_would(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    job_id = await client.submit("simulation", {"n": 1})
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    got = await queue.claim_or_defer("w1", CAPS, start=True)
    assert isinstance(got, Claimed)
    job = await client.get(job_id)
    assert job["status"] == "in_progress" and job["started_at"] == job["assigned_at"]
    assert got.fields["status"] == "in_progress" and got.fields["payload"] == json.dumps({"n": 1})
    assert (await redis.hgetall(keys.job_progress(job_id)))["status"] == "in_progress"
    events = [e[1]["event"] for e in await redis.xrange(keys.progress_stream(job_id))]
    assert events[-2:] == ["claimed", "started"]
    await queue.complete(job_id, "w1", got.attempt, "{}")  # the fence takes it as any started job
    assert (await client.get(job_id))["status"] == "completed"


async def test_a_claim_without_start_leaves_the_job_assigned(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    job_id = await client.submit("simulation", {})
    got = await Queue(redis, keys, QueueConfig(affinity_ms=0)).claim("w1", CAPS)
    assert got is not None and (await client.get(job_id))["status"] == "assigned"
    assert "started_at" not in await client.get(job_id)


# --- wake tokens ----------------------------------------------------------------------------------


async def _tokens(redis: aioredis.Redis, keys: Keys, service: str = "simulation") -> list[str]:
    return [str(t) for t in await redis.lrange(keys.wake_list(service), 0, -1)]


async def test_a_submitted_job_pushes_one_token_and_relays_add_none(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    job_id = await client.submit("simulation", {})
    assert await _tokens(redis, keys) == [f"0:{job_id}"]
    queue = Queue(redis, keys, QueueConfig())
    assert not await queue.wake(job_id)  # already woken by its submission
    assert await _tokens(redis, keys) == [f"0:{job_id}"]


async def test_a_job_their_api_wrote_gets_one_token_however_many_relays_ask(
    redis: aioredis.Redis, keys: Keys
) -> None:
    await redis.hset(keys.job("theirs"), mapping={"id": "theirs", "service_required": "simulation",
                                                  "status": "pending", "payload": "{}"})
    await redis.zadd(keys.pending, {"theirs": 50})
    queue = Queue(redis, keys, QueueConfig())
    assert [await queue.wake("theirs") for _ in range(3)] == [True, False, False]
    assert await _tokens(redis, keys) == ["0:theirs"]
    assert not await queue.wake("no-such-job")


async def test_a_claim_that_leaves_the_hinted_job_pending_passes_its_token_on(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    big = await client.submit("simulation", {}, requirements={"hardware": {"gpu_memory_gb": 48}})
    await redis.delete(keys.wake_list("simulation"))
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    assert await queue.claim_or_defer("small", CAPS, big, hops=0) is None  # 24 GB cannot run it
    assert await _tokens(redis, keys) == [f"1:{big}"]
    await redis.delete(keys.wake_list("simulation"))
    assert await queue.claim_or_defer("small", CAPS, big, hops=MAX_WAKE_HOPS - 1) is None
    assert await _tokens(redis, keys) == []  # the last hop: the slow poll and busy workers' claims remain
    caps_48 = {**CAPS, "hardware": {"gpu_memory_gb": 48}}
    got = await queue.claim_or_defer("large", caps_48, big, hops=1)
    assert isinstance(got, Claimed) and got.job_id == big
    assert await _tokens(redis, keys) == []  # taken: nothing to pass on
    assert await client.get(big) and not await queue.pass_on(3, big)  # nor to hand back


async def test_a_token_handed_back_keeps_its_hops_and_a_list_stays_bounded(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    job_id = await client.submit("simulation", {})
    queue = Queue(redis, keys, QueueConfig())
    await redis.delete(keys.wake_list("simulation"))
    assert await queue.pass_on(5, job_id)
    assert await _tokens(redis, keys) == [f"5:{job_id}"]
    assert not await queue.pass_on(MAX_WAKE_HOPS, job_id)
    for _ in range(100):
        await queue.pass_on(1, job_id)
    assert await redis.llen(keys.wake_list("simulation")) == 64


async def test_a_wake_list_of_another_type_is_replaced(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    await redis.set(keys.wake_list("simulation"), "garbage")
    job_id = await client.submit("simulation", {})
    assert await _tokens(redis, keys) == [f"0:{job_id}"]


@pytest.mark.parametrize(("raw", "parsed"), [
    ("0:job-1", (0, "job-1")), (b"15:a:b:c", (15, "a:b:c")), ("3:" + "x" * 512, (3, "x" * 512)),
    ("16:job", None), ("99:job", None), ("-1:job", None), ("x:job", None), (":job", None), ("1:", None), ("job", None),
    ("1:" + "x" * 513, None), ("001:job", None), (b"\xff:job", None),
])
def test_wake_tokens_are_parsed_strictly(raw: str | bytes, parsed: tuple[int, str] | None) -> None:
    assert parse_wake_token(raw) == parsed


def test_the_hop_limit_is_the_same_in_python_and_lua() -> None:
    assert f"local MAX_WAKE_HOPS = {MAX_WAKE_HOPS}\n" in scripts.ALL["claim"]


# --- complete the last job and claim the next in one call -------------------------------------------


async def test_a_worker_completes_its_job_and_claims_the_next_in_one_call(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    first, second = [await client.submit("simulation", {"n": n}) for n in range(2)]
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    got = await queue.claim_or_defer("w1", CAPS, start=True)
    assert isinstance(got, Claimed) and got.job_id == first
    done = Completion(first, got.attempt, json.dumps({"out": 1}), last_progress=ProgressUpdate(100.0, "done"))
    calls: list[str] = []

    async def finish() -> None:
        refused, nxt = await queue.complete_and_claim(done, "w1", CAPS, start=True)
        calls.append(f"{refused}:{nxt.job_id if isinstance(nxt, Claimed) else nxt}")

    commands = await script_commands(redis, keys, finish)
    assert calls == [f"None:{second}"]
    assert (await client.get(first))["status"] == "completed" and await client.result(first) == {"out": 1}
    assert await redis.hexists(keys.completed, first)
    assert (await client.get(second))["status"] == "in_progress"
    events = [e[1]["event"] for e in await redis.xrange(keys.progress_stream(first))]
    assert events[-2:] == ["progress", "completed"]
    assert len(commands) <= 50, commands  # one script: the completion's writes, then the claim's


async def test_a_refused_completion_still_claims(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    first, second = [await client.submit("simulation", {"n": n}) for n in range(2)]
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    got = await queue.claim_or_defer("w1", CAPS)
    assert isinstance(got, Claimed) and got.job_id == first
    refused, nxt = await queue.complete_and_claim(Completion(first, got.attempt + 1, "{}"), "w1", CAPS)
    assert refused is not None and "attempt" in refused
    assert isinstance(nxt, Claimed) and nxt.job_id == second
    assert (await client.get(first))["status"] == "assigned"  # not completed by a stale attempt
    refused, nxt = await queue.complete_and_claim(Completion(first, got.attempt, "{}"), "w1", CAPS)
    assert refused is None and nxt is None
