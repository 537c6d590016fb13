"""What a connector is: the interface every engine plugin implements, and the job context.

A connector turns one job into work on an engine (ComfyUI, A1111, a REST service, a simulation)::

    class MyConnector(Connector):
        name = "my-engine"
        service_types = ("my-engine",)
        max_concurrent_jobs = 1            # the engine runs one job at a time

        async def run(self, job: Job, ctx: JobContext) -> JobResult:
            for step in range(10):
                ctx.raise_if_cancelled()
                ...
                ctx.progress(step * 10, f"step {step}", eta_s=9 - step)
            ctx.add_output("image.png", png_bytes, content_type="image/png")
            return {"seed": 42}

        async def interrupt(self, job: Job, reason: StopReason) -> None:
            ...                            # tell the engine to stop this job's GPU work

Raise PermanentJobError for bad input, RetryableJobError for engine trouble (crash, timeout,
OOM); anything else counts as retryable. When a job must stop (``StopReason``: a user cancel, a
drain, a timeout, a lost lease) the worker first awaits ``interrupt(job, reason)``, then cancels
``run`` at its next await: clean up in ``finally``.

Every call the worker makes into a connector is guarded (worker/guard.py): it has a timeout, and
an exception is logged with the connector's name and turned into a state (a connector whose
``start()`` fails is DOWN and retried with backoff; a failing ``health()`` is DOWN; a failing
``models()`` keeps the last list), never into a dead worker.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from connectors.settings import ConnectorSettings
from worker.errors import EmpWorkerError, PermanentJobError
from worker.protocol import Job
from worker.queue import ProgressUpdate

JobResult = dict[str, Any]

MAX_OUTPUTS = 256
MAX_PROGRESS_MESSAGE = 1000
MAX_PROGRESS_DATA_BYTES = 4096
PREVIEW_INTERVAL_S = 1.0
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class HealthState(enum.Enum):
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"  # the worker stops claiming this connector's services until it recovers


@dataclass(frozen=True)
class Health:
    state: HealthState
    message: str = ""

    @property
    def can_claim(self) -> bool:
        return self.state is not HealthState.DOWN


class StopReason(enum.Enum):
    """Why a running job is being stopped (given to ``Connector.interrupt``)."""

    CANCELLED = "cancelled"  # a user cancelled the job: it ends as cancelled
    DRAIN = "drain"  # the worker is shutting down: the job goes back to the queue, unspent
    TIMEOUT = "timeout"  # the job ran past its timeout: it fails (retryable)
    LEASE_LOST = "lease_lost"  # the worker lost the job's lease: another attempt holds it now
    STALE = "stale"  # Redis refused this attempt's progress: another attempt holds it now


class Outcome(enum.Enum):
    """How a job ended on this worker (given to the ``emp_job_finished`` hook)."""

    COMPLETED = "completed"
    FAILED = "failed"  # for good
    RETRY = "retry"  # failed; back in the queue for another attempt
    CANCELLED = "cancelled"
    HANDED_BACK = "handed_back"  # drained: back in the queue without spending an attempt
    DROPPED = "dropped"  # another attempt holds the job: nothing of this one was recorded


@dataclass(frozen=True)
class ConnectorConfig:
    """What the daemon tells a connector about where it runs."""

    worker_id: str
    gpu_index: int | None = None  # NVML's index (PCI bus order); may differ from CUDA's default order
    env: Mapping[str, str] = field(default_factory=dict)
    gpu_uuid: str = ""  # stable: CUDA_VISIBLE_DEVICES=<uuid> pins an engine to this slot's GPU
    settings: ConnectorSettings | None = None  # loaded by the daemon; else read at construction

    @property
    def slot_index(self) -> int:
        """The slot's number (its GPU's index; 0 on a CPU-only box): picks the engine URL."""
        return self.gpu_index or 0


@dataclass(frozen=True)
class Output:
    """One file a job produced, handed to ``JobContext.add_output`` (bytes, or a path)."""

    name: str
    content_type: str
    data: bytes | None = None
    path: Path | None = None

    @property
    def size_bytes(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size


class JobCancelled(EmpWorkerError):
    """Raised by JobContext.raise_if_cancelled once the job must stop."""


class JobContext:
    """Handed to ``Connector.run``: progress, outputs and the cancellation signal."""

    def __init__(
        self,
        job: Job,
        report: Callable[[ProgressUpdate], None],
        logger: logging.Logger,
        *,
        previews: bool = False,
        preview_max_bytes: int = 256 * 1024,
    ) -> None:
        self.job = job
        self.log = logger
        self.cancelled = asyncio.Event()
        self.stop_reason: StopReason | None = None
        self.outputs: list[Output] = []
        #: whether live previews are wanted (EMP_PROGRESS_PREVIEWS): skip producing them if not
        self.previews = previews
        self.preview_max_bytes = preview_max_bytes
        self._report = report
        self._last_preview = -math.inf
        self._temp_dir: Path | None = None

    @property
    def cancel_reason(self) -> str:
        return self.stop_reason.value if self.stop_reason else ""

    def progress(
        self,
        percent: float,
        message: str = "",
        *,
        step: int | None = None,
        total_steps: int | None = None,
        eta_s: float | None = None,
        data: Mapping[str, Any] | None = None,
        preview: bytes | None = None,
        preview_type: str = "image/jpeg",
    ) -> None:
        """Report progress (0-100). Cheap and non-blocking: the worker coalesces and sends it.

        ``eta_s``: seconds left (sent as ``estimated_completion``); ``data``: small structured
        detail (e.g. ``{"node": "12"}``, at most 4 KiB of JSON); ``preview``: a live preview image,
        kept only when previews are on, it is at most ``preview_max_bytes``, and the last kept one
        is a second old (previews go to the job's progress stream).
        """
        now = time.monotonic()
        keep_preview = (preview is not None and self.previews and len(preview) <= self.preview_max_bytes
                        and now - self._last_preview >= PREVIEW_INTERVAL_S)
        if keep_preview:
            self._last_preview = now
        self._report(ProgressUpdate(
            progress=max(0.0, min(100.0, float(percent))),
            message=message[:MAX_PROGRESS_MESSAGE],
            current_step=step,
            total_steps=total_steps,
            eta_s=eta_s if eta_s is None or eta_s >= 0 else None,
            data=self._bounded(data),
            preview=preview if keep_preview else None,
            preview_type=preview_type[:100],
        ))

    def _bounded(self, data: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Progress detail as JSON of at most 4 KiB; anything else is dropped with a warning."""
        if not data:
            return None
        try:
            size = len(json.dumps(data, allow_nan=False))
        except (TypeError, ValueError) as exc:
            self.log.warning("progress data dropped: not JSON (%s)", exc)
            return None
        if size > MAX_PROGRESS_DATA_BYTES:
            self.log.warning("progress data dropped: %d bytes of JSON, the limit is %d", size, MAX_PROGRESS_DATA_BYTES)
            return None
        return dict(data)

    def add_output(
        self, name: str, data: bytes | None = None, *, path: Path | str | None = None,
        content_type: str = "application/octet-stream",
    ) -> Output:
        """Hand one output to the worker: bytes, or a file `path` (large files are streamed from
        disk, never loaded whole). The worker puts small ones inline in the result and uploads
        the rest to the output store; the result lists each as ``{name, size_bytes,
        content_type, url}``. `name` is a plain file name (letters, digits, ``._-``)."""
        if not _OUTPUT_NAME.match(name):
            raise ValueError(f"output name {name!r}: use 1-200 letters, digits, '.', '_' or '-'")
        if (data is None) == (path is None):
            raise ValueError("give an output either as data or as a path")
        if len(self.outputs) >= MAX_OUTPUTS:  # the job asked for too much: not worth retrying
            raise PermanentJobError(f"a job may hand over at most {MAX_OUTPUTS} outputs")
        file = Path(path) if path is not None else None
        if file is not None and not file.is_file():
            raise ValueError(f"output {name!r}: {file} is not a file")
        output = Output(name, content_type, data, file)
        self.outputs.append(output)
        return output

    def temp_dir(self) -> Path:
        """A directory of this job's own for files it produces (e.g. outputs fetched from the
        engine, handed over with ``add_output(path=...)``); the worker deletes it once the job's
        outcome is recorded."""
        if self._temp_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="emp-job-"))
        return self._temp_dir

    @property
    def has_temp_dir(self) -> bool:
        return self._temp_dir is not None

    def cleanup(self) -> None:
        """Delete the job's temporary directory (the worker calls this after the outcome)."""
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def cancel(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancelled.set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.cancel_reason or "job cancelled")


class Connector(ABC):
    """Base class of every connector. One instance per worker slot."""

    #: the name operators use in EMP_CONNECTORS / --connectors
    name: ClassVar[str]
    #: the service_required values this connector runs (an instance's are ``services_for`` its
    #: settings: the same, unless the connector's services are configured, as the REST connector's are)
    service_types: tuple[str, ...]
    #: how many jobs one engine runs at once (None: as many as the slot's EMP_MAX_CONCURRENT_JOBS)
    max_concurrent_jobs: ClassVar[int | None] = None
    #: the connector's settings, read from EMP_<NAME>_* (see connectors/settings.py)
    settings_class: ClassVar[type[ConnectorSettings]] = ConnectorSettings
    #: the variable prefix of its settings; "" means EMP_<NAME>_ (non-alphanumerics as _)
    settings_prefix: ClassVar[str] = ""

    settings: ConnectorSettings

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        given = config.settings
        self.settings = given if isinstance(given, self.settings_class) else self.load_settings()
        self.service_types = self.services_for(self.settings)

    @classmethod
    def env_prefix(cls) -> str:
        return cls.settings_prefix or "EMP_" + re.sub(r"[^A-Za-z0-9]", "_", cls.name).upper() + "_"

    @classmethod
    def services_for(cls, settings: ConnectorSettings) -> tuple[str, ...]:
        """The services this connector runs with ``settings``: ``service_types``. A connector whose
        services the operator configures (one per EMP_REST_SERVICES entry) overrides this."""
        return tuple(cls.service_types)

    @classmethod
    def load_settings(cls) -> ConnectorSettings:
        """This connector's settings from the environment; ConfigError (one line) when invalid."""
        return cls.settings_class.load(cls.env_prefix())

    async def start(self) -> None:
        """Called before the first job (connect to the engine, warm up). If it raises, the
        connector is DOWN and start is retried with backoff."""

    async def stop(self) -> None:
        """Called once at shutdown."""

    @abstractmethod
    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        """Run one job and return its JSON-serialisable result."""

    async def interrupt(self, job: Job, reason: StopReason) -> None:
        """Stop the engine's work on `job` now (e.g. POST /interrupt); awaited, with a timeout,
        before ``run`` is cancelled. `reason` says why (cancel, drain, timeout, lost lease)."""

    async def health(self) -> Health:
        """The engine's health; DOWN stops claiming this connector's services."""
        return Health(HealthState.OK)

    async def models(self) -> dict[str, list[str]]:
        """Models available, by service (jobs that require a model only go where it is). Called
        at start and again when EMP_MODELS_TTL_S has passed; a failure keeps the last list."""
        return {}

    async def loaded_models(self) -> list[str]:
        """Models in GPU memory now: among jobs of equal priority, the worker prefers those whose
        models are loaded, and a fresh job is left for a moment to an idle slot that has them."""
        return []
