"""The machine's status, published where emp-job-queue's API and monitor read it.

Their monitor draws machines, GPUs and workers only from ``machine:status:{machineId}``
messages (their API turns them into ``machine:{id}:info`` and its snapshot; a machine silent for
30 s is stale). One agent process is one machine: this publishes its slots in their shape at
start (``initial``), every ``PERIOD_S`` (``periodic``), on each slot's status change
(``event_driven``, coalesced) and when it drains (``shutdown``)::

    {machine_id, timestamp, update_type,
     structure: {gpu_count, capabilities, workers: {W: {worker_id, gpu_id, services}}},
     status: {machine: {phase, uptime_ms},
              workers: {W: {status, current_job_id, last_activity, is_connected}},
              services: {"W.service": {worker_id, service_type, status, health}}}}

Publishing never holds up a slot: a change only sets an event, and a failed publish is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.agent import Worker, WorkerState
from worker.keys import Keys

log = logging.getLogger("emp.machine")

PERIOD_S = 10.0  # as their machines do (MACHINE_STATUS_UPDATE_INTERVAL_SECONDS)
COALESCE_S = 0.05  # changes this close together go out as one event-driven message


def _ms() -> int:
    return int(time.time() * 1000)


def structure(workers: Sequence[Worker]) -> dict[str, Any]:
    """What does not change while the agent runs: its GPUs and slots, and what each runs."""
    services = sorted({s for w in workers for s in w.ads.all_services})
    return {
        "gpu_count": sum(1 for w in workers if w.ads.gpu is not None),
        "capabilities": services,
        "workers": {w.worker_id: {"worker_id": w.worker_id, "gpu_id": w.ads.gpu.index if w.ads.gpu else 0,
                                  "services": list(w.ads.all_services)} for w in workers},
    }


def slot_status(worker: Worker) -> dict[str, Any]:
    return {"status": worker.state.value, "current_job_id": next(iter(worker.running), ""),
            "last_activity": worker.last_activity_ms,
            "is_connected": worker.state not in (WorkerState.STARTING, WorkerState.STOPPED)}


def service_status(worker: Worker) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for engine in worker.engines:
        for service in engine.services:
            found[f"{worker.worker_id}.{service}"] = {
                "worker_id": worker.worker_id, "service_type": service, "connector": engine.name,
                "status": "active" if engine.can_claim else "inactive", "health": engine.health.state.value,
                "message": engine.health.message[:200]}
    return found


class MachineStatus:
    """Publishes one agent's ``machine:status:{machine_id}`` messages."""

    def __init__(self, client: aioredis.Redis, keys: Keys, machine_id: str, workers: Sequence[Worker]) -> None:
        self.redis, self.machine_id, self.workers = client, machine_id, list(workers)
        self.channel = keys.machine_status(machine_id)
        self.started_ms = _ms()
        self.changed = asyncio.Event()
        for worker in self.workers:
            worker.on_change = self.changed.set

    def message(self, update_type: str, phase: str) -> dict[str, Any]:
        return {
            "machine_id": self.machine_id, "timestamp": _ms(), "update_type": update_type,
            "structure": structure(self.workers),
            "status": {
                "machine": {"phase": phase, "uptime_ms": _ms() - self.started_ms},
                "workers": {w.worker_id: slot_status(w) for w in self.workers},
                "services": {k: v for w in self.workers for k, v in service_status(w).items()},
            },
        }

    async def publish(self, update_type: str, phase: str = "ready") -> None:
        try:
            await self.redis.publish(self.channel, json.dumps(self.message(update_type, phase)))
        except (RedisError, OSError) as exc:
            log.warning("could not publish the machine status (%s): %s", update_type, type(exc).__name__)

    def _phase(self) -> str:
        states = {w.state for w in self.workers}
        if states <= {WorkerState.STARTING}:
            return "starting"
        if WorkerState.DRAINING in states or WorkerState.STOPPED in states:
            return "draining"
        return "ready"

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish until `stopping` is set, then the shutdown message."""
        await self.publish("initial", self._phase())
        loop = asyncio.get_running_loop()
        next_periodic = loop.time() + PERIOD_S
        while not stopping.is_set():
            waiter = asyncio.ensure_future(self.changed.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({waiter, stopper}, timeout=max(0.0, next_periodic - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stopping.is_set():
                break
            if self.changed.is_set():
                await asyncio.sleep(COALESCE_S)  # let a burst of changes (claim, start) settle into one message
                self.changed.clear()
                await self.publish("event_driven", self._phase())
            if loop.time() >= next_periodic:
                await self.publish("periodic", self._phase())
                next_periodic = loop.time() + PERIOD_S
        await self.publish("shutdown", "shutdown")
