"""Models stored in Redis once (Queue.set_models -> the worker hash's emp_models) instead of sent
with every claim: the claim script reads them when the claim capabilities carry no models."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis

from tests.conftest import beat_idle
from worker.client import Client
from worker.keys import MODELS_FIELD, Keys
from worker.queue import Deferred, Queue, QueueConfig


def caps_without_models(loaded: list[str] | None = None) -> dict[str, Any]:
    return {"services": ["simulation"], "hardware": {"gpu_memory_gb": 24}, "customer_access": {},
            "custom": {}, "loaded": loaded or []}


async def test_claim_matches_the_models_stored_with_set_models(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    await queue.set_models("w", {"simulation": ["flux"]})
    assert json.loads(await redis.hget(keys.worker("w"), MODELS_FIELD)) == {"simulation": ["flux"]}
    sdxl = await client.submit("simulation", {}, requirements={"models": ["sdxl"]})
    flux = await client.submit("simulation", {}, requirements={"models": ["flux"]})

    got = await queue.claim("w", caps_without_models())
    assert got is not None and got.job_id == flux
    assert await queue.claim("w", caps_without_models()) is None  # it lacks sdxl

    await queue.set_models("w", {"simulation": ["flux", "sdxl"]})  # a changed list changes the outcome
    got = await queue.claim("w", caps_without_models())
    assert got is not None and got.job_id == sdxl


async def test_removing_a_stored_model_stops_its_claims(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    await queue.set_models("w", {"simulation": ["flux"]})
    await queue.set_models("w", {})
    await client.submit("simulation", {}, requirements={"models": ["flux"]})
    assert await queue.claim("w", caps_without_models()) is None
    await queue.set_models("w", {"other-service": ["flux"]})  # a model of any service counts, as today
    assert await queue.claim("w", caps_without_models()) is not None


async def test_without_stored_models_a_model_job_is_not_claimed(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    await client.submit("simulation", {}, requirements={"models": ["flux"]})
    assert await queue.claim("w", caps_without_models()) is None
    await redis.hset(keys.worker("w"), MODELS_FIELD, "not json")  # unreadable: no models, no error
    assert await queue.claim("w", caps_without_models()) is None
    plain = await client.submit("simulation", {})
    got = await queue.claim("w", caps_without_models())
    assert got is not None and got.job_id == plain


async def test_models_in_the_capabilities_win_over_stored_ones(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    await queue.set_models("w", {"simulation": ["sdxl"]})
    await client.submit("simulation", {}, requirements={"models": ["sdxl"]})
    assert await queue.claim("w", {**caps_without_models(), "models": {"simulation": ["flux"]}}) is None
    assert await queue.claim("w", {**caps_without_models(), "models": {}}) is None
    assert await queue.claim("w", caps_without_models()) is not None


async def _emp_models_reads(redis: aioredis.Redis, keys: Keys, action: Any) -> int:
    """How many times the scripts run by `action()` read a worker's emp_models (seen on MONITOR)."""
    marker = f"{keys.prefix}end-of-action"
    commands: list[str] = []
    async with redis.monitor() as monitor:
        await asyncio.sleep(0.05)  # let MONITOR take effect before the action

        async def collect() -> None:
            while True:
                entry = await monitor.next_command()
                commands.append(str(entry.get("command", "")))
                if marker in commands[-1]:
                    return

        reader = asyncio.create_task(collect())
        await action()
        await redis.echo(marker)
        await asyncio.wait_for(reader, 10)
    return sum(1 for c in commands if c.startswith("HGET ") and MODELS_FIELD in c and keys.prefix in c)


async def test_stored_models_are_read_lazily_and_once_per_claim(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=0))
    await queue.set_models("w", {"simulation": ["flux"]})
    await client.submit("simulation", {})

    async def claim() -> None:
        assert await queue.claim("w", caps_without_models()) is not None

    assert await _emp_models_reads(redis, keys, claim) == 0  # no requirement asked about a model
    for model in ("sdxl", "sd3", "flux"):  # three classes asking about models: one read
        await client.submit("simulation", {}, requirements={"models": [model]})
    assert await _emp_models_reads(redis, keys, claim) == 1


async def test_affinity_sees_an_idle_holder_whose_models_are_stored(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(affinity_ms=5000))
    await beat_idle(queue, "holder", caps_without_models(["flux"]))  # flux loaded, models not in its caps
    job_id = await client.submit("simulation", {}, requirements={"models": ["flux"]})
    await queue.set_models("other", {"simulation": ["flux"]})
    # the holder's stored models do not include flux: it cannot run the job, so nothing is deferred
    got = await queue.claim_or_defer("other", caps_without_models())
    assert got is not None and not isinstance(got, Deferred) and got.job_id == job_id

    await queue.set_models("holder", {"simulation": ["flux"]})
    second = await client.submit("simulation", {}, requirements={"models": ["flux"]})
    assert isinstance(await queue.claim_or_defer("other", caps_without_models()), Deferred)
    got = await queue.claim_or_defer("holder", caps_without_models(["flux"]))
    assert got is not None and not isinstance(got, Deferred) and got.job_id == second


async def test_live_capabilities_merge_the_stored_models(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig())
    await beat_idle(queue, "stored", caps_without_models())
    await queue.set_models("stored", {"simulation": ["flux"]})
    await beat_idle(queue, "inline", {**caps_without_models(), "models": {"simulation": ["sdxl"]}})
    await queue.set_models("inline", {"simulation": ["ignored"]})  # caps that carry models keep them
    await beat_idle(queue, "none", caps_without_models())
    live = await client.live_capabilities()
    assert live["stored"]["models"] == {"simulation": ["flux"]}
    assert live["inline"]["models"] == {"simulation": ["sdxl"]}
    assert live["none"]["models"] == {}

    await client.submit("simulation", {}, requirements={"models": ["flux"]})
    await client.submit("simulation", {}, requirements={"models": ["sd3"]})
    assert [json.loads(u.requirements)["models"] for u in await client.unrunnable()] == [["sd3"]]


async def test_a_heartbeat_keeps_the_worker_record_and_its_stored_models(
    redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig())
    await queue.set_models("w", {"simulation": ["flux"]})
    await redis.expire(keys.worker("w"), 60)  # as a past deregistration or offline mark leaves it
    await beat_idle(queue, "w", caps_without_models())
    assert await redis.ttl(keys.worker("w")) == -1
    assert await redis.hget(keys.worker("w"), MODELS_FIELD) is not None
