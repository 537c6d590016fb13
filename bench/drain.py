"""Drain: no-op simulation jobs from submitted to a completed record, through 1 and 4 real
`emp-worker run` processes (progress, leases and events on), against a same-run bare claim + bare
complete from as many processes."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Any

from bench.claimers import run_claimers
from bench.common import WORKER_EXE, Figure, bare_fill, info, submit_many, wait_for
from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.keys import Keys


def worker_env(url: str, prefix: str, worker_id: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "EMP_REDIS_URL": url, "EMP_KEY_PREFIX": prefix, "EMP_CONNECTORS": "simulation",
            "EMP_WORKER_ID": worker_id, "EMP_MACHINE_ID": worker_id, "EMP_LOG_LEVEL": "INFO", **extra}


@dataclasses.dataclass(frozen=True)
class Variant:
    """How to start a worker: the installed one, or another source tree (e.g. a git worktree of an
    earlier commit) run as `python -m worker run` with PYTHONPATH."""

    label: str = "this tree"
    tree: str = ""
    pythonpath: str = ""
    wrap: tuple[str, ...] = ()  # e.g. a profiler's command line, before the worker's

    def command(self) -> list[str]:
        return [*self.wrap, *([sys.executable, "-m", "worker", "run"] if self.tree else [str(WORKER_EXE), "run"])]

    def env(self) -> dict[str, str]:
        path = ":".join(p for p in (self.pythonpath, self.tree) if p)
        return {"PYTHONPATH": path} if path else {}


def start_workers(url: str, prefix: str, count: int, variant: Variant = Variant()) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes; their log lines (INFO, as operators run them) go to /dev/null."""
    return [subprocess.Popen(variant.command(), cwd=variant.tree or None, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env=worker_env(url, prefix, f"drain-{prefix.strip(':')}-{i}", **variant.env()))
            for i in range(count)]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclasses.dataclass(frozen=True)
class Drained:
    rate: float  # jobs/s from the first claim (server time) to the last completed record
    calls_per_job: float  # Redis commands per job (INFO commandstats, those inside scripts too)
    redis_cpu_us_per_job: float  # Redis CPU (INFO cpu) per job


async def drain_rate(url: str, prefix: str, jobs: int, workers: int, variant: Variant = Variant()) -> Drained:
    client = Client(connect(url), Keys(prefix))
    ids = await submit_many(client, jobs)
    before = await info(client.redis)
    procs = start_workers(url, prefix, workers, variant)
    try:
        completed = client.keys.completed
        await wait_for(lambda: _count_is(client, completed, jobs), 300, f"{jobs} completed", interval=0.005)
        ended = time.time()
        after = await info(client.redis)
    finally:
        stop_workers(procs)
    async with client.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(client.keys.job(job_id), "emp_claimed_us")
        claimed = [int(v) for v in await pipe.execute() if v]
    await client.redis.aclose()
    return Drained(jobs / (ended - min(claimed) / 1e6), (after["calls"] - before["calls"]) / jobs,
                   (after["cpu_s"] - before["cpu_s"]) / jobs * 1e6)


async def _count_is(client: Client, key: str, jobs: int) -> bool:
    return int(await client.redis.hlen(key)) >= jobs


async def _info(url: str) -> dict[str, Any]:
    redis = connect(url)
    got = await info(redis)
    await redis.aclose()
    return got


async def _fill_bare(url: str, prefix: str, jobs: int) -> None:
    redis = connect(url)
    await bare_fill(redis, prefix, jobs)
    await redis.aclose()


def run(url: str, jobs: int, levels: tuple[int, ...] = (1, 4), tag: str = "") -> list[Figure]:
    figures = []
    for n in levels:
        asyncio.run(_fill_bare(url, f"dbare{n}{tag}:", jobs))
        before = asyncio.run(_info(url))
        _, bare = run_claimers(url, f"dbare{n}{tag}:", "bare_cc", n)
        after = asyncio.run(_info(url))
        bare_calls = (after["calls"] - before["calls"]) / jobs
        bare_cpu = (after["cpu_s"] - before["cpu_s"]) / jobs * 1e6
        real = asyncio.run(drain_rate(url, f"drain{n}{tag}:", jobs, n))
        figures.append(Figure("drain", f"drain, {n} worker process(es)", real.rate, "jobs/s", bare,
                              "bare claim+complete", note=f"{jobs} jobs"))
        figures.append(Figure("drain", f"Redis commands per job, {n} worker(s)", real.calls_per_job, "cmd/job",
                              bare_calls, "bare claim+complete"))
        figures.append(Figure("drain", f"Redis CPU per job, {n} worker(s)", real.redis_cpu_us_per_job, "us/job",
                              bare_cpu, "bare claim+complete"))
    return figures


def compare(url: str, jobs: int, levels: tuple[int, ...], variants: list[Variant], rounds: int) -> list[Figure]:
    """Each variant's drain beside the same bare baseline, interleaved over `rounds` (best of)."""
    best: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        for n in levels:
            asyncio.run(_fill_bare(url, f"cbare{n}-{r}:", jobs))
            _, bare = run_claimers(url, f"cbare{n}-{r}:", "bare_cc", n)
            best[("bare", n)] = max(best.get(("bare", n), 0.0), bare)
            for v, variant in enumerate(variants):
                rate = asyncio.run(drain_rate(url, f"cmp{v}-{n}-{r}:", jobs, n, variant)).rate
                best[(variant.label, n)] = max(best.get((variant.label, n), 0.0), rate)
    return [Figure("drain", f"{variant.label}, {n} worker process(es)", best[(variant.label, n)], "jobs/s",
                   best[("bare", n)], "bare claim+complete", note=f"{jobs} jobs, best of {rounds}")
            for n in levels for variant in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description="drain, this tree against other trees, in one run")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tree", action="append", default=[],
                        help="LABEL=PATH[:EXTRA_PYTHONPATH], e.g. before=/tmp/wt:/tmp/no-hiredis")
    args = parser.parse_args()
    variants = [Variant()]
    for spec in args.tree:
        label, _, rest = spec.partition("=")
        tree, _, extra = rest.partition(":")
        variants.append(Variant(label, tree, extra))
    with EmbeddedRedis() as server:
        for figure in compare(server.url, args.jobs, tuple(int(n) for n in args.levels.split(",")), variants,
                              args.rounds):
            print(figure.line(), flush=True)


if __name__ == "__main__":
    main()
