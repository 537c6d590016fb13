"""What a REST job asks for, and what a service's answers say: pure functions, no I/O.

A job's payload follows emp-job-queue's REST connectors::

    {"endpoint": "/v1/upscale", "method": "POST", "data": {"image_url": "...", "scale": 2},
     "headers": {"X-Request-Id": "abc"}}

``body`` is accepted for ``data``. A GET sends ``data`` (an object of plain values) as the query
string; other methods send it as the JSON body. ``endpoint`` and ``method`` default to the
service's ``path`` and ``method``.

Job headers are an allow-list: :data:`~connectors.rest.config.SAFE_JOB_HEADERS` (content
negotiation, conditional requests, idempotency keys, tracing) plus the names the operator lists in
the service's ``job_headers``. A deny-list cannot keep up with what proxies and frameworks act on
(``X-HTTP-Method-Override``, ``X-Original-URL``, ``X-Forwarded-*``, vendor headers), and a header the
worker does not know is one it cannot vouch for. Credentials, framing, forwarding and re-routing
headers are refused even when listed, and so is any header the operator configured itself.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectors.rest.config import HEADER_NAME, SAFE_JOB_HEADERS, RestService, never_from_job
from connectors.rest.urls import ForbiddenTarget, join_url

MAX_JOB_HEADERS = 32
MAX_HEADER_VALUE_CHARS = 4096
MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_FIELD_DEPTH = 16
_Scalar = str | int | float | bool | None


class BadRequest(ValueError):
    """The job's payload asks for something this service does not allow; the message says what."""


@dataclass(frozen=True)
class RestRequest:
    method: str
    url: str
    endpoint: str  # as the job gave it (for the result and messages)
    json: Any = None
    params: dict[str, _Scalar | list[_Scalar]] | None = None
    headers: dict[str, str] | None = None


def parse_request(payload: Mapping[str, Any], spec: RestService) -> RestRequest:
    """The request a job's payload asks for; BadRequest (or ForbiddenTarget) when not allowed."""
    endpoint = payload.get("endpoint", spec.path)
    if not isinstance(endpoint, str):
        raise BadRequest("endpoint must be a string path, e.g. \"/v1/generate\"")
    url = join_url(spec.base_url, endpoint)
    method = payload.get("method", spec.method)
    if not isinstance(method, str) or method.upper() not in {spec.method, *spec.allowed_methods}:
        allowed = ", ".join(sorted({spec.method, *spec.allowed_methods}))
        raise BadRequest(f"method {str(method)[:20]!r} is not allowed for this service (allowed: {allowed})")
    method = method.upper()
    if "data" in payload and "body" in payload:
        raise BadRequest("give the request's content as data or as body, not both")
    data = payload.get("data", payload.get("body"))
    headers = job_headers(payload.get("headers"), spec)
    if method == "GET":
        return RestRequest(method, url, endpoint, params=_params(data), headers=headers)
    try:
        size = len(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"the request's data is not plain JSON ({exc})") from None
    if size > MAX_REQUEST_BYTES:
        raise BadRequest(f"the request's data is over {MAX_REQUEST_BYTES} bytes of JSON")
    return RestRequest(method, url, endpoint, json=data, headers=headers)


def _params(data: Any) -> dict[str, _Scalar | list[_Scalar]] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not all(_plain(v) or (isinstance(v, list) and all(map(_plain, v)))
                                             for v in data.values()):
        raise BadRequest("a GET sends data as the query string: give an object of strings, numbers or lists of them")
    return data


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def job_headers(headers: Any, spec: RestService) -> dict[str, str] | None:
    """The job's extra headers, checked; None when it gave none."""
    if headers is None:
        return None
    if not isinstance(headers, dict) or len(headers) > MAX_JOB_HEADERS:
        raise BadRequest(f"headers must be an object of at most {MAX_JOB_HEADERS} string values")
    configured = {name.lower() for name in spec.headers}
    allowed = SAFE_JOB_HEADERS | set(spec.job_headers)
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(value, str) or not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise BadRequest(f"header {str(name)[:100]!r}: names are HTTP tokens and values strings")
        if len(value) > MAX_HEADER_VALUE_CHARS or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise BadRequest(f"header {name!r}: a value has at most {MAX_HEADER_VALUE_CHARS} characters and "
                             "no control characters")
        lowered = name.lower()
        if never_from_job(name) or lowered in configured:
            raise BadRequest(f"header {name!r} cannot be set by a job")
        if lowered not in allowed:
            raise BadRequest(f"header {name!r} is not one a job may set for this service (the operator can add "
                             "it to the service's job_headers)")
        checked[name] = value
    return checked


# -- reading answers --------------------------------------------------------------------------------


_MISSING = object()


def dig(document: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``"output.items.0.url"``; list items by index), or None.

    >>> dig({"a": {"b": [10, 20]}}, "a.b.1")
    20
    """
    value = document
    for part in path.split(".")[:MAX_FIELD_DEPTH] if path else []:
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = _MISSING
        if value is _MISSING:
            return None
    return value


class TaskState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class TaskStatus:
    state: TaskState
    status: str  # the service's own word, e.g. "processing"
    percent: float | None = None


def task_status(document: Any, spec: RestService) -> TaskStatus:
    """What a status answer says: terminal or not (by ``status_field`` against the success and
    failure values, case-insensitive), and the progress in percent (``progress_field`` scaled by
    ``progress_scale``, clamped to 0-100) when the service gives one."""
    raw = dig(document, spec.status_field)
    status = str(raw).strip()[:100] if isinstance(raw, str | int | float) and not isinstance(raw, bool) else ""
    lowered = status.lower()
    state = (TaskState.SUCCEEDED if lowered in spec.success_values
             else TaskState.FAILED if lowered in spec.failure_values else TaskState.RUNNING)
    percent = None
    if spec.progress_field:
        value = dig(document, spec.progress_field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:  # not NaN
            percent = max(0.0, min(100.0, float(value) * 100.0 / spec.progress_scale))
    return TaskStatus(state, status, percent)


def task_id_of(document: Any, spec: RestService) -> str:
    """The task id at ``task_id_field`` of a submit answer (a string or an integer); BadAnswer if absent."""
    value = dig(document, spec.task_id_field)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise BadAnswer(f"the submit answer has no task id at {spec.task_id_field!r}")
    return str(value)


class BadAnswer(ValueError):
    """A service's answer does not have the shape its configuration describes."""


__all__ = ["BadAnswer", "BadRequest", "ForbiddenTarget", "RestRequest", "TaskState", "TaskStatus", "dig",
           "job_headers", "parse_request", "task_id_of", "task_status"]
