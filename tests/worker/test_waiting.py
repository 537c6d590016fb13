"""Why a pending job is still waiting, as `emp-worker status` says it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import WorkerFactory
from tests.worker.test_cli import _cli
from worker.client import Client
from worker.keys import Keys
from worker.waiting import reason

NOW = 1_800_000_000_000.0
SIM: dict[str, Any] = {"services": ["simulation"], "hardware": {"gpu_memory_gb": 24}, "customer_access": {},
                       "custom": {}, "loaded": []}
HAS = {**SIM, "models": {"simulation": ["sdxl"]}}
LOADED = {**HAS, "loaded": ["sdxl"]}


@pytest.mark.parametrize(("job", "delayed", "live", "busy", "expected"), [
    ({"service_required": "simulation"}, NOW + 5000, {"a": SIM}, set(), "retry delayed until 2027-01-15T08:00:05"),
    ({"service_required": "video"}, None, {"a": SIM}, set(), "no live worker runs 'video'"),
    ({"service_required": "simulation", "requirements": '{"hardware": {"gpu_memory_gb": 80}}'}, None, {"a": SIM},
     set(), "1 run 'simulation' but none meets its requirements"),
    ({"service_required": "simulation", "last_failed_worker": "a", "emp_last_failed_ms": str(NOW - 1000)}, None,
     {"a": SIM, "b": SIM}, set(), "kept from a, where its last attempt failed, until 2027-01-15T08:00:29"),
    ({"service_required": "simulation", "last_failed_worker": "a", "emp_last_failed_ms": str(NOW - 60_000)}, None,
     {"a": SIM}, set(), "1 capable worker(s) free"),
    ({"service_required": "simulation", "requirements": '{"models": ["sdxl"]}'}, None, {"a": LOADED, "b": HAS},
     {"a"}, "left for a, which has its models loaded"),
    ({"service_required": "simulation"}, None, {"a": SIM, "b": SIM}, {"a", "b"}, "every capable worker is busy (2"),
])
def test_each_reason_a_job_waits(job: dict[str, str], delayed: float | None, live: dict[str, dict[str, Any]],
                                 busy: set[str], expected: str) -> None:
    assert expected in reason(job, NOW, delayed, live, busy, exclusion_s=30, affinity_s=3)


async def test_status_lists_the_next_jobs_and_why(redis_url: str, keys: Keys, client: Client,
                                                  start_worker: WorkerFactory) -> None:
    await start_worker("idle-sim")
    job_id = await client.submit("video", {})
    code, out, err = await _cli("status", "--json", EMP_REDIS_URL=redis_url, EMP_KEY_PREFIX=keys.prefix)
    assert code == 0, err
    (waiting,) = json.loads(out)["waiting"]
    assert waiting["job_id"] == job_id and waiting["reason"] == "no live worker runs 'video'"
