"""REST jobs through a real worker and Redis (``--connectors rest``): an async job's progress
reaches the job's stream and its result the job record; a failed task fails the job for good; an
SSRF attempt fails permanently without a retry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import WorkerFactory, wait_until
from tests.connectors.rest.conftest import FakeService, services_env
from worker.client import Client

pytestmark = pytest.mark.timeout(90)


async def _ended(client: Client, job_id: str) -> bool:
    return (await client.get(job_id)).get("status") in ("completed", "failed", "cancelled")


def _configure(monkeypatch: pytest.MonkeyPatch, service: FakeService) -> None:
    env = services_env(
        video={"base_url": f"{service.url}/api", "mode": "async", "path": "/jobs", "status_path": "/jobs/{task_id}",
               "progress_field": "progress", "result_field": "output", "poll_interval_s": 0.2},
        caption={"base_url": f"{service.url}/caption"},
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _statuses(service: FakeService, task_id: str, *documents: dict[str, Any]) -> None:
    remaining = list(documents)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(remaining.pop(0) if len(remaining) > 1 else remaining[0])

    service.route("GET", f"/api/jobs/{task_id}", status)


async def test_an_async_rest_job_through_a_worker(client: Client, start_worker: WorkerFactory, service: FakeService,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch, service)
    service.reply("POST", "/api/jobs", {"id": "v-1", "status": "queued"})
    _statuses(service, "v-1", {"status": "running", "progress": 30}, {"status": "running", "progress": 60},
              {"status": "completed", "progress": 100, "output": {"video_url": "https://cdn/v-1.mp4"}})
    service.reply("POST", "/caption/run", {"caption": "a cat on a mat"})
    worker = await start_worker("rest-e2e", connectors="rest")
    assert sorted(worker.engines[0].services) == ["caption", "video"]  # what the worker advertises and claims

    job_id = await client.submit("video", {"endpoint": "/jobs", "method": "POST", "data": {"prompt": "a cat"}})
    await wait_until(lambda: _ended(client, job_id), within_s=30)
    job = await client.get(job_id)
    assert job["status"] == "completed", job
    result = json.loads(job["result"])
    assert result["task_id"] == "v-1" and result["data"] == {"video_url": "https://cdn/v-1.mp4"}
    progress = [e.data for e in await client.events(job_id) if e.kind == "progress"]
    assert any(float(p["progress"]) == 30 for p in progress) and any(float(p["progress"]) == 60 for p in progress)

    caption = await client.submit("caption", {"endpoint": "/run", "data": {"image": "https://cdn/x.png"}})
    await wait_until(lambda: _ended(client, caption), within_s=30)
    done = await client.get(caption)
    assert done["status"] == "completed" and json.loads(done["result"])["data"] == {"caption": "a cat on a mat"}


async def test_failures_through_a_worker_are_permanent_at_once(
        client: Client, start_worker: WorkerFactory, service: FakeService, other_service: FakeService,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch, service)
    service.reply("POST", "/api/jobs", {"id": "v-2"})
    _statuses(service, "v-2", {"status": "failed", "error": "NSFW content detected"})
    await start_worker("rest-e2e-fail", connectors="rest")

    failed = await client.submit("video", {"data": {}}, max_retries=3)
    await wait_until(lambda: _ended(client, failed), within_s=30)
    job = await client.get(failed)
    assert job["status"] == "failed" and "NSFW content detected" in job.get("error", ""), job
    assert len(service.seen("/api/jobs")) == 1  # permanent: not submitted again

    ssrf = await client.submit("caption", {"endpoint": f"http://127.0.0.1:{other_service.port}/x"}, max_retries=3)
    await wait_until(lambda: _ended(client, ssrf), within_s=30)
    job = await client.get(ssrf)
    assert job["status"] == "failed" and "may only reach" in job.get("error", ""), job
    assert other_service.received == [] and service.seen("/caption/x") == []
