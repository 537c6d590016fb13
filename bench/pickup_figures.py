"""bench/pickup.py's measurements as figures beside their same-run baselines."""

from __future__ import annotations

from bench.common import Figure, pct
from bench.pickup import measure


async def run(url: str, jobs: int, idle_s: float) -> list[Figure]:
    got = await measure(url, jobs, idle_s)
    rtt, lat, base = got["rtt"], got["lat"], got["base_lat"]
    return [
        Figure("pickup", f"pickup p50 ({len(lat)} jobs)", pct(lat, .5), "ms", pct(rtt, .5), "PING RTT p50"),
        Figure("pickup", "pickup p90", pct(lat, .9), "ms", pct(rtt, .9), "PING RTT p90"),
        Figure("pickup", "pickup p99", pct(lat, .99), "ms", pct(rtt, .99), "PING RTT p99"),
        Figure("pickup", "pickup p50 vs 1 s polling", pct(lat, .5), "ms", pct(base, .5), "1 s polling p50"),
        Figure("pickup", "idle commands/s per worker", got["idle"], "cmd/s", got["base_idle"], "1 s polling"),
    ]
