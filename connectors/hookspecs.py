"""The plugin contract: every hook emp-worker calls, prefixed ``emp_``.

Plugins implement them with ``from connectors import hookimpl`` and are found through the
``emp_worker`` entry-point group (the built-ins are registered explicitly)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pluggy

PROJECT = "emp_worker"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def emp_connectors() -> Sequence[type[Any]]:  # type: ignore[empty-body]
    """Called once at start-up. Return the Connector subclasses this plugin provides."""


@hookspec
def emp_capabilities(worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any] | None:
    """Called when the worker (re)builds its capability record. Return custom capability keys
    to add (e.g. ``{"has_nvenc": True}``), or None. Must not block."""


@hookspec
def emp_job_finished(job_id: str, service: str, outcome: str, duration_s: float) -> None:
    """Called after a job ends on this worker; outcome is completed, failed, retry, cancelled or
    handed_back. For metrics and audit; must not block."""
