"""Cost the output step adds to every job, against the JSON encoding each result already gets.

    .venv/bin/python bench/outputs.py [--rounds 20000]

Every completed job's result now passes through ``OutputPlacer.place`` (the walk that turns
base64 media into outputs, and the listing), then ``json.dumps``. This times ``place`` for a
typical small result without outputs, and with one small inline text output, as a ratio of the
``json.dumps`` of the same result measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from connectors.base import Output
from connectors.stores import builtin
from connectors.testing import make_job
from worker.outputs import OutputPlacer
from worker.settings import load_settings

RESULT: dict[str, Any] = {"output": "ab" * 128, "steps": 10, "seed": 42, "info": {"sampler": "euler", "cfg": 7.0,
                                                                               "tags": ["a", "b", "c"]}}


def per_call_us(rounds: int, call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - started) / rounds * 1e6


async def main(rounds: int) -> None:
    placer = OutputPlacer(load_settings(), builtin.by_name())
    job = make_job("simulation", {})
    note = [Output("note.txt", "text/plain", b"small note")]
    baseline = per_call_us(rounds, lambda: json.dumps(RESULT, allow_nan=False))
    timings: dict[str, float] = {}
    for label, outputs in (("no outputs", []), ("one inline output", note)):
        started = time.perf_counter()
        for _ in range(rounds):
            await placer.place(job, outputs, RESULT)
        timings[label] = (time.perf_counter() - started) / rounds * 1e6
    print(f"json.dumps(result) baseline: {baseline:.2f} us per job")
    for label, us in timings.items():
        print(f"place() with {label}: {us:.2f} us per job = {us / baseline:.1f}x the baseline")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20000)
    asyncio.run(main(parser.parse_args().rounds))
