"""The A1111 connector through a real worker and Redis, against the fake A1111: progress in the
job's stream, outputs in the result, cancel reaching A1111's interrupt, and the engine dying
mid-job (retryable at once, claiming stops while it is down and resumes when it is back)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from connectors.a1111 import A1111Connector
from tests.conftest import WorkerFactory, wait_until
from tests.connectors.a1111.conftest import small
from tests.fakes.a1111 import FakeA1111
from tests.fakes.a1111.wire import png_size
from worker.client import Client

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeA1111]:
    async with FakeA1111(step_s=0.01) as server:
        monkeypatch.setenv("EMP_A1111_URL", server.url)
        monkeypatch.setenv("EMP_A1111_PROGRESS_INTERVAL_S", "0.05")
        yield server


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def test_a_job_reports_rising_progress_and_completes_with_its_images(
    client: Client, start_worker: WorkerFactory, fake: FakeA1111
) -> None:
    await start_worker("a1111-w", connectors="a1111")
    job_id = await client.submit("a1111", small(steps=80, batch_size=2, seed=5))
    await wait_until(lambda: _is(client, job_id, "completed", "failed"), within_s=30)
    job = await client.get(job_id)
    assert job["status"] == "completed", job.get("error")
    result = json.loads(job["result"])
    assert [o["name"] for o in result["outputs"]] == ["image-000.png", "image-001.png"]
    assert all(o["content_type"] == "image/png" for o in result["outputs"])
    assert result["metadata"]["seeds"] == [5, 6] and result["metadata"]["model"] == "v1-5-pruned-emaonly"
    values = [float(e.data["progress"]) for e in await client.events(job_id) if e.kind == "progress"]
    assert len(values) >= 4 and values == sorted(values) and len({v for v in values if 0 < v < 100}) >= 3


async def _is(client: Client, job_id: str, *statuses: str) -> bool:
    return await _status(client, job_id) in statuses


async def test_cancel_reaches_a1111s_interrupt_and_the_job_ends_cancelled(
    client: Client, start_worker: WorkerFactory, fake: FakeA1111
) -> None:
    await start_worker("a1111-c", connectors="a1111")
    job_id = await client.submit("a1111", small(steps=3000))
    await wait_until(lambda: fake.engine.state.sampling_step >= 5, within_s=20)
    await client.cancel(job_id)
    await wait_until(lambda: fake.interrupts == 1, within_s=10)
    await wait_until(lambda: bool(fake.engine.generations) and fake.engine.generations[0].done, within_s=10)
    [generation] = fake.engine.generations
    assert generation.interrupted and generation.steps_done < 3000
    job = await client.get(job_id)
    kinds = [e.kind for e in await client.events(job_id)]
    assert job["status"] == "cancelled" and not job.get("result") and "completed" not in kinds


async def test_drain_interrupts_a1111_and_hands_the_job_back(
    client: Client, start_worker: WorkerFactory, fake: FakeA1111
) -> None:
    worker = await start_worker("a1111-drain", connectors="a1111", grace_period_s=0.2)
    job_id = await client.submit("a1111", small(steps=3000))
    await wait_until(lambda: fake.engine.state.sampling_step >= 5, within_s=20)
    worker.request_stop()
    await wait_until(lambda: fake.interrupts == 1, within_s=15)
    await wait_until(lambda: _is(client, job_id, "pending"), within_s=15)
    assert fake.engine.generations[0].interrupted and not (await client.get(job_id)).get("result")


async def test_a_timed_out_job_is_interrupted_and_its_retry_is_not(
    client: Client, start_worker: WorkerFactory, fake: FakeA1111
) -> None:
    """The retry of a timed-out job, claimed here at once, shares its id: the first attempt's
    interrupt must stop only the first attempt's generation."""
    await start_worker("a1111-timeout", connectors="a1111")
    job_id = await client.submit("a1111", small(steps=3000, timeout_seconds=1), max_retries=2)
    await wait_until(lambda: _is(client, job_id, "failed"), within_s=40)
    failures = [e.data["error"] for e in await client.events(job_id) if e.kind in ("retry", "failed")]
    assert len(failures) >= 2 and all("timed out" in f for f in failures), failures
    assert all(g.interrupted for g in fake.engine.generations) and fake.interrupts == len(fake.engine.generations)


async def test_a_killed_engine_fails_the_job_retryable_and_claiming_waits_for_its_return(
    client: Client, start_worker: WorkerFactory, fake: FakeA1111
) -> None:
    # a failed worker keeps off the job for 3 s (EMP_RETRY_EXCLUSION_S) as in production, where it is 30 s
    worker = await start_worker("a1111-k", connectors="a1111", retry_exclusion_s=3)
    [engine] = worker.engines
    assert isinstance(engine.connector, A1111Connector)
    job_id = await client.submit("a1111", small(steps=5000), max_retries=10)
    await wait_until(lambda: fake.engine.state.sampling_step >= 3, within_s=20)
    await fake.kill()
    await wait_until(lambda: _retried(client, job_id), within_s=10)  # retryable, within 10 s
    assert "a1111" in (await client.get(job_id))["error"]
    await wait_until(lambda: not engine.can_claim, within_s=10)  # health DOWN: claiming stops
    await wait_until(lambda: _down_in_record(client), within_s=10)
    tries = (await client.get(job_id))["retry_count"]
    await _beats(client, "a1111-k", 2)
    assert await _status(client, job_id) == "pending" and (await client.get(job_id))["retry_count"] == tries
    await fake.restart()
    fake.engine.step_s = 0.0002  # the restarted engine runs the job through quickly
    await wait_until(lambda: _is(client, job_id, "completed"), within_s=30)  # claimed again once healthy
    assert fake.engine.generations and fake.engine.generations[0].done


async def _retried(client: Client, job_id: str) -> bool:
    return int((await client.get(job_id)).get("retry_count", "0") or 0) >= 1


async def _down_in_record(client: Client) -> bool:
    return any("connector a1111 is down" in p for w in await client.workers() for p in w.problems)


async def _beats(client: Client, worker_id: str, count: int) -> None:
    """Wait until the worker has beaten `count` more times (its record's last_heartbeat moves)."""
    key = client.keys.worker(worker_id)
    for _ in range(count):
        before = await client.redis.hget(key, "last_heartbeat")
        await wait_until(lambda b=before: _moved(client, key, b), within_s=10)


async def _moved(client: Client, key: str, before: str | None) -> bool:
    return bool(await client.redis.hget(key, "last_heartbeat") != before)


async def test_images_go_to_the_output_store_not_into_redis(
    client: Client, start_worker: WorkerFactory, fake: FakeA1111, output_dir: Path
) -> None:
    await start_worker("a1111-i", connectors="a1111", output_inline_bytes=1024 * 1024)
    job_id = await client.submit("a1111", small(width=24, height=8))
    await wait_until(lambda: _is(client, job_id, "completed", "failed"), within_s=30)
    job = await client.get(job_id)
    [output] = json.loads(job["result"])["outputs"]
    stored = Path(urlsplit(output["url"]).path)
    assert stored.is_relative_to(output_dir) and png_size(await asyncio.to_thread(stored.read_bytes)) == (24, 8)
    assert "data_base64" not in output and "iVBORw0KGgo" not in job["result"]  # no base64 PNG in Redis
