"""Fleet: N worker slots (asyncio Worker instances, a few processes, real heartbeats, listeners,
wake-token waits and claim scripts, the simulation connector at 0 s) against M pending jobs of
mixed services and requirements; then the idle fleet gets a trickle of single jobs.

Figures: sustained claims/s, claim p99 (as the slots time it), Redis CPU (INFO cpu), Redis commands
per claimed job while draining (INFO commandstats: every command, those inside scripts too), and,
for the trickle: Redis commands per job submitted to the idle fleet, read from MONITOR (the lines
clients sent, and those with the calls inside scripts, tagged ``lua``) beside an equal window of the
idle fleet just before (see Monitor and _trickle: its periodic beats and polls are told apart, so
that their jitter does not blur the count), the claim scripts per such job, and the longest wait
of a matchable job (claimed_us - submitted_us, both stamped by Redis).

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
import re
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
TRICKLE_JOBS, TRICKLE_PER_S = 50, 5.0  # single jobs to the idle fleet, paced
TRICKLE_TAIL_S = 1.0  # the window goes on this long after the last submission (its job's run)
CLAIM_SHA = hashlib.sha1(ALL["claim"].encode()).hexdigest()
HEARTBEAT_SHA = hashlib.sha1(ALL["heartbeat"].encode()).hexdigest()
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


async def _fill(client: Client, jobs: int) -> tuple[int, list[str]]:
    """Submit the mix; returns how many of them some slot can run, and every id."""
    weights = [share for share, *_ in MIX]
    plan = [kind for kind, share in enumerate(weights) for _ in range(share)]

    async def one(i: int) -> str:
        _, service, requirements, _ = MIX[plan[i % len(plan)]]
        return await client.submit(service, SIM_PAYLOAD, priority=50 + i % 3, requirements=requirements or None)

    ids = await submit_many(client, jobs, one)
    return sum(1 for i in range(jobs) if MIX[plan[i % len(plan)]][3]), ids


async def _ran_again(client: Client, ids: list[str]) -> int:
    """Jobs claimed more than once (attempt > 1): a lease that ran out for real and was reaped."""
    again = 0
    for start in range(0, len(ids), 1000):
        async with client.redis.pipeline(transaction=False) as pipe:
            for job_id in ids[start:start + 1000]:
                pipe.hget(client.keys.job(job_id), "attempt")
            again += sum(1 for a in await pipe.execute() if a and int(a) > 1)
    return again


class Monitor:
    """MONITOR lines while a block runs, in two parts: the idle fleet's periodic lines (heartbeats,
    BLPOPs, claims with no wake token behind them: the slow poll) and the rest; each part as the
    lines clients sent (top-level) and in all (with the calls inside their scripts, the ``[db lua]``
    lines that follow a script's own line). Replies are read raw, not parsed, so that the counting
    keeps up with a fleet's few thousand lines a second."""

    def __init__(self, url: str) -> None:
        self.url = url
        # [periodic, other] x [top-level, in all]; token claims (claims with a hop count) apart
        self.top, self.all = [0, 0], [0, 0]
        self.plain_claims = self.plain_claim_calls = self.token_claims = 0

    def _line(self, line: str, last: list[int]) -> None:
        if " lua]" in line[:64]:
            self.all[last[0]] += 1
            self.plain_claim_calls += last[1]
            return
        periodic, plain = _periodic(line)
        last[:] = [0 if periodic else 1, plain]
        self.top[last[0]] += 1
        self.all[last[0]] += 1
        self.plain_claims += plain
        self.token_claims += CLAIM_SHA in line[:200] and not plain

    async def count(self, seconds: float, during: Any = None) -> Monitor:
        redis = connect(self.url)
        async with redis.monitor() as monitor:
            conn = monitor.connection
            assert conn is not None

            async def read() -> None:
                last = [1, 0]
                while True:
                    line = await conn.read_response()
                    if isinstance(line, str):
                        self._line(line, last)

            reader = asyncio.create_task(read())
            began = time.monotonic()
            if during is not None:
                await during
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))  # the rest of the window
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await redis.aclose()
        return self


_CLAIM_TAIL = re.compile(r'"([^"]*)" "[^"]*"$')  # a claim's last two arguments: hops, start


def _periodic(line: str) -> tuple[bool, int]:
    """(whether a MONITOR line is one of an idle slot's periodic commands, 1 if a plain claim)."""
    head = line[:200]
    if '"BLPOP"' in head or HEARTBEAT_SHA in head:
        return True, 0
    if CLAIM_SHA in head:
        tail = _CLAIM_TAIL.search(line[-64:])
        plain = tail is not None and tail.group(1) == ""
        return plain, int(plain)
    return False, 0


async def _blpops(client: Client) -> int:
    stats = await client.redis.info("commandstats")
    return int(stats.get("cmdstat_blpop", {}).get("calls", 0))


async def _settled(client: Client, slots: int, within_s: float = 180.0) -> float:
    """Wait for the idle fleet's steady state: the slots' BLPOPs at about one per slow poll each.
    Right after the drain the tokens of the jobs no slot can run still hop from slot to slot (up
    to 16 claims each, lib/wake.lua), which would count as the trickle's."""
    began = time.monotonic()
    steady = slots / POLL_S * 1.3
    while time.monotonic() < began + within_s:
        before = await _blpops(client)
        await asyncio.sleep(2.0)  # a sampling window
        if (await _blpops(client) - before) / 2.0 <= steady:
            break
    return time.monotonic() - began


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
    # The job's runner looks for its next job once more (a plain claim) and waits again (a BLPOP):
    # those two hide among the fleet's periodic lines, so they are added as they cost in the idle
    # window; the rest (submit, token claims, progress, complete, publishes...) is counted exactly.
    claim_all = 1 + idle.plain_claim_calls / max(1, idle.plain_claims)
    periodic_net = (busy.top[0] - idle.top[0]) / jobs
    return {"waits": waits, "top": (busy.top[1] - idle.top[1]) / jobs + 2,
            "all": (busy.all[1] - idle.all[1]) / jobs + claim_all + 1,
            "claims": (busy.token_claims - idle.token_claims) / jobs + 1,
            "periodic_net": periodic_net, "idle_top_per_s": (idle.top[0] + idle.top[1]) / window}


async def _at_least(client: Client, key: str, count: int) -> bool:
    return int(await client.redis.hlen(key)) >= count


async def _drain(url: str, prefix: str, jobs: int, slots: int, children: list[Any], ready: Any) -> dict[str, Any]:
    client = Client(connect(url), Keys(prefix))
    matchable, ids = await _fill(client, jobs)
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
    settled_s = await _settled(client, slots)
    trickle = await _trickle(client, url, TRICKLE_JOBS, TRICKLE_PER_S, matchable)
    got = {"matchable": matchable, "elapsed": elapsed, "slots_up": slots_up,
           "cpu": (after["cpu_s"] - before["cpu_s"]) / elapsed,
           "calls_per_job": (after["calls"] - before["calls"]) / matchable,
           "ran_again": await _ran_again(client, ids), "settled_s": settled_s, **trickle}
    await client.redis.aclose()
    return got


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
               got["top"], "cmd/job", note=f"{len(got['waits'])} jobs at {TRICKLE_PER_S:g}/s, MONITOR "
               f"{got['settled_s']:.0f}s after the drain; beside the idle fleet's own "
               f"{got['idle_top_per_s']:,.0f} cmd/s, whose periodic lines (beats, polls) "
               f"changed by {got['periodic_net']:+.1f} per job over an equal window"),
        Figure("fleet", "Redis commands per job submitted to the idle fleet, in all (script-inner calls too)",
               got["all"], "cmd/job"),
        Figure("fleet", "claim scripts per job submitted to the idle fleet", got["claims"], "claims/job",
               note="the token's claims and the runner's next look"),
        Figure("fleet", "leases lost (a slot's process too busy to heartbeat in time)", leases_lost, "jobs",
               note=f"{warnings} warnings in all; a job that completed while its slot's beat was under way "
               "counts too"),
        Figure("fleet", "jobs that ran again (their lease ran out and they were reaped)", got["ran_again"], "jobs"),
        Figure("fleet", "longest wait of a matchable job (idle fleet)", max(got["waits"]), "ms",
               pct(got["waits"], .5), "p50 wait"),
    ]
