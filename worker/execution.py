"""Running one claimed job: validate it, hand it to its connector, and record the outcome.

A job's path: ``Job.from_hash`` (a malformed job fails for good, the worker goes on) -> the
connector's ``run`` under the job's timeout, progress coalesced by worker/progress.py -> outputs
placed by worker/outputs.py -> one fenced Redis call: complete, fail (retry or final), or hand
back. A job that must stop (``StopReason``) gets its connector's ``interrupt`` first, then its
task is cancelled; the stop reason decides what is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.base import JobCancelled, JobContext, Outcome, StopReason
from worker.errors import InvalidJob, JobError, PermanentJobError, RedisUnavailable, StaleJob
from worker.guard import INTERRUPT_TIMEOUT_S, PluggedConnector
from worker.outputs import OutputPlacer
from worker.progress import ProgressReporter
from worker.protocol import Job, read_int
from worker.queue import Claimed, Completion, ProgressUpdate, Queue
from worker.retry import Backoff, retry_backoff_ms
from worker.settings import Settings

log = logging.getLogger("emp.worker")

PERSIST_DEADLINE_S = 600.0
FIRST_HOLD_S = 0.02  # a job's first progress report waits this long (worker/progress.py)
STOP_WAIT_S = 10.0
MAX_ERROR_CHARS = 4000


@dataclass
class RunningJob:
    """A job this slot holds, and how to stop it."""

    job_id: str
    attempt: int
    service: str = ""
    engine: PluggedConnector | None = None
    job: Job | None = None
    stop_reason: StopReason | None = None
    ctx: JobContext | None = None
    inner: asyncio.Task[Any] | None = None
    started: float = field(default_factory=time.monotonic)
    #: the stop reason when run() ended (None: it ended on its own, and its result stands)
    ended_by: StopReason | None = None
    #: its place is free for the next claim (its run ended; its outcome is being written)
    released: bool = False
    #: the connector's run is over (what is left is writing the outcome, which the fence checks)
    run_ended: bool = False
    _stopper: asyncio.Task[None] | None = None

    def stop(self, reason: StopReason) -> None:
        """Stop the connector's work (interrupt, then cancel); the outcome follows `reason`."""
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        if self.ctx is not None:
            self.ctx.cancel(reason)
        self._stopper = asyncio.create_task(self._interrupt_then_cancel(reason), name=f"stop-{self.job_id}")

    async def _interrupt_then_cancel(self, reason: StopReason) -> None:
        if self.engine is not None and self.job is not None and self.inner is not None:
            await self.engine.interrupt(self.job, reason)
        if self.inner is not None:
            self.inner.cancel()


class Executor:
    """Runs the jobs of one slot; the slot's loops decide when."""

    def __init__(self, settings: Settings, queue: Queue, worker_id: str,
                 on_finished: Callable[[], Awaitable[None]], outputs: OutputPlacer) -> None:
        self.settings = settings
        self.outputs = outputs
        self.queue = queue
        self.worker_id = worker_id
        self._on_finished = on_finished  # before the outcome frees the slot (loaded models)
        #: the slot's "complete this job and claim the next in one call" (False: not now)
        self.complete_and_claim: Callable[[RunningJob, Completion], Awaitable[bool]] | None = None

    async def run(self, claimed: Claimed, running: RunningJob) -> Outcome:
        """Run a job whose place the slot has taken (``running.engine``: its connector)."""
        job_id, attempt = claimed.job_id, claimed.attempt
        try:
            job = Job.from_hash(claimed.fields, attempt, self.settings.max_payload_bytes, job_id)
        except InvalidJob as exc:
            log.warning("job %s is malformed: %s", job_id, exc)
            return await self._fail(job_id, attempt, f"invalid job: {exc}", retryable=False, retries=0)
        running.service, running.job = job.service, job
        engine = running.engine
        if engine is None or job.service not in engine.services:
            return await self._fail(job_id, attempt, f"no connector here runs {job.service!r}",
                                    retryable=True, retries=job.retry_count)
        # DEBUG: the one INFO line a job gets is its outcome's (completed / failed / handed back)
        log.debug("job %s claimed (attempt %d, service %s)", job_id, attempt, job.service)
        result, error, folded = await self._run_with_progress(engine, job, running, claimed.started)
        try:
            await self._on_finished()
        except Exception as exc:  # an optimisation (affinity): never let it cost the outcome
            log.warning("could not record loaded models: %s: %s", type(exc).__name__, exc)
        try:
            return await self._record(job, running, result, error, folded)
        finally:
            if running.ctx is not None and running.ctx.has_temp_dir:  # most jobs make none: no thread hop
                await asyncio.to_thread(running.ctx.cleanup)

    async def _run_with_progress(
        self, engine: PluggedConnector, job: Job, running: RunningJob, claimed_started: bool
    ) -> tuple[dict[str, Any] | None, JobError | None, ProgressUpdate | None]:
        """The connector's result or error, and its last progress report when it is still to be
        written (folded into the outcome's write)."""
        s = self.settings
        # The connector starts at once; the start write goes to Redis meanwhile, and whatever is
        # written for this job after it (progress, the outcome) waits for it, so Redis sees
        # started -> progress -> outcome in that order (one round trip less before the connector runs).
        started: asyncio.Future[None]
        if claimed_started:
            started = asyncio.get_running_loop().create_future()
            started.set_result(None)
        else:
            started = asyncio.create_task(self._mark_started(job, running), name=f"start-{job.id}")

        async def send(update: ProgressUpdate) -> None:
            await started
            await self.queue.progress(job.id, self.worker_id, job.attempt, update)

        reporter = ProgressReporter(send=send, rate_hz=s.progress_rate_hz,
                                    on_stale=lambda why: running.stop(StopReason.STALE), first_hold_s=FIRST_HOLD_S)
        running.ctx = JobContext(job, reporter.report, log.getChild(job.service),
                                 previews=s.progress_previews, preview_max_bytes=s.preview_max_bytes)
        reporter.start()
        try:
            result, error = await self._run_connector(engine, job, running)
            # a run that ended on its own: its last report goes to Redis with the outcome
            folded = await reporter.close(keep_last=result is not None and error is None)
            return result, error, folded
        finally:
            await reporter.close()  # (a no-op once closed above)
            await started

    async def _mark_started(self, job: Job, running: RunningJob) -> None:
        """``in_progress`` and ``started_at`` as the connector starts, as their worker writes them
        (their processing time counts from here); a refused fence stops the job."""
        try:
            await self.queue.start(job.id, self.worker_id, job.attempt)
        except StaleJob:
            running.stop(StopReason.STALE)
        except RedisUnavailable as exc:  # the first progress report writes them instead
            log.warning("job %s: could not mark it started: %s", job.id, exc)

    async def _run_connector(
        self, engine: PluggedConnector, job: Job, running: RunningJob
    ) -> tuple[dict[str, Any] | None, JobError | None]:
        assert running.ctx is not None
        timeout = job.timeout_s or self.settings.job_timeout_s
        name = engine.name
        running.inner = asyncio.create_task(engine.connector.run(job, running.ctx), name=f"run-{job.id}")
        if running.stop_reason is not None:  # stopped before the task existed
            running.inner.cancel()
        done, _ = await asyncio.wait({running.inner}, timeout=timeout)
        running.ended_by = running.stop_reason
        running.run_ended = bool(done)
        if not done:
            running.stop(StopReason.TIMEOUT)
            running.ended_by = running.stop_reason
            await asyncio.wait({running.inner}, timeout=STOP_WAIT_S + INTERRUPT_TIMEOUT_S)
            return None, JobError(f"job timed out after {timeout:.0f}s")
        try:
            result = running.inner.result()
        except (asyncio.CancelledError, JobCancelled):
            return None, None
        except JobError as exc:
            return None, exc
        except Exception as exc:
            return None, JobError(f"connector {name} raised {type(exc).__name__}: {exc}")
        if not isinstance(result, dict):
            return None, JobError(f"connector {name} returned {type(result).__name__}, not a dict")
        return result, None

    async def _record(
        self, job: Job, running: RunningJob, result: dict[str, Any] | None, error: JobError | None,
        folded: ProgressUpdate | None = None,
    ) -> Outcome:
        # A run that ended on its own keeps its result even if a stop came while it was recorded
        # (a drain landing then must not throw finished work away); the fence still refuses a
        # job that was cancelled or moved on meanwhile.
        reason = running.ended_by if result is not None and error is None else running.stop_reason
        if reason in (StopReason.CANCELLED, StopReason.LEASE_LOST, StopReason.STALE):
            log.info("job %s stopped (%s); nothing more to record", job.id, reason.value)
            return Outcome.CANCELLED if reason is StopReason.CANCELLED else Outcome.DROPPED
        if reason is StopReason.DRAIN:
            if await self._persist(lambda: self.queue.hand_back(job.id, self.worker_id, job.attempt,
                                                                "worker draining")):
                log.info("job %s handed back to the queue", job.id)
                return Outcome.HANDED_BACK
            return Outcome.DROPPED
        if error is None and result is not None and running.ctx is not None:
            try:
                result = await self.outputs.place(job, running.ctx.outputs, result)
            except JobError as exc:  # a store failed, or the job's storage request is wrong
                error = exc
        encoded = ""
        if error is None and result is not None:
            encoded, error = self._encode(result)
        if error is not None or result is None:
            if folded is not None:  # a failing job's last report goes on its own
                with contextlib.suppress(StaleJob, RedisUnavailable):
                    await self.queue.progress(job.id, self.worker_id, job.attempt, folded)
            message = str(error) if error is not None else "job stopped"
            retryable = error.retryable if error is not None else True
            return await self._fail(job.id, job.attempt, message, retryable=retryable, retries=job.retry_count)
        envelope = json.dumps({"output_files": result["output_files"]}) if "output_files" in result else "{}"
        if await self._complete(running, Completion(job.id, job.attempt, encoded, envelope, folded)):
            log.info("job %s completed", job.id)
            return Outcome.COMPLETED
        return Outcome.DROPPED

    async def _complete(self, running: RunningJob, done: Completion) -> bool:
        """Write a completion: with the slot's next claim in the same call when the slot takes it,
        else on its own (retried while Redis is away). False when the fence refused it."""
        if self.complete_and_claim is not None:
            try:
                if await self.complete_and_claim(running, done):
                    return True
            except StaleJob as exc:
                log.warning("dropping the outcome: %s", exc)
                return False
            except RedisUnavailable as exc:
                log.warning("%s; writing the completion on its own", exc)
        return await self._persist(lambda: self.queue.complete(done.job_id, self.worker_id, done.attempt, done.result,
                                                               done.envelope, last_progress=done.last_progress))

    def _encode(self, result: dict[str, Any]) -> tuple[str, JobError | None]:
        """The result as the JSON Redis keeps, or why it cannot be kept."""
        try:
            encoded = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return "", PermanentJobError(f"the connector's result is not JSON: {exc}")
        size = len(encoded.encode())
        if size > self.settings.max_result_bytes:
            return "", PermanentJobError(
                f"result is {size} bytes; the limit is {self.settings.max_result_bytes} "
                "(EMP_MAX_RESULT_BYTES): hand large outputs to ctx.add_output instead")
        return encoded, None

    async def fail_unexpected(self, claimed: Claimed, exc: BaseException) -> Outcome:
        """A bug between claim and outcome: fail the attempt (retryable) instead of leaving the
        job held until its lease expires."""
        retries = read_int(claimed.fields.get("retry_count"), 0)
        return await self._fail(claimed.job_id, claimed.attempt,
                                f"worker error: {type(exc).__name__}: {str(exc)[:300]}",
                                retryable=True, retries=retries)

    async def _fail(self, job_id: str, attempt: int, message: str, *, retryable: bool, retries: int) -> Outcome:
        s = self.settings
        backoff = retry_backoff_ms(retries, s.retry_backoff_s, s.retry_backoff_max_s, random.random())
        verdict: list[str] = []

        async def call() -> None:
            verdict.append(await self.queue.fail(job_id, self.worker_id, attempt, message[:MAX_ERROR_CHARS],
                                                 retryable=retryable, backoff_ms=backoff))

        if not await self._persist(call):
            return Outcome.DROPPED
        outcome = Outcome.RETRY if verdict[0] == "retry" else Outcome.FAILED
        log.info("job %s %s: %s", job_id, "will be retried" if outcome is Outcome.RETRY else "failed", message)
        return outcome

    async def _persist(self, make_call: Callable[[], Awaitable[Any]]) -> bool:
        """Run a completion-type call until Redis takes it; False when the fence refused it."""
        backoff = Backoff()
        deadline = time.monotonic() + PERSIST_DEADLINE_S
        while True:
            try:
                await make_call()
                return True
            except StaleJob as exc:
                log.warning("dropping the outcome: %s", exc)
                return False
            except RedisUnavailable as exc:
                if time.monotonic() > deadline:
                    log.error("giving up recording an outcome after %.0fs: %s", PERSIST_DEADLINE_S, exc)
                    return False
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)  # reconnect backoff


async def stop_all(jobs: list[RunningJob], reason: StopReason) -> None:
    """Stop every job (drain): each gets its interrupt concurrently."""
    for job in jobs:
        job.stop(reason)
    stoppers = [j._stopper for j in jobs if j._stopper is not None]
    if stoppers:
        with contextlib.suppress(Exception):
            await asyncio.wait(stoppers, timeout=INTERRUPT_TIMEOUT_S + 1)
