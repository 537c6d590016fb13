"""The worker daemon: one worker slot that claims jobs, runs them through its connectors and
records their outcome.

Its life is an explicit state machine (``WorkerState``); each periodic duty is its own loop that
logs and survives errors:

* the claim loop claims while a slot is free, then waits for a wake-up (a ``job_submitted``
  message, a freed slot, a promoted retry) or a jittered slow poll;
* the listener reads ``job_submitted`` and ``cancel_job`` on one pub/sub connection;
* the heartbeat loop refreshes the worker record (with this slot's GPU, re-read), renews leases,
  checks connector health and records the models the connectors hold loaded.

worker/daemon.py runs one Worker per GPU slot and handles the process's signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.base import Connector, JobCancelled, JobContext
from connectors.manager import Plugins
from worker.errors import InvalidJob, JobError, RedisUnavailable, StaleJob
from worker.hardware import Gpu
from worker.keys import Keys
from worker.progress import ProgressReporter
from worker.protocol import Job, retry_backoff_ms, utc_iso
from worker.queue import Claimed, Deferred, Queue, QueueConfig
from worker.settings import Settings

log = logging.getLogger("emp.worker")

PERSIST_DEADLINE_S = 600.0
GPU_READ_TIMEOUT_S = 2.0
LOADED_TIMEOUT_S = 1.0
STOP_WAIT_S = 10.0


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"


_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.IDLE, WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.DRAINING}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.DRAINING}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


class Backoff:
    """Exponential backoff with jitter for reconnecting; `reset` after a success."""

    def __init__(self, base_s: float = 0.2, max_s: float = 10.0) -> None:
        self.base_s, self.max_s, self.failures = base_s, max_s, 0

    def next_delay(self) -> float:
        self.failures += 1
        return retry_backoff_ms(self.failures - 1, self.base_s, self.max_s, random.random()) / 1000

    def reset(self) -> None:
        self.failures = 0


async def wait_for_event(event: asyncio.Event, within_s: float) -> bool:
    """True if the event was set within `within_s` seconds."""
    try:
        await asyncio.wait_for(event.wait(), within_s)
    except TimeoutError:
        return False
    return True


@dataclass
class RunningJob:
    job_id: str
    attempt: int
    service: str = ""
    stop_reason: str = ""
    ctx: JobContext | None = None
    inner: asyncio.Task[Any] | None = None
    started: float = field(default_factory=time.monotonic)

    def stop(self, reason: str) -> None:
        """Stop the connector's work; the outcome is recorded according to `reason`."""
        if self.stop_reason:
            return
        self.stop_reason = reason
        if self.ctx is not None:
            self.ctx.cancel(reason)
        if self.inner is not None:
            self.inner.cancel()


def queue_config(settings: Settings) -> QueueConfig:
    return QueueConfig(
        lease_ms=int(settings.lease_s * 1000),
        stream_maxlen=settings.stream_maxlen,
        stream_ttl_s=int(settings.retention_s + settings.job_timeout_s),
        retention_s=settings.retention_s,
        retry_exclusion_ms=int(settings.retry_exclusion_s * 1000),
        reap_period_ms=max(200, int(settings.heartbeat_interval_s * 500)),
        affinity_ms=int(settings.model_affinity_s * 1000),
    )


class Worker:
    """One worker slot: a worker id, its connectors and its capability record."""

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        connectors: Sequence[Connector],
        *,
        worker_id: str,
        hardware: Mapping[str, Any],
        plugins: Plugins | None = None,
        gpu: Gpu | None = None,
        gpu_probe: Callable[[], Gpu] | None = None,
        host: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.keys = Keys(settings.key_prefix)
        self.queue = Queue(client, self.keys, queue_config(settings))
        self.worker_id = worker_id
        self.connectors = list(connectors)
        self.plugins = plugins
        self.hardware = dict(hardware)
        self.by_service = {s: c for c in self.connectors for s in c.service_types}
        self.healthy_services = sorted(self.by_service)
        self.models: dict[str, list[str]] = {}
        self.loaded: list[str] = []
        self.gpu = gpu
        self.gpu_probe = gpu_probe
        self.gpu_problem = "; ".join(gpu.problems) if gpu is not None else ""
        self.custom = settings.custom_capabilities
        self.host = dict(host or {})
        self.state = WorkerState.STARTING
        self.running: dict[str, RunningJob] = {}
        self.stopping = asyncio.Event()
        self.fast_stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.hints: deque[str] = deque(maxlen=1000)
        self.claims = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- state -----------------------------------------------------------------------------------

    async def _set_state(self, new: WorkerState) -> None:
        old = self.state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"worker state cannot go from {old.value} to {new.value}")
        self.state = new
        # old_status/new_status for their API, status/previous_status for their webhook service
        event = {"worker_id": self.worker_id, "old_status": old.value, "new_status": new.value,
                 "status": new.value, "previous_status": old.value,
                 "current_job_id": next(iter(self.running), ""), "timestamp": int(time.time() * 1000)}
        with contextlib.suppress(RedisUnavailable, RedisConnectionError, RedisTimeoutError, OSError):
            await self.redis.publish(self.keys.ch_worker_status, json.dumps(event))

    def capabilities(self) -> dict[str, Any]:
        """What the claim script matches against (see worker/matching.py)."""
        caps: dict[str, Any] = {
            "services": [] if self.gpu_problem else self.healthy_services,
            "hardware": self.hardware,
            "models": self.models,
            "customer_access": self.settings.customer_access,
            "custom": dict(self.custom),
            "workflow_id": self.settings.workflow_id,
            "loaded": self.loaded,
        }
        if self.plugins is not None:
            caps["custom"].update(self.plugins.extra_capabilities(self.worker_id, caps))
        return caps

    def _record_fields(self) -> dict[str, str]:
        caps = self.capabilities()
        advertised = {
            **caps["custom"],
            "worker_id": self.worker_id,
            "job_service_required_map": sorted(self.by_service),
            "services": caps["services"],
            "hardware": caps["hardware"],
            "models": caps["models"],
            "loaded_models": self.loaded,
            "customer_access": caps["customer_access"],
            "gpus": [self.gpu.to_dict()] if self.gpu is not None else [],
            "host": self.host,
        }
        if self.settings.workflow_id:
            advertised["workflow_id"] = self.settings.workflow_id
        return {
            "machine_id": self.settings.machine_id,
            "capabilities": json.dumps(advertised),
            "emp_caps": json.dumps(caps),
            "current_job_id": next(iter(self.running), ""),
            "max_concurrent_jobs": str(self.settings.max_concurrent_jobs),
        }

    # --- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain within the grace period. Second call: hand jobs back now."""
        if self.stopping.is_set():
            log.warning("second stop signal: handing running jobs back now")
            self.fast_stop.set()
        self.stopping.set()
        self.wake.set()

    async def run(self) -> None:
        """Run until request_stop(); then drain, deregister and return."""
        for connector in self.connectors:
            await connector.start()
        await self._beat_until_registered()
        await self._set_state(WorkerState.IDLE)
        log.info("worker %s ready: services %s", self.worker_id, ", ".join(sorted(self.by_service)))
        loops = [self._listen(), self._heartbeat_loop(), self._claim_loop()]
        background = [asyncio.create_task(c) for c in loops[:2]]
        try:
            await loops[2]
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._deregister()
            for connector in self.connectors:
                with contextlib.suppress(Exception):
                    await connector.stop()
            await self._set_state(WorkerState.STOPPED)
            log.info("worker %s stopped", self.worker_id)

    async def _beat_until_registered(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                await self._heartbeat()
                return
            except RedisUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("cannot register worker %s: %s (next try in %.1fs)", self.worker_id, exc, delay)
                await wait_for_event(self.stopping, delay)

    async def _drain(self) -> None:
        await self._set_state(WorkerState.DRAINING)
        with contextlib.suppress(RedisUnavailable):
            await self._heartbeat()
        if self.running:
            log.info("draining: waiting up to %.0fs for %d running job(s)",
                     self.settings.grace_period_s, len(self.running))
            deadline = time.monotonic() + self.settings.grace_period_s
            while self.running and not self.fast_stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await wait_for_event(self.fast_stop, min(remaining, 0.05))
        for job in list(self.running.values()):
            job.stop("drain")
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=STOP_WAIT_S)

    async def _deregister(self) -> None:
        try:
            await self.queue.set_loaded(self.worker_id, [])
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.srem(self.keys.workers_active, self.worker_id)
                pipe.delete(self.keys.heartbeat(self.worker_id))
                pipe.hset(self.keys.worker(self.worker_id), mapping={
                    "status": "offline", "current_job_id": "", "last_heartbeat": utc_iso()})
                pipe.expire(self.keys.worker(self.worker_id), self.settings.retention_s)
                await pipe.execute()
        except (RedisUnavailable, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("could not deregister %s: %s", self.worker_id, type(exc).__name__)

    # --- heartbeat -------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Refresh what the slot advertises, then beat (start-up and drain)."""
        await self._refresh()
        await self._beat()

    async def _refresh(self) -> None:
        """Connector health, this slot's GPU and loaded models, each bounded in time."""
        await self._refresh_health()
        await self._refresh_gpu()
        self.loaded = await self._loaded_now()

    async def _beat(self) -> None:
        """One heartbeat script: the worker record, lease renewal, promotion, reaping."""
        ttl = max(int(self.settings.heartbeat_interval_s * 3), int(self.settings.lease_s) + 1)
        status = self.state.value if self.state is not WorkerState.STARTING else "idle"
        held = {job_id: job.attempt for job_id, job in self.running.items()}
        beat = await self.queue.heartbeat(self.worker_id, status, self._record_fields(), ttl, held, self.loaded)
        if beat.reaped:
            log.warning("reaper: %d job(s) with an expired lease put back or failed", beat.reaped)
        for job_id in beat.lost:
            if job_id in self.running:
                log.warning("job %s is no longer held by %s; stopping it", job_id, self.worker_id)
                self.running[job_id].stop("lease_lost")
        if beat.promoted or beat.reaped:
            self.wake.set()

    async def _refresh_health(self) -> None:
        healthy: list[str] = []
        for connector in self.connectors:
            try:
                health = await asyncio.wait_for(connector.health(), timeout=5.0)
                ok, message = health.can_claim, health.message
                models = await asyncio.wait_for(connector.models(), timeout=5.0)
                self.models.update(models)
            except Exception as exc:
                ok, message = False, f"health check failed: {type(exc).__name__}: {exc}"
            if ok:
                healthy.extend(connector.service_types)
            elif set(connector.service_types) & set(self.healthy_services):
                log.warning("connector %s is down (%s): not claiming its jobs", connector.name, message)
        if healthy and not self.healthy_services:
            self.wake.set()
        self.healthy_services = sorted(healthy)

    async def _refresh_gpu(self) -> None:
        """Re-read this slot's GPU; one that fails or reports a problem stops the slot claiming."""
        if self.gpu_probe is None:
            return
        try:
            self.gpu = await asyncio.wait_for(asyncio.to_thread(self.gpu_probe), GPU_READ_TIMEOUT_S)
            problem = "; ".join(self.gpu.problems)
        except TimeoutError:
            problem = f"reading the GPU took over {GPU_READ_TIMEOUT_S:.0f}s"
        except Exception as exc:
            problem = f"cannot read the GPU: {type(exc).__name__}: {exc}"
        if problem and problem != self.gpu_problem:
            log.error("GPU of %s is unhealthy (%s): not claiming jobs until it recovers", self.worker_id, problem)
        elif self.gpu_problem and not problem:
            log.info("GPU of %s is healthy again", self.worker_id)
            self.wake.set()
        self.gpu_problem = problem

    async def _sync_loaded(self) -> None:
        """Tell Redis at once which models this slot holds in GPU memory, when that changed."""
        loaded = await self._loaded_now()
        if loaded != self.loaded:
            await self.queue.set_loaded(self.worker_id, loaded)
            self.loaded = loaded

    async def _loaded_now(self) -> list[str]:
        loaded: list[str] = []
        for connector in self.connectors:
            try:
                loaded.extend(await asyncio.wait_for(connector.loaded_models(), timeout=LOADED_TIMEOUT_S))
            except Exception as exc:
                log.debug("connector %s loaded_models failed: %s", connector.name, exc)
        return sorted({m for m in loaded if isinstance(m, str) and 0 < len(m) <= 512})[:256]

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # the heartbeat period
            try:
                await self._beat()  # leases first: a slow engine or GPU read must never cost one
                await self._refresh()  # advertised by the next beat
            except RedisUnavailable as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed unexpectedly")

    # --- pub/sub -----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = Backoff()
        channels = (self.keys.ch_job_submitted, self.keys.ch_cancel)
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                if backoff.failures:
                    log.info("reconnected to Redis pub/sub")
                backoff.reset()
                self.wake.set()  # anything published while we were away is found by a claim
                while True:
                    message = await pubsub.get_message(timeout=60.0)
                    if message is not None:
                        self._on_message(message)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)  # reconnect backoff
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_message(self, message: Mapping[str, Any]) -> None:
        try:
            data = json.loads(message["data"])
        except (TypeError, ValueError):
            return
        if not isinstance(data, dict):
            return
        job_id = str(data.get("job_id", ""))
        if message["channel"] == self.keys.ch_cancel:
            running = self.running.get(job_id)
            if running is not None:
                log.info("job %s cancelled: %s", job_id, data.get("reason", ""))
                running.stop("cancelled")
            return
        service = data.get("service_required")
        if service is None or service in self.by_service:
            if job_id:
                self.hints.append(job_id)
            self.wake.set()

    # --- claiming --------------------------------------------------------------------------------

    def _slots_free(self) -> bool:
        return len(self.running) < self.settings.max_concurrent_jobs

    async def _claim_loop(self) -> None:
        backoff = Backoff()
        poll = self.settings.poll_interval_s
        while not self.stopping.is_set():
            self.wake.clear()
            if not self._slots_free() or not self.healthy_services or self.gpu_problem:
                await wait_for_event(self.wake, poll)
                continue
            hint = self.hints.popleft() if self.hints else ""
            try:
                claimed = await self.queue.claim_or_defer(self.worker_id, self.capabilities(), hint)
                backoff.reset()
            except RedisUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("claim failed: %s (next try in %.1fs)", exc, delay)
                await wait_for_event(self.stopping, delay)
                continue
            if isinstance(claimed, Claimed):
                self._start(claimed)
            elif isinstance(claimed, Deferred):  # left to a worker with its models loaded: look again
                await wait_for_event(self.wake, min(poll, claimed.retry_in_ms / 1000 + 0.01))
            elif not self.hints:
                await wait_for_event(self.wake, poll * random.uniform(0.8, 1.2))

    def _start(self, claimed: Claimed) -> None:
        self.claims += 1
        running = RunningJob(claimed.job_id, claimed.attempt)
        self.running[claimed.job_id] = running
        self._spawn(self._execute(claimed, running), name=f"job-{claimed.job_id}")
        if self.state is WorkerState.IDLE:
            self._spawn(self._set_state(WorkerState.BUSY))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        """Run `coro` as a task the drain waits for."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- running a job ---------------------------------------------------------------------------

    async def _execute(self, claimed: Claimed, running: RunningJob) -> None:
        outcome = "failed"
        try:
            outcome = await self._run_claimed(claimed, running)
        except Exception:
            log.exception("job %s: unexpected error in the worker", claimed.job_id)
        finally:
            self.running.pop(claimed.job_id, None)
            if self.plugins is not None:
                with contextlib.suppress(Exception):
                    self.plugins.job_finished(claimed.job_id, running.service, outcome,
                                              time.monotonic() - running.started)
            if not self.running and self.state is WorkerState.BUSY:
                await self._set_state(WorkerState.IDLE)
            self.wake.set()

    async def _run_claimed(self, claimed: Claimed, running: RunningJob) -> str:
        job_id, attempt = claimed.job_id, claimed.attempt
        try:
            job = Job.from_hash(claimed.fields, attempt, self.settings.max_payload_bytes)
        except InvalidJob as exc:
            log.warning("job %s is malformed: %s", job_id, exc)
            return await self._fail(job_id, attempt, f"invalid job: {exc}", retryable=False, retries=0)
        running.service = job.service
        connector = self.by_service.get(job.service)
        if connector is None:
            return await self._fail(job_id, attempt, f"no connector here runs {job.service!r}",
                                    retryable=True, retries=job.retry_count)
        log.info("job %s claimed (attempt %d, service %s)", job_id, attempt, job.service)
        reporter = ProgressReporter(
            send=lambda u: self.queue.progress(job_id, self.worker_id, attempt, u),
            rate_hz=self.settings.progress_rate_hz,
            on_stale=lambda why: running.stop("stale"),
        )
        running.ctx = JobContext(job, reporter.report, log.getChild(job.service))
        reporter.start()
        try:
            result, error = await self._run_connector(connector, job, running)
        finally:
            await reporter.close()
        try:
            await self._sync_loaded()  # before the outcome frees this slot for the next job
        except Exception as exc:  # affinity is an optimisation: never let it cost the outcome
            log.warning("could not record loaded models: %s: %s", type(exc).__name__, exc)
        return await self._record(job, running, result, error)

    async def _run_connector(
        self, connector: Connector, job: Job, running: RunningJob
    ) -> tuple[dict[str, Any] | None, JobError | None]:
        assert running.ctx is not None
        timeout = job.timeout_s or self.settings.job_timeout_s
        running.inner = asyncio.create_task(connector.run(job, running.ctx))
        if running.stop_reason:  # stopped before the task existed
            running.inner.cancel()
        done, _ = await asyncio.wait({running.inner}, timeout=timeout)
        if not done:
            running.stop("timeout")
            await asyncio.wait({running.inner}, timeout=STOP_WAIT_S)
            return None, JobError(f"job timed out after {timeout:.0f}s")
        try:
            result = running.inner.result()
        except (asyncio.CancelledError, JobCancelled):
            return None, None
        except JobError as exc:
            return None, exc
        except Exception as exc:
            return None, JobError(f"connector {connector.name} raised {type(exc).__name__}: {exc}")
        if not isinstance(result, dict):
            return None, JobError(f"connector {connector.name} returned {type(result).__name__}, not a dict")
        return result, None

    async def _record(
        self, job: Job, running: RunningJob, result: dict[str, Any] | None, error: JobError | None
    ) -> str:
        reason = running.stop_reason
        if reason in ("cancelled", "lease_lost", "stale"):
            log.info("job %s stopped (%s); nothing more to record", job.id, reason)
            return "cancelled" if reason == "cancelled" else "dropped"
        if reason == "drain":
            await self._persist(lambda: self.queue.hand_back(
                job.id, self.worker_id, job.attempt, "worker draining"))
            log.info("job %s handed back to the queue", job.id)
            return "handed_back"
        if error is not None or result is None:
            message = str(error) if error is not None else "job stopped"
            retryable = error.retryable if error is not None else True
            return await self._fail(job.id, job.attempt, message, retryable=retryable, retries=job.retry_count)
        encoded = json.dumps(result)
        if len(encoded.encode()) > self.settings.max_result_bytes:
            return await self._fail(
                job.id, job.attempt,
                f"result is {len(encoded.encode())} bytes; the limit is {self.settings.max_result_bytes} "
                "(EMP_MAX_RESULT_BYTES): store large outputs elsewhere and return their URL",
                retryable=False, retries=job.retry_count)
        if await self._persist(lambda: self.queue.complete(job.id, self.worker_id, job.attempt, encoded)):
            log.info("job %s completed", job.id)
            return "completed"
        return "dropped"

    async def _fail(self, job_id: str, attempt: int, message: str, *, retryable: bool, retries: int) -> str:
        s = self.settings
        backoff = retry_backoff_ms(retries, s.retry_backoff_s, s.retry_backoff_max_s, random.random())
        outcome: list[str] = []

        async def call() -> None:
            outcome.append(await self.queue.fail(job_id, self.worker_id, attempt, message[:4000],
                                                 retryable=retryable, backoff_ms=backoff))

        if await self._persist(call):
            log.info("job %s %s: %s", job_id, "will be retried" if outcome[0] == "retry" else "failed", message)
            return "retry" if outcome[0] == "retry" else "failed"
        return "dropped"

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
