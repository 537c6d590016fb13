"""One agent, two fake GPUs (24 GB and 80 GB), two worker slots: the right job on the right GPU.

The agent is a real `python -m worker run` process; EMP_FAKE_GPUS drives the NVML mapping code.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tests.conftest import wait_until
from tests.procs import WorkerProcess
from tests.worker.test_cli import _cli
from worker.client import Client
from worker.keys import MODELS_FIELD, Keys

SLOT0, SLOT1 = "box-worker-simulation-0", "box-worker-simulation-1"


def agent(redis_url: str, keys: Keys, args: tuple[str, ...] = (), **env: Any) -> WorkerProcess:
    return WorkerProcess(redis_url, keys.prefix, "", args=args, EMP_MACHINE_ID="box",
                         EMP_FAKE_GPUS="24GB,80GB:Fake H100", EMP_SIM_MODELS="flux,sdxl", EMP_SIM_STEPS="2",
                         EMP_LOG_LEVEL="INFO", **env)


async def _both_slots_up(client: Client) -> None:
    async def up() -> bool:
        alive = {w.worker_id for w in await client.workers() if w.alive}
        return {SLOT0, SLOT1} <= alive

    await wait_until(up, within_s=20, interval=0.05)


async def _finished(client: Client, job_ids: list[str], within_s: float = 60) -> dict[str, dict[str, str]]:
    jobs: dict[str, dict[str, str]] = {}

    async def done() -> bool:
        for job_id in job_ids:
            jobs[job_id] = await client.get(job_id)
        return all(j.get("status") == "completed" for j in jobs.values())

    await wait_until(done, within_s=within_s, interval=0.05)
    return jobs


async def test_two_fake_gpus_advertise_their_own_memory(client: Client, redis_url: str, keys: Keys) -> None:
    async with agent(redis_url, keys) as proc:
        await _both_slots_up(client)
        records = {w: json.loads((await client.redis.hgetall(keys.worker(w)))["capabilities"])
                   for w in (SLOT0, SLOT1)}
        assert records[SLOT0]["hardware"]["gpu_memory_gb"] == 24.0
        assert records[SLOT1]["hardware"]["gpu_memory_gb"] == 80.0
        assert records[SLOT1]["hardware"]["gpu_model"] == "Fake H100"
        gpu = records[SLOT1]["gpus"][0]
        assert gpu["index"] == 1 and gpu["memory_total_gb"] == 80.0 and 0 < gpu["memory_free_gb"] < 80
        assert "models" not in records[SLOT0]  # stored once per change, not rewritten every beat:
        stored = await client.redis.hget(keys.worker(SLOT0), MODELS_FIELD)
        assert json.loads(stored) == {"simulation": ["flux", "sdxl"]}
        assert records[SLOT0]["job_service_required_map"] == ["simulation"]
        host = records[SLOT0]["host"]
        assert host["gpu_count"] == 2 and host["cuda_version"] == "12.4" and host["gpu_source"] == "fake"
        assert proc.running


async def test_a_40gb_job_only_ever_goes_to_the_80gb_slot(client: Client, redis_url: str, keys: Keys) -> None:
    async with agent(redis_url, keys, EMP_SIM_DURATION_S="0.05"):
        await _both_slots_up(client)
        big, small = [], []
        for _ in range(15):
            big.append(await client.submit("simulation", {}, requirements={"hardware": {"gpu_memory_gb": 40}}))
            small.append(await client.submit("simulation", {}))
        jobs = await _finished(client, big + small)
    assert {jobs[j]["worker_id"] for j in big} == {SLOT1}
    assert SLOT0 in {jobs[j]["worker_id"] for j in small}  # the 24 GB slot did work meanwhile


async def test_a_job_for_a_model_loaded_on_slot_1_goes_to_slot_1(client: Client, redis_url: str, keys: Keys) -> None:
    async with agent(redis_url, keys, EMP_SIM_DURATION_S="0.05"):
        await _both_slots_up(client)
        # a 40 GB flux job can only run on slot 1, which then holds flux
        first = await client.submit("simulation", {},
                                    requirements={"models": ["flux"], "hardware": {"gpu_memory_gb": 40}})
        await _finished(client, [first])
        # both slots idle, one job at a time: each flux job goes where flux is loaded
        placed: Counter[str] = Counter()
        for _ in range(12):
            job_id = await client.submit("simulation", {}, requirements={"models": ["flux"]})
            placed[(await _finished(client, [job_id]))[job_id]["worker_id"]] += 1
        assert placed == Counter({SLOT1: 12})

        # slot 1 busy: the flux job does not wait for it
        long = await client.submit("simulation", {"duration_s": 30},
                                   requirements={"models": ["flux"], "hardware": {"gpu_memory_gb": 40}})
        await wait_until(lambda: _claimed_by(client, long, SLOT1), within_s=10)
        job_id = await client.submit("simulation", {}, requirements={"models": ["flux"]})
        jobs = await _finished(client, [job_id], within_s=10)
        assert jobs[job_id]["worker_id"] == SLOT0
        await client.cancel(long)


async def _claimed_by(client: Client, job_id: str, worker_id: str) -> bool:
    job = await client.get(job_id)
    return job.get("status") in ("assigned", "in_progress") and job.get("worker_id") == worker_id


async def test_gpu_pins_one_slot(client: Client, redis_url: str, keys: Keys) -> None:
    async with agent(redis_url, keys, args=("--gpu", "1")):
        async def up() -> bool:
            return SLOT1 in {w.worker_id for w in await client.workers() if w.alive}

        await wait_until(up, within_s=20, interval=0.05)
        assert SLOT0 not in {w.worker_id for w in await client.workers()}


async def test_status_reports_jobs_no_live_worker_can_run(client: Client, redis_url: str, keys: Keys) -> None:
    async with agent(redis_url, keys, EMP_SIM_DURATION_S="30", EMP_GRACE_PERIOD_S="0"):
        await _both_slots_up(client)
        # keep both slots busy so that runnable jobs stay pending too
        for _ in range(2):
            await client.submit("simulation", {}, priority=90, requirements={"hardware": {"gpu_memory_gb": 16}})
        await client.submit("simulation", {}, requirements={"hardware": {"gpu_memory_gb": 40}})  # runnable
        for _ in range(3):
            await client.submit("simulation", {}, requirements={"hardware": {"gpu_memory_gb": 100}})
        await client.submit("a1111", {})
        code, out, _ = await _cli("status", "--json", EMP_REDIS_URL=redis_url, EMP_KEY_PREFIX=keys.prefix)
    assert code == 0
    stuck = {(u["service"], u["requirements"]): u for u in json.loads(out)["unrunnable"]}
    assert set(stuck) == {("simulation", '{"hardware": {"gpu_memory_gb": 100}}'), ("a1111", "")}
    assert stuck[("simulation", '{"hardware": {"gpu_memory_gb": 100}}')]["pending"] == 3
    assert "none meets the requirements" in stuck[("simulation", '{"hardware": {"gpu_memory_gb": 100}}')]["reason"]
    assert "no live worker runs 'a1111'" in stuck[("a1111", "")]["reason"]
