"""The REST connector: one instance serves every service EMP_REST_SERVICES configures.

Sync mode: one request; a JSON answer is the result (``{"data": ..., "status_code": ...}``), a
JSON answer over ``EMP_REST_MAX_RESULT_BYTES`` or any other answer becomes an output. Async mode:
submit, take the task id, poll the status path until the task succeeds (its result is the job's),
fails (the job fails at once) or runs past ``max_wait_s``; progress comes from the status answers.

A ``Retry-After`` of a retryable status is waited out here (up to ``max_retry_after_s``, at most
``request_retries`` times per request), then the request is sent again; a longer one fails the job
as retryable and says how long the service asked to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
from typing import Any

import httpx

from connectors.base import Connector, ConnectorConfig, Health, HealthState, JobContext, JobResult, StopReason
from connectors.rest.config import RestSettings, Service
from connectors.rest.engine import RestEngine, ServiceBusy, total_deadline_s
from connectors.rest.jobs import (
    BadAnswer,
    BadRequest,
    RestRequest,
    TaskState,
    dig,
    parse_request,
    task_id_of,
    task_status,
)
from connectors.rest.urls import ForbiddenTarget, fill_task_id, join_url
from connectors.settings import ConnectorSettings
from worker.errors import ConfigError, JobError, PermanentJobError, RetryableJobError
from worker.protocol import Job

log = logging.getLogger("emp.connectors.rest")

CANCEL_TIMEOUT_S = 5.0
ERROR_TEXT_CHARS = 300


class RestConnector(Connector):
    name = "rest"
    #: a placeholder shown by ``emp-worker plugins``: an instance runs the services its settings name
    service_types: tuple[str, ...] = ("<EMP_REST_SERVICES>",)
    settings_class = RestSettings
    settings: RestSettings

    @classmethod
    def services_for(cls, settings: ConnectorSettings) -> tuple[str, ...]:
        if not isinstance(settings, RestSettings):
            raise ConfigError("the rest connector needs RestSettings")
        return tuple(settings.configured)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self._engines: dict[str, RestEngine] = {}
        self._tasks: dict[str, tuple[str, str]] = {}  # job id -> (service, task id) of running async jobs

    async def start(self) -> None:
        for name, service in self.settings.configured.items():
            if name not in self._engines:
                self._engines[name] = RestEngine(service, max_response_bytes=self.settings.max_response_bytes)

    async def stop(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.aclose()

    async def health(self) -> Health:
        checked = [(name, e) for name, e in self._engines.items() if e.service.spec.health_path]
        if not self._engines:
            return Health(HealthState.DOWN, "not started")
        down = []
        for name, engine in checked:
            ok, message = await engine.probe(engine.service.spec.health_path)
            if not ok:
                down.append(f"{name}: {message}"[:200])
        if checked and len(down) == len(checked):
            return Health(HealthState.DOWN, "; ".join(down))
        return Health(HealthState.DEGRADED, "; ".join(down)) if down else Health(HealthState.OK)

    def _engine(self, job: Job) -> RestEngine:
        engine = self._engines.get(job.service)
        if engine is None:
            raise RetryableJobError(f"the rest connector has no started service {job.service!r}")
        return engine

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        engine = self._engine(job)
        spec = engine.service.spec
        try:
            request = parse_request(job.payload, spec)
        except (BadRequest, ForbiddenTarget) as exc:
            raise self._refused(engine, job.payload.get("endpoint"), exc) from None
        if spec.mode == "sync":
            return await self._run_sync(engine, request, ctx)
        return await self._run_async(engine, request, job, ctx)

    @staticmethod
    def _refused(engine: RestEngine, endpoint: Any, exc: ValueError) -> PermanentJobError:
        shown = repr(endpoint)[:100] if isinstance(endpoint, str) else "the payload"
        if isinstance(exc, ForbiddenTarget):
            return PermanentJobError(f"{engine.name}: the job may only reach {engine.base_url}; refused {shown}: {exc}")
        return PermanentJobError(f"{engine.name}: invalid payload: {exc}")

    # -- sync -------------------------------------------------------------------------------------

    async def _run_sync(self, engine: RestEngine, request: RestRequest, ctx: JobContext) -> JobResult:
        ctx.progress(0, f"{request.method} {request.endpoint}")
        response = await self._send(engine, request, ctx)
        ctx.progress(100, f"answered {response.status_code}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        result: JobResult = {"status_code": response.status_code, "endpoint": request.endpoint,
                             "method": request.method}
        value = _json_or_missing(response.content, content_type)
        if value is _NOT_JSON:
            name = "response" + (mimetypes.guess_extension(content_type) or ".bin")
            ctx.add_output(name, response.content, content_type=content_type or "application/octet-stream")
            return {**result, "output": name, "content_type": content_type}
        return {**result, **self._bounded(ctx, value, response.content)}

    def _bounded(self, ctx: JobContext, value: Any, encoded: bytes | None = None) -> JobResult:
        """``{"data": value}``, or the value handed over as output ``response.json`` when it is over
        EMP_REST_MAX_RESULT_BYTES (so a large answer never lands in the job record)."""
        body = encoded if encoded is not None else json.dumps(value, separators=(",", ":")).encode()
        if len(body) <= self.settings.max_result_bytes:
            return {"data": value}
        ctx.add_output("response.json", body, content_type="application/json")
        return {"output": "response.json"}

    async def _send(self, engine: RestEngine, request: RestRequest, ctx: JobContext) -> httpx.Response:
        """One request, bounded as a whole; a Retry-After within the service's limits is waited out."""
        spec = engine.service.spec
        waits = 0
        while True:
            deadline_s = total_deadline_s(engine.service)
            try:
                async with asyncio.timeout(deadline_s):
                    return await engine.request(request.method, request.url, json=request.json,
                                                params=request.params, headers=request.headers)
            except TimeoutError:
                raise RetryableJobError(f"{engine.name} did not answer {request.method} {request.endpoint} within "
                                        f"{deadline_s:g}s (timeout_s={spec.timeout_s:g})") from None
            except ServiceBusy as busy:
                wait = busy.retry_after_s
                if wait is None or wait > spec.max_retry_after_s or waits >= spec.request_retries:
                    raise
                waits += 1
                ctx.progress(0, f"the service asked to retry in {wait:g}s")
                log.info("%s; waiting %.1fs before sending it again", busy, wait)
                await _sleep_unless_cancelled(ctx, wait)

    # -- async ------------------------------------------------------------------------------------

    async def _run_async(self, engine: RestEngine, request: RestRequest, job: Job, ctx: JobContext) -> JobResult:
        spec = engine.service.spec
        ctx.progress(0, f"submitting {request.method} {request.endpoint}")
        submitted = _json_answer(engine, await self._send(engine, request, ctx))
        try:
            task_id = task_id_of(submitted, spec)
            status_url = join_url(spec.base_url, fill_task_id(spec.status_path, task_id))
        except (BadAnswer, ForbiddenTarget) as exc:
            raise RetryableJobError(f"{engine.name}: {exc}") from None
        self._tasks[job.id] = (engine.service.name, task_id)
        try:
            document = await self._poll(engine, task_id, status_url, ctx, first=submitted)
        finally:
            self._tasks.pop(job.id, None)
        value = dig(document, spec.result_field) if spec.result_field else document
        return {"task_id": task_id, "status": task_status(document, spec).status, "endpoint": request.endpoint,
                **self._bounded(ctx, value)}

    async def _poll(self, engine: RestEngine, task_id: str, status_url: str, ctx: JobContext, *,
                    first: Any) -> Any:
        """Status answers until the task is terminal; its last answer. The submit answer counts as
        the first status (a service may finish at once)."""
        spec = engine.service.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.max_wait_s
        document, errors = first, 0
        poll = RestRequest("GET", status_url, spec.status_path)
        while True:
            if document is not None:
                status = task_status(document, spec)
                if status.state is TaskState.SUCCEEDED:
                    return document
                if status.state is TaskState.FAILED:
                    raise self._task_failed(engine, task_id, status.status, document)
                if status.percent is not None:
                    ctx.progress(status.percent, f"task {task_id}: {status.status or 'running'}")
            if loop.time() + spec.poll_interval_s > deadline:
                await self._cancel_task(engine, task_id)
                raise RetryableJobError(f"{engine.name}: task {task_id} still not done after {spec.max_wait_s:g}s "
                                        "(max_wait_s); it was cancelled")
            await _sleep_unless_cancelled(ctx, spec.poll_interval_s)
            try:
                document, errors = _json_answer(engine, await self._send(engine, poll, ctx)), 0
            except RetryableJobError as exc:
                errors += 1
                if errors > spec.max_poll_errors:
                    await self._cancel_task(engine, task_id)  # a retry submits it again: leave no orphan
                    raise
                log.warning("%s (poll error %d of %d tolerated)", exc, errors, spec.max_poll_errors)
                document = None

    def _task_failed(self, engine: RestEngine, task_id: str, status: str, document: Any) -> JobError:
        reason = dig(document, engine.service.spec.error_field)
        text = reason if isinstance(reason, str) else json.dumps(reason, default=str) if reason is not None else ""
        text = engine.redact(" ".join(text.split()))[:ERROR_TEXT_CHARS]
        message = f"{engine.name}: task {task_id} ended {status!r}" + (f": {text}" if text else "")
        if engine.service.spec.failure_retryable:
            return RetryableJobError(message)
        return PermanentJobError(message)

    # -- cancel -----------------------------------------------------------------------------------

    async def interrupt(self, job: Job, reason: StopReason) -> None:
        running = self._tasks.get(job.id)
        engine = self._engines.get(running[0]) if running else None
        if running and engine:
            await self._cancel_task(engine, running[1])

    async def _cancel_task(self, engine: RestEngine, task_id: str) -> None:
        """Ask the service to stop a task (its cancel_path); a failure is logged, never raised."""
        spec = engine.service.spec
        if not spec.cancel_path:
            return
        try:
            url = join_url(spec.base_url, fill_task_id(spec.cancel_path, task_id))
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await engine.request(spec.cancel_method, url, timeout=CANCEL_TIMEOUT_S)
        except (JobError, ForbiddenTarget, TimeoutError) as exc:
            log.warning("%s: cancelling task %s failed: %s", engine.name, task_id, exc)


_NOT_JSON = object()


def _json_or_missing(body: bytes, content_type: str) -> Any:
    """The answer as JSON (None when empty), or _NOT_JSON when it is something else."""
    if not body:
        return None
    if "json" not in content_type and not (not content_type and body.lstrip()[:1] in (b"{", b"[")):
        return _NOT_JSON
    try:
        return json.loads(body, parse_constant=_no_constant)  # NaN/Infinity could not be stored as JSON
    except (ValueError, RecursionError):
        return _NOT_JSON


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_answer(engine: RestEngine, response: httpx.Response) -> Any:
    value = _json_or_missing(response.content, response.headers.get("Content-Type", "").lower())
    if value is _NOT_JSON or not isinstance(value, dict):
        raise RetryableJobError(f"{engine.name} answered {response.request.method} {response.request.url.path} "
                                "with something other than a JSON object")
    return value


async def _sleep_unless_cancelled(ctx: JobContext, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.cancelled.wait(), seconds)
    ctx.raise_if_cancelled()


__all__ = ["RestConnector", "Service"]
