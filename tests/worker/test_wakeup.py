"""Wake-up without a thundering herd (worker/wake.py): a submitted job wakes one idle worker through
a wake token, not every idle worker; emp-job-queue's job_submitted reaches the queue through the
relays; and no token a worker pops is lost.

Real Redis, real Worker instances in this event loop; a 60 s slow poll unless said otherwise, so
that a job picked up within a second was picked up by a wake-up, not by a poll.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import WorkerFactory, wait_until
from worker.agent import Worker, WorkerState
from worker.client import Client
from worker.errors import ConfigError
from worker.keys import Keys
from worker.queue import Queue, QueueConfig
from worker.settings import load_settings
from worker.wake import Waiter

SLOW_POLL = 60.0
JOB: dict[str, Any] = {"duration_s": 0, "steps": 1}
HW_24 = {"gpu_memory_gb": 24, "gpu_model": "fake", "ram_gb": 64, "cpu_cores": 8}
HW_48 = {**HW_24, "gpu_memory_gb": 48}


async def _fleet(start_worker: WorkerFactory, count: int, name: str = "w", **overrides: Any) -> list[Worker]:
    overrides.setdefault("poll_interval_s", SLOW_POLL)
    workers = list(await asyncio.gather(*(start_worker(f"{name}{i}", **overrides) for i in range(count))))
    await _all_waiting(workers)
    return workers


async def _all_waiting(workers: list[Worker]) -> None:
    """Every worker blocked on its wake lists (its claim found nothing)."""
    await wait_until(lambda: all(w.waiter.in_flight for w in workers), within_s=20, interval=0.02)


async def _relays_up(redis: aioredis.Redis, keys: Keys, workers: list[Worker], count: int) -> list[Worker]:
    """Wait for `count` relays, subscribed to job_submitted."""
    async def up() -> bool:
        subscribed = dict(await redis.pubsub_numsub(keys.ch_job_submitted)).get(keys.ch_job_submitted, 0)
        return sum(w.relays.is_relay for w in workers) == count and int(subscribed) == count

    await wait_until(up, within_s=30, interval=0.05)
    return [w for w in workers if w.relays.is_relay]


async def _submit_like_their_api(redis: aioredis.Redis, keys: Keys, **fields: str) -> str:
    """HSET + ZADD jobs:pending + PUBLISH {job_id}: all emp-job-queue's API does (no token)."""
    job_id = str(uuid.uuid4())
    await redis.hset(keys.job(job_id), mapping={"id": job_id, "status": "pending", "service_required": "simulation",
                                                "payload": json.dumps(JOB), "priority": "50", **fields})
    await redis.zadd(keys.pending, {job_id: 50e15})
    await redis.publish(keys.ch_job_submitted, json.dumps({"job_id": job_id}))
    return job_id


async def _server_us(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


async def _completed(client: Client, job_id: str, within_s: float = 10) -> dict[str, str]:
    job: dict[str, str] = {}

    async def done() -> bool:
        job.update(await client.get(job_id))
        return job.get("status") == "completed"

    await wait_until(done, within_s=within_s, interval=0.01)
    return job


async def test_a_job_wakes_one_of_twenty_idle_workers_not_all(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    workers = await _fleet(start_worker, 20)
    await _relays_up(redis, keys, workers, 2)
    for submit in ("ours", "their api"):
        await _all_waiting(workers)
        before = sum(w.claim_calls for w in workers), sum(w.claims for w in workers)
        if submit == "ours":
            job_id = await client.submit("simulation", JOB)
        else:
            job_id = await _submit_like_their_api(redis, keys)
        await _completed(client, job_id)
        await _all_waiting(workers)  # the worker that ran it has looked for its next job
        calls = sum(w.claim_calls for w in workers) - before[0]
        assert sum(w.claims for w in workers) - before[1] == 1
        # ours: the token's claim and the runner's next look; theirs: one claim per relay, plus
        # the runner's next look and a passed-on token's claim at most (the old herd: 20)
        assert calls <= (2 if submit == "ours" else 5), (submit, calls)


async def test_pickup_is_instant_without_polling(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    workers = await _fleet(start_worker, 1)
    await _relays_up(redis, keys, workers, 1)
    for _ in range(3):
        job = await _completed(client, await client.submit("simulation", JOB))
        assert int(job["emp_claimed_us"]) - int(job["emp_submitted_us"]) < 1_000_000
        await _all_waiting(workers)
        published_us = await _server_us(redis)
        job = await _completed(client, await _submit_like_their_api(redis, keys))
        assert int(job["emp_claimed_us"]) - published_us < 1_000_000
        await _all_waiting(workers)


async def test_a_job_only_one_worker_can_run_is_passed_on_to_it(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    small = await _fleet(start_worker, 9, "small", hardware=HW_24)
    big = await _fleet(start_worker, 1, "big", hardware=HW_48)
    await _all_waiting(small + big)
    job_id = await client.submit("simulation", JOB, requirements={"hardware": {"gpu_memory_gb": 48}})
    job = await _completed(client, job_id)
    assert job["worker_id"] == "big0"
    assert int(job["emp_claimed_us"]) - int(job["emp_submitted_us"]) < 1_000_000


async def test_another_worker_takes_over_from_stopped_relays(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    # a short heartbeat TTL (2 s): the election runs every 2-4 of them
    workers = await _fleet(start_worker, 4, heartbeat_interval_s=0.25, lease_s=1.0)
    relays = await _relays_up(redis, keys, workers, 2)
    for relay in relays:
        relay.request_stop()
    await wait_until(lambda: all(r.state is WorkerState.STOPPED for r in relays), within_s=20)
    rest = [w for w in workers if w not in relays]
    await _relays_up(redis, keys, rest, 2)
    await _all_waiting(rest)
    published_us = await _server_us(redis)
    job = await _completed(client, await _submit_like_their_api(redis, keys))
    assert job["worker_id"] in {w.worker_id for w in rest}
    assert int(job["emp_claimed_us"]) - published_us < 1_000_000


async def test_a_token_popped_by_a_worker_without_room_is_passed_on(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    job_id = await client.submit("simulation", JOB)  # its token waits on the list: nobody is idle yet
    wake = asyncio.Event()
    waiter = Waiter(redis, keys, Queue(redis, keys, QueueConfig()), wake)
    waiter.listen(["simulation"], 5.0)
    await asyncio.wait_for(wake.wait(), 5)
    assert list(waiter.ready) == [(0, job_id)] and await redis.llen(keys.wake_list("simulation")) == 0
    await waiter.stand_down()  # this "worker" has no free place now: the token goes back
    await waiter.close()
    assert await redis.lrange(keys.wake_list("simulation"), 0, -1) == [f"0:{job_id}"]
    worker = await start_worker("taker", poll_interval_s=SLOW_POLL)
    assert (await _completed(client, job_id))["worker_id"] == worker.worker_id


async def test_a_busy_worker_stops_waiting_so_the_next_token_reaches_an_idle_one(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    # the relay claims an API job straight from job_submitted while its BLPOP is in flight: that
    # BLPOP is unblocked, or the next token would go to a worker with no free place
    workers = await _fleet(start_worker, 2, wake_relays=1)
    (relay,) = await _relays_up(redis, keys, workers, 1)
    (other,) = [w for w in workers if w is not relay]
    long_job = await _submit_like_their_api(redis, keys, payload=json.dumps({"duration_s": 3, "steps": 1}))
    await wait_until(lambda: long_job in relay.running, within_s=5)
    await wait_until(lambda: not relay.waiter.in_flight, within_s=5)
    job = await _completed(client, await client.submit("simulation", JOB))
    assert job["worker_id"] == other.worker_id
    assert int(job["emp_claimed_us"]) - int(job["emp_submitted_us"]) < 1_000_000


async def test_an_idle_worker_sends_under_one_command_a_second(
    redis_url: str, keys: Keys, start_worker: WorkerFactory
) -> None:
    # default intervals: a heartbeat every 2 s (0.5 cmd/s, as before) and, per slow poll of 4-6 s,
    # one BLPOP and the claim at its timeout: 0.9 cmd/s in all
    worker = await start_worker("quiet", heartbeat_interval_s=2.0, lease_s=8.0, poll_interval_s=5.0)
    await _all_waiting([worker])
    await wait_until(lambda: worker.relays.is_relay, within_s=10)
    beat, claim = worker.queue._scripts["heartbeat"].sha, worker.queue._scripts["claim"].sha
    seconds, sent = 10.0, {"heartbeat": 0, "blpop": 0, "claim": 0, "other": 0}
    watcher = aioredis.Redis.from_url(redis_url, decode_responses=True)

    async def count() -> None:
        async with watcher.monitor() as monitor:
            async for entry in monitor.listen():
                command = str(entry.get("command", ""))
                # this test's worker: every command it sends names this test's prefix
                if entry.get("client_type") != "lua" and keys.prefix in command:
                    kind = ("heartbeat" if beat in command else "claim" if claim in command
                            else "blpop" if command.startswith("BLPOP") else "other")
                    sent[kind] += 1

    task = asyncio.create_task(count())
    await asyncio.sleep(seconds)  # the measurement window
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await watcher.aclose()
    polls = int(seconds / (0.6 * 5.0)) + 1  # at most this many slow polls (jittered 0.6-1.4x) fit in the window
    assert 1 <= sent["blpop"] <= polls and sent["claim"] <= polls, sent
    assert sent["heartbeat"] <= int(seconds / (0.9 * 2.0)) + 1 and sent["other"] <= 1, sent


async def test_garbage_on_a_wake_list_never_breaks_the_waiter(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory
) -> None:
    (worker,) = await _fleet(start_worker, 1)
    wake_list = keys.wake_list("simulation")
    garbage = ["", "nonsense", "99:job", "-1:job", "1:", ":", "x:y", "1:" + "j" * 600, "\udcff:\udcfe"]
    for entry in garbage:
        await redis.rpush(wake_list, entry)
    await wait_until(lambda: worker.waiter.garbage >= len(garbage), within_s=10)
    await redis.rpush(wake_list, f"0:{uuid.uuid4()}")  # a token for no job: a claim finds nothing
    await redis.set(wake_list, "not a list")  # a waiter's BLPOP answers WRONGTYPE; a push replaces it
    await _all_waiting([worker])
    job = await _completed(client, await client.submit("simulation", JOB))
    assert int(job["emp_claimed_us"]) - int(job["emp_submitted_us"]) < 1_000_000
    await _all_waiting([worker])


@pytest.mark.parametrize(("value", "why"), [("-1", "greater than or equal to 0"), ("17", "less than or equal to 16"),
                                            ("two", "a valid integer")])
def test_a_bad_relay_count_is_one_line(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(wake_relays=value)
    assert str(caught.value).startswith(f"EMP_WAKE_RELAYS={value!r}: Input should be ") and why in str(caught.value)
