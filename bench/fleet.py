"""Fleet: N worker slots (asyncio Worker instances, a few processes, real heartbeats, listeners,
wake-token waits and claim scripts, the simulation connector at 0 s) against M pending jobs of
mixed services and requirements; then the idle fleet gets a trickle of single jobs.

Figures: sustained claims/s, claim p99 (as the slots time it), Redis CPU (INFO cpu), Redis commands
per claimed job while draining (INFO commandstats: every command, those inside scripts too), and,
for the trickle: Redis commands per job submitted to the idle fleet, read from MONITOR (the lines
clients sent, and those with the calls inside scripts, tagged ``lua``), net of what the idle fleet
sends anyway (its heartbeats and slow polls, counted over as long a window just before), the claim
scripts per such job, and the longest wait of a matchable job (claimed_us - submitted_us, both
stamped by Redis).

Layout: a heartbeat every HEARTBEAT_S (a lease of LEASE_S) rather than the default 2 s: with 250
slots in one event loop on a shared 2-core machine, 2 s beats and their refresh turns alone keep
the loops so busy that leases run out (the issue's fleet: 1,000 slots as asyncio tasks over a few
processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
from worker.scripts import ALL
from worker.settings import load_settings

PROCESSES = 4
HEARTBEAT_S, LEASE_S = 5.0, 30.0
POLL_S = 5.0  # the default slow poll
TRICKLE_JOBS, TRICKLE_PER_S = 40, 5.0  # single jobs to the idle fleet, paced
TRICKLE_TAIL_S = 1.0  # the window goes on this long after the last submission (its job's run)
CLAIM_SHA = hashlib.sha1(ALL["claim"].encode()).hexdigest()
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
                             machine_id=f"fleet-{index}", heartbeat_interval_s=HEARTBEAT_S, lease_s=LEASE_S,
                             poll_interval_s=POLL_S)
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


class Monitor:
    """MONITOR lines while a block runs: those clients sent (top-level, claim scripts apart) and
    those of the calls inside scripts (``[db lua]``). Replies are read raw, not parsed, so that
    the counting keeps up with a fleet's few thousand lines a second."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.top = self.lua = self.claims = 0

    async def count(self, seconds: float, during: Any = None) -> Monitor:
        redis = connect(self.url)
        async with redis.monitor() as monitor:
            conn = monitor.connection
            assert conn is not None

            async def read() -> None:
                while True:
                    line = await conn.read_response()
                    head = line[:64] if isinstance(line, str) else ""
                    if " lua]" in head:
                        self.lua += 1
                    else:
                        self.top += 1
                        self.claims += CLAIM_SHA in line[:200]

            reader = asyncio.create_task(read())
            began = time.monotonic()
            if during is not None:
                await during
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))  # the rest of the window
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await redis.aclose()
        return self


async def _blpops(client: Client) -> int:
    stats = await client.redis.info("commandstats")
    return int(stats.get("cmdstat_blpop", {}).get("calls", 0))


async def _settled(client: Client, slots: int, within_s: float = 120.0) -> None:
    """Wait for the idle fleet's steady state: the slots' BLPOPs at about one per slow poll each.
    Right after the drain the tokens of the jobs no slot can run still hop from slot to slot (up
    to 16 claims each, lib/wake.lua), which would count as the trickle's."""
    deadline = time.monotonic() + within_s
    steady = slots / POLL_S * 1.3
    while time.monotonic() < deadline:
        before = await _blpops(client)
        await asyncio.sleep(2.0)  # a sampling window
        if (await _blpops(client) - before) / 2.0 <= steady:
            return


async def _trickle(client: Client, url: str, jobs: int, per_s: float, done_before: int) -> dict[str, Any]:
    """Single matchable jobs to the idle fleet, paced: their waits in ms and the Redis commands
    they cost (MONITOR), net of the idle fleet's own over as long a window just before."""
    window = jobs / per_s + TRICKLE_TAIL_S
    idle = await Monitor(url).count(window)
    ids: list[str] = []

    async def submit() -> None:
        for _ in range(jobs):
            ids.append(await client.submit("simulation", SIM_PAYLOAD))
            await asyncio.sleep(1 / per_s)  # the pace of the trickle

    busy = await Monitor(url).count(window, submit())
    key = client.keys.completed
    await wait_for(lambda: _at_least(client, key, done_before + jobs), 60, "trickle completed")
    waits = []
    for job_id in ids:
        job = await client.get(job_id)
        waits.append((int(job["emp_claimed_us"]) - int(job["emp_submitted_us"])) / 1000)
    return {"waits": waits, "top": (busy.top - idle.top) / jobs,
            "all": (busy.top + busy.lua - idle.top - idle.lua) / jobs,
            "claims": (busy.claims - idle.claims) / jobs, "idle_top_per_s": idle.top / window}


async def _at_least(client: Client, key: str, count: int) -> bool:
    return int(await client.redis.hlen(key)) >= count


async def _drain(url: str, prefix: str, jobs: int, slots: int, children: list[Any], ready: Any) -> dict[str, Any]:
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
    await _settled(client, slots)
    trickle = await _trickle(client, url, TRICKLE_JOBS, TRICKLE_PER_S, matchable)
    await client.redis.aclose()
    return {"matchable": matchable, "elapsed": elapsed, "slots_up": slots_up,
            "cpu": (after["cpu_s"] - before["cpu_s"]) / elapsed,
            "calls_per_job": (after["calls"] - before["calls"]) / matchable, **trickle}


def run(url: str, slots: int, jobs: int, prefix: str = "fleet:") -> list[Figure]:
    ctx = multiprocessing.get_context("spawn")
    stop, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = min(PROCESSES, slots)
    children = [ctx.Process(target=_child, args=(url, prefix, i, slots // procs + (i < slots % procs),
                                                 stop, ready, out)) for i in range(procs)]
    try:
        got = asyncio.run(_drain(url, prefix, jobs, slots, children, ready))
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
        Figure("fleet", "Redis commands per job submitted to the idle fleet, top-level (sent by clients)",
               got["top"], "cmd/job", note=f"{len(got['waits'])} jobs at {TRICKLE_PER_S:g}/s, MONITOR, net of the "
               f"idle fleet's own {got['idle_top_per_s']:,.0f} cmd/s"),
        Figure("fleet", "Redis commands per job submitted to the idle fleet, in all (script-inner calls too)",
               got["all"], "cmd/job"),
        Figure("fleet", "claim scripts per job submitted to the idle fleet", got["claims"], "claims/job"),
        Figure("fleet", "leases lost (a slot's process too busy to heartbeat in time)", leases_lost, "jobs",
               note=f"{warnings} warnings in all"),
        Figure("fleet", "longest wait of a matchable job (idle fleet)", max(got["waits"]), "ms",
               pct(got["waits"], .5), "p50 wait"),
    ]
