"""The Python client: submit, inspect, follow and cancel jobs; read the queue's state.

Used by the CLI and the tests::

    async with Client.from_url("redis://127.0.0.1:6379/0") as client:
        job_id = await client.submit("simulation", {"steps": 5}, priority=80)
        async for event in client.follow(job_id):
            print(event.kind, event.data)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from worker.keys import MODELS_FIELD, Keys
from worker.matching import matches
from worker.protocol import emp_job_queue_score, epoch_ms, submit_fields
from worker.queue import Queue, QueueConfig
from worker.redis_conn import RedisOptions, open_redis
from worker.settings import Settings

FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
FINAL_STATUSES = FINAL_EVENTS


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's progress stream."""

    id: str
    kind: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.kind in FINAL_EVENTS


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    status: str
    current_job_id: str
    alive: bool
    services: list[str]
    completed: int
    failed: int
    problems: list[str]  # why it claims less than it could: connectors down, a bad GPU, failing hooks


def _json_list(raw: str | None) -> list[str]:
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def connect(url: str, options: RedisOptions | None = None) -> aioredis.Redis:
    """A Redis client with bounded timeouts (no call waits forever): one server by default, or the
    TLS, Sentinel or Cluster set-up `options` describes (worker/redis_conn.py). Whatever others
    wrote may not be text: bytes that are not UTF-8 come back as surrogate escapes (which write back
    as the same bytes) instead of raising in the middle of a reply; worker.protocol.is_text tells them."""
    return open_redis(url, options)


class Client:
    def __init__(self, redis: aioredis.Redis, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.queue = Queue(redis, self.keys, QueueConfig())

    @classmethod
    def from_url(cls, url: str, prefix: str = "", options: RedisOptions | None = None) -> Client:
        return cls(connect(url, options), Keys(prefix))

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        """A client of the Redis the settings name, in their mode (TLS, Sentinel, Cluster)."""
        return cls.from_url(settings.redis_url, settings.key_prefix, RedisOptions.from_settings(settings))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.redis.aclose()

    async def submit(
        self,
        service: str,
        payload: Mapping[str, Any],
        *,
        priority: int = 50,
        requirements: Mapping[str, Any] | None = None,
        customer_id: str = "",
        max_retries: int = 3,
        job_id: str | None = None,
        **extra: Any,
    ) -> str:
        """Submit a job exactly as emp-job-queue's API does (and publish job_submitted)."""
        job_id = job_id or str(uuid.uuid4())
        fields = submit_fields(service=service, payload=payload, priority=priority,
                               requirements=requirements, customer_id=customer_id,
                               max_retries=max_retries, **extra)
        score = emp_job_queue_score(priority, epoch_ms(datetime.now(UTC)),
                                    extra.get("workflow_priority"), extra.get("workflow_datetime_ms"))
        await self.queue.submit(job_id, fields, score)
        return job_id

    async def get(self, job_id: str) -> dict[str, str]:
        """The job hash ({} when unknown or expired)."""
        return dict(await self.redis.hgetall(self.keys.job(job_id)))

    async def result(self, job_id: str) -> Any:
        """A completed job's output: the job's ``result`` field (ours), else ``jobs:completed``
        (what their worker writes: ``{success, data: {success, data: <output>, ...}}``)."""
        raw = await self.redis.hget(self.keys.job(job_id), "result")
        if raw is not None:
            return _json_or_text(raw)
        raw = await self.redis.hget(self.keys.completed, job_id)
        return None if raw is None else unwrap_result(_json_or_text(raw))

    async def cancel(self, job_id: str, reason: str = "Job cancelled by user") -> str:
        """Cancel a pending or running job; returns its previous status."""
        previous, _holder = await self.queue.cancel(job_id, reason)
        return previous

    async def events(self, job_id: str, after: str = "0-0") -> list[JobEvent]:
        entries = await self.redis.xrange(self.keys.progress_stream(job_id), min=f"({after}"
                                          if after != "0-0" else "-")
        return [_event(entry_id, fields) for entry_id, fields in entries]

    async def follow(self, job_id: str, block_ms: int = 1000, max_idle_polls: int = 3600) -> AsyncIterator[JobEvent]:
        """Replay the job's stream from the start, then follow it until a final event."""
        last = "0-0"
        idle = 0
        key = self.keys.progress_stream(job_id)
        while idle < max_idle_polls:
            reply = await self.redis.xread({key: last}, block=block_ms, count=100)
            if not reply:
                idle += 1
                status = await self.redis.hget(self.keys.job(job_id), "status")
                if status in FINAL_STATUSES or status is None:
                    for event in await self.events(job_id, last):
                        yield event
                    return
                continue
            idle = 0
            for entry_id, fields in reply[0][1]:
                last = entry_id
                event = _event(entry_id, fields)
                yield event
                if event.final:
                    return

    async def queue_depth(self) -> dict[str, int]:
        """Pending jobs by service."""
        depth: dict[str, int] = {}
        ids = await self.redis.zrange(self.keys.pending, 0, -1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.keys.job(job_id), "service_required")
            services = await pipe.execute()
        for service in services:
            depth[service or "?"] = depth.get(service or "?", 0) + 1
        return depth

    async def workers(self) -> list[WorkerInfo]:
        ids = sorted(await self.redis.smembers(self.keys.workers_active))
        infos = []
        for worker_id in ids:
            record = await self.redis.hgetall(self.keys.worker(worker_id))
            alive = bool(await self.redis.exists(self.keys.heartbeat(worker_id)))
            try:
                caps = json.loads(record.get("capabilities", "{}"))
            except ValueError:
                caps = {}
            infos.append(WorkerInfo(
                worker_id=worker_id, status=record.get("status", "?"),
                current_job_id=record.get("current_job_id", ""), alive=alive,
                services=list(caps.get("job_service_required_map", [])),
                completed=int(record.get("total_jobs_completed", 0) or 0),
                failed=int(record.get("total_jobs_failed", 0) or 0),
                problems=_json_list(record.get("emp_problems")),
            ))
        return infos

    async def live_capabilities(self) -> dict[str, dict[str, Any]]:
        """What each live worker matches with when it claims (its emp_caps), by worker id; caps
        without ``models`` get the worker's stored ones (emp_models, Queue.set_models), as the claim
        script does."""
        found: dict[str, dict[str, Any]] = {}
        for worker_id in sorted(await self.redis.smembers(self.keys.workers_active)):
            if not await self.redis.exists(self.keys.heartbeat(worker_id)):
                continue
            raw_caps, raw_models = await self.redis.hmget(self.keys.worker(worker_id), ["emp_caps", MODELS_FIELD])
            try:
                caps = json.loads(raw_caps or "")
            except ValueError:
                continue  # a worker of the system we replace: its capabilities are not comparable
            if isinstance(caps, dict):
                if "models" not in caps:
                    caps["models"] = _json_object(raw_models)
                found[worker_id] = caps
        return found

    async def quarantined(self) -> list[Quarantined]:
        """The ids in quarantine with their reasons, oldest first."""
        found = []
        for job_id, raw in (await self.redis.hgetall(self.keys.quarantine)).items():
            record = _json_object(raw)
            found.append(Quarantined(job_id, str(record.get("reason", "")), str(record.get("where", "")),
                                     str(record.get("at", ""))))
        return sorted(found, key=lambda q: (q.at, q.job_id))

    async def unrunnable(self) -> list[Unrunnable]:
        """Pending job classes that no live worker matches (workers restricted to one workflow
        are left out: they only take that workflow's jobs)."""
        workers = await self.live_capabilities()
        now_ms = time.time() * 1000
        found = []
        for class_id, raw in (await self.redis.hgetall(self.keys.classes)).items():
            try:
                meta = json.loads(raw)
            except ValueError:
                continue
            service, reqs, customer = meta.get("service", ""), meta.get("requirements", ""), meta.get("customer_id", "")
            if any(matches(caps, service, reqs, customer) for caps in workers.values()):
                continue
            pending = await self.redis.zcard(self.keys.class_queue(class_id))
            if not pending:
                continue
            head = await self.redis.zrange(self.keys.class_queue(class_id), 0, 0)
            offering = [w for w, caps in workers.items() if service in (caps.get("services") or [])]
            reason = (f"{len(offering)} live worker(s) run {service!r} but none meets the requirements"
                      if offering else f"no live worker runs {service!r}")
            effective_ms = float(head[0].split(":", 1)[0]) if head else now_ms
            found.append(Unrunnable(service, reqs, customer, pending, max(0.0, (now_ms - effective_ms) / 1000),
                                    reason))
        return sorted(found, key=lambda u: -u.pending)


@dataclass(frozen=True)
class Quarantined:
    """An id no script could read or fail readably, parked in emp:quarantine (see worker/lua/lib/untrusted.lua)."""

    job_id: str  # as stored: bytes that are not UTF-8 come as surrogate escapes (protocol.printable shows them)
    reason: str
    where: str  # which script set it aside: index, claim or reaper
    at: str


@dataclass(frozen=True)
class Unrunnable:
    """Pending jobs of one class (service, requirements, customer) that no live worker can run."""

    service: str
    requirements: str
    customer_id: str
    pending: int
    oldest_wait_s: float
    reason: str


def _json_object(raw: str | None) -> dict[str, Any]:
    """A JSON object stored in Redis, or {} when absent or unreadable (the claim script reads it so)."""
    try:
        value = json.loads(raw or "")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(entry_id: str, fields: Mapping[str, str]) -> JobEvent:
    try:
        data = json.loads(fields.get("data", "{}"))
    except ValueError:
        data = {}
    # emp-job-queue's own claim script writes flat fields with a `status` and no `event`
    kind = fields.get("event") or fields.get("status") or "?"
    return JobEvent(entry_id, kind, data if isinstance(data, dict) else dict(fields))


def unwrap_result(record: Any) -> Any:
    """The output in a ``jobs:completed`` record: ``{success, data: <JobResult>}`` where the
    JobResult is ``{success, data: <output>, processing_time_ms, ...}`` (or, as emp-worker wrote it
    before, the output itself)."""
    value = record.get("data") if isinstance(record, dict) else record
    if isinstance(value, dict) and "success" in value and "data" in value:
        return value["data"]
    return value


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
