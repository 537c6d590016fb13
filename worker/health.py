"""Is this machine's worker healthy? The verdicts behind ``/healthz`` and ``emp-worker check``.

Two views of one rule. A slot is healthy when it is up (idle or busy, not starting or draining),
its heartbeat is fresh, and nothing keeps it from claiming what it could (no connector down, no
unhealthy GPU, no failing hook: ``Advertiser.problems``):

* ``slot_problems`` judges a slot of this process (``/healthz`` on the metrics port);
* ``record_problems`` judges a slot from its record in Redis (``emp-worker check``, run by a
  supervisor, a container runtime or a load balancer next to the worker), read by
  ``machine_report`` with bounded timeouts.

Both return the reasons, empty when healthy; they are pure functions with a table of cases.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis

from worker.keys import Keys

if TYPE_CHECKING:
    from worker.settings import Settings

UP_STATES = frozenset({"idle", "busy"})
RECORD_FIELDS = ("machine_id", "status", "emp_problems", "emp_connectors", "last_heartbeat")
CHECK_TIMEOUT_S = 5.0
MAX_REASON = 300


def slot_problems(worker_id: str, state: str, beat_age_s: float, beat_ttl_s: float,
                  problems: Sequence[str]) -> list[str]:
    """Why the slot `worker_id` of this process is not healthy (empty when it is)."""
    found = [] if state in UP_STATES else [f"worker {worker_id} is {state}"]
    if beat_age_s > beat_ttl_s:
        found.append(f"worker {worker_id}: no heartbeat got through for {beat_age_s:.0f}s "
                     f"(its record expires after {beat_ttl_s:.0f}s)")
    found.extend(f"worker {worker_id}: {p}"[:MAX_REASON] for p in problems)
    return found


def _json_value(raw: str | None, default: Any) -> Any:
    try:
        value = json.loads(raw or "")
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def record_problems(worker_id: str, alive: bool, record: Mapping[str, str]) -> list[str]:
    """Why the slot `worker_id` is not healthy, from its record in Redis and whether its
    heartbeat key exists (`alive`); empty when it is healthy."""
    status = record.get("status", "")
    if not record:
        return [f"worker {worker_id} has no record in Redis"]
    if not alive:
        last = record.get("last_heartbeat") or "never"
        why = "stopped" if status == "offline" else "its heartbeat expired"
        return [f"worker {worker_id} is not live: {why} (last heartbeat {last})"]
    found = [] if status in UP_STATES else [f"worker {worker_id} is {status or 'in an unknown state'}"]
    problems = [str(p) for p in _json_value(record.get("emp_problems"), [])]
    found.extend(f"worker {worker_id}: {p}"[:MAX_REASON] for p in problems)
    connectors = _json_value(record.get("emp_connectors"), {})
    for name, summary in sorted(connectors.items()):
        state = summary.get("state") if isinstance(summary, dict) else None
        if state == "down" and not any(f"connector {name} " in p for p in problems):
            found.append(f"worker {worker_id}: connector {name} is down")
    return found


@dataclass(frozen=True)
class SlotReport:
    """One worker slot of this machine as Redis has it."""

    worker_id: str
    alive: bool
    status: str
    problems: list[str]
    connectors: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "alive": self.alive, "status": self.status, "healthy": self.healthy,
                "problems": self.problems, "connectors": self.connectors}


async def _read(redis: aioredis.Redis, keys: Keys, worker_ids: Sequence[str]) -> list[tuple[str, bool, dict[str, str]]]:
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in worker_ids:
            pipe.hmget(keys.worker(worker_id), list(RECORD_FIELDS))
            pipe.exists(keys.heartbeat(worker_id))
        replies = await pipe.execute()
    found = []
    for index, worker_id in enumerate(worker_ids):
        values, exists = replies[2 * index], replies[2 * index + 1]
        record = {name: value for name, value in zip(RECORD_FIELDS, values, strict=True) if value is not None}
        found.append((worker_id, bool(exists), record))
    return found


async def machine_report(redis: aioredis.Redis, keys: Keys, machine_id: str,
                         expected: Sequence[str] = ()) -> list[SlotReport]:
    """Every registered slot of `machine_id`, and each id in `expected` whether registered or not
    (a stopped worker leaves the registry but its record says when it went offline)."""
    active = sorted(await cast("Awaitable[set[str]]", redis.smembers(keys.workers_active)))
    reports = []
    for worker_id, alive, record in await _read(redis, keys, active):
        if record.get("machine_id") == machine_id or worker_id in expected:
            reports.append(_report(worker_id, alive, record))
    missing = [w for w in expected if w not in active]
    for worker_id, alive, record in await _read(redis, keys, missing) if missing else []:
        reports.append(_report(worker_id, alive, record))
    return reports


def _report(worker_id: str, alive: bool, record: dict[str, str]) -> SlotReport:
    return SlotReport(worker_id, alive, record.get("status", ""), record_problems(worker_id, alive, record),
                      _json_value(record.get("emp_connectors"), {}))


def verdict(machine_id: str, reports: Sequence[SlotReport]) -> list[str]:
    """Why this machine is not healthy (empty when every slot is and there is at least one)."""
    if not reports:
        return [f"no worker of machine {machine_id!r} is registered in Redis (is emp-worker running here, "
                "with this EMP_MACHINE_ID and EMP_KEY_PREFIX?)"]
    return [p for r in reports for p in r.problems]


async def check_machine(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S) -> tuple[list[SlotReport], list[str]]:
    """The reports and reasons for `emp-worker check` of the settings' machine (and their worker
    id, when set): at most `timeout_s` in all; an unreachable Redis is a reason, not an exception."""
    from worker.redis_conn import RedisOptions, open_redis, refused

    redis = open_redis(settings.redis_url, RedisOptions.from_settings(settings))
    expected = [settings.worker_id] if settings.worker_id else []
    try:
        reports = await asyncio.wait_for(machine_report(redis, Keys(settings.key_prefix), settings.machine_id,
                                                        expected), timeout_s)
    except TimeoutError:
        return [], [f"Redis did not answer within {timeout_s:g}s"]
    except Exception as exc:  # redis-py's connection and reply errors, OSError
        config = refused(exc)
        return [], [str(config) if config else f"cannot read Redis: {type(exc).__name__}: {str(exc)[:200]}"]
    finally:
        await redis.aclose()
    return reports, verdict(settings.machine_id, reports)
