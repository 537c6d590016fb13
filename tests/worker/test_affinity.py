"""Model affinity and workflow restriction in the claim script, driven through the Queue API."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import beat_idle, wait_until
from worker.client import Client
from worker.keys import Keys
from worker.queue import Claimed, Deferred, Queue, QueueConfig


def caps(loaded: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"services": ["simulation"], "hardware": {"gpu_memory_gb": 24}, "customer_access": {},
            "custom": {}, "models": {"simulation": ["flux", "sdxl"]}, "loaded": loaded or [], **extra}


async def test_equal_priority_prefers_loaded_models_but_never_over_priority(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    older = await client.submit("simulation", {}, priority=50, requirements={"models": ["sdxl"]})
    flux = await client.submit("simulation", {}, priority=50, requirements={"models": ["flux"]})
    urgent = await client.submit("simulation", {}, priority=90, requirements={"models": ["sdxl"]})
    order = []
    for _ in range(3):
        got = await queue.claim("w-flux", caps(["flux"]))
        assert got is not None
        order.append(got.job_id)
    # priority first; then the flux job (loaded here) ahead of the older sdxl one; then FIFO
    assert order == [urgent, flux, older]


async def test_without_loaded_models_equal_priority_is_fifo(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    first = await client.submit("simulation", {}, requirements={"models": ["sdxl"]})
    second = await client.submit("simulation", {}, requirements={"models": ["flux"]})
    got = [await queue.claim("w", caps()) for _ in range(2)]
    assert [g.job_id for g in got if g] == [first, second]


async def test_fresh_job_is_left_to_an_idle_holder_then_taken_after_the_window(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=400))
    await beat_idle(queue, "holder", caps(["flux"]))
    job_id = await client.submit("simulation", {}, requirements={"models": ["flux"]})
    got = await queue.claim_or_defer("other", caps([]))
    assert isinstance(got, Deferred) and 0 < got.retry_in_ms <= 400
    # the holder never claims (say it is wedged): after the window anyone may take the job
    started = time.monotonic()
    claimed: list[Claimed] = []

    async def other_claims() -> bool:
        result = await queue.claim_or_defer("other", caps([]))
        if isinstance(result, Claimed):
            claimed.append(result)
        return bool(claimed)

    await wait_until(other_claims, within_s=5, interval=0.02)
    assert claimed[0].job_id == job_id and time.monotonic() - started < 2


async def test_a_busy_dead_or_unsuitable_holder_does_not_delay_the_job(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=60_000))
    # busy: its one slot holds a job
    await beat_idle(queue, "busy-holder", caps(["flux"]))
    await client.submit("simulation", {}, priority=99)
    assert await queue.claim("busy-holder", caps(["flux"])) is not None
    # unsuitable: holds flux but cannot run the job's class (too little VRAM)
    await beat_idle(queue, "small-holder", caps(["flux"], hardware={"gpu_memory_gb": 8}))
    # dead: its heartbeat key is gone
    await beat_idle(queue, "dead-holder", caps(["flux"]))
    await redis.delete(keys.heartbeat("dead-holder"))
    job_id = await client.submit("simulation", {}, requirements={"models": ["flux"], "hardware": {"gpu_memory_gb": 16}})
    got = await queue.claim_or_defer("other", caps([]))
    assert isinstance(got, Claimed) and got.job_id == job_id


async def test_loaded_registry_follows_the_worker(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig())
    await queue.set_loaded("w", ["flux", "sdxl"])
    assert await redis.smembers(keys.loaded("flux")) == {"w"}
    await queue.set_loaded("w", ["sdxl"])
    assert await redis.smembers(keys.loaded("flux")) == set()
    assert await redis.smembers(keys.loaded("sdxl")) == {"w"}
    await queue.set_loaded("w", [])
    assert await redis.exists(keys.loaded("sdxl")) == 0


async def test_workflow_restricted_worker_takes_only_its_workflow_without_head_of_line_blocking(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig())
    for _ in range(300):  # same class, other workflows, all ahead of ours
        await client.submit("simulation", {}, priority=80, workflow_id="wf-other")
    await client.submit("simulation", {}, priority=50)  # no workflow
    mine = [await client.submit("simulation", {}, priority=p, workflow_id="wf-mine") for p in (10, 60)]
    restricted = caps(workflow_id="wf-mine")
    first = await queue.claim("restricted", restricted)
    second = await queue.claim("restricted", restricted)
    assert first is not None and second is not None
    assert [first.job_id, second.job_id] == [mine[1], mine[0]]  # priority order within the workflow
    assert await queue.claim("restricted", restricted) is None
    # an unrestricted worker still takes the others, and the index holds no stale workflow entries
    got = await queue.claim("free", caps())
    assert got is not None and got.fields["workflow_id"] == "wf-other"
    assert await redis.zcard(keys.workflow_queue("wf-mine")) == 0
    assert await redis.zcard(keys.workflow_queue("wf-other")) == 299


async def test_a_dead_workers_loaded_models_are_forgotten(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(reap_period_ms=10))
    await beat_idle(queue, "ghost", caps(["flux"]))
    assert await redis.smembers(keys.loaded("flux")) == {"ghost"}
    await redis.delete(keys.heartbeat("ghost"))  # it died without deregistering

    async def forgotten() -> bool:
        await beat_idle(queue, "survivor", caps([]))  # a live worker's beat runs the reaper
        return not await redis.sismember(keys.loaded("flux"), "ghost")

    await wait_until(forgotten, within_s=5, interval=0.02)


async def test_restricted_worker_sees_past_many_jobs_of_its_workflow_it_cannot_run(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig())
    for _ in range(100):
        await client.submit("other-service", {}, priority=90, workflow_id="wf-mine")
    mine = await client.submit("simulation", {}, priority=50, workflow_id="wf-mine")
    got = await queue.claim("restricted", caps(workflow_id="wf-mine"))
    assert got is not None and got.job_id == mine


async def test_a_huge_models_list_skips_the_affinity_hand_off(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=60_000))
    many = [f"m{i}" for i in range(40)]
    holder = caps(many)
    holder["models"] = {"simulation": many}
    await beat_idle(queue, "holder", holder)
    job_id = await client.submit("simulation", {}, requirements={"models": many})
    other = caps()
    other["models"] = {"simulation": many}
    got = await queue.claim_or_defer("other", other)
    assert isinstance(got, Claimed) and got.job_id == job_id  # not deferred: the list is over the cap
