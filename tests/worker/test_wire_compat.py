"""What emp-job-queue's API, monitor, clients and webhook service read, as their worker writes it:
the JobResult envelope, max_retries as attempts in all, in_progress at start, no job_submitted for
a retry, and counters that outlive their clean-up of worker records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from connectors import Connector, Job, JobContext, JobResult, hookimpl
from tests.conftest import WorkerFactory, published, wait_until
from worker.client import Client, unwrap_result
from worker.keys import Keys


async def _status(client: Client, job_id: str, *wanted: str) -> bool:
    return (await client.get(job_id)).get("status") in wanted


@pytest.fixture
async def channel_log(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[dict[str, list[dict[str, Any]]]]:
    """Every message published on the job channels during the test, by channel."""
    async with published(redis, [keys.ch_job_submitted, keys.ch_complete, keys.ch_failed]) as seen:
        yield seen


class Listy(Connector):
    name = "listy"
    service_types = ("listy",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        ctx.add_output("frame.png", b"\x89PNG\r\n\x1a\n" + bytes(100), content_type="image/png")
        return {"tags": [], "nested": {"empty": []}, "n": 1}


class Gate(Connector):
    """Holds its job, without reporting progress, until the test opens the gate."""

    name = "gate"
    service_types = ("gate",)
    opened: asyncio.Event | None = None

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        assert Gate.opened is not None
        await Gate.opened.wait()
        ctx.progress(50, "halfway")
        return {}


class Plugin:
    @hookimpl
    def emp_connectors(self) -> list[type[Connector]]:
        return [Listy, Gate]


async def test_results_carry_their_jobresult_envelope(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
    channel_log: dict[str, list[dict[str, Any]]],
) -> None:
    await start_worker("envelope", connectors="listy", plugins=[Plugin()])
    job_id = await client.submit("listy", {})
    await wait_until(lambda: len(channel_log[keys.ch_complete]) == 1, within_s=15)
    (event,) = channel_log[keys.ch_complete]
    envelope = event["result"]
    assert envelope["success"] is True and isinstance(envelope["processing_time_ms"], int)
    output = envelope["data"]
    assert output["tags"] == [] and output["nested"] == {"empty": []}  # lists stay lists
    assert output["image_url"].endswith(f"{job_id}/000-frame.png")
    assert envelope["output_files"] == output["output_files"]
    assert envelope["output_files"][0]["mime_type"] == "image/png"
    record = json.loads(await redis.hget(keys.completed, job_id))
    assert record["success"] is True and record["data"] == envelope
    assert json.loads((await client.get(job_id))["result"]) == output  # our own field: the output itself
    assert await client.result(job_id) == output
    await redis.hdel(keys.job(job_id), "result")  # as a job their worker completed looks
    assert await client.result(job_id) == output


def test_both_shapes_of_a_completed_record_are_read() -> None:
    ours_before = {"success": True, "data": {"steps": 4}, "completed_at": "t"}
    theirs = {"success": True, "data": {"success": True, "data": {"steps": 4}, "processing_time_ms": 5}}
    assert unwrap_result(ours_before) == unwrap_result(theirs) == {"steps": 4}


@pytest.mark.parametrize("max_retries", [1, 2, 3])
async def test_max_retries_is_attempts_in_all(
    client: Client, start_worker: WorkerFactory, max_retries: int,
) -> None:
    await start_worker(f"attempts-{max_retries}")
    job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1, "fail": "retryable"},
                                 max_retries=max_retries)
    await wait_until(lambda: _status(client, job_id, "failed"), within_s=30)
    job = await client.get(job_id)
    assert job["attempt"] == str(max_retries) and job["retry_count"] == str(max_retries)


async def test_a_job_is_in_progress_once_its_connector_starts_it(client: Client, start_worker: WorkerFactory) -> None:
    Gate.opened = asyncio.Event()
    await start_worker("starter", connectors="gate", plugins=[Plugin()])
    job_id = await client.submit("gate", {})
    await wait_until(lambda: _status(client, job_id, "in_progress"), within_s=15)
    job = await client.get(job_id)
    assert job["started_at"] and job["started_at"] >= job["assigned_at"]
    kinds = [e.kind for e in await client.events(job_id)]
    assert "started" in kinds and "progress" not in kinds  # before any progress report
    Gate.opened.set()
    await wait_until(lambda: _status(client, job_id, "completed"), within_s=15)
    assert (await client.get(job_id))["started_at"] == job["started_at"]


async def test_a_retry_is_not_announced_as_a_new_submission(
    client: Client, keys: Keys, start_worker: WorkerFactory, channel_log: dict[str, list[dict[str, Any]]],
) -> None:
    # a 60 s poll: each retry wakes a worker by itself (a wake token, worker/wake.py), not by a message
    await start_worker("retrier", retry_backoff_s=0.05, poll_interval_s=60.0)
    job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1, "fail": "retryable"}, max_retries=3)
    await wait_until(lambda: _status(client, job_id, "failed"), within_s=30)
    await wait_until(lambda: len(channel_log[keys.ch_failed]) == 1, within_s=10)
    assert [m["job_id"] for m in channel_log[keys.ch_job_submitted]] == [job_id]  # the submission only
    assert (await client.get(job_id))["attempt"] == "3"  # the retries ran well inside one poll


async def test_counters_outlive_a_deleted_worker_record(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
) -> None:
    await start_worker("counted", heartbeat_interval_s=0.2)
    done = [await client.submit("simulation", {"duration_s": 0, "steps": 1}) for _ in range(2)]
    bad = await client.submit("simulation", {"duration_s": 0, "steps": 1, "fail": "permanent"})
    for job_id in (*done, bad):
        await wait_until(lambda j=job_id: _status(client, j, "completed", "failed"), within_s=15)
    await redis.delete(keys.worker("counted"))  # their API's start-up clean-up
    await wait_until(lambda: _counters_are(redis, keys, ("2", "1")), within_s=10)


async def _counters_are(redis: aioredis.Redis, keys: Keys, expected: tuple[str, str]) -> bool:
    found = await redis.hmget(keys.worker("counted"), ["total_jobs_completed", "total_jobs_failed"])
    return tuple(found) == expected
