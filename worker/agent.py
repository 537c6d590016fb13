"""One worker slot and its loops: it claims jobs, runs them through its connectors and keeps its
leases and its record fresh.

Its life is an explicit state machine (``WorkerState``); each duty is its own loop that logs and
survives errors, so that none waits on another:

* the **lease loop** renews the leases of running jobs and beats (one heartbeat script): it waits
  on nothing but Redis, never on an engine or a GPU;
* the **refresh loop** checks connector health, lists models (every ``EMP_MODELS_TTL_S``),
  re-reads the slot's GPU and the models loaded in it, and calls the capability hooks, all
  concurrently and each with a timeout; it retries connectors whose ``start()`` failed;
* the **listener** reads ``cancel_job`` on one pub/sub connection, and ``job_submitted`` too when
  the slot is a wake relay (worker/wake.py);
* the **claim loop** claims while a place is free, then waits for a wake token (worker/wake.py:
  a job wakes one idle worker, not all), a local event (a freed place, a relay's job_submitted) or,
  at the wait's timeout, a jittered slow poll.

Running one job is worker/execution.py; what the slot advertises is worker/advertise.py; every
call into connector code is guarded by worker/guard.py. worker/daemon.py runs one Worker per GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.base import Connector, Outcome, StopReason
from connectors.manager import Plugins
from connectors.stores import builtin as builtin_stores
from worker.advertise import Advertiser
from worker.errors import ConfigError, EmpWorkerError, RedisUnavailable, StaleJob
from worker.execution import STOP_WAIT_S, Executor, RunningJob, stop_all
from worker.guard import PluggedConnector
from worker.hardware import Gpu
from worker.keys import Keys
from worker.logs import bind
from worker.outputs import OutputPlacer
from worker.protocol import is_text, printable, utc_iso
from worker.queue import Claimed, Completion, Deferred, Queue, QueueConfig
from worker.retry import Backoff, wait_for_event
from worker.settings import Settings
from worker.wake import READ_MARGIN_S, Relays, Waiter

if TYPE_CHECKING:
    from worker.metrics import Metrics

log = logging.getLogger("emp.worker")
_Reply = TypeVar("_Reply")

GPU_READ_TIMEOUT_S = 2.0
LISTEN_TURN_S = 1.0  # the listener looks this often whether its channels must change (a relay or not)
LOADED_TIMEOUT_S = 1.0
INSTANCE_ERROR = "EMP_INSTANCE "  # heartbeat.lua's refusal: another process holds the worker id


class IdInUse(EmpWorkerError):
    """A heartbeat was refused: another process (its token in `holder`) writes under this worker id."""

    def __init__(self, worker_id: str, holder: str) -> None:
        super().__init__(f"worker id {worker_id!r} is held by another process ({holder})")
        self.holder = holder


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
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.keys = Keys(settings.key_prefix)
        self.queue = Queue(client, self.keys, queue_config(settings))
        self.worker_id = worker_id
        self.engines = [PluggedConnector(c, settings.max_concurrent_jobs) for c in connectors]
        self.by_service = {s: e for e in self.engines for s in e.services}
        self.plugins = plugins
        self.ads = Advertiser(settings, worker_id, self.engines, hardware=hardware, gpu=gpu,
                              host=host or {}, plugins=plugins)
        self.outputs = OutputPlacer(settings, plugins.store_classes() if plugins else builtin_stores.by_name())
        self.executor = Executor(settings, self.queue, worker_id, self._sync_loaded, self.outputs)
        self.executor.complete_and_claim = self._complete_and_claim
        self.gpu_probe = gpu_probe
        self.metrics = metrics  # None: EMP_METRICS_PORT unset
        self.state = WorkerState.STARTING
        self.running: dict[str, RunningJob] = {}
        self.finishing = 0  # jobs in self.running whose run ended and whose place is free (_release)
        self.claim_lock = asyncio.Lock()  # one claim at a time: the claim loop's, or a finished job's
        self._last_look: tuple[Deferred | None] | None = None  # what a finished job's claim found, if nothing
        self.stopping = asyncio.Event()
        self.fast_stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.hints: deque[str] = deque(maxlen=1000)  # job ids from job_submitted (a relay's)
        self.waiter = Waiter(client, self.keys, self.queue, self.wake)
        self.relays = Relays(client, self.keys, self.queue, worker_id, settings.wake_relays, self.beat_ttl_s)
        self.claims = 0
        self.claim_calls = 0  # claim scripts run (jobs claimed or not)
        self.unreadable_messages = 0  # pub/sub messages ignored as unreadable
        self._last_beat = time.monotonic()  # the last beat that got through
        self._beat_failed = False  # whether a beat failed since then (a gap in our own heartbeats)
        self._models_dirty = True  # written to Redis on the first refresh, then on each change
        self._starting: dict[PluggedConnector, asyncio.Task[None]] = {}
        self._fields: dict[str, str] = {}  # the last worker record built
        self._tasks: set[asyncio.Task[Any]] = set()
        #: this process's token on worker:{id}:instance (one writer per worker id)
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.displaced = False  # another process took the worker id over: write nothing more
        #: loop name -> monotonic time its last turn ended (the systemd watchdog's sign of progress)
        self.turns: dict[str, float] = {}
        #: called after each state change (the machine status publisher's wake-up); must not block
        self.on_change: Callable[[], None] | None = None
        self.last_activity_ms = int(time.time() * 1000)

    @property
    def redis_ok(self) -> bool:
        """Whether the last heartbeat got through."""
        return not self._beat_failed

    @property
    def gpu_problem(self) -> str:
        return self.ads.gpu_problem

    @property
    def beat_age_s(self) -> float:
        """Seconds since the last heartbeat that got through."""
        return time.monotonic() - self._last_beat

    @property
    def beat_ttl_s(self) -> int:
        """How long the heartbeat key (this slot's liveness in Redis) outlives a beat."""
        return max(int(self.settings.heartbeat_interval_s * 3), int(self.settings.lease_s) + 1)

    def capabilities(self) -> dict[str, Any]:
        """What the claim script matches against now (see worker/advertise.py)."""
        return self.ads.claim_capabilities()

    # --- state -----------------------------------------------------------------------------------

    async def _set_state(self, new: WorkerState) -> None:
        old = self.state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"worker state cannot go from {old.value} to {new.value}")
        self.state = new
        self.last_activity_ms = int(time.time() * 1000)
        if self.on_change is not None:
            self.on_change()
        # old_status/new_status for their API, status/previous_status for their webhook service
        event = {"worker_id": self.worker_id, "old_status": old.value, "new_status": new.value,
                 "status": new.value, "previous_status": old.value,
                 "current_job_id": next(iter(self.running), ""), "timestamp": int(time.time() * 1000)}
        with contextlib.suppress(RedisUnavailable, RedisConnectionError, RedisTimeoutError, OSError):
            await self.redis.publish(self.keys.ch_worker_status, json.dumps(event))

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
        bind(worker_id=self.worker_id)  # every log line of this slot's tasks names it
        await self._wait_for_id()  # before any engine starts: a duplicate starts nothing
        await asyncio.gather(*(engine.start() for engine in self.engines))  # a failure: DOWN, retried
        await self._beat_until_registered()
        await self._set_state(WorkerState.IDLE)
        log.info("worker %s ready: services %s", self.worker_id, ", ".join(self.ads.all_services))
        background = [asyncio.create_task(c) for c in (self._listen(), self._every_beat(self._beat, "heartbeat"),
                                                           self._every_beat(self._refresh, "refresh"),
                                                           self.relays.run(self.stopping))]
        try:
            await self._claim_loop()
            await self._drain()
        except Exception:  # never hidden behind a state error on the way out
            log.exception("worker %s: unexpected error; stopping", self.worker_id)
            raise
        finally:
            for task in [*background, *self._starting.values()]:
                task.cancel()
            await asyncio.gather(*background, *self._starting.values(), return_exceptions=True)
            await self._stop_waiting()
            await self._deregister()
            await asyncio.gather(*(engine.stop() for engine in self.engines))
            await self.outputs.close()
            if self.state is not WorkerState.DRAINING:
                await self._set_state(WorkerState.DRAINING)
            await self._set_state(WorkerState.STOPPED)
            log.info("worker %s stopped", self.worker_id)

    async def _wait_for_id(self) -> None:
        """Wait for another process's hold on this worker id to lapse (an orphan, the process a
        restart replaces); ConfigError when it is still renewed after a heartbeat TTL (a live one)."""
        key, deadline = self.keys.instance(self.worker_id), 0.0
        while not self.stopping.is_set():
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.get(key)
                    pipe.pttl(key)
                    holder, ttl_ms = await pipe.execute()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                return  # cannot tell now: the first heartbeat decides, and never writes under another's token
            if not holder or holder == self.instance:
                return
            now = time.monotonic()
            if not deadline:  # its own TTL says when an unrenewed token is gone, whatever its settings
                deadline = now + max(0, ttl_ms) / 1000 + 2 * self.settings.heartbeat_interval_s
                log.warning("worker id %s is held by another process (%s); waiting up to %.0fs for it to let go",
                            self.worker_id, holder, deadline - now)
            elif now > deadline:
                raise ConfigError(f"worker id {self.worker_id!r} is in use by another live process ({holder}); "
                                  "give each process its own EMP_WORKER_ID (or --worker-id), or stop the other one")
            await wait_for_event(self.stopping, min(self.settings.heartbeat_interval_s, 1.0))

    def _displaced_by(self, exc: IdInUse) -> None:
        """Another process writes under our id now (ours lapsed): stop at once, writing nothing more."""
        if not self.displaced:
            log.error("worker %s: %s; stopping without writing under it again", self.worker_id, exc)
        self.displaced = True
        self.request_stop()
        self.fast_stop.set()

    async def _beat_until_registered(self) -> None:
        backoff = Backoff()
        await self._refresh()
        while not self.stopping.is_set():
            try:
                await self._beat()
                return
            except RedisUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("cannot register worker %s: %s (next try in %.1fs)", self.worker_id, exc, delay)
                await wait_for_event(self.stopping, delay)
            except IdInUse as exc:  # taken between _wait_for_id and now: wait for it as for an outage
                delay = backoff.next_delay()
                log.warning("cannot register: %s (next try in %.1fs)", exc, delay)
                await wait_for_event(self.stopping, delay)
            except Exception:
                delay = backoff.next_delay()
                log.exception("cannot register worker %s (next try in %.1fs)", self.worker_id, delay)
                await wait_for_event(self.stopping, delay)

    async def _drain(self) -> None:
        await self._set_state(WorkerState.DRAINING)
        with contextlib.suppress(RedisUnavailable, IdInUse):
            if not self.displaced:
                await self._beat()
        if self.running:
            log.info("draining: waiting up to %.0fs for %d running job(s)",
                     self.settings.grace_period_s, len(self.running))
            deadline = time.monotonic() + self.settings.grace_period_s
            while self.running and not self.fast_stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await wait_for_event(self.fast_stop, min(remaining, 0.05))
        await stop_all(list(self.running.values()), StopReason.DRAIN)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=STOP_WAIT_S)
        for job in list(self.running.values()):  # a connector that ignores cancellation: hand back anyway
            log.warning("job %s did not stop within %.0fs; handing it back", job.job_id, STOP_WAIT_S)
            with contextlib.suppress(RedisUnavailable, StaleJob):
                await self.queue.hand_back(job.job_id, self.worker_id, job.attempt, "worker draining")

    async def _deregister(self) -> None:
        if self.displaced:  # the record and the token are the other process's now
            return
        try:
            await self.queue.set_loaded(self.worker_id, [])
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.srem(self.keys.workers_active, self.worker_id)
                pipe.delete(self.keys.heartbeat(self.worker_id), self.keys.instance(self.worker_id))
                pipe.hset(self.keys.worker(self.worker_id), mapping={
                    "status": "offline", "current_job_id": "", "last_heartbeat": utc_iso()})
                pipe.expire(self.keys.worker(self.worker_id), self.settings.retention_s)
                await pipe.execute()
        except (RedisUnavailable, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("could not deregister %s: %s", self.worker_id, type(exc).__name__)

    # --- lease loop: Redis only -------------------------------------------------------------------

    async def _beat(self) -> None:
        """One heartbeat script: the worker record, lease renewal, promotion, reaping."""
        ttl = self.beat_ttl_s
        status = self.state.value if self.state is not WorkerState.STARTING else "idle"
        held = {job_id: job.attempt for job_id, job in self.running.items()}
        try:
            self._fields = self.ads.record_fields(next(iter(self.running), ""))
        except Exception:  # never let the record cost the leases: beat with the last good one
            log.exception("could not build the worker record; beating with the last one")
        fields = {**self._fields, "emp_instance": self.instance}
        away_ms = int((time.monotonic() - self._last_beat) * 1000) if self._beat_failed else 0
        try:
            beat = await self.queue.heartbeat(self.worker_id, status, fields, ttl, held, self.ads.loaded,
                                              away_ms=away_ms)
        except ResponseError as exc:
            if str(exc).startswith(INSTANCE_ERROR):  # nothing was written
                raise IdInUse(self.worker_id, str(exc).removeprefix(INSTANCE_ERROR)) from None
            self._beat_failed = True
            raise
        except Exception:
            self._beat_failed = True
            raise
        if self._beat_failed and self.metrics is not None:
            self.metrics.reconnected("commands")
        self._last_beat, self._beat_failed = time.monotonic(), False
        if beat.reaped:
            log.warning("reaper: %d job(s) with an expired lease put back or failed", beat.reaped)
        for job_id in beat.lost:
            # (a job whose run is over may have been completed while this beat was under way:
            # nothing is left to stop, and the fence decides whether its outcome still counts)
            if job_id in self.running and not self.running[job_id].run_ended:
                log.warning("job %s is no longer held by %s; stopping it", job_id, self.worker_id)
                if self.metrics is not None:
                    self.metrics.lease_lost()
                self.running[job_id].stop(StopReason.LEASE_LOST)
        if beat.models_missing:
            self._models_dirty = True  # the next refresh writes them again
        if beat.promoted or beat.reaped:
            self.wake.set()

    async def _every_beat(self, duty: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run `duty` once per heartbeat interval (jittered) for ever; a failure is logged."""
        interval = self.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # the period
            try:
                await duty()
            except RedisUnavailable as exc:
                log.warning("%s failed: %s", what, exc)
            except IdInUse as exc:
                self._displaced_by(exc)
            except Exception:
                log.exception("%s failed unexpectedly", what)
            self.turns[what] = time.monotonic()

    # --- refresh loop: engines, GPU, hooks ---------------------------------------------------------

    async def _refresh(self) -> None:
        """Every engine's health and (when due) models, this slot's GPU and loaded models, all
        concurrently and each bounded (so a turn takes at most about EMP_HEALTH_TIMEOUT_S); then
        the capability hooks."""
        before = self.ads.services(with_room=False)
        timeout = self.settings.health_timeout_s
        for engine in self.engines:  # retried in the background: a hanging start() holds no turn
            if not engine.started and engine not in self._starting:
                self._starting[engine] = asyncio.create_task(self._start_engine(engine), name=f"start-{engine.name}")
        ttl = self.settings.models_ttl_s
        results = await asyncio.gather(*(e.refresh_models(ttl, timeout) for e in self.engines),
                                       *(e.check_health(timeout) for e in self.engines),
                                       self._refresh_gpu(), self._refresh_loaded())
        changed = results[: len(self.engines)]  # refresh_models: True when the list changed
        self.ads.refresh_extra()
        if any(changed):
            self._models_dirty = True
        if self._models_dirty:
            try:
                await self.queue.set_models(self.worker_id, self.ads.models())
                self._models_dirty = False
            except RedisUnavailable as exc:
                log.warning("could not record the models: %s", exc)
        if set(self.ads.services(with_room=False)) - set(before):
            self.wake.set()

    async def _start_engine(self, engine: PluggedConnector) -> None:
        try:
            if await engine.start():
                self.wake.set()
        finally:
            self._starting.pop(engine, None)

    async def _refresh_gpu(self) -> None:
        """Re-read this slot's GPU; one that fails or reports a problem stops the slot claiming."""
        if self.gpu_probe is None:
            return
        try:
            self.ads.gpu = await asyncio.wait_for(asyncio.to_thread(self.gpu_probe), GPU_READ_TIMEOUT_S)
            problem = "; ".join(self.ads.gpu.problems)
        except TimeoutError:
            problem = f"reading the GPU took over {GPU_READ_TIMEOUT_S:.0f}s"
        except Exception as exc:
            problem = f"cannot read the GPU: {type(exc).__name__}: {exc}"
        if problem and problem != self.ads.gpu_problem:
            log.error("GPU of %s is unhealthy (%s): not claiming jobs until it recovers", self.worker_id, problem)
        elif self.ads.gpu_problem and not problem:
            log.info("GPU of %s is healthy again", self.worker_id)
            self.wake.set()
        self.ads.gpu_problem = problem

    async def _refresh_loaded(self) -> None:
        self.ads.loaded = await self._loaded_now()

    async def _sync_loaded(self) -> None:
        """Tell Redis at once which models this slot holds in GPU memory, when that changed."""
        loaded = await self._loaded_now()
        if loaded != self.ads.loaded:
            await self.queue.set_loaded(self.worker_id, loaded)
            self.ads.loaded = loaded

    async def _loaded_now(self) -> list[str]:
        found = await asyncio.gather(*(e.loaded_models(LOADED_TIMEOUT_S) for e in self.engines))
        return sorted({m for names in found for m in names if 0 < len(m) <= 512})[:256]

    # --- pub/sub -----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = Backoff()
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                channels = self.relays.channels()
                await pubsub.subscribe(*channels)
                if backoff.failures:
                    log.info("reconnected to Redis pub/sub")
                    if self.metrics is not None:
                        self.metrics.reconnected("pubsub")
                backoff.reset()
                self.wake.set()  # anything published while we were away is found by a claim
                while True:
                    try:
                        message = await pubsub.get_message(timeout=LISTEN_TURN_S)
                    except UnicodeDecodeError as exc:  # a client that decodes strictly; the reply was read whole
                        self._unreadable_message(f"not UTF-8 text: {exc.reason}")
                        continue
                    if message is not None:
                        self._on_message(message)
                    channels = await self.relays.follow(pubsub, channels)  # became a relay, or stopped
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)  # reconnect backoff
            except Exception:  # a bug or a message no check foresaw: the listener goes on
                delay = backoff.next_delay()
                log.exception("pub/sub listener failed; resubscribing in %.1fs", delay)
                await asyncio.sleep(delay)  # reconnect backoff
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _unreadable_message(self, why: str) -> None:
        """Anyone can publish anything: an unreadable message is counted and logged once."""
        self.unreadable_messages += 1
        if self.unreadable_messages == 1:
            log.warning("ignoring an unreadable pub/sub message (%s); later ones are counted, not logged", why)

    def _on_message(self, message: Mapping[str, Any]) -> None:
        raw = message.get("data")
        try:
            data = json.loads(raw) if isinstance(raw, str | bytes) else None
        except (ValueError, RecursionError):
            data = None
        job_id = data.get("job_id", "") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(job_id, str) or not is_text(job_id) or len(job_id) > 512:
            self._unreadable_message(f"on {printable(str(message.get('channel', '')))}: {printable(str(raw))}")
            return
        if message.get("channel") == self.keys.ch_cancel:
            running = self.running.get(job_id)
            if running is not None:
                log.info("job %s cancelled: %s", job_id, data.get("reason", ""))
                running.stop(StopReason.CANCELLED)
            return
        if message.get("channel") != self.keys.ch_job_submitted or data.get("emp_woken") is True:
            return  # our own submit pushed its wake token already
        service = data.get("service_required")
        room = self._room() if not self.stopping.is_set() else []
        if (service is None and room) or (isinstance(service, str) and service in room):
            if job_id:  # claimed here, or passed on by the claim script (hops=0)
                self.hints.append(job_id)
            self.wake.set()
        elif job_id:
            self.relays.forward(job_id)  # wake one idle worker of its service

    # --- claiming --------------------------------------------------------------------------------

    def _slots_free(self) -> bool:
        return len(self.running) - self.finishing < self.ads.max_concurrent_jobs

    def _room(self) -> list[str]:
        """The services this slot has a free place for now (none while every place is taken)."""
        return self.ads.services(with_room=True) if self._slots_free() else []

    async def _timed_claim(self, claim: Awaitable[_Reply]) -> _Reply:
        """Run one claim script call, counted and timed."""
        began = time.perf_counter()
        self.claim_calls += 1
        reply = await claim
        if self.metrics is not None:
            self.metrics.claim_took(time.perf_counter() - began)
        return reply

    def _release(self, running: RunningJob) -> None:
        """A job's run ended: its place is free for the next claim, while the job stays in
        self.running (its lease renewed) until its outcome is written."""
        if not running.released:
            running.released = True
            self.finishing += 1
            if running.engine is not None:
                running.engine.running -= 1

    async def _complete_and_claim(self, running: RunningJob, done: Completion) -> bool:
        """Complete a finished job and claim this slot's next one in one call (the executor's
        success path). False when this slot does not claim now (stopping, another claim under way,
        no room): the executor completes the job as usual. StaleJob when the fence refused the
        completion (the claim stands)."""
        if self.stopping.is_set() or self.claim_lock.locked():
            return False
        async with self.claim_lock:
            self._release(running)
            if not self._room():
                return False
            refused, claimed = await self._timed_claim(
                self.queue.complete_and_claim(done, self.worker_id, self.capabilities(), start=True))
            if isinstance(claimed, Claimed):
                self._start(claimed)
            else:
                self._last_look = (claimed,)  # the claim loop waits instead of looking again at once
        if refused is not None:
            raise StaleJob(f"job {done.job_id}: {refused}")
        return True

    async def _claim_loop(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                await self._claim_once(backoff)
            except Exception:  # a bug or a record no check foresaw: log, back off, claim on
                delay = backoff.next_delay()
                log.exception("claim failed unexpectedly (next try in %.1fs)", delay)
                await wait_for_event(self.stopping, delay)
            self.turns["claim"] = time.monotonic()
        self.turns.pop("claim", None)  # a loop that ended on purpose is no stalled loop
        await self._stop_waiting()  # now, not after the drain: what this slot holds goes on at once

    async def _claim_once(self, backoff: Backoff) -> None:
        """One claim when a place is free, then the wait until the next one."""
        poll = self.settings.poll_interval_s
        room = self._room()
        if not room:
            await self._idle_if_done()
            await self._hand_on()
            await wait_for_event(self.wake, poll)
            return
        looked, self._last_look = self._last_look, None
        if looked is not None and not self.hints and not self.waiter.ready:
            await self._wait_for_work(looked[0], room)  # a finished job's claim just found nothing
            return
        token = self.waiter.take()
        hint, hops = (token[1], token[0]) if token else (self.hints.popleft(), 0) if self.hints else ("", None)
        try:
            async with self.claim_lock:
                if not self._room():
                    # a finished job's claim filled the place meanwhile: keep what this claim took
                    if token is not None:
                        self.waiter.ready.appendleft(token)
                    elif hint:
                        self.hints.appendleft(hint)
                    return
                claimed = await self._timed_claim(
                    self.queue.claim_or_defer(self.worker_id, self.capabilities(), hint, hops=hops, start=True))
                if isinstance(claimed, Claimed):
                    self._start(claimed)
            backoff.reset()
        except RedisUnavailable as exc:
            if token is not None:
                self.waiter.ready.appendleft(token)  # for the next claim: a popped token is never dropped
            await self._idle_if_done()
            delay = backoff.next_delay()
            log.warning("claim failed: %s (next try in %.1fs)", exc, delay)
            await wait_for_event(self.stopping, delay)
            return
        if not isinstance(claimed, Claimed):
            await self._wait_for_work(claimed, room)

    async def _wait_for_work(self, claimed: Deferred | None, room: list[str]) -> None:
        """After a claim that found nothing: wait for a token, a local event or the slow poll."""
        poll = self.settings.poll_interval_s
        await self._idle_if_done()
        if isinstance(claimed, Deferred):  # left to a worker with its models loaded: look again
            await wait_for_event(self.wake, min(poll, claimed.retry_in_ms / 1000 + 0.01))
        elif not self.hints and not self.waiter.ready:
            timeout = poll * random.uniform(0.6, 1.4)  # wide: a fleet idle after a drain falls out of step
            self.waiter.listen(room, timeout)  # a token, or its timeout (the slow poll), sets self.wake
            await wait_for_event(self.wake, timeout + READ_MARGIN_S)

    async def _hand_on(self) -> None:
        """No free place (or stopping): the next token goes to a worker that has one (the BLPOP in
        flight is unblocked), and the tokens and job_submitted ids held here go on to others."""
        await self.waiter.stand_down()
        self.relays.forward_all(self.hints)

    async def _stop_waiting(self) -> None:
        await self._hand_on()
        await self.waiter.close()
        await self.relays.close()

    async def _idle_if_done(self) -> None:
        """BUSY -> IDLE once a claim finds nothing to start and no job runs: back-to-back jobs keep
        the slot BUSY, so worker_status (and the machine status) change on real transitions only,
        not twice per job."""
        if not self.running and self.state is WorkerState.BUSY:
            await self._set_state(WorkerState.IDLE)

    def _start(self, claimed: Claimed) -> None:
        self.claims += 1
        if self.metrics is not None:
            self.metrics.claimed(claimed.fields)
        running = RunningJob(claimed.job_id, claimed.attempt)
        running.engine = self.by_service.get(claimed.fields.get("service_required", ""))
        if running.engine is not None:
            running.engine.running += 1  # its place is taken now: the next claim must not offer it
        self.running[claimed.job_id] = running
        self._spawn(self._execute(claimed, running), name=f"job-{claimed.job_id}")
        if self.state is WorkerState.IDLE:
            self._spawn(self._set_state(WorkerState.BUSY))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        """Run `coro` as a task the drain waits for."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, claimed: Claimed, running: RunningJob) -> None:
        outcome = Outcome.FAILED
        bind(job_id=claimed.job_id, attempt=claimed.attempt)  # this task's log lines (and its children's)
        try:
            outcome = await self.executor.run(claimed, running)
            if outcome is Outcome.RETRY and running.engine is not None:
                # the engine may have died: look before this slot claims its next job (a lone
                # worker retakes its own failed job at once, and must not spend its attempts on a
                # dead engine)
                await running.engine.check_health(self.settings.health_timeout_s)
        except Exception as exc:
            log.exception("job %s: unexpected error in the worker", claimed.job_id)
            with contextlib.suppress(Exception):
                outcome = await self.executor.fail_unexpected(claimed, exc)
        finally:
            if self.running.get(claimed.job_id) is running:
                del self.running[claimed.job_id]
            if running.released:
                self.finishing -= 1
            elif running.engine is not None:
                running.engine.running -= 1
            took = time.monotonic() - running.started
            if self.metrics is not None:
                self.metrics.finished(running.service, outcome, took)
            if self.plugins is not None:
                self.plugins.job_finished(claimed.job_id, running.service, outcome, took)
            self.wake.set()  # the claim loop claims again, or goes IDLE if nothing is left (_idle_if_done)
