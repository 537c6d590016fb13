"""The emp-job-queue wire format, as pure functions: timestamps, scores, job records, events.

Nothing here does I/O; worker/queue.py moves these values in and out of Redis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.errors import InvalidJob

DEFAULT_PRIORITY = 50
DEFAULT_MAX_RETRIES = 3
MAX_JSON_DEPTH = 64

JsonObject = dict[str, Any]


# --- time --------------------------------------------------------------------------------------------


def utc_iso(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as emp-job-queue writes: 2026-01-02T03:04:05.678Z."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(value: str | float | int | None) -> datetime | None:
    """Read ISO-8601, epoch milliseconds or 'sec.usec' seconds; None when absent or unreadable."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isnan(number):
        seconds = number if number < 1e11 else number / 1000.0
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# --- scores ------------------------------------------------------------------------------------------


def emp_job_queue_score(
    priority: float,
    created_ms: int,
    workflow_priority: float | None = None,
    workflow_datetime_ms: int | None = None,
) -> float:
    """The `jobs:pending` score emp-job-queue's API writes, which our submitter writes too.

    ``effective_priority * 1e15 - floor(effective_datetime_ms / 1000)``. As a double it loses
    FIFO order within a priority (8-16 s buckets); emp-worker claims from its own exact index
    (see worker/scripts.py), so this score only keeps their monitor's view and any of their own
    workers ordered as before.
    """
    effective_priority = workflow_priority if workflow_priority is not None else priority
    effective_ms = workflow_datetime_ms if workflow_datetime_ms is not None else created_ms
    return effective_priority * 1e15 - math.floor(effective_ms / 1000)


def claim_order_key(
    priority: float, effective_ms: int, seq: int, job_id: str
) -> tuple[float, str]:
    """Our exact claim order: (score, member) of the class queue, smallest first.

    The Lua index writes the same thing: score ``-effective_priority`` and member
    ``{effective_ms:013}:{seq:012}:{job_id}``. Higher priority first; within a priority the older
    effective time first; within a millisecond the earlier submission (sequence) first.
    """
    return (-priority, f"{effective_ms:013d}:{seq:012d}:{job_id}")


# --- job records -------------------------------------------------------------------------------------


def _json_depth(value: Any, depth: int = 0) -> int:
    if depth > MAX_JSON_DEPTH:
        return depth
    if isinstance(value, dict):
        return max((_json_depth(v, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((_json_depth(v, depth + 1) for v in value), default=depth + 1)
    return depth


def decode_json_object(name: str, raw: str | None, max_bytes: int) -> JsonObject:
    """Decode an untrusted JSON object field, bounded in size and depth; InvalidJob otherwise."""
    if raw is None or raw == "":
        return {}
    if len(raw.encode()) > max_bytes:
        raise InvalidJob(f"{name} is {len(raw.encode())} bytes; the limit is {max_bytes}")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidJob(f"{name} is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(value, dict):
        raise InvalidJob(f"{name} must be a JSON object, got {type(value).__name__}")
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidJob(f"{name} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_int(raw: str | None, default: int) -> int:
    """An untrusted whole number ('3', '3.0'); the default when absent or unreadable ('x', 'nan', '1e400')."""
    try:
        value = float(raw or default)
    except ValueError:
        return default
    return int(value) if math.isfinite(value) and abs(value) < 2**53 else default


def _int_field(fields: Mapping[str, str], name: str, default: int) -> int:
    raw = fields.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise InvalidJob(f"{name} must be a number, got {printable(raw)}") from exc
    if not math.isfinite(value) or abs(value) >= 2**53:
        raise InvalidJob(f"{name} must be a finite number, got {printable(raw)}")
    return int(value)


# --- untrusted bytes ---------------------------------------------------------------------------------


def printable(value: str | bytes, limit: int = 40) -> str:
    """An untrusted value for an error message: at most `limit` characters, quoted, anything
    outside printable ASCII escaped (so that a message is always readable, one line)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    clipped = value[:limit].encode("utf-8", "surrogateescape")
    shown = "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in clipped)
    return f"'{shown}'" + ("..." if len(value) > limit else "")


def is_text(value: str) -> bool:
    """False for a string decoded from bytes that are not UTF-8 (it holds surrogate escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_reply(raw: bytes | str) -> str:
    """Bytes from Redis as text; bytes that are not UTF-8 become surrogate escapes, which encode
    back to the same bytes (so the job can still be addressed) and which is_text() finds."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def untextual_field(fields: Mapping[str, str]) -> str | None:
    """Why a job hash is not all text (a field name or value with bytes that are not UTF-8), or None."""
    for name, value in fields.items():
        if not is_text(name):
            return f"a field name is not UTF-8 text: {printable(name)}"
        if not is_text(value):
            bad = value.encode("utf-8", "surrogateescape")
            try:
                bad.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"{printable(name)} is not UTF-8 text (byte 0x{bad[exc.start]:02x} at offset {exc.start})")
            return f"{printable(name)} is not UTF-8 text"
    return None


@dataclass(frozen=True)
class Job:
    """A claimed job as the worker sees it: validated, with its fencing token."""

    id: str
    service: str
    payload: JsonObject
    attempt: int
    priority: int = DEFAULT_PRIORITY
    requirements: JsonObject = field(default_factory=dict)
    customer_id: str = ""
    retry_count: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    created_at: str = ""
    workflow_id: str = ""
    current_step: str = ""
    total_steps: str = ""
    ctx: JsonObject = field(default_factory=dict)
    timeout_s: float | None = None

    @classmethod
    def from_hash(
        cls, fields: Mapping[str, str], attempt: int, max_payload_bytes: int, job_id: str | None = None
    ) -> Job:
        """Validate a job hash; raise InvalidJob with a readable reason when it is malformed.
        `job_id`: the id of the key it was read from (the hash's own id field must agree)."""
        problem = untextual_field(fields)
        if problem:
            raise InvalidJob(problem)
        own = fields.get("id", "")
        if job_id is None:
            job_id = own
        elif own and own != job_id:
            raise InvalidJob(f"id field names job {printable(own)}, not this job")
        if not job_id:
            raise InvalidJob("the job hash has no id field")
        service = fields.get("service_required", "")
        if not service:
            raise InvalidJob("service_required is missing")
        if "payload" not in fields:
            raise InvalidJob("payload is missing")
        payload = decode_json_object("payload", fields["payload"], max_payload_bytes)
        requirements = decode_json_object("requirements", fields.get("requirements"), 65536)
        ctx = decode_json_object("ctx", fields.get("ctx"), max_payload_bytes)
        timeout = payload.get("timeout_seconds", requirements.get("timeout_minutes"))
        timeout_s: float | None = None
        if timeout is not None:
            if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
                raise InvalidJob(f"timeout must be a positive number, got {timeout!r}")
            is_minutes = "timeout_seconds" not in payload
            timeout_s = float(timeout) * (60.0 if is_minutes else 1.0)
        return cls(
            id=job_id,
            service=service,
            payload=payload,
            attempt=attempt,
            priority=_int_field(fields, "priority", DEFAULT_PRIORITY),
            requirements=requirements,
            customer_id=fields.get("customer_id", ""),
            retry_count=_int_field(fields, "retry_count", 0),
            max_retries=_int_field(fields, "max_retries", DEFAULT_MAX_RETRIES),
            created_at=fields.get("created_at", ""),
            workflow_id=fields.get("workflow_id", ""),
            current_step=fields.get("current_step", ""),
            total_steps=fields.get("total_steps", ""),
            ctx=ctx,
            timeout_s=timeout_s,
        )


def submit_fields(
    *,
    service: str,
    payload: Mapping[str, Any],
    priority: int = DEFAULT_PRIORITY,
    requirements: Mapping[str, Any] | None = None,
    customer_id: str = "",
    max_retries: int = DEFAULT_MAX_RETRIES,
    workflow_id: str = "",
    workflow_priority: int | None = None,
    workflow_datetime_ms: int | None = None,
    current_step: int | None = None,
    total_steps: int | None = None,
    ctx: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The job hash fields emp-job-queue's API writes for a new job (created_at set by Redis)."""
    fields = {
        "service_required": service,
        "priority": str(priority),
        "payload": json.dumps(payload),
        "requirements": json.dumps(requirements) if requirements else "",
        "customer_id": customer_id,
        "status": "pending",
        "retry_count": "0",
        "max_retries": str(max_retries),
        "workflow_id": workflow_id,
        "ctx": json.dumps(ctx) if ctx else "",
    }
    optional = {
        "workflow_priority": workflow_priority,
        "workflow_datetime": workflow_datetime_ms,
        "current_step": current_step,
        "total_steps": total_steps,
    }
    fields.update({k: str(v) for k, v in optional.items() if v is not None})
    return fields
