"""The systemd units as shipped: systemd-analyze verify accepts them (no warning either), and the
settings the worker's shutdown and notify protocol rely on are there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "packaging" / "systemd"
SHIPPED_BINARY = "/usr/local/bin/emp-worker"
GRACE_S = 30  # EMP_GRACE_PERIOD_S's default


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _binary() -> str:
    """An executable for ExecStart (verify checks it exists): the built binary, else the venv's."""
    built = os.environ.get("EMP_WORKER_BINARY", "")
    if built and os.access(built, os.X_OK):
        return built
    return str(Path(sys.executable).parent / "emp-worker")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd; .ci/run does)")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert SHIPPED_BINARY in text
        name = unit.name.replace("@.service", "@0.service")  # a template is verified as an instance
        (tmp_path / name).write_text(text.replace(SHIPPED_BINARY, _binary()))  # only the path changes
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    assert len(units) == 2
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


@pytest.mark.parametrize("unit", ["emp-worker.service", "emp-worker@.service"])
def test_units_are_notify_with_a_watchdog_and_outlast_the_grace_period(unit: str) -> None:
    d = _directives(UNITS / unit)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["all"]  # the bootloader's child notifies
    assert int(d["WatchdogSec"][0]) >= 10
    assert d["KillMode"] == ["mixed"]  # SIGTERM to the bootloader, which forwards it once
    assert int(d["TimeoutStopSec"][0]) > GRACE_S + 10
    assert d["Restart"] == ["on-failure"]
