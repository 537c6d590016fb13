"""The plugin contract: every hook emp-worker calls, prefixed ``emp_``.

Plugins implement them with ``from connectors import hookimpl`` and are found through the
``emp_worker`` entry-point group (the built-ins are registered explicitly). Each implementation
is called on its own (connectors/manager.py): one that raises is skipped with an ERROR line
naming its plugin, and ``emp-worker status`` shows it, while the others' contributions count.
A connector name or a service provided twice is a configuration error at start-up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pluggy

PROJECT = "emp_worker"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def emp_connectors() -> Sequence[type[Any]]:  # type: ignore[empty-body]
    """Called at start-up (and by ``emp-worker plugins``). Return the Connector subclasses this
    plugin provides; each needs a unique ``name`` and ``service_types`` (see connectors/base.py)."""


@hookspec
def emp_output_stores() -> Sequence[type[Any]]:  # type: ignore[empty-body]
    """Called at start-up (and by ``emp-worker plugins``). Return the OutputStore subclasses this
    plugin provides (see connectors/stores/__init__.py); each needs a unique ``name``, which
    ``EMP_OUTPUT_STORE`` and a job's ``ctx.storage.provider`` use."""


@hookspec
def emp_capabilities(worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any] | None:
    """Called by each slot's refresh loop (every heartbeat interval, never on the lease path)
    with the slot's capabilities. Return custom capability keys to add (e.g.
    ``{"has_nvenc": True}``), or None. Must not block: a call over 0.1 s is logged."""


@hookspec
def emp_job_finished(job_id: str, service: str, outcome: str, duration_s: float) -> None:
    """Called after a job ends on this worker; `outcome` is an ``Outcome`` value: completed,
    failed, retry, cancelled, handed_back or dropped. For metrics and audit; must not block."""
