"""The command line, run as a real process."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.conftest import WorkerFactory
from tests.procs import run_cli
from worker import __version__
from worker.keys import Keys

_cli = run_cli


async def test_version() -> None:
    code, out, _ = await _cli("--version")
    assert code == 0 and out.strip() == f"emp-worker {__version__}"


async def test_bad_setting_is_one_line_naming_variable_value_and_rule() -> None:
    code, _, err = await _cli("run", EMP_LEASE_S="soon")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "EMP_LEASE_S='soon'" in lines[0] and "number" in lines[0]


async def test_secret_in_a_bad_url_is_not_shown() -> None:
    code, _, err = await _cli("run", HUB_REDIS_URL="http://user:hunter2@example:1")
    assert code == 2 and "hunter2" not in err and "***" in err


async def test_submit_follow_exits_0_on_completion_and_1_on_failure(
    redis_url: str, keys: Keys, start_worker: WorkerFactory
) -> None:
    await start_worker()
    code, out, _ = await _cli("submit", "--service", "simulation", "--payload",
                              '{"duration_s": 0.05, "steps": 3}', "--priority", "80", "--follow",
                              EMP_REDIS_URL=redis_url, EMP_KEY_PREFIX=keys.prefix)
    assert code == 0 and "completed" in out
    code, out, _ = await _cli("submit", "--service", "simulation", "--payload", '{"fail": "permanent"}',
                              "--follow", EMP_REDIS_URL=redis_url, EMP_KEY_PREFIX=keys.prefix)
    assert code == 1 and "failed" in out and "simulated permanent failure" in out
    code, _, err = await _cli("submit", "--service", "simulation", "--payload", "{bad", EMP_REDIS_URL=redis_url,
                              EMP_KEY_PREFIX=keys.prefix)
    assert code == 1 and "--payload is not valid JSON" in err


async def test_status_lists_queue_and_workers(redis_url: str, keys: Keys, start_worker: WorkerFactory) -> None:
    await start_worker("status-worker")
    code, out, _ = await _cli("status", "--json", EMP_REDIS_URL=redis_url, EMP_KEY_PREFIX=keys.prefix)
    assert code == 0 and "status-worker" in out and '"alive": true' in out


async def test_gpu_that_does_not_exist_stops_start_up() -> None:
    code, _, err = await _cli("run", "--gpu", "999")
    assert code == 2 and "--gpu 999: this machine has" in err


async def test_demo_runs_and_places_40gb_jobs_on_the_80gb_gpu() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("EMP_REDIS_URL", "HUB_REDIS_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "demo", "--jobs", "12", "--duration", "0.05", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode()
    assert proc.returncode == 0, text
    big_rows = [line for line in text.splitlines() if "40 GB" in line and "│" in line]  # summary rows
    assert len(big_rows) == 3 and all("80gb" in line for line in big_rows)
    # one job's 2 MB image went through the output store (the autouse fixture's EMP_OUTPUT_DIR)
    (shown,) = [line for line in text.splitlines() if line.startswith("Output of job")]
    assert "(2,000,000 bytes, image/png) at file://" in shown
