"""The one boundary between the daemon and connector code: every call into a connector goes
through here, with a timeout, and its failure becomes a state, never an exception in a loop.

* ``start()`` failing (or timing out): the connector is DOWN (its services are not claimed) and
  start is retried with backoff, each failure one ERROR line with the connector's name;
* ``health()`` failing: DOWN until a later check passes;
* ``models()`` failing: the last list is kept (health and models fail separately);
* ``loaded_models()``, ``interrupt()``, ``stop()`` failing: logged, nothing else changes.

Hooks (synchronous plugin functions) are guarded the same way in connectors/manager.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from connectors.base import Connector, Health, HealthState, StopReason
from worker.errors import ConnectorError
from worker.protocol import Job
from worker.retry import Backoff

log = logging.getLogger("emp.plugins")
T = TypeVar("T")

START_TIMEOUT_S = 120.0
INTERRUPT_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
MAX_MODEL_SERVICES = 256
MAX_MODELS = 100_000
MAX_MODEL_NAME = 512
MAX_MESSAGE = 500


class PluginFailed(ConnectorError):
    """A call into plugin code raised or ran past its timeout."""

    def __init__(self, plugin: str, call: str, detail: str) -> None:
        super().__init__(f"{plugin}: {call} {detail}")
        self.plugin, self.call, self.detail = plugin, call, detail


_abandoned: set[asyncio.Task[Any]] = set()  # plugin calls past their timeout that ignore cancellation


async def guard(plugin: str, call: str, awaitable: Awaitable[T], timeout_s: float) -> T:
    """Await plugin code within `timeout_s`; PluginFailed (with a short reason) if it raises,
    times out, or raises CancelledError of its own. Past the timeout the call is cancelled and
    left behind: a coroutine that swallows its cancellation cannot hold the caller."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_abandoned.discard)
        raise PluginFailed(plugin, call, f"took over {timeout_s:g}s")
    try:
        return task.result()
    except asyncio.CancelledError:  # the plugin's own (e.g. a client library's timeout)
        raise PluginFailed(plugin, call, "failed: it raised CancelledError") from None
    except Exception as exc:
        raise PluginFailed(plugin, call, f"failed: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _checked_health(value: Any) -> Health:
    """What health() returned, as a Health with a real state and a short string message."""
    if not isinstance(value, Health) or not isinstance(value.state, HealthState):
        return Health(HealthState.DOWN, f"health() returned {value!r:.100}, not a Health with a HealthState")
    return Health(value.state, str(value.message)[:MAX_MESSAGE])


def clean_models(value: Any) -> dict[str, list[str]]:
    """What ``models()`` returned, checked: {service: [model name, ...]}, bounded."""
    if not isinstance(value, dict):
        raise TypeError(f"models() must return a dict of lists, not {type(value).__name__}")
    models: dict[str, list[str]] = {}
    total = 0
    for service, names in list(value.items())[:MAX_MODEL_SERVICES]:
        if not isinstance(service, str) or not isinstance(names, list | tuple):
            raise TypeError("models() must return {service: [model name, ...]}")
        kept = sorted({n for n in names if isinstance(n, str) and 0 < len(n) <= MAX_MODEL_NAME})
        kept = kept[: max(0, MAX_MODELS - total)]
        total += len(kept)
        models[service] = kept
    return models


class PluggedConnector:
    """One connector instance in one slot, as the daemon sees it: started or not, healthy or
    not, how many jobs it runs now and may run at once, and the models it last listed."""

    def __init__(self, connector: Connector, slot_limit: int) -> None:
        self.connector = connector
        declared = connector.max_concurrent_jobs
        self.limit = min(slot_limit, declared) if declared else slot_limit
        self.running = 0
        self.started = False
        self.health = Health(HealthState.DOWN, "not started yet")
        self.models: dict[str, list[str]] = {}
        self._models_due = -math.inf
        self._restart = Backoff(base_s=1.0, max_s=60.0)
        self._start_due = -math.inf

    @property
    def name(self) -> str:
        return self.connector.name

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self.connector.service_types)

    @property
    def can_claim(self) -> bool:
        return self.started and self.health.can_claim

    @property
    def has_room(self) -> bool:
        return self.running < self.limit

    def summary(self) -> dict[str, Any]:
        """What the worker record says of this connector (``emp-worker status`` shows it)."""
        state = self.health.state.value if self.started else "down"
        return {"state": state, "message": self.health.message, "services": list(self.services),
                "running": self.running, "limit": self.limit}

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Start the connector when it is not started and its next try is due; True if started."""
        if self.started:
            return True
        if time.monotonic() < self._start_due:
            return False
        try:
            await guard(self.name, "start()", self.connector.start(), timeout_s)
        except PluginFailed as exc:
            delay = self._restart.next_delay()
            self._start_due = time.monotonic() + delay
            self.health = Health(HealthState.DOWN, f"start() {exc.detail}")
            log.error("connector %s: start() %s; not claiming %s; next try in %.0fs",
                      self.name, exc.detail, ", ".join(self.services), delay)
            return False
        if self._restart.failures:
            log.info("connector %s started after %d failed tries", self.name, self._restart.failures)
        self._restart.reset()
        self.started = True
        self.health = Health(HealthState.OK)
        return True

    async def check_health(self, timeout_s: float) -> None:
        if not self.started:
            return
        try:
            health = _checked_health(await guard(self.name, "health()", self.connector.health(), timeout_s))
        except PluginFailed as exc:
            health = Health(HealthState.DOWN, f"health() {exc.detail}")
        if self.health.can_claim and not health.can_claim:
            log.warning("connector %s is down (%s): not claiming its jobs", self.name, health.message)
        elif not self.health.can_claim and health.can_claim:
            log.info("connector %s is healthy again", self.name)
            self._models_due = -math.inf  # an engine that came back may have other models
        self.health = health

    async def refresh_models(self, ttl_s: float, timeout_s: float) -> bool:
        """List the models again when the last list is older than `ttl_s`; True if they changed."""
        now = time.monotonic()
        if not self.can_claim or now < self._models_due:
            return False
        try:
            models = clean_models(await guard(self.name, "models()", self.connector.models(), timeout_s))
        except (PluginFailed, TypeError) as exc:
            self._models_due = now + min(ttl_s, 30.0)
            log.error("connector %s: models() %s; keeping the last list (%d services)",
                      self.name, exc.detail if isinstance(exc, PluginFailed) else exc, len(self.models))
            return False
        self._models_due = now + ttl_s
        changed, self.models = models != self.models, models
        return changed

    async def loaded_models(self, timeout_s: float) -> list[str]:
        if not self.started:
            return []
        try:
            loaded = await guard(self.name, "loaded_models()", self.connector.loaded_models(), timeout_s)
        except PluginFailed as exc:
            log.debug("connector %s: loaded_models() %s", self.name, exc.detail)
            return []
        return [m for m in loaded if isinstance(m, str)] if isinstance(loaded, list | tuple) else []

    async def interrupt(self, job: Job, reason: StopReason) -> None:
        """Ask the engine to stop `job` (bounded); the job's task is cancelled afterwards anyway."""
        try:
            await guard(self.name, "interrupt()", self.connector.interrupt(job, reason), INTERRUPT_TIMEOUT_S)
        except PluginFailed as exc:
            log.error("connector %s: interrupt() of job %s %s", self.name, job.id, exc.detail)

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            await guard(self.name, "stop()", self.connector.stop(), STOP_TIMEOUT_S)
        except PluginFailed as exc:
            log.error("connector %s: stop() %s", self.name, exc.detail)
