"""The Redis side of the job lifecycle: every call is one atomic script from worker/scripts.py.

The fixed limits (QueueConfig's fields, and MAX_PER_BEAT as ``max_per_beat``) reach the scripts as
one JSON options argument, encoded once per Queue; each script's header in worker/lua says which of
them it reads.

Foreign errors (redis-py's) are translated here into worker.errors at the boundary.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import scripts
from worker.errors import InvalidJob, RedisUnavailable, StaleJob, refused_credentials
from worker.keys import MODELS_FIELD, Keys
from worker.protocol import decode_reply, utc_iso

MAX_PER_BEAT = 100
MAX_HINT_CHARS = 512  # a job_submitted id longer than any job id is no hint
MAX_WAKE_HOPS = 16  # lib/wake.lua's: a token is passed on this many times at most


def parse_wake_token(raw: bytes | str) -> tuple[int, str] | None:
    """A wake token ``"{hops}:{job id}"`` popped from a wake list, as (hops, job id); None for
    anything else (anyone can push anything on a list)."""
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    hops, sep, job_id = text.partition(":")
    if not sep or not hops.isdigit() or len(hops) > 2 or not job_id or len(job_id) > MAX_HINT_CHARS:
        return None
    if int(hops) >= MAX_WAKE_HOPS:
        return None
    return int(hops), job_id


@dataclass(frozen=True)
class QueueConfig:
    """Limits the scripts apply; the daemon builds it from Settings."""

    lease_ms: int = 8000
    stream_maxlen: int = 1000
    stream_ttl_s: int = 7 * 86400
    retention_s: int = 86400
    retry_exclusion_ms: int = 30_000
    reconcile_lock_ms: int = 2000
    reap_period_ms: int = 1000
    affinity_ms: int = 3000


@dataclass(frozen=True)
class Claimed:
    """A job this worker now holds: its fencing token, the id of the key it claimed, and the raw
    hash fields (untrusted: bytes that are not UTF-8 come as surrogate escapes; Job.from_hash
    says so)."""

    attempt: int
    job_id: str
    fields: dict[str, str]
    started: bool = False  # marked started by the claim itself (Queue.claim_or_defer's `start`)


@dataclass(frozen=True)
class Completion:
    """A held job's successful outcome, as Queue.complete writes it."""

    job_id: str
    attempt: int
    result: str  # the connector's output, JSON
    envelope: str = "{}"  # more JobResult fields, a JSON object
    last_progress: ProgressUpdate | None = None  # its last report, not sent on its own


@dataclass(frozen=True)
class Deferred:
    """Nothing claimed now: a job was left to a worker that has its models loaded."""

    retry_in_ms: int


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report of a running job (built by JobContext.progress)."""

    progress: float
    message: str = ""
    current_step: int | None = None
    total_steps: int | None = None
    eta_s: float | None = None  # seconds left: written as estimated_completion
    data: dict[str, Any] | None = None  # small structured detail, e.g. {"node": "12"}
    preview: bytes | None = None  # a live preview image (only when previews are on)
    preview_type: str = "image/jpeg"


@dataclass(frozen=True)
class Beat:
    renewed: int
    promoted: int
    lost: list[str]
    reaped: int = 0
    models_missing: bool = False  # the record lost its emp_models (e.g. deleted): set them again


def eta_iso(eta_s: float | None) -> str:
    """Seconds left -> the ISO time emp-job-queue's `estimated_completion` holds ('' if unknown)."""
    if eta_s is None:
        return ""
    return utc_iso(datetime.now(UTC) + timedelta(seconds=min(eta_s, 365 * 86400.0)))


def _progress_extra_fields(update: ProgressUpdate) -> dict[str, Any]:
    """A report's structured detail and preview, when present."""
    extra: dict[str, Any] = {}
    if update.data:
        extra["data"] = update.data
    if update.preview is not None:
        extra["preview"] = base64.b64encode(update.preview).decode()
        extra["preview_type"] = update.preview_type
    return extra


def _progress_extra(update: ProgressUpdate) -> str:
    """The progress script's extra argument ('' when the report has neither detail nor preview)."""
    extra = _progress_extra_fields(update)
    return json.dumps(extra) if extra else ""


def _claimed(reply: Any, started: bool) -> Claimed | Deferred | None:
    """The claim script's reply (undecoded) as what the worker got."""
    if not reply:
        return None
    if int(reply[0]) == -1:
        return Deferred(int(reply[1]))
    fields = json.loads(decode_reply(reply[2]))  # one JSON object: cheaper to parse than 2n strings
    return Claimed(int(reply[0]), decode_reply(reply[1]), {str(k): str(v) for k, v in fields.items()}, started)


def _progress_fields(update: ProgressUpdate) -> dict[str, Any]:
    """A progress report as complete.lua's `progress` option (progress.lua's arguments, by name)."""
    fields: dict[str, Any] = {"progress": update.progress, "message": update.message,
                              "current_step": _opt(update.current_step), "total_steps": _opt(update.total_steps),
                              "estimated_completion": eta_iso(update.eta_s)}
    fields.update(_progress_extra_fields(update))
    return fields


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


class Queue:
    """Typed, atomic operations on the emp-job-queue layout."""

    def __init__(self, client: aioredis.Redis, keys: Keys, config: QueueConfig) -> None:
        self.redis = client
        self.keys = keys
        self.config = config
        self._config_options = {**dataclasses.asdict(config), "max_per_beat": MAX_PER_BEAT}
        self._options = json.dumps(self._config_options)
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source) for name, source in scripts.ALL.items()
        }
        # a hash-tagged prefix is declared as the one key, so a cluster client routes to its slot
        self._route = list(keys.routing_keys)

    async def _run(self, name: str, *args: str | int | float) -> Any:
        """Run a script (redis-py's AsyncScript loads it again when Redis answers NOSCRIPT: after
        SCRIPT FLUSH, a restart or a failover to a replica that never had it)."""
        try:
            return await self._scripts[name](keys=self._route, args=[self.keys.prefix, *args])
        except _REDIS_ERRORS as exc:
            _raise_translated(exc)

    async def _run_undecoded(self, name: str, *args: str | int | float) -> Any:
        """Like _run, but the reply is left as bytes: it holds what others wrote (a job hash),
        which need not be text; the caller decodes it (decode_reply)."""
        script = self._scripts[name]
        numkeys_keys_argv = [len(self._route), *self._route, self.keys.prefix, *args]
        try:
            try:
                return await self.redis.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, *numkeys_keys_argv, **{NEVER_DECODE: True})
            except NoScriptError:  # flushed, restarted or failed over: load it and run it again
                script.sha = await self.redis.script_load(script.script)
                return await self.redis.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, *numkeys_keys_argv, **{NEVER_DECODE: True})
        except _REDIS_ERRORS as exc:
            _raise_translated(exc)

    async def submit(self, job_id: str, fields: Mapping[str, str], score: float) -> str:
        """Write a new job hash, add it to jobs:pending and our index; returns created_at."""
        ok, detail = await self._run("submit", job_id, repr(score), json.dumps(dict(fields)))
        if not ok:
            raise InvalidJob(detail)
        return str(detail)

    async def claim(self, worker_id: str, capabilities: Mapping[str, Any], hint: str = "") -> Claimed | None:
        """Claim the best job this worker can run, or None (a job left to another worker included)."""
        got = await self.claim_or_defer(worker_id, capabilities, hint)
        return got if isinstance(got, Claimed) else None

    async def claim_or_defer(
        self, worker_id: str, capabilities: Mapping[str, Any], hint: str = "", hops: int | None = None,
        *, start: bool = False,
    ) -> Claimed | Deferred | None:
        """`hint`: a job to index first (a job_submitted or wake-token id); `hops`: the hop count
        of the wake token it came from, if it did: the script passes the token on to the next idle
        worker of the job's service when this claim leaves that job pending. `start`: the job goes
        to its connector at once, so the claim marks it started too (what `start` does, without
        its round trip); the Claimed says so."""
        reply = await self._claim(worker_id, capabilities, hint, hops, start)
        return _claimed(reply, start)

    async def complete_and_claim(
        self, done: Completion, worker_id: str, capabilities: Mapping[str, Any], hint: str = "",
        hops: int | None = None, *, start: bool = False,
    ) -> tuple[str | None, Claimed | Deferred | None]:
        """Complete `done` (as `complete` does), then claim as `claim_or_defer` does, in one
        script: a worker going from one job to the next. Returns (None, claim) when the job was
        completed, (why not, claim) when the fence refused it (the claim is made all the same)."""
        completion = [done.job_id, str(done.attempt), done.result, self._complete_options(done)]
        reply = await self._claim(worker_id, capabilities, hint, hops, start, completion)
        refused = None if int(reply[0]) == 1 else decode_reply(reply[1])
        return refused, _claimed(reply[2:], start)

    async def _claim(self, worker_id: str, capabilities: Mapping[str, Any], hint: str, hops: int | None,
                     start: bool, completion: list[str] | None = None) -> Any:
        try:
            return await self._run_undecoded(
                "claim", worker_id, json.dumps(capabilities), hint[:MAX_HINT_CHARS], self._options,
                "" if hops is None else str(hops), "1" if start else "", *(completion or ()))
        except ResponseError as exc:  # a script error is a bug or a foreign record; never silent
            raise RedisUnavailable(f"claim script failed: {exc}") from exc

    async def wake(self, job_id: str) -> bool:
        """Wake one idle worker for a pending job (a relay's answer to job_submitted): push a wake
        token on its service's list, at most one per job however many relays ask. True when pushed."""
        if not job_id or len(job_id) > MAX_HINT_CHARS:
            return False
        return bool(await self._run("wake", job_id, ""))

    async def pass_on(self, hops: int, job_id: str) -> bool:
        """Push back a wake token this worker popped but cannot use now (no free place), unchanged,
        while its job is pending. True when pushed."""
        if not job_id or len(job_id) > MAX_HINT_CHARS:
            return False
        return bool(await self._run("wake", job_id, str(hops)))

    async def set_loaded(self, worker_id: str, models: list[str]) -> None:
        """Record the models `worker_id` holds in GPU memory, for model affinity."""
        await self._run("set_loaded", worker_id, json.dumps(models))

    async def set_models(self, worker_id: str, models: Mapping[str, list[str]]) -> None:
        """Store the models `worker_id` can run, ``{service: [model names]}``, in its worker hash
        (field emp_models), so that its claims need not carry them: a claim whose capabilities have
        no ``models`` key matches with these. Call it at start and whenever the models change; it
        replaces the previous set and lasts as long as the worker record (which heartbeats keep)."""
        value = json.dumps({service: list(names) for service, names in models.items()})
        try:
            # redis-py types its asyncio client with the sync one's `Awaitable[T] | T` unions
            await cast("Awaitable[int]", self.redis.hset(self.keys.worker(worker_id), MODELS_FIELD, value))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RedisUnavailable(f"Redis is unreachable ({type(exc).__name__}); retrying") from exc

    async def start(self, job_id: str, worker_id: str, attempt: int) -> None:
        """The connector has the job now: ``in_progress``, ``started_at`` (StaleJob when not ours)."""
        self._fenced(await self._run("start", job_id, worker_id, attempt, self._options), job_id)

    async def progress(self, job_id: str, worker_id: str, attempt: int, update: ProgressUpdate) -> None:
        reply = await self._run(
            "progress", job_id, worker_id, attempt, update.progress, update.message,
            _opt(update.current_step), _opt(update.total_steps), eta_iso(update.eta_s),
            _progress_extra(update), self._options,
        )
        self._fenced(reply, job_id)

    async def complete(self, job_id: str, worker_id: str, attempt: int, result: str, envelope: str = "{}",
                       last_progress: ProgressUpdate | None = None) -> None:
        """`result`: the connector's output (JSON); `envelope`: more JobResult fields (a JSON object);
        `last_progress`: the job's last progress report, not sent on its own (its event goes out
        first, in the same step)."""
        done = Completion(job_id, attempt, result, envelope, last_progress)
        reply = await self._run("complete", job_id, worker_id, attempt, result, self._complete_options(done))
        self._fenced(reply, job_id)

    def _complete_options(self, done: Completion) -> str:
        extra: dict[str, Any] = {}
        if done.envelope != "{}":
            extra["envelope"] = done.envelope
        if done.last_progress is not None:
            extra["progress"] = _progress_fields(done.last_progress)
        return json.dumps({**self._config_options, **extra}) if extra else self._options

    async def fail(
        self, job_id: str, worker_id: str, attempt: int, error: str, *, retryable: bool, backoff_ms: int
    ) -> str:
        """Returns 'retry' when the job went back to the queue, 'failed' when it failed for good."""
        reply = await self._run(
            "fail", job_id, worker_id, attempt, error, "1" if retryable else "0", backoff_ms, self._options
        )
        self._fenced(reply, job_id)
        return str(reply[1])

    async def hand_back(self, job_id: str, worker_id: str, attempt: int, reason: str) -> None:
        reply = await self._run("hand_back", job_id, worker_id, attempt, reason, self._options)
        self._fenced(reply, job_id)

    async def heartbeat(
        self, worker_id: str, status: str, fields: Mapping[str, str], heartbeat_ttl_s: int,
        running: Mapping[str, int], loaded: list[str] | None = None, away_ms: int = 0,
    ) -> Beat:
        """Refresh the worker, renew its leases (`running`: job id -> attempt), promote due
        retries and, when this worker holds the reaper lock, reap expired leases. `away_ms`: how
        long this worker's beats have been failing (0: they were not), so that after an outage
        live workers get a lease's grace to renew before anything is reaped."""
        options = self._options if away_ms <= 0 else json.dumps({**json.loads(self._options), "away_ms": away_ms})
        reply = await self._run(
            "heartbeat", worker_id, heartbeat_ttl_s, status, json.dumps(dict(fields)),
            json.dumps(dict(running)) if running else "{}", json.dumps(loaded) if loaded is not None else "",
            options,
        )
        lost = [j for j in str(reply[2]).split(",") if j]
        return Beat(int(reply[0]), int(reply[1]), lost, int(reply[3]), bool(int(reply[4])))

    async def reconcile(self) -> tuple[int, int]:
        reply = await self._run("reconcile", self._options)
        if int(reply[0]) < 0:
            return (0, 0)
        return (int(reply[0]), int(reply[1]))

    async def cancel(self, job_id: str, reason: str) -> tuple[str, str]:
        """Cancel a job; returns (previous status, holder). InvalidJob if it cannot be cancelled."""
        reply = await self._run("cancel", job_id, reason, self._options)
        if not reply[0]:
            raise InvalidJob(str(reply[1]))
        return str(reply[1]), str(reply[2])

    @staticmethod
    def _fenced(reply: list[Any], job_id: str) -> None:
        if not reply[0]:
            raise StaleJob(f"job {job_id}: {reply[1]}")


_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, ResponseError, RedisClusterException)
# Replies that mean "not now" during a failover or a cluster reconfiguration, not a bug
_PASSING = (ReadOnlyError, ClusterDownError, TryAgainError, RedisClusterException)
_PASSING_TEXT = ("READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")


def _raise_translated(exc: BaseException) -> NoReturn:
    """Redis's refusal of our credentials is configuration (ConfigError); a lost connection, or a
    reply that says Redis is failing over or reconfiguring its cluster, is an outage
    (RedisUnavailable, retried); any other reply error is raised as it is."""
    refused = refused_credentials(exc)
    if refused is not None:
        raise refused from exc
    text = str(exc)
    if isinstance(exc, _PASSING) or text.startswith(_PASSING_TEXT) or "cluster is down" in text:
        raise RedisUnavailable(f"Redis is unavailable ({type(exc).__name__}: {text[:120]}); retrying") from exc
    if isinstance(exc, ResponseError):
        raise exc
    raise RedisUnavailable(f"Redis is unreachable ({type(exc).__name__}); retrying") from exc
