"""A job that ends before its first progress report went out has that report written with its
outcome (one round trip less), still first and still complete; a slower job's reports go on their
own as before."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from tests.conftest import WorkerFactory, published, wait_until
from worker.client import Client
from worker.keys import Keys
from worker.progress import ProgressReporter
from worker.queue import ProgressUpdate


def _reporter() -> tuple[ProgressReporter, list[ProgressUpdate]]:
    """A started reporter with a 30 s hold (longer than any test), and what it sent."""
    sent: list[ProgressUpdate] = []

    async def send(update: ProgressUpdate) -> None:
        sent.append(update)

    reporter = ProgressReporter(send, rate_hz=10.0, on_stale=lambda why: None, first_hold_s=30.0)
    reporter.start()
    return reporter, sent


async def test_a_report_still_held_at_close_is_handed_to_the_caller_and_never_sent() -> None:
    reporter, sent = _reporter()
    reporter.report(ProgressUpdate(50.0, "half"))
    reporter.report(ProgressUpdate(100.0, "done"))
    await asyncio.sleep(0)  # the loop takes the wake-up and starts holding
    kept = await reporter.close(keep_last=True)
    assert kept == ProgressUpdate(100.0, "done") and sent == []


async def test_a_second_report_ends_the_hold_and_the_first_still_goes_out() -> None:
    """Holding the first report never makes it vanish under a second one (a connector's "queued"
    then its first step): the hold ends, the first is sent, the second follows the rate limit."""
    sent: list[ProgressUpdate] = []
    both = asyncio.Event()

    async def send(update: ProgressUpdate) -> None:
        sent.append(update)
        if len(sent) == 2:
            both.set()

    reporter = ProgressReporter(send, rate_hz=1000.0, on_stale=lambda why: None, first_hold_s=30.0)
    reporter.start()
    reporter.report(ProgressUpdate(0.0, "queued"))
    await asyncio.sleep(0)  # the loop holds the first
    reporter.report(ProgressUpdate(10.0, "step 1"))
    await asyncio.wait_for(both.wait(), 10)  # long before the 30 s hold would have ended
    assert [u.message for u in sent] == ["queued", "step 1"]
    assert await reporter.close(keep_last=True) is None


async def test_without_keep_last_the_held_report_is_sent_at_close() -> None:
    reporter, sent = _reporter()
    reporter.report(ProgressUpdate(10.0, "first"))
    assert await reporter.close() is None
    assert sent == [ProgressUpdate(10.0, "first")]


async def test_a_report_already_sent_is_not_folded_again() -> None:
    sent: list[ProgressUpdate] = []
    went_out = asyncio.Event()

    async def send(update: ProgressUpdate) -> None:
        sent.append(update)
        went_out.set()

    reporter = ProgressReporter(send, rate_hz=1000.0, on_stale=lambda why: None, first_hold_s=0.0)
    reporter.start()
    reporter.report(ProgressUpdate(30.0, "sent"))
    await asyncio.wait_for(went_out.wait(), 10)
    assert await reporter.close(keep_last=True) is None
    assert sent == [ProgressUpdate(30.0, "sent")]


async def test_a_fast_job_still_publishes_its_progress_before_its_completion(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
) -> None:
    await start_worker()
    async with published(redis, [keys.ch_progress, keys.ch_complete]) as seen:
        job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1})
        await wait_until(lambda: len(seen[keys.ch_complete]) == 1, within_s=15)
    assert [m["message"] for m in seen[keys.ch_progress]] == ["step 1/1"]
    assert seen[keys.ch_progress][0]["progress"] == 100 and seen[keys.ch_progress][0]["job_id"] == job_id
    events = [e[1]["event"] for e in await redis.xrange(keys.progress_stream(job_id))]
    assert events == ["claimed", "started", "progress", "completed"]


async def test_a_fast_job_that_fails_after_its_run_still_sends_its_last_report(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory,
) -> None:
    """The run ended with a result (its report kept for the completion), but the result cannot be
    kept: the job fails, and its report goes out on its own, before the failure."""
    await start_worker(max_result_bytes=1024)
    async with published(redis, [keys.ch_progress, keys.ch_failed]) as seen:
        job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1, "output_bytes": 4000})
        await wait_until(lambda: len(seen[keys.ch_failed]) == 1, within_s=15)
    assert "EMP_MAX_RESULT_BYTES" in seen[keys.ch_failed][0]["error"]
    assert [m["message"] for m in seen[keys.ch_progress]] == ["step 1/1"]
    events = [e[1]["event"] for e in await redis.xrange(keys.progress_stream(job_id))]
    assert events == ["claimed", "started", "progress", "failed"]
