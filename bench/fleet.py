"""Fleet: N worker slots (asyncio Worker instances, a few processes, real heartbeats, listeners and
claim scripts, the simulation connector at 0 s) against M pending jobs of mixed services and
requirements; then the idle fleet gets a trickle of single jobs.

Figures: sustained claims/s, claim p99 (as the slots time it), Redis CPU (INFO cpu), Redis commands
per job (INFO commandstats: every command, those inside scripts too), and the longest wait of a
matchable job submitted to the idle fleet (claimed_us - submitted_us, both stamped by Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from multiprocessing.synchronize import Event
from typing import Any

from bench.common import SIM_PAYLOAD, Figure, info, pct, submit_many, wait_for
from connectors.base import ConnectorConfig
from connectors.manager import Plugins
from worker.agent import Worker
from worker.client import Client, connect
from worker.keys import Keys
from worker.settings import load_settings

PROCESSES = 4
TRICKLE_JOBS, TRICKLE_PER_S = 20, 5.0  # single jobs to the idle fleet, paced
# (share of jobs, service, requirements, matchable): slots are half 24 GB, half 48 GB
MIX: tuple[tuple[int, str, dict[str, Any], bool], ...] = (
    (6, "simulation", {}, True),
    (2, "simulation", {"hardware": {"gpu_memory_gb": 48}}, True),
    (1, "simulation", {"hardware": {"gpu_memory_gb": 80}}, False),
    (1, "other-service", {}, False),
)


class _Counter(logging.Handler):
    """Counts the slots' warnings (instead of printing them); lease losses apart."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings = self.leases_lost = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings += 1
        self.leases_lost += str(record.msg).startswith("job %s is no longer held")


async def _slots(url: str, prefix: str, index: int, count: int, stop: Event,
                 ready: Any) -> tuple[list[float], int, int]:
    counter = _Counter()
    logging.getLogger().addHandler(counter)
    settings = load_settings(redis_url=url, key_prefix=prefix, connectors="simulation",
                             machine_id=f"fleet-{index}")
    client = connect(url)
    plugins = Plugins()
    samples: list[float] = []
    workers = []
    for s in range(count):
        worker_id = f"fleet-{index}-{s}"
        hardware = {"gpu_memory_gb": 48 if s % 2 else 24, "gpu_model": "fake", "ram_gb": 64, "cpu_cores": 8}
        worker = Worker(settings, client, plugins.create_connectors(settings.connector_names,
                                                                    ConnectorConfig(worker_id, None)),
                        worker_id=worker_id, hardware=hardware, plugins=plugins)
        _time_claims(worker, samples)
        workers.append(worker)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    deadline = time.monotonic() + 120
    while not all(w.state.value in ("idle", "busy") for w in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # waiting on our own slots' start-up
    ready.put(index)
    await asyncio.to_thread(stop.wait, 900)
    for w in workers:
        w.request_stop()
        w.fast_stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    await client.aclose()
    return samples, counter.warnings, counter.leases_lost


def _time_claims(worker: Worker, samples: list[float]) -> None:
    """Record each claim script's round trip (ms), as the slot sees it."""
    original = worker.queue.claim_or_defer

    async def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            samples.append((time.perf_counter() - began) * 1000)

    setattr(worker.queue, "claim_or_defer", timed)  # noqa: B010 -- instrumenting one instance


def _child(url: str, prefix: str, index: int, count: int, stop: Event, ready: Any, out: Any) -> None:
    out.put(asyncio.run(_slots(url, prefix, index, count, stop, ready)))


async def _fill(client: Client, jobs: int) -> int:
    """Submit the mix; returns how many of them some slot can run."""
    weights = [share for share, *_ in MIX]
    plan = [kind for kind, share in enumerate(weights) for _ in range(share)]

    async def one(i: int) -> str:
        _, service, requirements, _ = MIX[plan[i % len(plan)]]
        return await client.submit(service, SIM_PAYLOAD, priority=50 + i % 3, requirements=requirements or None)

    await submit_many(client, jobs, one)
    return sum(1 for i in range(jobs) if MIX[plan[i % len(plan)]][3])


async def _trickle(client: Client, jobs: int, per_s: float, done_before: int) -> list[float]:
    """Single matchable jobs to the idle fleet, paced; their waits in ms."""
    ids = []
    for _ in range(jobs):
        ids.append(await client.submit("simulation", SIM_PAYLOAD))
        await asyncio.sleep(1 / per_s)  # the pace of the trickle
    key = client.keys.completed
    await wait_for(lambda: _at_least(client, key, done_before + jobs), 60, "trickle completed")
    waits = []
    for job_id in ids:
        job = await client.get(job_id)
        waits.append((int(job["emp_claimed_us"]) - int(job["emp_submitted_us"])) / 1000)
    return waits


async def _at_least(client: Client, key: str, count: int) -> bool:
    return int(await client.redis.hlen(key)) >= count


async def _drain(url: str, prefix: str, jobs: int, ctx: Any, children: list[Any], ready: Any) -> dict[str, Any]:
    client = Client(connect(url), Keys(prefix))
    matchable = await _fill(client, jobs)
    before, started = await info(client.redis), time.time()
    for child in children:
        child.start()
    for _ in children:
        await asyncio.to_thread(ready.get, True, 180)
    slots_up = time.time() - started
    await wait_for(lambda: _at_least(client, client.keys.completed, matchable), 900, "fleet drained", 0.05)
    ended = time.time()
    after = await info(client.redis)
    elapsed = ended - started
    # claims run from the first slot's start: the rate is over the whole window, start-up included
    idle_before = await info(client.redis)
    trickle_jobs = TRICKLE_JOBS
    waits = await _trickle(client, trickle_jobs, TRICKLE_PER_S, matchable)
    idle_after = await info(client.redis)
    await client.redis.aclose()
    return {"matchable": matchable, "elapsed": elapsed, "slots_up": slots_up,
            "cpu": (after["cpu_s"] - before["cpu_s"]) / elapsed,
            "calls_per_job": (after["calls"] - before["calls"]) / matchable,
            "idle_calls_per_job": (idle_after["calls"] - idle_before["calls"]) / trickle_jobs,
            "waits": waits}


def run(url: str, slots: int, jobs: int, prefix: str = "fleet:") -> list[Figure]:
    ctx = multiprocessing.get_context("spawn")
    stop, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = min(PROCESSES, slots)
    children = [ctx.Process(target=_child, args=(url, prefix, i, slots // procs + (i < slots % procs),
                                                 stop, ready, out)) for i in range(procs)]
    try:
        got = asyncio.run(_drain(url, prefix, jobs, ctx, children, ready))
    finally:
        stop.set()
    samples: list[float] = []
    warnings = leases_lost = 0
    for _ in children:
        got_samples, got_warnings, got_lost = out.get(timeout=120)
        samples += got_samples
        warnings, leases_lost = warnings + got_warnings, leases_lost + got_lost
    for child in children:
        child.join(30)
    rate = got["matchable"] / got["elapsed"]
    size = f"{slots} slots, {jobs:,} jobs, {got['matchable']:,} matchable; slots up in {got['slots_up']:.1f}s"
    return [
        Figure("fleet", "sustained claims/s (start-up included)", rate, "claims/s", note=size),
        Figure("fleet", "claim p99 (as the slots time it)", pct(samples, .99), "ms", pct(samples, .5), "claim p50"),
        Figure("fleet", "Redis CPU while draining", got["cpu"] * 100, "% of a core"),
        Figure("fleet", "Redis commands per claimed job (draining)", got["calls_per_job"], "cmd/job"),
        Figure("fleet", "Redis commands per job submitted to the idle fleet", got["idle_calls_per_job"], "cmd/job",
               note=f"{len(got['waits'])} jobs at {TRICKLE_PER_S:g}/s"),
        Figure("fleet", "leases lost (a slot's process too busy to heartbeat in time)", leases_lost, "jobs",
               note=f"{warnings} warnings in all"),
        Figure("fleet", "longest wait of a matchable job (idle fleet)", max(got["waits"]), "ms",
               pct(got["waits"], .5), "p50 wait"),
    ]
