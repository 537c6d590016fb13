"""One configured service's HTTP client: HttpEngine with the REST connector's status rules.

- a status in the service's ``retryable_status`` (default 429, 502, 503, 504) is a
  :class:`ServiceBusy` (retryable) carrying the answer's ``Retry-After`` in seconds, if any;
- 401 and 403 are retryable (this worker's credentials are wrong, not the job);
- a 3xx is permanent: redirects are never followed, so no answer can send a request elsewhere;
- every other non-2xx is permanent, with the status and a bounded, redacted excerpt of the body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from connectors.http import CREDENTIAL_STATUSES, HttpEngine, body_excerpt, connect_backoff_s, error_for_status
from connectors.rest.config import Service
from worker.errors import JobError, PermanentJobError, RetryableJobError

CONNECT_RETRIES = 2
RETRY_BACKOFF_S = 0.5
MAX_RETRY_AFTER_S = 24 * 3600.0  # a larger Retry-After is read as this


class ServiceBusy(RetryableJobError):
    """The service answered a retryable status; ``retry_after_s`` is its Retry-After, if it gave one."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date; never below 0,
    at most a day); None when absent or unreadable.

    >>> retry_after_s("3")
    3.0
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, delay), MAX_RETRY_AFTER_S)


def total_deadline_s(service: Service) -> float:
    """The bound of one whole request, however slowly its answer trickles in: every connect attempt
    with the longest backoff between them, plus ``timeout_s`` for the answer."""
    spec = service.spec
    backoff = sum(connect_backoff_s(retry, RETRY_BACKOFF_S, 1.0) for retry in range(CONNECT_RETRIES))
    return spec.timeout_s + (CONNECT_RETRIES + 1) * spec.connect_timeout_s + backoff


class RestEngine(HttpEngine):
    """An HttpEngine for one configured service."""

    def __init__(self, service: Service, *, max_response_bytes: int) -> None:
        spec = service.spec
        super().__init__(
            spec.base_url, name=f"REST service {service.name!r}",
            timeout=httpx.Timeout(spec.timeout_s, connect=spec.connect_timeout_s),
            connect_retries=CONNECT_RETRIES, retry_backoff_s=RETRY_BACKOFF_S, auth=service.basic,
            token=service.token, headers=spec.headers,
            verify=spec.verify_tls, max_response_bytes=max_response_bytes,
        )
        self.service = service

    def error_for_response(self, response: httpx.Response, body: bytes, request: str) -> JobError:
        status = response.status_code
        content_type = response.headers.get("Content-Type", "")
        if status in CREDENTIAL_STATUSES and status not in self.service.spec.retryable_status:
            return error_for_status(self.name, status, body, content_type, request=request, secrets=self._secrets)
        excerpt = body_excerpt(body, content_type, secrets=self._secrets)
        message = f"{self.name} answered {status} to {request}" + (f": {excerpt}" if excerpt else "")
        if status in self.service.spec.retryable_status:
            wait = retry_after_s(response.headers.get("Retry-After"))
            return ServiceBusy(message + (f" (Retry-After: {wait:g}s)" if wait is not None else ""), wait)
        if 300 <= status < 400:
            return PermanentJobError(f"{self.name} answered {request} with a redirect ({status}); redirects are "
                                     f"not followed: the job may only reach {self.base_url}")
        return PermanentJobError(f"{message} (the service refused this job's request; retrying cannot help)")
