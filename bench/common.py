"""Shared pieces of the benchmarks: figures, percentiles, Redis INFO deltas, bulk submits,
the bare (baseline) Lua scripts, and the machine description for bench/results.md."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from worker.client import Client

SIM_PAYLOAD: dict[str, Any] = {"duration_s": 0, "steps": 1, "output_bytes": 0}
CAPS: dict[str, Any] = {"services": ["simulation"], "hardware": {"gpu_memory_gb": 24}, "models": {},
                        "customer_access": {}, "custom": {}}
WORKER_EXE = Path(sys.executable).with_name("emp-worker")

# The same-run baselines: what any Redis queue must do at least, in one script each.
BARE_CLAIM = """
local id = redis.call('ZPOPMAX', KEYS[1])[1]
if not id then return false end
redis.call('HSET', KEYS[2] .. id, 'status', 'assigned', 'worker_id', ARGV[1])
return id
"""
BARE_COMPLETE = """
redis.call('HSET', KEYS[2] .. ARGV[2], 'status', 'completed', 'result', '{}')
redis.call('HSET', KEYS[1], ARGV[2], '{}')
return 1
"""


@dataclasses.dataclass
class Figure:
    """One measured figure beside its same-run baseline (ratio = value / baseline)."""

    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None

    def line(self) -> str:
        text = f"[{self.bench}] {self.name}: {self.value:,.3f} {self.unit}"
        if self.baseline is not None:
            text += f"  vs {self.baseline_name} {self.baseline:,.3f} {self.unit}"
            if self.ratio is not None:
                text += f"  ({self.ratio:.2f}x)"
        return text + (f"  -- {self.note}" if self.note else "")


def pct(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(redis_version: str) -> dict[str, str]:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {"CPUs": f"{os.cpu_count()} x {cpu_model()}", "load average at start (1/5/15 min)": load,
            "Python": platform.python_version(), "Redis": redis_version, "OS": platform.platform(),
            "reply parser": "hiredis" if hiredis_available() else "redis-py pure Python"}


def hiredis_available() -> bool:
    from redis.utils import HIREDIS_AVAILABLE

    return bool(HIREDIS_AVAILABLE)


async def info(redis: aioredis.Redis) -> dict[str, Any]:
    """INFO cpu + commandstats, flattened: used CPU seconds and total command calls."""
    raw = await redis.info("all")
    calls = sum(int(v["calls"]) for k, v in raw.items() if k.startswith("cmdstat_"))
    return {"cpu_s": float(raw["used_cpu_sys"]) + float(raw["used_cpu_user"]), "calls": calls,
            "version": str(raw["redis_version"])}


async def submit_many(client: Client, count: int, make: Callable[[int], Awaitable[str]] | None = None,
                      batch: int = 200) -> list[str]:
    """Submit `count` jobs through the real submit script, `batch` in flight at a time."""
    async def one(i: int) -> str:
        return await client.submit("simulation", SIM_PAYLOAD, priority=50)

    make = make or one
    ids: list[str] = []
    for start in range(0, count, batch):
        ids += await asyncio.gather(*(make(i) for i in range(start, min(count, start + batch))))
    return ids


async def bare_fill(redis: aioredis.Redis, prefix: str, count: int) -> None:
    """`count` bare job hashes in one sorted set, for the bare baselines."""
    for start in range(0, count, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(count, start + 1000)):
                pipe.hset(f"{prefix}job:{i}", mapping={"status": "pending", "payload": "{}"})
                pipe.zadd(f"{prefix}pending", {str(i): 50})
            await pipe.execute()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str,
                   interval: float = 0.01) -> None:
    """Poll a condition with a deadline (another process's progress)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")
        await asyncio.sleep(interval)


def write_results(path: Path, figures: list[Figure], mach: dict[str, str], mode: str, notes: list[str]) -> None:
    lines = ["# emp-worker benchmarks", "", f"Run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ({mode}); "
             "`python -m bench` writes this file (`--smoke` for the CI sizes).", ""]
    lines += [f"- {k}: {v}" for k, v in mach.items()]
    lines += ["", "| bench | figure | value | same-run baseline | ratio |", "|---|---|---|---|---|"]
    for f in figures:
        base = f"{f.baseline:,.3f} {f.unit} ({f.baseline_name})" if f.baseline is not None else ""
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        name = f.name + (f" ({f.note})" if f.note else "")
        lines.append(f"| {f.bench} | {name} | {f.value:,.3f} {f.unit} | {base} | {ratio} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(lines) + "\n")
