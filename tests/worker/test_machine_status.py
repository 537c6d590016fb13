"""machine:status:{machineId}: what their monitor draws machines, GPUs and workers from, read
the way their API's handleUnifiedMachineStatus reads it, for a two-slot agent."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import wait_until
from tests.procs import WorkerProcess
from worker.client import Client
from worker.keys import Keys


@pytest.fixture
async def machine_messages(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(keys.machine_status("*"))

    async def collect() -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                assert message["channel"] == keys.machine_status("box-1")
                seen.append(json.loads(message["data"]))

    task = asyncio.create_task(collect())
    yield seen
    task.cancel()
    await pubsub.aclose()  # type: ignore[no-untyped-call]


def check_their_shape(message: dict[str, Any], workers: list[str]) -> None:
    """Every field their API reads, with the type it expects."""
    assert message["machine_id"] == "box-1" and isinstance(message["timestamp"], int)
    assert message["update_type"] in ("initial", "periodic", "event_driven", "shutdown")
    structure, status = message["structure"], message["status"]
    assert structure["gpu_count"] == 2 and structure["capabilities"] == ["simulation"]
    assert sorted(structure["workers"]) == workers
    for worker_id, info in structure["workers"].items():
        assert info["worker_id"] == worker_id and info["services"] == ["simulation"]
        assert isinstance(info["gpu_id"], int)
    assert {info["gpu_id"] for info in structure["workers"].values()} == {0, 1}
    assert status["machine"]["phase"] in ("starting", "ready", "draining", "shutdown")
    assert isinstance(status["machine"]["uptime_ms"], int)
    assert sorted(status["workers"]) == workers
    for slot in status["workers"].values():
        assert set(slot) >= {"status", "current_job_id", "last_activity", "is_connected"}
        assert isinstance(slot["is_connected"], bool) and isinstance(slot["last_activity"], int)
    for key, service in status["services"].items():
        assert key == f"{service['worker_id']}.simulation" and service["service_type"] == "simulation"


async def test_their_monitor_sees_both_slots_at_start_on_a_job_and_on_drain(
    redis_url: str, keys: Keys, client: Client, machine_messages: list[dict[str, Any]],
) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "box", EMP_MACHINE_ID="box-1", EMP_FAKE_GPUS="2x24GB") as proc:
        await wait_until(lambda: any(m["update_type"] == "initial" for m in machine_messages), within_s=20)
        initial = next(m for m in machine_messages if m["update_type"] == "initial")
        workers = sorted(initial["structure"]["workers"])
        assert len(workers) == 2, proc.output()
        check_their_shape(initial, workers)
        await wait_until(lambda: any(m["update_type"] == "event_driven" and all(
            w["status"] == "idle" for w in m["status"]["workers"].values()) for m in machine_messages), within_s=20)

        job_id = await client.submit("simulation", {"duration_s": 1.0, "steps": 4})
        await wait_until(lambda: any(w["current_job_id"] == job_id and w["status"] == "busy"
                                     for m in machine_messages if m["update_type"] == "event_driven"
                                     for w in m["status"]["workers"].values()), within_s=20)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()
    shutdown = machine_messages[-1]
    assert shutdown["update_type"] == "shutdown" and shutdown["status"]["machine"]["phase"] == "shutdown"
    check_their_shape(shutdown, workers)
    assert all(not w["is_connected"] for w in shutdown["status"]["workers"].values())
    for message in machine_messages:
        check_their_shape(message, workers)
    assert (await client.get(job_id))["status"] in ("completed", "pending")  # finished or handed back
