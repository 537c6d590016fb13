"""Cost the metrics add to every job (EMP_METRICS_PORT set), against the JSON encoding each
result already gets, measured in the same run.

    .venv/bin/python bench/metrics.py [--rounds 50000]

Per job the slot makes three calls: ``claim_took`` (one histogram observation), ``claimed`` (the
queue wait: two timestamps of the job hash parsed, one observation) and ``finished`` (one counter
increment, one observation). Also timed: a scrape (``exposition``) of one slot with a GPU, which
runs when Prometheus asks, not per job.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from connectors.base import Outcome
from worker.metrics import Metrics

RESULT: dict[str, Any] = {"output": "ab" * 128, "steps": 10, "seed": 42, "info": {"sampler": "euler", "cfg": 7.0,
                                                                               "tags": ["a", "b", "c"]}}
FIELDS = {"service_required": "simulation", "created_at": "2026-01-02T03:04:05.123Z",
          "assigned_at": "2026-01-02T03:04:05.456Z", "priority": "50", "payload": "{}"}


def per_call_us(rounds: int, call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - started) / rounds * 1e6


def one_job(metrics: Metrics) -> None:
    metrics.claim_took(0.0012)
    metrics.claimed(FIELDS)
    metrics.finished("simulation", Outcome.COMPLETED, 1.7)


def main(rounds: int) -> None:
    metrics = Metrics()
    metrics.services = frozenset({"simulation"})
    baseline = per_call_us(rounds, lambda: json.dumps(RESULT, allow_nan=False))
    parts = {
        "claim_took": per_call_us(rounds, lambda: metrics.claim_took(0.0012)),
        "claimed (queue wait)": per_call_us(rounds, lambda: metrics.claimed(FIELDS)),
        "finished": per_call_us(rounds, lambda: metrics.finished("simulation", Outcome.COMPLETED, 1.7)),
    }
    total = per_call_us(rounds, lambda: one_job(metrics))
    scrape = per_call_us(max(1, rounds // 100), metrics.exposition)
    print(f"json.dumps(result) baseline: {baseline:.2f} us per job")
    for label, us in parts.items():
        print(f"  {label}: {us:.2f} us")
    print(f"metrics per job: {total:.2f} us = {total / baseline:.1f}x the baseline")
    print(f"one scrape (no slots watched): {scrape:.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50000)
    main(parser.parse_args().rounds)
