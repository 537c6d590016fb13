"""`emp-worker demo`: a private Redis, simulation workers on pretend GPUs of 24 and 80 GB, a batch
of mixed-priority jobs (some needing 40 GB, one producing a 2 MB image through the output store)
moving through the queue with live progress, and a summary table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from connectors.manager import Plugins
from worker.agent import Worker
from worker.client import Client, connect
from worker.daemon import Slot, slot_worker
from worker.embedded import EmbeddedRedis
from worker.hardware import FakeNvml, GpuReader, discover_with
from worker.keys import Keys
from worker.protocol import parse_time
from worker.settings import load_settings

PRIORITIES = (90, 70, 50, 30)
FINAL = ("completed", "failed", "cancelled")


async def run_demo(*, jobs: int, workers: int, duration_s: float, console: Console) -> bool:
    """Returns True when every job reached a final state."""
    external = os.environ.get("EMP_REDIS_URL") or os.environ.get("HUB_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if external:
            url, prefix = external, f"demo:{uuid.uuid4().hex[:8]}:"
            console.print(f"Using the configured Redis under key prefix {prefix}")
        else:
            server = stack.enter_context(EmbeddedRedis())
            url, prefix = server.url, ""
            console.print(f"Started a private redis-server on {server.url} ({server.binary})")
        return await _demo(url, prefix, jobs, workers, duration_s, console)
    return False  # unreachable; keeps type checkers content


async def _demo(url: str, prefix: str, jobs: int, workers: int, duration_s: float, console: Console) -> bool:
    settings = load_settings(redis_url=url, key_prefix=prefix, connectors="simulation",
                             heartbeat_interval_s=1.0, retry_backoff_s=0.2, retry_exclusion_s=0.0,
                             machine_id="demo", log_level="WARNING")
    plugins = Plugins()
    running: list[tuple[Worker, asyncio.Task[None]]] = []
    conns = []
    # pretend GPUs (every third one, and the last, has 80 GB), read through the NVML mapping code
    sizes = [80.0 if i % 3 == 2 or i == workers - 1 else 24.0 for i in range(workers)]
    reader = GpuReader(FakeNvml([(size, f"Fake GPU {size:g}GB") for size in sizes]), "fake")
    hardware = discover_with(reader)
    for gpu in hardware.gpus:
        conn = connect(url)
        conns.append(conn)
        slot = Slot(gpu.index, f"gpu{gpu.index}-{gpu.memory_total_gb:g}gb", gpu)
        worker = slot_worker(settings, conn, plugins, hardware, reader, slot)
        running.append((worker, asyncio.create_task(worker.run())))
    client = Client(connect(url), Keys(prefix))
    rng = random.Random(7)
    ids: list[str] = []
    try:
        for n in range(jobs):
            payload: dict[str, Any] = {"duration_s": duration_s * rng.uniform(0.5, 1.5), "steps": 10,
                       "failure_rate": 0.15, "output_bytes": 64}
            big = {"hardware": {"gpu_memory_gb": 40}} if n % 4 == 3 else None
            if n == 0:  # an engine's image: too big for the result, so it goes to the output store
                payload.update(failure_rate=0.0, outputs=[{"bytes": 2_000_000, "content_type": "image/png"}])
            ids.append(await client.submit("simulation", payload, priority=PRIORITIES[n % 4], max_retries=3,
                                           requirements=big))
        console.print(f"Submitted {jobs} jobs with priorities {', '.join(map(str, PRIORITIES))} "
                      f"(every fourth needs 40 GB of VRAM) to {workers} simulation workers on "
                      f"{', '.join(f'{size:g}' for size in sizes)} GB GPUs")
        await _watch(client, ids, console, timeout_s=120 + jobs * duration_s * 3 / workers)
        rows = [await client.get(job_id) for job_id in ids]
        console.print(_summary(rows))
        for row in rows:
            for output in json.loads(row.get("result") or "{}").get("outputs", []):
                console.print(f"Output of job {row['id'][:8]}: {output['name']} ({output['size_bytes']:,} bytes, "
                              f"{output['content_type']}) at {output.get('url', 'inline')}", highlight=False)
        return all(row.get("status") in FINAL for row in rows)
    finally:
        for worker, _task in running:
            worker.request_stop()
        await asyncio.gather(*(task for _w, task in running), return_exceptions=True)
        await client.redis.aclose()
        for conn in conns:
            await conn.aclose()
        reader.close()


async def _snapshot(client: Client, ids: list[str]) -> list[dict[str, str]]:
    async with client.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(client.keys.job(job_id), ["status", "priority", "worker_id", "retry_count"])
            pipe.hget(client.keys.job_progress(job_id), "progress")
        replies = await pipe.execute()
    rows = []
    for job_id, fields, progress in zip(ids, replies[::2], replies[1::2], strict=True):
        status, priority, worker, retries = fields
        rows.append({"id": job_id, "status": status or "?", "priority": priority or "",
                     "worker": worker or "", "retries": retries or "0", "progress": progress or "0"})
    return rows


def _live_table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="Jobs", expand=False)
    for column in ("job", "prio", "status", "progress", "worker", "retries"):
        table.add_column(column)
    for row in rows:
        pct = float(row["progress"]) if row["status"] != "completed" else 100.0
        bar = "#" * int(pct / 10) + "." * (10 - int(pct / 10))
        table.add_row(row["id"][:8], row["priority"], row["status"], f"{bar} {pct:3.0f}%",
                      row["worker"], row["retries"])
    return table


async def _watch(client: Client, ids: list[str], console: Console, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_line = ""
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while time.monotonic() < deadline:
            rows = await _snapshot(client, ids)
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["status"]] = counts.get(row["status"], 0) + 1
            line = "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            if console.is_terminal:
                live.update(_live_table(rows), refresh=True)
            elif line != last_line:
                console.print(f"queue: {line}", highlight=False)
            last_line = line
            if sum(counts.get(s, 0) for s in FINAL) == len(ids):
                return
            await asyncio.sleep(0.1)  # display refresh rate


def _ms_between(a: str | None, b: str | None) -> float | None:
    start, end = parse_time(a), parse_time(b)
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000


def _summary(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Summary (in claim order)")
    for column in ("job", "prio", "needs", "status", "worker", "tries", "wait ms", "ran ms"):
        table.add_column(column, no_wrap=True)
    ordered = sorted(rows, key=lambda r: r.get("assigned_at") or "~")
    for row in ordered:
        waited = _ms_between(row.get("created_at"), row.get("assigned_at"))
        ran = row.get("processing_time", "")
        needs = "40 GB" if "gpu_memory_gb" in row.get("requirements", "") else ""
        table.add_row(row.get("id", "")[:8], row.get("priority", ""), needs, row.get("status", ""),
                      row.get("worker_id", ""), row.get("attempt", ""),
                      f"{waited:.0f}" if waited is not None else "", ran)
    done = sum(1 for r in rows if r.get("status") == "completed")
    failed = sum(1 for r in rows if r.get("status") == "failed")
    retried = sum(int(r.get("retry_count") or 0) for r in rows)
    table.caption = f"{done} completed, {failed} failed, {retried} retries, {len(rows)} jobs"
    return table
