"""One process per worker id: the instance token (worker:{id}:instance) that each heartbeat sets
with the heartbeat's TTL, with real worker processes."""

from __future__ import annotations

import signal
import time

from tests.conftest import wait_until
from tests.procs import WorkerProcess
from worker.client import Client
from worker.keys import Keys

TTL_S = 3  # the heartbeat TTL WorkerProcess's settings give: max(3 x 0.5 s, lease 2 s + 1)


async def _holder(client: Client, keys: Keys, worker_id: str) -> str:
    return str(await client.redis.get(keys.instance(worker_id)) or "")


async def _registered(client: Client, keys: Keys, worker_id: str) -> bool:
    return bool(await client.redis.exists(keys.heartbeat(worker_id))) and bool(
        await _holder(client, keys, worker_id))


async def test_a_second_live_process_with_the_id_refuses_in_one_line(
    client: Client, redis_url: str, keys: Keys
) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "twin") as first:
        await wait_until(lambda: _registered(client, keys, "twin"), within_s=20)
        token = await _holder(client, keys, "twin")
        assert first.proc is not None and f":{first.proc.pid}:" in token
        async with WorkerProcess(redis_url, keys.prefix, "twin") as second:
            assert await second.wait(30) == 2, second.output()
            errors = [line for line in second.output().splitlines() if "configuration error" in line]
            assert len(errors) == 1 and "worker id 'twin' is in use by another live process" in errors[0]
            assert token in errors[0]  # it names the holder (host:pid:random)
        assert first.running
        assert await _holder(client, keys, "twin") == token  # never taken over
        job = await first.run_job("simulation", {"duration_s": 0, "steps": 1})
        assert job["status"] == "completed" and job["worker_id"] == "twin"


async def test_an_orphans_token_lapses_and_the_newcomer_then_takes_the_id(
    client: Client, redis_url: str, keys: Keys
) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "phoenix") as old:
        await wait_until(lambda: _registered(client, keys, "phoenix"), within_s=20)
        old_token = await _holder(client, keys, "phoenix")
        old.signal(signal.SIGKILL)  # no deregistration: the token stays until its TTL lapses
        await old.wait()
    assert await _holder(client, keys, "phoenix") == old_token
    killed_at = time.monotonic()
    async with WorkerProcess(redis_url, keys.prefix, "phoenix", EMP_LOG_LEVEL="INFO") as new:
        await wait_until(lambda: "is held by another process" in new.output(), within_s=20)

        async def taken_over() -> bool:
            holder = await _holder(client, keys, "phoenix")
            return bool(holder) and holder != old_token

        await wait_until(taken_over, within_s=TTL_S + 15)
        assert time.monotonic() - killed_at < TTL_S + 15
        job = await new.run_job("simulation", {"duration_s": 0, "steps": 1})
        assert job["status"] == "completed"


async def test_a_clean_stop_lets_go_of_the_id_at_once(client: Client, redis_url: str, keys: Keys) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "restarted") as old:
        await wait_until(lambda: _registered(client, keys, "restarted"), within_s=20)
        old.signal(signal.SIGTERM)
        assert await old.wait() == 0
    assert await _holder(client, keys, "restarted") == ""
    async with WorkerProcess(redis_url, keys.prefix, "restarted") as new:
        await wait_until(lambda: _registered(client, keys, "restarted"), within_s=20)
        assert "is held by another process" not in new.output()


async def test_a_displaced_worker_stops_writing_under_the_id(client: Client, redis_url: str, keys: Keys) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "usurped") as proc:
        await wait_until(lambda: _registered(client, keys, "usurped"), within_s=20)
        # What a newcomer does once this worker's token lapsed (it stalled past the TTL): its own token.
        await client.redis.set(keys.instance("usurped"), "elsewhere:1:feedface", ex=60)
        assert await proc.wait(20) == 0, proc.output()
        errors = [line for line in proc.output().splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "held by another process (elsewhere:1:feedface)" in errors[0], proc.output()
    # It wrote nothing more: no offline mark, no deleted heartbeat or token of the newcomer's.
    assert await _holder(client, keys, "usurped") == "elsewhere:1:feedface"
    assert await client.redis.hget(keys.worker("usurped"), "status") != "offline"
    assert await client.redis.sismember(keys.workers_active, "usurped")
