"""What a connector is: the interface every engine plugin implements, and the job context.

A connector turns one job into work on an engine (ComfyUI, A1111, a REST service, a simulation)::

    class MyConnector(Connector):
        name = "my-engine"
        service_types = ("my-engine",)

        async def run(self, job: Job, ctx: JobContext) -> JobResult:
            for step in range(10):
                ctx.raise_if_cancelled()
                ...
                ctx.progress(step * 10, f"step {step}")
            return {"images": [...]}

Raise PermanentJobError for bad input, RetryableJobError for engine trouble (crash, timeout,
OOM); anything else counts as retryable. ``run`` may be cancelled at any await (job cancelled,
timed out, or the worker draining): clean up in ``finally`` and stop the engine's work.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from worker.errors import EmpWorkerError
from worker.protocol import Job

JobResult = dict[str, Any]


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


@dataclass(frozen=True)
class ConnectorConfig:
    """What the daemon tells a connector about where it runs."""

    worker_id: str
    gpu_index: int | None = None  # NVML's index (PCI bus order); may differ from CUDA's default order
    env: Mapping[str, str] = field(default_factory=dict)
    gpu_uuid: str = ""  # stable: CUDA_VISIBLE_DEVICES=<uuid> pins an engine to this slot's GPU


class JobCancelled(EmpWorkerError):
    """Raised by JobContext.raise_if_cancelled once the job must stop."""


class JobContext:
    """Handed to ``Connector.run``: progress reporting and the cancellation signal."""

    def __init__(self, job: Job, report: Callable[..., None], logger: logging.Logger) -> None:
        self.job = job
        self.log = logger
        self.cancelled = asyncio.Event()
        self.cancel_reason = ""
        self._report = report

    def progress(
        self,
        percent: float,
        message: str = "",
        *,
        step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        """Report progress (0-100). Cheap and non-blocking: the worker coalesces and sends it."""
        self._report(max(0.0, min(100.0, float(percent))), message, step, total_steps)

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancelled.set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.cancel_reason or "job cancelled")


class Connector(ABC):
    """Base class of every connector. One instance per worker slot."""

    #: the name operators use in EMP_CONNECTORS / --connectors
    name: ClassVar[str]
    #: the service_required values this connector runs
    service_types: ClassVar[tuple[str, ...]]

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config

    async def start(self) -> None:
        """Called once before the first job (connect to the engine, warm up)."""

    async def stop(self) -> None:
        """Called once at shutdown."""

    @abstractmethod
    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        """Run one job and return its JSON-serialisable result."""

    async def health(self) -> Health:
        """The engine's health; DOWN stops claiming this connector's services."""
        return Health(HealthState.OK)

    async def models(self) -> dict[str, list[str]]:
        """Models available now, by service (jobs that require a model only go where it is)."""
        return {}

    async def loaded_models(self) -> list[str]:
        """Models in GPU memory now: among jobs of equal priority, the worker prefers those whose
        models are loaded, and a fresh job is left for a moment to an idle slot that has them."""
        return []
