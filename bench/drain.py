"""Drain: no-op simulation jobs from submitted to a completed record, through 1 and 4 real
`emp-worker run` processes (progress, leases and events on), against a same-run bare claim + bare
complete from as many processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from bench.claimers import run_claimers
from bench.common import WORKER_EXE, Figure, bare_fill, submit_many, wait_for
from worker.client import Client, connect
from worker.keys import Keys


def worker_env(url: str, prefix: str, worker_id: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "EMP_REDIS_URL": url, "EMP_KEY_PREFIX": prefix, "EMP_CONNECTORS": "simulation",
            "EMP_WORKER_ID": worker_id, "EMP_MACHINE_ID": worker_id, "EMP_LOG_LEVEL": "INFO", **extra}


def start_workers(url: str, prefix: str, count: int, command: Sequence[str] = ()) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes; their log lines (INFO, as operators run them) go to /dev/null."""
    cmd = list(command) or [str(WORKER_EXE), "run"]
    return [subprocess.Popen(cmd, env=worker_env(url, prefix, f"drain-{prefix.strip(':')}-{i}"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(count)]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def drain_rate(url: str, prefix: str, jobs: int, workers: int, command: Sequence[str] = ()) -> float:
    """jobs/s from the first claim (server time) to the last completed record."""
    client = Client(connect(url), Keys(prefix))
    ids = await submit_many(client, jobs)
    procs = start_workers(url, prefix, workers, command)
    try:
        completed = client.keys.completed
        await wait_for(lambda: _count_is(client, completed, jobs), 300, f"{jobs} completed", interval=0.005)
        ended = time.time()
    finally:
        stop_workers(procs)
    async with client.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(client.keys.job(job_id), "emp_claimed_us")
        claimed = [int(v) for v in await pipe.execute() if v]
    await client.redis.aclose()
    return jobs / (ended - min(claimed) / 1e6)


async def _count_is(client: Client, key: str, jobs: int) -> bool:
    return int(await client.redis.hlen(key)) >= jobs


async def _fill_bare(url: str, prefix: str, jobs: int) -> None:
    redis = connect(url)
    await bare_fill(redis, prefix, jobs)
    await redis.aclose()


def run(url: str, jobs: int, levels: tuple[int, ...] = (1, 4), tag: str = "") -> list[Figure]:
    figures = []
    for n in levels:
        asyncio.run(_fill_bare(url, f"dbare{n}{tag}:", jobs))
        _, bare = run_claimers(url, f"dbare{n}{tag}:", "bare_cc", n)
        real = asyncio.run(drain_rate(url, f"drain{n}{tag}:", jobs, n))
        figures.append(Figure("drain", f"drain, {n} worker process(es)", real, "jobs/s", bare,
                              "bare claim+complete", note=f"{jobs} jobs"))
    return figures
