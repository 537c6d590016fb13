"""What one slot advertises: the capabilities its claims match with, and its worker record.

Two views of the same facts:

* ``claim_capabilities()``: what the claim script matches against (worker/matching.py), built
  per claim from state the refresh loop keeps; only services whose connector is up and has a
  free place are offered;
* ``record_fields()``: the ``worker:{id}`` hash fields the heartbeat writes: emp-job-queue's
  ``capabilities`` (flat, as their matcher and monitor read it), our ``emp_caps`` (what a peer
  compares with for model affinity, and ``emp-worker status`` for unrunnable jobs), the state of
  each connector and the problems that keep the slot from claiming. The models are not in it:
  they can be megabytes (ComfyUI), so they are written to ``emp_models`` only when they change.

Nothing here does I/O; plugin hooks are called by ``refresh_extra`` in the refresh loop, never on
the lease path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from connectors.manager import Plugins
from worker.guard import PluggedConnector
from worker.hardware import Gpu
from worker.settings import Settings


class Advertiser:
    def __init__(self, settings: Settings, worker_id: str, engines: Sequence[PluggedConnector], *,
                 hardware: Mapping[str, Any], gpu: Gpu | None, host: Mapping[str, Any],
                 plugins: Plugins | None) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.engines = list(engines)
        self.hardware = dict(hardware)
        self.gpu = gpu
        self.gpu_problem = "; ".join(gpu.problems) if gpu is not None else ""
        self.host = dict(host)
        self.plugins = plugins
        self.loaded: list[str] = []
        self.extra: dict[str, Any] = {}

    @property
    def all_services(self) -> list[str]:
        return sorted({s for e in self.engines for s in e.services})

    def services(self, *, with_room: bool) -> list[str]:
        """Services this slot can run now (`with_room`: whose connector also has a free place)."""
        if self.gpu_problem:
            return []
        return sorted({s for e in self.engines if e.can_claim and (e.has_room or not with_room)
                       for s in e.services})

    def models(self) -> dict[str, list[str]]:
        merged: dict[str, list[str]] = {}
        for engine in self.engines:
            merged.update(engine.models)
        return merged

    def _base(self, services: list[str]) -> dict[str, Any]:
        """Capabilities without the models: those are stored once per change in the worker
        hash's emp_models (Queue.set_models), where the claim script reads them when a job asks."""
        custom = dict(self.settings.custom_capabilities)
        custom.update(self.extra)
        return {
            "services": services,
            "hardware": self.hardware,
            "customer_access": self.settings.customer_access,
            "custom": custom,
            "workflow_id": self.settings.workflow_id,
            "loaded": self.loaded,
        }

    def claim_capabilities(self) -> dict[str, Any]:
        """What the claim script matches against (see worker/matching.py)."""
        return self._base(self.services(with_room=True))

    def refresh_extra(self) -> None:
        """Custom capability keys from the ``emp_capabilities`` hooks (a failing one is skipped)."""
        if self.plugins is not None:
            self.extra = self.plugins.extra_capabilities(self.worker_id, self._base(self.services(with_room=False)))

    def problems(self) -> list[str]:
        """Why this slot claims less than it could: connectors down, a bad GPU, failing hooks."""
        found = [f"connector {e.name} is down: {e.health.message}" for e in self.engines if not e.can_claim]
        if self.gpu_problem:
            found.append(f"GPU unhealthy: {self.gpu_problem}")
        if self.plugins is not None:
            found.extend(self.plugins.problems.values())
        return found

    def record_fields(self, current_job_id: str) -> dict[str, str]:
        caps = self._base(self.services(with_room=False))
        advertised = {
            **caps["custom"],
            "worker_id": self.worker_id,
            "job_service_required_map": self.all_services,
            "services": caps["services"],
            "hardware": caps["hardware"],
            "loaded_models": self.loaded,
            "customer_access": caps["customer_access"],
            "gpus": [self.gpu.to_dict()] if self.gpu is not None else [],
            "host": self.host,
        }
        if self.settings.workflow_id:
            advertised["workflow_id"] = self.settings.workflow_id
        return {
            "machine_id": self.settings.machine_id,
            "capabilities": json.dumps(advertised),
            "emp_caps": json.dumps(caps),
            "emp_connectors": json.dumps({e.name: e.summary() for e in self.engines}),
            "emp_problems": json.dumps(self.problems()),
            "current_job_id": current_job_id,
            "max_concurrent_jobs": str(self.max_concurrent_jobs),
        }

    @property
    def max_concurrent_jobs(self) -> int:
        """The slot's limit, lowered to what its connectors can run at once together."""
        return max(1, min(self.settings.max_concurrent_jobs, sum(e.limit for e in self.engines) or 1))
