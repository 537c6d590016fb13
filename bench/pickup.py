"""Pickup latency and idle Redis load of one worker, against baselines measured in the same run.

    .venv/bin/python bench/pickup.py [--jobs 300] [--idle-seconds 20]

Runs its own redis-server (so command counts are ours alone) and a real `emp-worker run` process.
Pickup latency = server time at claim - server time at submit (both stamped inside the Lua
scripts with TIME, in microseconds), for jobs submitted one at a time to an idle worker (which
waits for them with BLPOP on its wake list: the submit pushes the job's wake token there).
Idle load: what the worker sends once it waits again (its heartbeats, one BLPOP and one claim per
slow poll).
Baselines: a Redis PING round trip (the floor), and the 1 s polling loop emp-job-queue's worker
uses (WORKER_POLL_INTERVAL_MS=1000), run against the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.keys import Keys
from worker.queue import Queue, QueueConfig

CAPS = {"services": ["simulation"], "hardware": {}, "models": {}, "customer_access": {}, "custom": {}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def idle_rate(redis: aioredis.Redis, seconds: float) -> float:
    """Commands clients send per second, read from MONITOR (commands a script runs inside
    Redis are shown as 'lua' and not counted: an EVALSHA is one command on the wire)."""
    sent = 0

    async def count() -> None:
        nonlocal sent
        async with redis.monitor() as monitor:
            async for entry in monitor.listen():
                if entry.get("client_type") != "lua":
                    sent += 1

    task = asyncio.create_task(count())
    await asyncio.sleep(seconds)  # the measurement window
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return sent / seconds


async def waiting_for_tokens(redis: aioredis.Redis, timeout_s: float = 30) -> None:
    """Wait until a client is blocked in BLPOP (the worker waits for wake tokens: the last job's
    tail, its next claim and the like, is over)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.get("cmd") == "blpop" and "b" in c.get("flags", "") for c in await redis.client_list()):
            return
        await asyncio.sleep(0.01)  # polling another process's state
    raise TimeoutError("the worker did not wait for wake tokens")


async def wait_status(client: Client, job_id: str, status: str, timeout_s: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = await client.get(job_id)
        if job.get("status") == status:
            return job
        await asyncio.sleep(0.001)
    raise TimeoutError(f"job {job_id} did not reach {status}")


async def pickups(client: Client, jobs: int) -> list[float]:
    latencies = []
    for _ in range(jobs):
        job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1, "output_bytes": 0})
        job = await wait_status(client, job_id, "completed")
        latencies.append((int(job["emp_claimed_us"]) - int(job["emp_submitted_us"])) / 1000)
    return latencies


async def ping_rtt(redis: aioredis.Redis, n: int = 500) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await redis.ping()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def polling_baseline(url: str, keys: Keys, jobs: int, idle_s: float) -> tuple[list[float], float]:
    """emp-job-queue's worker loop: try a claim every 1 s."""
    conn = connect(url)
    queue = Queue(conn, keys, QueueConfig())
    stop = asyncio.Event()

    async def poller() -> None:
        while not stop.is_set():
            claimed = await queue.claim("baseline-poller", CAPS)
            if claimed is not None:
                await queue.complete(claimed.job_id, "baseline-poller", claimed.attempt, "{}")
                continue
            await asyncio.sleep(1.0)  # their WORKER_POLL_INTERVAL_MS default

    task = asyncio.create_task(poller())
    client = Client(connect(url), keys)
    latencies = await pickups(client, jobs)
    rate = await idle_rate(client.redis, idle_s)
    stop.set()
    await task
    await client.redis.aclose()
    await conn.aclose()
    return latencies, rate


async def measure(url: str, jobs: int, idle_s: float) -> dict[str, Any]:
    """Pickup latencies (ms) and idle cmd/s of the worker, the 1 s polling baseline and PING RTT."""
    client = Client(connect(url), Keys("bench:"))
    rtt = await ping_rtt(client.redis)
    base_lat, base_idle = await polling_baseline(url, Keys("baseline:"), max(10, jobs // 30), idle_s)
    env = {**os.environ, "EMP_REDIS_URL": url, "EMP_KEY_PREFIX": "bench:",
           "EMP_LOG_LEVEL": "WARNING", "EMP_CONNECTORS": "simulation", "EMP_WORKER_ID": "bench-worker"}
    exe = Path(sys.executable).with_name("emp-worker")
    proc = await asyncio.create_subprocess_exec(str(exe), "run", env=env)
    try:
        while not await client.redis.exists(client.keys.heartbeat("bench-worker")):
            await asyncio.sleep(0.05)  # polling another process's registration
        await pickups(client, 20)  # warm-up
        lat = await pickups(client, jobs)
        await waiting_for_tokens(client.redis)
        rate = await idle_rate(client.redis, idle_s)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    await client.redis.aclose()
    return {"rtt": rtt, "base_lat": base_lat, "base_idle": base_idle, "lat": lat, "idle": rate}


async def main(jobs: int, idle_s: float) -> None:
    with EmbeddedRedis() as server:
        got = await measure(server.url, jobs, idle_s)
    rtt, base_lat, base_idle, lat, rate = got["rtt"], got["base_lat"], got["base_idle"], got["lat"], got["idle"]
    print(f"redis PING round trip     p50 {pct(rtt, .5):7.3f} ms  p99 {pct(rtt, .99):7.3f} ms")
    print(f"1 s polling (baseline)    p50 {pct(base_lat, .5):7.1f} ms  p99 {pct(base_lat, .99):7.1f} ms"
          f"  idle {base_idle:.2f} cmd/s")
    print(f"emp-worker ({jobs} jobs)   p50 {pct(lat, .5):7.3f} ms  p99 {pct(lat, .99):7.3f} ms"
          f"  mean {statistics.mean(lat):.3f} ms  idle {rate:.2f} cmd/s")
    print(f"ratios: pickup p50 = {pct(lat, .5) / pct(rtt, .5):.1f}x PING RTT, "
          f"{pct(base_lat, .5) / pct(lat, .5):.0f}x faster than 1 s polling; "
          f"idle load {rate / base_idle:.2f}x of 1 s polling")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.idle_seconds))
