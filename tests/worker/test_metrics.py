"""Prometheus metrics and /healthz: scraped from a real `emp-worker run` after real jobs, plus the
metric objects and the server on their own."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.base import Outcome
from connectors.testing import WorkerProcess
from tests.conftest import wait_until
from worker.errors import ConfigError
from worker.hardware import GIB
from worker.keys import Keys
from worker.metrics import OTHER, Metrics, MetricsServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


async def _healthy(port: int) -> bool:
    try:
        return (await scrape(port, "/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_metrics_after_jobs_through_a_real_worker(redis_url: str, keys: Keys) -> None:
    port = free_port()
    async with WorkerProcess(redis_url, keys.prefix, "metrics-worker", EMP_METRICS_PORT=port,
                             EMP_METRICS_HOST="127.0.0.1", EMP_FAKE_GPUS="1x24GB") as proc:
        await wait_until(lambda: _healthy(port), within_s=30, interval=0.1)
        for _ in range(3):
            job = await proc.run_job("simulation", {"duration_s": 0.05, "steps": 2})
            assert job["status"] == "completed"
        job = await proc.run_job("simulation", {"fail": "permanent"})
        assert job["status"] == "failed"

        async def counted() -> bool:
            found = samples((await scrape(port)).text)
            return value(found, "emp_job_duration_seconds_count", service="simulation") == 4

        await wait_until(counted, within_s=10, interval=0.05)
        response = await scrape(port)
        assert response.headers["content-type"].startswith("text/plain")
        found = samples(response.text)
        health = await scrape(port, "/healthz")
    assert value(found, "emp_jobs_total", service="simulation", outcome="completed") == 3
    assert value(found, "emp_jobs_total", service="simulation", outcome="failed") == 1
    assert value(found, "emp_jobs_total", service="simulation", outcome="retry") == 0
    assert value(found, "emp_queue_wait_seconds_count", service="simulation") == 4
    claims = value(found, "emp_claim_duration_seconds_count")
    assert claims is not None and claims >= 4
    assert value(found, "emp_leases_lost_total") == 0
    assert value(found, "emp_job_retries_total", service="simulation") == 0
    assert value(found, "emp_redis_reconnects_total", connection="pubsub") == 0
    worker = "metrics-worker"
    assert value(found, "emp_connector_health", worker=worker, connector="simulation", state="ok") == 1
    assert value(found, "emp_connector_health", worker=worker, connector="simulation", state="down") == 0
    assert value(found, "emp_worker_state", worker=worker, state="idle") == 1
    gpu = {"worker": worker, "gpu": "0"}
    (uuid,) = {dict(labels)["uuid"] for name, labels in found if name == "emp_gpu_memory_total_bytes"}
    assert value(found, "emp_gpu_memory_total_bytes", **gpu, uuid=uuid) == 24 * GIB
    assert value(found, "emp_gpu_memory_used_bytes", **gpu, uuid=uuid) == 0.5 * GIB  # the fake's 512 MiB
    assert value(found, "emp_gpu_temperature_celsius", **gpu, uuid=uuid) == 35
    assert value(found, "emp_gpu_utilization_percent", **gpu, uuid=uuid) == 0
    assert value(found, "emp_gpu_healthy", **gpu, uuid=uuid) == 1
    assert health.status_code == 200 and health.json()["healthy"] is True


async def test_healthz_is_503_naming_a_connector_that_is_down(redis_url: str, keys: Keys) -> None:
    port = free_port()
    async with WorkerProcess(redis_url, keys.prefix, "down-worker", connectors="simulation,a1111",
                             EMP_METRICS_PORT=port, EMP_METRICS_HOST="127.0.0.1",
                             EMP_A1111_URL=f"http://127.0.0.1:{free_port()}", EMP_HEALTH_TIMEOUT_S="1") as proc:

        async def unhealthy() -> dict[str, Any] | None:
            try:
                response = await scrape(port, "/healthz")
            except httpx.TransportError:
                return None
            body: dict[str, Any] = response.json()
            return body if response.status_code == 503 and body["workers"][0]["problems"] else None

        await wait_until(unhealthy, within_s=30, interval=0.1)
        body = await unhealthy()
        found = samples((await scrape(port)).text)
        assert proc.running
    assert body is not None and body["healthy"] is False
    assert any("connector a1111 is down" in p for p in body["workers"][0]["problems"])
    assert value(found, "emp_connector_health", worker="down-worker", connector="a1111", state="down") == 1


def test_job_labels_stay_bounded_and_series_start_at_zero() -> None:
    metrics = Metrics()
    metrics.services = frozenset({"simulation"})
    metrics.finished("simulation", Outcome.RETRY, 1.5)
    metrics.finished("x" * 300, Outcome.COMPLETED, 0.1)  # a job's service is untrusted text
    metrics.claimed({"service_required": "simulation", "created_at": "2026-01-02T03:04:05.000Z",
                     "assigned_at": "2026-01-02T03:04:07.500Z"})
    metrics.claimed({"service_required": "simulation", "created_at": "not a time"})  # skipped
    found = samples(metrics.exposition().decode())
    assert value(found, "emp_jobs_total", service="simulation", outcome="retry") == 1
    assert value(found, "emp_job_retries_total", service="simulation") == 1
    assert value(found, "emp_jobs_total", service=OTHER, outcome="completed") == 1
    assert not any(("x" * 300) in dict(labels).values() for _, labels in found)
    assert value(found, "emp_queue_wait_seconds_sum", service="simulation") == 2.5
    assert value(found, "emp_queue_wait_seconds_count", service="simulation") == 1


def test_two_agents_in_one_process_never_share_series() -> None:
    first, second = Metrics(), Metrics()
    first.lease_lost()
    assert value(samples(second.exposition().decode()), "emp_leases_lost_total") == 0
    assert value(samples(first.exposition().decode()), "emp_leases_lost_total") == 1


async def test_server_routes_and_refuses_a_port_in_use() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", free_port())
    await server.start()
    try:
        assert (await scrape(server.port, "/nope")).status_code == 404
        assert (await scrape(server.port, "/healthz")).status_code == 503  # no slots: not healthy
        assert json.loads((await scrape(server.port, "/healthz")).text) == {"healthy": False, "workers": []}
        async with httpx.AsyncClient(timeout=5.0) as http:
            assert (await http.post(f"http://127.0.0.1:{server.port}/metrics")).status_code == 405
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /" + b"a" * 20_000)  # over the request limit, no end of head
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        writer.close()
        await writer.wait_closed()
        with pytest.raises(ConfigError, match=f"EMP_METRICS_PORT={server.port}: cannot listen"):
            await MetricsServer(Metrics(), "127.0.0.1", server.port).start()
    finally:
        await server.close()
