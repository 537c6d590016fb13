"""How long a dead worker's job takes to be back in the queue and running again, with the
default settings (lease 8 s, heartbeat 2 s), against a baseline measured in the same run.

    .venv/bin/python bench/recovery.py [--runs 3]

Two real `emp-worker run` processes; the one running a long job is SIGKILLed. Times are Redis
server times: kill -> job back in jobs:pending (reaped) -> claimed by the survivor. The baseline
is the lease itself: no lease-based design can recover faster than the lease it waits out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
from pathlib import Path

from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.keys import Keys
from worker.settings import load_settings


async def server_ms(client: Client) -> float:
    seconds, micros = await client.redis.time()
    return float(seconds) * 1000 + float(micros) / 1000


async def one_run(url: str, run: int) -> tuple[float, float]:
    keys = Keys(f"rec{run}:")
    client = Client(connect(url), keys)
    exe = Path(sys.executable).with_name("emp-worker")
    env = {**os.environ, "EMP_REDIS_URL": url, "EMP_KEY_PREFIX": keys.prefix, "EMP_LOG_LEVEL": "ERROR"}
    victim = await asyncio.create_subprocess_exec(str(exe), "run", env={**env, "EMP_WORKER_ID": "victim"})
    while not await client.redis.exists(keys.heartbeat("victim")):
        await asyncio.sleep(0.05)  # waiting for the process to register
    job_id = await client.submit("simulation", {"duration_s": 60, "steps": 60}, priority=50)
    while (await client.get(job_id)).get("worker_id") != "victim":
        await asyncio.sleep(0.01)
    survivor = await asyncio.create_subprocess_exec(str(exe), "run", env={**env, "EMP_WORKER_ID": "survivor"})
    while not await client.redis.exists(keys.heartbeat("survivor")):
        await asyncio.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    killed = await server_ms(client)
    requeued = claimed = 0.0
    while not claimed:
        job = await client.get(job_id)
        if not requeued and job.get("retry_count") == "1":
            requeued = await server_ms(client)
        if job.get("worker_id") == "survivor":
            claimed = int(job["emp_claimed_us"]) / 1000
            requeued = requeued or claimed
        await asyncio.sleep(0.01)
    survivor.send_signal(signal.SIGKILL)
    await survivor.wait()
    await client.redis.aclose()
    return (requeued - killed) / 1000, (claimed - killed) / 1000


async def main(runs: int) -> None:
    lease = load_settings().lease_s
    with EmbeddedRedis() as server:
        results = [await one_run(server.url, n) for n in range(runs)]
    back = [r[0] for r in results]
    running = [r[1] for r in results]
    print(f"default lease (baseline)       {lease:.2f} s")
    print(f"kill -> back in queue          mean {statistics.mean(back):.2f} s  max {max(back):.2f} s")
    print(f"kill -> claimed by survivor    mean {statistics.mean(running):.2f} s  max {max(running):.2f} s")
    print(f"ratio: recovery max / lease = {max(running) / lease:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
