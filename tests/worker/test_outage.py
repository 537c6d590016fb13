"""A Redis outage longer than a lease costs no finished work.

Redis (AOF on, fsync always) is killed while jobs run and comes back on the same port three leases
later. Every lease ran out meanwhile; the jobs of the live workers must not be reaped before their
workers renew them, and a job finished during the outage is completed by the worker that ran it:
nothing is re-run, lost or completed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from connectors.base import ConnectorConfig
from connectors.manager import Plugins
from tests.conftest import fast_settings, wait_until
from worker.agent import Worker
from worker.client import Client, connect
from worker.embedded import find_redis_server, free_port
from worker.errors import StaleJob
from worker.keys import Keys
from worker.queue import Queue, QueueConfig

LEASE_S = 2.0
JOBS = 12
WORKERS = 3


class DurableRedis:
    """A redis-server of this test's own, with an append-only file, that can be killed and started
    again on the same port with the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.binary, self.port, self.dir = find_redis_server(), free_port(), data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--loglevel", "warning",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)  # polling a child process's readiness
        raise AssertionError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _worker(url: str, keys: Keys, worker_id: str) -> Worker:
    settings = fast_settings(url, keys, lease_s=LEASE_S, heartbeat_interval_s=0.5, poll_interval_s=0.5,
                             connectors="simulation")
    connectors = Plugins().create_connectors(settings.connector_names, ConnectorConfig(worker_id))
    return Worker(settings, connect(url), connectors, worker_id=worker_id, hardware={})


@pytest.mark.timeout(180)
async def test_redis_down_for_three_leases_reruns_and_loses_nothing(durable_redis: DurableRedis) -> None:
    keys = Keys(f"outage:{uuid.uuid4().hex[:8]}:")
    client = Client(connect(durable_redis.url), keys)
    workers = [_worker(durable_redis.url, keys, f"live-{i}") for i in range(WORKERS)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_until(lambda: all(w.state.value == "idle" for w in workers), within_s=10)
        ids = [await client.submit("simulation", {"duration_s": 1.5, "steps": 3}, max_retries=10)
               for _ in range(JOBS)]

        async def running_everywhere() -> bool:
            return all(w.running for w in workers)

        await wait_until(running_everywhere, within_s=20)
        durable_redis.kill()  # mid-job: each worker finishes its job while Redis is away
        await asyncio.sleep(3 * LEASE_S + 0.5)  # the outage itself: three leases (every job finishes in it)
        durable_redis.start()

        async def all_completed() -> bool:
            statuses = [(await client.get(job_id)).get("status") for job_id in ids]
            return statuses == ["completed"] * JOBS

        await wait_until(all_completed, within_s=90, interval=0.2)
        assert all(not t.done() for t in tasks), "a worker stopped"
        for job_id in ids:
            kinds = Counter(e.kind for e in await client.events(job_id))
            job = await client.get(job_id)
            assert kinds["claimed"] == 1, (job_id, kinds, job)  # never re-run
            assert kinds["completed"] == 1, (job_id, kinds)
            assert job["retry_count"] == "0", job
        assert await client.redis.hlen(keys.completed) == JOBS
        assert await client.redis.zcard(keys.pending) == 0
        assert int(await client.redis.hget(keys.outage, "outages") or 0) >= 1  # the grace period opened
    finally:
        for worker in workers:
            worker.request_stop()
            worker.fast_stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for worker in workers:
            await worker.redis.aclose()
        await client.redis.aclose()


# --- the two mechanisms, one at a time (Queue level, the shared Redis) ----------------------------------

CAPS = {"services": ["simulation"], "hardware": {}, "models": {}, "customer_access": {}, "custom": {}}


async def _reap_once(queue: Queue, redis: aioredis.Redis, keys: Keys, **beat: Any) -> int:
    """One beat of another live worker that surely runs the reaper."""
    await redis.delete(keys.reaper_lock)
    return (await queue.heartbeat("reaper", "idle", {}, 5, {}, **beat)).reaped


async def test_a_job_reaped_from_a_live_worker_is_completed_by_it_when_nobody_took_it(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=50, reap_period_ms=10))
    job_id = await client.submit("simulation", {})
    held = await queue.claim("slow", CAPS)
    assert held is not None
    await wait_until(lambda: _reap_once(queue, redis, keys), within_s=5, interval=0.06)
    assert (await client.get(job_id))["status"] == "pending"  # reaped: the lease ran out
    await queue.complete(job_id, "slow", held.attempt, '{"ok": true}')  # but its work stands
    job = await client.get(job_id)
    assert job["status"] == "completed" and job["retry_count"] == "0", job
    assert await redis.zscore(keys.pending, job_id) is None and not await redis.sismember(keys.indexed, job_id)
    assert await queue.claim("other", CAPS) is None
    assert [e.kind for e in await client.events(job_id)].count("completed") == 1


async def test_a_reaped_job_someone_else_claimed_stays_theirs(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=50, reap_period_ms=10))
    job_id = await client.submit("simulation", {})
    stale = await queue.claim("slow", CAPS)
    assert stale is not None
    await wait_until(lambda: _reap_once(queue, redis, keys), within_s=5, interval=0.06)
    fresh = await Queue(redis, keys, QueueConfig()).claim("other", CAPS)
    assert fresh is not None and fresh.attempt == stale.attempt + 1
    with pytest.raises(StaleJob):
        await queue.complete(job_id, "slow", stale.attempt, "{}")
    beat = await queue.heartbeat("slow", "busy", {}, 5, {job_id: stale.attempt})
    assert beat.lost == [job_id]
    await queue.complete(job_id, "other", fresh.attempt, "{}")


async def test_a_heartbeat_takes_back_a_reaped_job_nobody_claimed(client: Client, redis: aioredis.Redis,
                                                                  keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=50, reap_period_ms=10))
    job_id = await client.submit("simulation", {})
    held = await queue.claim("slow", CAPS)
    assert held is not None
    await wait_until(lambda: _reap_once(queue, redis, keys), within_s=5, interval=0.06)
    beat = await queue.heartbeat("slow", "busy", {}, 5, {job_id: held.attempt})
    assert beat.lost == [] and beat.renewed == 1
    job = await client.get(job_id)
    assert job["status"] == "assigned" and job["worker_id"] == "slow" and await redis.zscore(keys.leases, job_id)
    assert "reclaimed" in [e.kind for e in await client.events(job_id)]


async def test_a_worker_back_from_an_outage_opens_a_lease_of_grace(client: Client, redis: aioredis.Redis,
                                                                  keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=300, reap_period_ms=10))
    job_id = await client.submit("simulation", {})
    assert await queue.claim("live", CAPS) is not None
    await redis.zadd(keys.leases, {job_id: 0})  # its lease ran out while Redis was away
    assert await _reap_once(queue, redis, keys, away_ms=1000) == 0  # this worker's beats failed for 1 s
    assert (await client.get(job_id))["status"] == "assigned"
    grace_until = int(await redis.hget(keys.outage, "grace_until_ms"))
    await wait_until(lambda: _reap_once(queue, redis, keys), within_s=5, interval=0.02)  # a lease later
    now_s, now_us = await redis.time()
    assert now_s * 1000 + now_us // 1000 >= grace_until
    assert (await client.get(job_id))["status"] == "pending"


async def test_a_new_redis_run_id_opens_a_lease_of_grace(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=300, reap_period_ms=10))
    await _reap_once(queue, redis, keys)  # the reaper notes the run_id
    job_id = await client.submit("simulation", {})
    assert await queue.claim("live", CAPS) is not None
    await redis.zadd(keys.leases, {job_id: 0})
    await redis.hset(keys.outage, "run_id", "an-earlier-server")  # as after a restart or a failover
    assert await _reap_once(queue, redis, keys) == 0
    assert (await client.get(job_id))["status"] == "assigned"
    assert "new run_id" in await redis.hget(keys.outage, "last_outage")


async def test_short_beat_gaps_open_no_grace(client: Client, redis: aioredis.Redis, keys: Keys) -> None:
    queue = Queue(redis, keys, QueueConfig(lease_ms=300, reap_period_ms=10))
    job_id = await client.submit("simulation", {})
    assert await queue.claim("gone", CAPS) is not None
    await redis.zadd(keys.leases, {job_id: 0})
    assert await _reap_once(queue, redis, keys, away_ms=100) == 1  # under half a lease: no outage
