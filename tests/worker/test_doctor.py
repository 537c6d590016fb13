"""`emp-worker doctor` through a real process against the test Redis; its verdicts as tables."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.worker.test_metrics import free_port
from worker.doctor import GIB, Check, disk_check, latency_check, quarantine_check, skew_check, version_check

LINE = re.compile(r"^(OK|WARN|FAIL|SKIP)  +[^:]+: .+$")


async def doctor(*args: str, cwd: Path | None = None, **env: str) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EMP_", "HUB_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "doctor", *args, env={**base, **env}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def names(out: str) -> list[str]:
    return [line.split(":", 1)[0].split(maxsplit=1)[1] for line in out.splitlines()]


async def test_doctor_against_the_test_redis_is_one_line_per_check(redis_url: str, tmp_path: Path) -> None:
    code, out, err = await doctor(cwd=tmp_path, EMP_REDIS_URL=redis_url, EMP_FAKE_GPUS="2x24GB",
                                  EMP_OUTPUT_DIR=str(tmp_path / "out"))
    assert code == 0, out + err
    lines = out.splitlines()
    assert all(LINE.match(line) for line in lines), out
    assert names(out) == ["configuration", "connectors", "output store", "plugins", "redis", "redis auth",
                          "redis version", "redis latency", "redis scripts", "clock skew", "quarantine", "nvml",
                          "gpu 0", "gpu 1",
                          "engine simulation (slot 0)", "engine simulation (slot 1)", "output disk"]
    assert all(line.startswith("OK") for line in lines), out
    assert "13 Lua scripts load" in out and "EMP_FAKE_GPUS" in out and str(tmp_path / "out") in out


async def test_doctor_fails_with_a_hint_for_a_wrong_redis_url(tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, out, _ = await doctor(cwd=tmp_path, EMP_REDIS_URL=url)
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert line.startswith("FAIL  redis: cannot reach redis://:***@127.0.0.1:")
    assert "-> check EMP_REDIS_URL's host and port" in line and "hunter2" not in out
    assert "SKIP  redis auth, version, latency, scripts, clock skew, quarantine" in out
    assert "OK    configuration" in out and "engine simulation" in out  # the other checks still ran


async def test_doctor_tells_refused_credentials_from_an_unreachable_redis(protected_redis: int,
                                                                          tmp_path: Path) -> None:
    code, out, _ = await doctor("--json", cwd=tmp_path,
                                EMP_REDIS_URL=f"redis://:wrong-secret@127.0.0.1:{protected_redis}/0")
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1 and report["ok"] is False
    assert checks["redis"]["status"] == "ok" and checks["redis auth"]["status"] == "fail"
    assert "user and password" in checks["redis auth"]["hint"] and "wrong-secret" not in out


async def test_doctor_fails_an_engine_that_does_not_answer_and_a_bad_setting(redis_url: str,
                                                                           tmp_path: Path) -> None:
    code, out, _ = await doctor(cwd=tmp_path, EMP_REDIS_URL=redis_url, EMP_CONNECTORS="simulation,a1111",
                                EMP_A1111_URL=f"http://127.0.0.1:{free_port()}", EMP_HEALTH_TIMEOUT_S="2")
    (line,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 1 and line.startswith("FAIL  engine a1111: ") and "EMP_A1111_URL" in line
    code, out, _ = await doctor(cwd=tmp_path, EMP_REDIS_URL=redis_url, EMP_LEASE_S="soon")
    assert code == 1 and out.splitlines()[0].startswith("FAIL  configuration: EMP_LEASE_S='soon'")
    assert out.splitlines()[1].startswith("SKIP")


@pytest.mark.parametrize(("version", "status"), [("7.2.4", "ok"), ("6.2.0", "ok"), ("6.0.16", "fail"),
                                                 ("5.0.7", "fail"), ("unstable", "warn"), ("10.0", "ok")])
def test_version_check(version: str, status: str) -> None:
    assert version_check(version).status == status


@pytest.mark.parametrize(("samples", "status"), [([0.2, 0.3, 9.0], "ok"), ([25.0, 30.0, 1.0], "warn"),
                                                 ([600.0, 700.0, 1.0], "fail")])
def test_latency_check(samples: list[float], status: str) -> None:
    assert latency_check(samples).status == status


@pytest.mark.parametrize(("skew", "status", "words"), [(0.01, "ok", "ahead of"), (-2.0, "warn", "2.00s behind"),
                                                       (120.0, "fail", "120.00s ahead")])
def test_skew_check(skew: float, status: str, words: str) -> None:
    found = skew_check(skew)
    assert found.status == status and words in found.detail


@pytest.mark.parametrize(("free", "writable", "status"), [(50 * GIB, True, "ok"), (5 * GIB, True, "warn"),
                                                          (GIB // 2, True, "fail"), (50 * GIB, False, "fail"),
                                                          (None, False, "fail")])
def test_disk_check(free: int | None, writable: bool, status: str) -> None:
    assert disk_check("/data/out", free, writable).status == status


def test_a_line_shows_the_hint_only_when_something_is_wrong() -> None:
    assert Check("x", "ok", "fine", "do y").line() == "OK    x: fine"
    assert Check("x", "fail", "broken", "do y").line() == "FAIL  x: broken -> do y"


@pytest.mark.parametrize(("count", "status"), [(0, "ok"), (1, "warn"), (500, "warn")])
def test_quarantine_verdict(count: int, status: str) -> None:
    check = quarantine_check(count)
    assert check.status == status and (status == "ok" or (f"{count} job id(s)" in check.detail and bool(check.hint)))
