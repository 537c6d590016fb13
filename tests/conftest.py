"""Shared fixtures: a real Redis (REDIS_URL, else a throwaway server), a key prefix per test, and a
factory for workers with tiny intervals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from connectors.base import ConnectorConfig
from connectors.manager import Plugins
from connectors.testing import cleanup_job_dirs, redis_for_tests
from worker.agent import Worker
from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.errors import ConfigError
from worker.hardware import Gpu
from worker.keys import Keys
from worker.queue import Queue
from worker.settings import Settings, load_settings

# A third-party plugin package with tests of its own: installed and run by
# tests/connectors/test_third_party_plugin.py, never imported from here.
collect_ignore = ["plugins"]


@pytest.fixture(autouse=True)
def job_dirs() -> Iterator[None]:
    """Each job directory a test's FakeJobContexts made is deleted at its end (the worker does it
    after each job; a test may still read the files)."""
    yield
    cleanup_job_dirs()


@pytest.fixture(autouse=True)
def output_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Outputs of every test's workers (in-process or child processes) go to a directory of its own."""
    path = tmp_path_factory.mktemp("outputs")
    monkeypatch.setenv("EMP_OUTPUT_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[int]:
    """The port of a redis-server of the test module's own that wants the password right-secret."""
    try:
        server = EmbeddedRedis(extra_args=["--requirepass", "right-secret"])
    except ConfigError as exc:
        pytest.skip(f"no redis-server to start: {exc}")
    with server:
        yield server.port


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (tests then touch only keys under their own prefix), else our own server."""
    with redis_for_tests() as url:
        yield url


@pytest.fixture
def keys() -> Keys:
    return Keys(f"test:{uuid.uuid4().hex[:12]}:")


@pytest.fixture
async def redis(redis_url: str, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    cursor = 0
    while True:  # delete only this test's keys
        cursor, found = await client.scan(cursor, match=f"{keys.prefix}*", count=1000)
        if found:
            await client.delete(*found)
        if cursor == 0:
            break
    await client.aclose()


@pytest.fixture
async def client(redis: aioredis.Redis, keys: Keys) -> Client:
    return Client(redis, keys)


def fast_settings(redis_url: str, keys: Keys, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url, "key_prefix": keys.prefix, "heartbeat_interval_s": 0.5,
        "lease_s": 3.0, "poll_interval_s": 2.0, "grace_period_s": 5.0, "retry_backoff_s": 0.0,
        "retry_exclusion_s": 0.0, "machine_id": "test-machine",
    }
    values.update(overrides)
    return load_settings(**values)


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(redis_url: str, keys: Keys) -> AsyncIterator[WorkerFactory]:
    """Start workers in this event loop; they are stopped (drained) at the end of the test."""
    started: list[tuple[Worker, asyncio.Task[None], aioredis.Redis]] = []

    async def factory(worker_id: str = "w1", connectors: str = "simulation", **overrides: Any) -> Worker:
        hardware = overrides.pop("hardware", None) or {"gpu_memory_gb": 24, "gpu_model": "fake",
                                                       "ram_gb": 64, "cpu_cores": 8}
        gpu: Gpu | None = overrides.pop("gpu", None)  # with gpu_probe: a slot that re-reads its GPU
        gpu_probe = overrides.pop("gpu_probe", None)
        extra_plugins: list[object] = overrides.pop("plugins", [])  # plugin objects to register too
        settings = fast_settings(redis_url, keys, connectors=connectors, **overrides)
        plugins = Plugins()
        for plugin in extra_plugins:
            plugins.pm.register(plugin)
        config = ConnectorConfig(worker_id, gpu.index if gpu else None)
        instances = plugins.create_connectors(settings.connector_names, config)
        conn = connect(redis_url)
        worker = Worker(settings, conn, instances, worker_id=worker_id, hardware=hardware, plugins=plugins,
                        gpu=gpu, gpu_probe=gpu_probe)
        task = asyncio.create_task(worker.run())
        started.append((worker, task, conn))
        await wait_until(lambda: worker.state.value in ("idle", "busy"), within_s=10)
        return worker

    yield factory
    for worker, task, conn in started:
        worker.request_stop()
        worker.fast_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await conn.aclose()


async def wait_until(predicate: Callable[[], Any], within_s: float = 10.0, interval: float = 0.01) -> None:
    """Wait for a condition with a deadline (polling a condition, not sleeping for an outcome)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(interval)


async def beat_idle(queue: Queue, worker: str, capabilities: dict[str, Any]) -> None:
    """Register a live, idle worker the way the agent does (its claim capabilities in emp_caps)."""
    fields = {"emp_caps": json.dumps(capabilities), "max_concurrent_jobs": "1"}
    await queue.heartbeat(worker, "idle", fields, 30, {}, capabilities["loaded"])


@contextlib.asynccontextmanager
async def published(redis: aioredis.Redis, channels: list[str]) -> AsyncIterator[dict[str, list[dict[str, Any]]]]:
    """Every JSON message published on `channels` while the block runs, by channel."""
    seen: dict[str, list[dict[str, Any]]] = {c: [] for c in channels}
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(*channels)

    async def collect() -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                seen[message["channel"]].append(json.loads(message["data"]))

    task = asyncio.create_task(collect())
    try:
        yield seen
    finally:
        task.cancel()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
