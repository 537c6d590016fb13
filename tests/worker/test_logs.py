"""Logs: one JSON object a line off a terminal (configuration errors included), text on request,
the slot, job and attempt on every line about them, and no password ever."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from connectors.testing import WorkerProcess
from worker.keys import Keys
from worker.logs import JsonFormatter, TextFormatter, bind, redact


async def cli(*args: str, cwd: Path | None = None, **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if k != "EMP_LOG_FORMAT"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env={**base, **env}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


async def test_a_configuration_error_is_one_json_line(tmp_path: Path) -> None:
    code, err = await cli("run", cwd=tmp_path, EMP_LOG_FORMAT="json", EMP_LEASE_S="soon")
    entry = json.loads(one_line(err))
    assert code == 2 and entry["level"] == "error" and entry["error"] == "configuration_error"
    assert entry["msg"].startswith("configuration error: EMP_LEASE_S='soon'") and "ts" in entry


async def test_off_a_terminal_auto_is_json_and_passwords_stay_masked(tmp_path: Path) -> None:
    code, err = await cli("run", cwd=tmp_path, HUB_REDIS_URL="http://user:hunter2@example:1")
    entry = json.loads(one_line(err))  # stderr is a pipe here: auto means JSON
    assert code == 2 and "***" in entry["msg"] and "hunter2" not in err


async def test_text_when_asked_in_the_environment_or_the_env_file(tmp_path: Path) -> None:
    code, err = await cli("run", cwd=tmp_path, EMP_LOG_FORMAT="text", EMP_LEASE_S="soon")
    assert code == 2 and one_line(err).startswith("configuration error: EMP_LEASE_S='soon'")
    (tmp_path / ".env").write_text("EMP_LOG_FORMAT=text\nEMP_LEASE_S=soon\n")
    code, err = await cli("run", cwd=tmp_path)
    assert code == 2 and one_line(err).startswith("configuration error: EMP_LEASE_S='soon'")


async def test_a_running_workers_lines_name_slot_job_and_attempt(redis_url: str, keys: Keys) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "log-worker", EMP_LOG_FORMAT="json",
                             EMP_LOG_LEVEL="DEBUG") as proc:  # "claimed" is a DEBUG line (one INFO per job)
        job = await proc.run_job("simulation", {"duration_s": 0.05, "steps": 2})
        job_id = job["id"]
        proc.signal()
        assert await proc.wait() == 0
        output = proc.output()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    about = [e for e in entries if job_id in e["msg"]]
    assert {e["msg"].split(" ", 2)[2] for e in about} >= {"claimed (attempt 1, service simulation)", "completed"}
    assert all(e["job_id"] == job_id and e["attempt"] == 1 and e["worker_id"] == "log-worker" for e in about)
    ready = [e for e in entries if "ready" in e["msg"]]
    assert ready and ready[0]["worker_id"] == "log-worker" and "job_id" not in ready[0]


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("emp.test", logging.WARNING, __file__, 1, message, args, info)


def test_formatters_mask_url_passwords_in_messages_and_tracebacks() -> None:
    try:
        raise ConnectionError("lost rediss://default:s3cret@cache:6380/0")
    except ConnectionError as exc:
        line = record("connecting to %s", "redis://:hunter2@h:6379/0", exc=exc)
    entry = json.loads(JsonFormatter().format(line))
    assert entry["msg"] == "connecting to redis://:***@h:6379/0"
    assert "rediss://default:***@cache:6380/0" in entry["exc"] and "s3cret" not in entry["exc"]
    assert "hunter2" not in TextFormatter().format(line) and "s3cret" not in TextFormatter().format(line)
    assert redact("http://example.com/a@b and redis://h:6379") == "http://example.com/a@b and redis://h:6379"


async def test_bound_fields_belong_to_their_task() -> None:
    async def job(job_id: str) -> dict[str, object]:
        bind(job_id=job_id, attempt=2)
        await asyncio.sleep(0)  # let the other task bind its own meanwhile
        return dict(json.loads(JsonFormatter().format(record("working"))))

    bind(worker_id="slot-a")
    first, second = await asyncio.gather(job("j1"), job("j2"))
    outside = json.loads(JsonFormatter().format(record("between jobs")))
    assert (first["job_id"], second["job_id"]) == ("j1", "j2")
    assert first["worker_id"] == second["worker_id"] == "slot-a" and first["attempt"] == 2
    assert "job_id" not in outside
