"""A new operator's mistakes, each met through a real process: one clear line, never a traceback,
a hang or a silently wrong result."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.conftest import WorkerFactory, wait_until
from tests.procs import WorkerProcess, run_cli
from worker.client import Client
from worker.keys import Keys


async def _cli(*args: str, cwd: Path | None = None, within_s: float = 60, **env: str) -> tuple[int, str, str]:
    return await run_cli(*args, cwd=cwd, within_s=within_s, **{"EMP_LOG_FORMAT": "text", **env})


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("url", ["redis://:wrong-secret@127.0.0.1:{port}/0", "redis://127.0.0.1:{port}/0",
                                 "redis://nobody:wrong-secret@127.0.0.1:{port}/0"])
async def test_refused_credentials_stop_start_up_with_one_line(protected_redis: int, url: str) -> None:
    code, _, err = await _cli("run", EMP_REDIS_URL=url.format(port=protected_redis), EMP_LOG_LEVEL="WARNING",
                              within_s=30)
    line = _one_line(err)
    assert code == 2 and line.startswith("configuration error: EMP_REDIS_URL")
    assert "credentials" in line and "wrong-secret" not in err


async def test_the_right_password_works(protected_redis: int) -> None:
    url = f"redis://:right-secret@127.0.0.1:{protected_redis}/0"
    code, out, err = await _cli("submit", "--service", "simulation", "--payload", "{}", EMP_REDIS_URL=url)
    assert code == 0 and out.strip(), err


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://u:secret@h:99999", "Port out of range"),
    ("redis://u:secret@h:port/0", "not a valid URL"),
    ("redis://:secret@/0", "names no host"),
    ("redis://h:6379/zero", "must be a number"),
])
async def test_an_unparseable_redis_url_is_one_line_with_the_password_masked(url: str, expected: str) -> None:
    code, _, err = await _cli("run", EMP_REDIS_URL=url)
    line = _one_line(err)
    assert code == 2 and expected in line and "secret" not in err


async def test_a_lease_shorter_than_three_heartbeats_is_refused() -> None:
    code, _, err = await _cli("run", EMP_LEASE_S="1", EMP_HEARTBEAT_INTERVAL_S="5")
    line = _one_line(err)
    assert code == 2 and "EMP_LEASE_S=1" in line and "3 heartbeats" in line and "EMP_HEARTBEAT_INTERVAL_S=5" in line


async def test_connector_settings_are_read_from_the_env_file_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("EMP_SIM_DURATION_S=soon\n")
    code, _, err = await _cli("run", cwd=tmp_path)
    line = _one_line(err)
    assert code == 2 and "EMP_SIM_DURATION_S='soon'" in line


async def test_following_a_job_no_live_worker_can_run_says_so_at_once(redis_url: str, keys: Keys) -> None:
    code, out, err = await _cli("submit", "--service", "nobody-runs-this", "--follow", within_s=20,
                                EMP_REDIS_URL=redis_url, EMP_KEY_PREFIX=keys.prefix)
    assert code == 1 and out.strip()  # the job id, then the reason
    assert "no live worker runs 'nobody-runs-this'" in err and "--wait" in err


async def test_a_simulation_payload_field_it_does_not_know_fails_the_job_naming_it(
    client: Client, start_worker: WorkerFactory,
) -> None:
    await start_worker("typo")
    job_id = await client.submit("simulation", {"duration_ms": 10})
    await wait_until(lambda: _status(client, job_id, "failed"), within_s=15)
    job = await client.get(job_id)
    assert "unknown field 'duration_ms'" in job["error"] and "duration_s" in job["error"] and job["attempt"] == "1"


async def _status(client: Client, job_id: str, *wanted: str) -> bool:
    return (await client.get(job_id)).get("status") in wanted


async def test_flags_read_as_flags_in_help() -> None:
    code, out, _ = await _cli("submit", "--help")
    assert code == 0 and "<bool>" not in out
    follow = next(line for line in out.splitlines() if "--follow" in line)
    assert "-f, --follow " in follow


async def test_a_lone_worker_restarted_under_the_same_id_takes_its_crashed_job_at_once(
    redis_url: str, keys: Keys, client: Client,
) -> None:
    """PM2 restarts a killed worker under its id; no other worker exists. The job its first life
    held is kept from it for EMP_RETRY_EXCLUSION_S only while another worker is free to take it."""
    job_id = await client.submit("simulation", {"duration_s": 3, "steps": 30})
    async with WorkerProcess(redis_url, keys.prefix, "lone", EMP_RETRY_EXCLUSION_S="120") as first:
        await wait_until(lambda: _status(client, job_id, "in_progress"), within_s=20)
        first.signal(signal.SIGKILL)
        await first.wait()
    loop = asyncio.get_running_loop()
    restarted = loop.time()
    async with WorkerProcess(redis_url, keys.prefix, "lone", EMP_RETRY_EXCLUSION_S="120") as second:
        await wait_until(lambda: _status(client, job_id, "completed"), within_s=60)
        assert loop.time() - restarted < 60, second.output()  # well inside the 120 s exclusion
    job = await client.get(job_id)
    assert job["attempt"] == "2" and job["worker_id"] == "lone"
