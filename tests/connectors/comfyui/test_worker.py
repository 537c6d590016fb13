"""The ComfyUI connector inside a real worker against a real Redis and the fake ComfyUI: jobs
written the emp-job-queue way, progress in the job's stream, outputs in the result; a dying
ComfyUI, a cancel, and two slots with a ComfyUI each."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.conftest import WorkerFactory, wait_until
from tests.connectors.comfyui.conftest import FAST, blur_chain, graph
from tests.fakes.comfyui import FakeComfyUI
from worker.client import Client
from worker.hardware import Gpu


@pytest.fixture(autouse=True)
def comfy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)


async def status_of(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def wait_status(client: Client, job_id: str, statuses: tuple[str, ...], within_s: float = 30) -> dict[str, str]:
    await wait_until(lambda: _in(client, job_id, statuses), within_s=within_s, interval=0.05)
    return await client.get(job_id)


async def _in(client: Client, job_id: str, statuses: tuple[str, ...]) -> bool:
    return await status_of(client, job_id) in statuses


async def test_happy_path_through_the_worker(fake: FakeComfyUI, start_worker: WorkerFactory, client: Client,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_COMFYUI_URL", fake.url)
    fake.behaviour.node_delay_s = 0.4  # slow enough for the coalesced progress stream to show each node
    await start_worker("w1", connectors="comfyui")
    job_id = await client.submit("comfyui", graph("e2e"))  # the workflow is the payload, as emp-job-queue sends it
    job = await wait_status(client, job_id, ("completed", "failed"))
    assert job["status"] == "completed", job
    result = json.loads(job["result"])
    assert [(f["node_id"], f["filename"], f["content_type"]) for f in result["files"]] == \
        [("3", "e2e_00001_.png", "image/png")]
    placed = {o["name"]: o for o in result["outputs"]}
    assert placed[result["files"][0]["name"]]["size_bytes"] == result["files"][0]["size_bytes"]
    messages = [str(e.data.get("message", "")) for e in await client.events(job_id)]
    assert any("Invert Image" in m for m in messages) and "queued in ComfyUI" in messages
    percents = [float(e.data["progress"]) for e in await client.events(job_id) if "progress" in e.data]
    assert percents == sorted(percents) and 0 < percents[-2] < 100
    assert fake.prompts[-1].extra_data.get("emp_job_id") == job_id


async def test_killed_comfyui_fails_retryable_stops_claims_and_resumes(
        fake: FakeComfyUI, start_worker: WorkerFactory, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_COMFYUI_URL", fake.url)
    worker = await start_worker("w1", connectors="comfyui")
    hold = fake.hold("11")
    job_id = await client.submit("comfyui", blur_chain("killed"), max_retries=5)
    await hold.wait_reached(20)
    killed_at = time.monotonic()
    await fake.kill()
    await wait_until(lambda: _retried(client, job_id), within_s=10, interval=0.05)
    assert time.monotonic() - killed_at < 10
    engine = worker.engines[0]
    await wait_until(lambda: not engine.health.can_claim, within_s=5)
    pending = await client.get(job_id)
    assert pending["status"] == "pending" and "stopped answering" in pending.get("last_error", pending.get("error", ""))
    claimed_before = len(fake.prompts)
    await fake.restart()
    job = await wait_status(client, job_id, ("completed", "failed"), within_s=30)
    assert job["status"] == "completed", job
    assert len(fake.prompts) == claimed_before + 1  # claimed again only once ComfyUI was back


async def _retried(client: Client, job_id: str) -> bool:
    job = await client.get(job_id)
    return job.get("status") == "pending" and int(job.get("retry_count", "0") or 0) >= 1


async def test_cancel_reaches_comfyui_as_a_prompt_scoped_interrupt(
        fake: FakeComfyUI, start_worker: WorkerFactory, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_COMFYUI_URL", fake.url)
    await start_worker("w1", connectors="comfyui")
    hold = fake.hold("11")
    job_id = await client.submit("comfyui", blur_chain("cancelled"))
    await hold.wait_reached(20)
    await client.cancel(job_id)
    await wait_until(lambda: bool(fake.interrupts), within_s=10)
    hold.release()
    job = await wait_status(client, job_id, ("cancelled", "completed", "failed"))
    assert job["status"] == "cancelled"
    cancelled_prompt = fake.prompts[-1].prompt_id
    assert [c.body for c in fake.interrupts] == [{"prompt_id": cancelled_prompt}] and fake.interrupts[0].hit
    next_id = await client.submit("comfyui", blur_chain("after-cancel", color=99))
    job = await wait_status(client, next_id, ("completed", "failed", "cancelled"))
    assert job["status"] == "completed"  # the interrupt flag did not carry over
    assert len(fake.interrupts) == 1


async def test_two_slots_each_reach_only_their_own_comfyui(start_worker: WorkerFactory, client: Client,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeComfyUI() as first, FakeComfyUI() as second:
        monkeypatch.setenv("EMP_COMFYUI_URLS", f"{first.url},{second.url}")
        for index in (0, 1):
            gpu = Gpu(index=index, uuid=f"GPU-{index}", name="fake", memory_total_gb=24, memory_free_gb=24)
            await start_worker(f"slot{index}", connectors="comfyui", gpu=gpu)
        holds = [first.hold("2"), second.hold("2")]  # each slot's first job waits: the other slot must take some
        jobs = [await client.submit("comfyui", graph(f"two{i}", color=i)) for i in range(6)]
        for hold in holds:
            await hold.wait_reached(20)  # both slots run a job at the same time
        for hold in holds:
            hold.release()
        done = [await wait_status(client, job_id, ("completed", "failed")) for job_id in jobs]
        assert all(j["status"] == "completed" for j in done), done
        by_worker: dict[str, set[str]] = {}
        for job_id, job in zip(jobs, done, strict=True):
            by_worker.setdefault(job["worker_id"], set()).add(job_id)
        assert set(by_worker) == {"slot0", "slot1"}, by_worker  # both slots ran jobs
        seen: dict[str, Any] = {"slot0": first, "slot1": second}
        for worker_id, ids in by_worker.items():
            server: FakeComfyUI = seen[worker_id]
            other: FakeComfyUI = second if server is first else first
            assert ids <= {p.extra_data.get("emp_job_id") for p in server.prompts}
            assert not ids & {p.extra_data.get("emp_job_id") for p in other.prompts}
        assert len(first.prompts) + len(second.prompts) == 6
        await asyncio.sleep(0)
