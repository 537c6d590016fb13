"""Prometheus metrics of one agent, served with ``/healthz`` on ``EMP_METRICS_PORT`` (off by default).

Two kinds, so that the job path pays a few increments and nothing else:

* **events** (counters and histograms), updated where they happen by the slot's loops: jobs by
  service and outcome, claim script latency, queue wait (submission to claim, both Redis times
  from the claimed job hash), job duration (claim to outcome), leases lost, retries, Redis
  reconnects. No Redis call, no I/O;
* **state** (gauges), read from the slots when Prometheus scrapes: each slot's state, each
  connector's health, each slot's GPU (memory, utilisation, temperature, power) as the refresh
  loop last read it. Nothing polls for them.

Everything lives in a registry of its own (never prometheus-client's global one), so that two
agents in one process (tests) or an embedding application never share series.

The server is a small asyncio one in the agent's event loop (reads of the slots' state need no
lock): ``GET /metrics`` (Prometheus text), ``GET /healthz`` (200 or 503 with a short JSON body,
worker/health.py's verdict). Each connection is bounded in size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from connectors.base import HealthState, Outcome
from worker.errors import ConfigError
from worker.health import slot_problems
from worker.protocol import parse_time

if TYPE_CHECKING:
    from worker.agent import Worker
    from worker.settings import Settings

log = logging.getLogger("emp.metrics")

GIB = 1024**3
OTHER = "other"  # the service label of a job whose service this agent does not run (bounded labels)
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192


class Metrics:
    """The agent's metrics; the slots call the event methods, the collector reads the slots."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("emp_jobs", "Jobs that ended on this agent, by service and outcome",
                            ["service", "outcome"], registry=r)
        self.claim_seconds = Histogram("emp_claim_duration_seconds", "Time of one claim script call",
                                       buckets=CLAIM_BUCKETS, registry=r)
        self.queue_wait = Histogram("emp_queue_wait_seconds", "Time from a job's submission to its claim here",
                                    ["service"], buckets=WAIT_BUCKETS, registry=r)
        self.job_duration = Histogram("emp_job_duration_seconds", "Time from a job's claim to its outcome",
                                      ["service"], buckets=DURATION_BUCKETS, registry=r)
        self.leases_lost = Counter("emp_leases_lost", "Running jobs stopped because their lease was lost",
                                   registry=r)
        self.retries = Counter("emp_job_retries", "Failed attempts put back in the queue for another",
                               ["service"], registry=r)
        self.redis_reconnects = Counter("emp_redis_reconnects", "Redis connections back after being lost",
                                        ["connection"], registry=r)
        self.workers: list[Worker] = []
        self.services: frozenset[str] = frozenset()
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}  # (service, outcome) -> (jobs, duration)
        r.register(_SlotCollector(self))

    def watch(self, workers: Sequence[Worker]) -> None:
        """Report these slots' state, and start every job series at 0 (so rates work from the first job)."""
        self.workers = list(workers)
        self.services = frozenset(s for w in workers for s in w.by_service)
        for service in (*sorted(self.services), OTHER):
            for outcome in Outcome:
                self._child(service, outcome.value)
            self.queue_wait.labels(service)
            self.retries.labels(service)
        for connection in ("commands", "pubsub"):
            self.redis_reconnects.labels(connection)

    def _child(self, service: str, outcome: str) -> tuple[Any, Any]:
        child = self._children.get((service, outcome))
        if child is None:
            child = self._children[(service, outcome)] = (self.jobs.labels(service, outcome),
                                                          self.job_duration.labels(service))
        return child

    def service(self, name: str) -> str:
        """`name` as a label: one of this agent's services, else ``other`` (job fields are untrusted)."""
        return name if name in self.services else OTHER

    # --- events: a few increments each -------------------------------------------------------------

    def claim_took(self, seconds: float) -> None:
        self.claim_seconds.observe(seconds)

    def claimed(self, fields: Mapping[str, str]) -> None:
        """Queue wait of a job just claimed: the claim's ``assigned_at`` - ``created_at``."""
        created = epoch_s(fields.get("created_at"))
        if created is None:
            return
        claimed_at = epoch_s(fields.get("assigned_at")) or time.time()
        self.queue_wait.labels(self.service(fields.get("service_required", ""))).observe(max(0.0, claimed_at - created))

    def finished(self, service: str, outcome: Outcome, duration_s: float) -> None:
        label = self.service(service)
        jobs, duration = self._child(label, outcome.value)
        jobs.inc()
        duration.observe(duration_s)
        if outcome is Outcome.RETRY:
            self.retries.labels(label).inc()

    def lease_lost(self) -> None:
        self.leases_lost.inc()

    def reconnected(self, connection: str) -> None:
        self.redis_reconnects.labels(connection).inc()

    # --- serving ------------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: healthy when every slot is (worker/health.py), with the reasons."""
        slots = []
        for w in self.workers:
            reasons = slot_problems(w.worker_id, w.state.value, w.beat_age_s, w.beat_ttl_s, w.ads.problems())
            slots.append({"worker_id": w.worker_id, "state": w.state.value, "healthy": not reasons,
                          "problems": reasons})
        ok = bool(slots) and all(s["healthy"] for s in slots)
        return ok, {"healthy": ok, "workers": slots}


def epoch_s(value: str | None) -> float | None:
    """A job hash's time as epoch seconds: the ISO form fast, any other form worker.protocol reads."""
    if not value:
        return None
    try:
        moment: datetime | None = datetime.fromisoformat(value)
    except ValueError:
        moment = parse_time(value)  # epoch ms, 'sec.usec', or None
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class _SlotCollector(Collector):
    """The gauges, read from the slots at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # series depend on the slots: not described ahead

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("emp_worker_state", "1 for each slot's current state", labels=["worker", "state"])
        health = GaugeMetricFamily("emp_connector_health", "1 for each connector's current health state",
                                   labels=["worker", "connector", "state"])
        gpu_labels = ["worker", "gpu", "uuid"]
        gauges = {
            "used": GaugeMetricFamily("emp_gpu_memory_used_bytes", "GPU memory in use (10 MiB precision)",
                                      labels=gpu_labels),
            "total": GaugeMetricFamily("emp_gpu_memory_total_bytes", "GPU memory in all", labels=gpu_labels),
            "util": GaugeMetricFamily("emp_gpu_utilization_percent", "GPU utilisation", labels=gpu_labels),
            "temp": GaugeMetricFamily("emp_gpu_temperature_celsius", "GPU temperature", labels=gpu_labels),
            "power": GaugeMetricFamily("emp_gpu_power_watts", "GPU power draw", labels=gpu_labels),
            "healthy": GaugeMetricFamily("emp_gpu_healthy", "1 when the slot's GPU reads healthy, else 0",
                                         labels=gpu_labels),
        }
        for w in self.metrics.workers:
            for s in ("starting", "idle", "busy", "draining", "stopped"):
                state.add_metric([w.worker_id, s], 1.0 if w.state.value == s else 0.0)
            for engine in w.engines:
                current = engine.summary()["state"]
                for h in HealthState:
                    health.add_metric([w.worker_id, engine.name, h.value], 1.0 if current == h.value else 0.0)
            _gpu_samples(gauges, w)
        yield state
        yield health
        yield from gauges.values()


def _gpu_samples(gauges: Mapping[str, GaugeMetricFamily], w: Worker) -> None:
    gpu = w.ads.gpu
    if gpu is None:
        return
    labels = [w.worker_id, str(gpu.index), gpu.uuid]
    gauges["total"].add_metric(labels, gpu.memory_total_gb * GIB)
    gauges["used"].add_metric(labels, max(0.0, gpu.memory_total_gb - gpu.memory_free_gb) * GIB)
    gauges["healthy"].add_metric(labels, 0.0 if w.ads.gpu_problem else 1.0)
    for key, value in (("util", gpu.utilization_pct), ("temp", gpu.temperature_c), ("power", gpu.power_w)):
        if value is not None:
            gauges[key].add_metric(labels, value)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP/1.0-style one-request connections."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics, self.host, self.port = metrics, host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES)
        except (OSError, OverflowError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"EMP_METRICS_PORT={self.port}: cannot listen on {self.host}:{self.port} "
                              f"({why}); pick a free port, or unset it to serve no metrics") from None
        log.info("metrics at http://%s:%d/metrics, health at /healthz", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        route = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET\n"
        if route == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if route == "/healthz":
            ok, body = self.metrics.health()
            return (200 if ok else 503), "application/json", json.dumps(body).encode()
        return 404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            status, content_type, body = self.respond(method, path) if path else (400, "text/plain", b"bad request\n")
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a slow, oversized or vanished client: just close
        except Exception:  # never into the agent's loop
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


async def serve_metrics(settings: Settings, workers: Sequence[Worker], *, port_offset: int = 0) -> MetricsServer:
    """Metrics for these slots, served on EMP_METRICS_PORT + `port_offset` (a ``--gpu I`` process: I,
    so that one process per GPU can share one environment); ConfigError when it cannot listen."""
    metrics = Metrics()
    metrics.watch(workers)
    for worker in workers:
        worker.metrics = metrics
    server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port + port_offset)
    await server.start()
    return server
