"""Sentinel: a master, a replica and a sentinel started here (skipped, saying why, where they cannot
start). A job runs through the sentinel-resolved master; a failover while jobs run loses none and
runs none twice, and the worker carries on: its leases, scripts and subscriptions come back."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.redis_servers import (
    SentinelSet,
    Unavailable,
    client_for,
    failover,
    running_worker,
    start_sentinel_set,
    stop_all,
    wait_final,
    workdir,
)
from worker.embedded import free_port
from worker.settings import Settings, load_settings

PREFIX = "sentinel-test:"


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    with workdir() as where:
        try:
            found = start_sentinel_set(where)
        except Unavailable as exc:
            pytest.skip(f"cannot start a master, a replica and a sentinel here: {exc}")
        try:
            yield found
        finally:
            stop_all(found.servers())


def _settings(found: SentinelSet, **overrides: Any) -> Settings:
    dead = free_port()  # a sentinel that is down: the next one in the list answers
    values: dict[str, Any] = {
        # the URL's host is not used in Sentinel mode; its password is the data nodes'
        "redis_url": f"redis://:{found.password}@unused-host:6379/0",
        "redis_sentinels": f"127.0.0.1:{dead},127.0.0.1:{found.sentinel.port}",
        "redis_master_name": found.master_name, "redis_sentinel_password": found.sentinel_password,
        "key_prefix": PREFIX, "heartbeat_interval_s": 0.5, "lease_s": 3.0, "poll_interval_s": 2.0,
        "grace_period_s": 5.0, "retry_backoff_s": 0.0, "machine_id": "sentinel-machine",
    }
    values.update(overrides)
    return load_settings(**values)


async def test_a_job_runs_through_the_master_the_sentinels_name(
        sentinels: SentinelSet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(sentinels)
    async with running_worker(settings, "sentinel-w1"), client_for(settings) as client:
        job_id = await client.submit("simulation", {"steps": 2, "duration_s": 0.1})
        jobs = await wait_final(client, [job_id], within_s=30)
        assert jobs[job_id]["status"] == "completed"
        info = await client.redis.info("server")
        assert int(info["tcp_port"]) == sentinels.master.port
    assert sentinels.password not in caplog.text and sentinels.sentinel_password not in caplog.text
    assert sentinels.sentinel_password not in repr(settings)


async def _completions(client: Any, job_ids: list[str]) -> dict[str, int]:
    counts = {}
    for job_id in job_ids:
        counts[job_id] = sum(1 for e in await client.events(job_id) if e.kind == "completed")
    return counts


async def test_a_failover_mid_run_loses_nothing_doubles_nothing_and_the_worker_carries_on(
        sentinels: SentinelSet) -> None:
    """SENTINEL FAILOVER while two jobs run. Until the worker next asks the sentinels (within
    FollowingPool.RECHECK_S) it may still write to the old master, which accepts writes until the
    sentinel reconfigures it: Redis loses those (asynchronous replication). A lost write is never a
    lost job: the lease of a job whose completion was lost runs out on the new master, and the job
    runs again. What must hold is read on the new master: every job completed, each once."""
    # a slow poll: after the failover only the wait for wake tokens (BLPOP on the new master) wakes
    # the worker at once
    settings = _settings(sentinels, poll_interval_s=60.0, max_concurrent_jobs=2)
    async with running_worker(settings, "sentinel-w2") as worker:
        async with client_for(settings) as client:
            before = [await client.submit("simulation", {"steps": 10, "duration_s": 1.5}) for _ in range(4)]

            async def running() -> bool:
                statuses = [(await client.get(j)).get("status") for j in before]
                return statuses.count("in_progress") == 2

            await wait_until(running, within_s=20)
            await client.redis.wait(1, 2000)  # the replica has every write so far
        new_master = failover(sentinels)
        assert new_master == sentinels.replica.port

        async with client_for(settings) as client:  # its connections open on the new master
            assert int((await client.redis.info("server"))["tcp_port"]) == new_master
            jobs = await wait_final(client, before, within_s=60)
            assert {j: jobs[j]["status"] for j in before} == dict.fromkeys(before, "completed")
            after = await client.submit("simulation", {"steps": 2, "duration_s": 0.1})
            jobs = await wait_final(client, [after], within_s=10)  # well inside the 60 s poll: the wait is back
            assert jobs[after]["status"] == "completed"
            every = [*before, after]
            assert await _completions(client, every) == dict.fromkeys(every, 1)
            assert await client.redis.hlen(f"{PREFIX}jobs:completed") == len(every)
            assert not await client.redis.hlen(f"{PREFIX}jobs:failed")
            # the scripts came back on the new master (it never had them: NOSCRIPT, then loaded)
            # (a claim also starts its job, and completes the worker's last one: start and complete
            # are the fallbacks)
            used = ("claim", "progress", "heartbeat")
            assert all(await client.redis.script_exists(*(worker.queue._scripts[name].sha for name in used)))
            assert worker.state.value in ("idle", "busy")


async def test_the_master_killed_mid_run_the_sentinel_promotes_the_replica_and_no_job_is_lost(
        sentinels: SentinelSet) -> None:
    settings = _settings(sentinels, max_concurrent_jobs=2)
    async with running_worker(settings, "sentinel-w3") as worker, client_for(settings) as client:
        jobs_before = [await client.submit("simulation", {"steps": 10, "duration_s": 1.5}) for _ in range(4)]

        async def running() -> bool:
            statuses = [(await client.get(j)).get("status") for j in jobs_before]
            return statuses.count("in_progress") == 2

        await wait_until(running, within_s=20)
        await client.redis.wait(1, 2000)
        sentinels.master.kill()  # SIGKILL: the sentinel sees it down after 1 s and fails over
        await wait_until(lambda: sentinels.master_port() == sentinels.replica.port, within_s=30)

        jobs = await wait_final(client, jobs_before, within_s=60)
        assert {j: jobs[j]["status"] for j in jobs_before} == dict.fromkeys(jobs_before, "completed")
        after = await client.submit("simulation", {"steps": 2, "duration_s": 0.1})
        assert (await wait_final(client, [after], within_s=20))[after]["status"] == "completed"
        every = [*jobs_before, after]
        assert await _completions(client, every) == dict.fromkeys(every, 1)
        assert await client.redis.hlen(f"{PREFIX}jobs:completed") == len(every)
        assert not await client.redis.hlen(f"{PREFIX}jobs:failed")
        assert worker.state.value in ("idle", "busy") and worker.claims == len(every)  # none ran twice
