"""Processes of the packaging tests: which executable to test (the built binary or the venv's
entry point), and the processes that carry a test's own marker in their environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[2]


def built_binary() -> Path | None:
    """EMP_WORKER_BINARY when it names an executable (.ci/run builds it before pytest)."""
    value = os.environ.get("EMP_WORKER_BINARY", "")
    return Path(value) if value and os.access(value, os.X_OK) else None


def worker_executable() -> Path:
    """The built one-file binary when there is one, else the venv's `emp-worker` entry point."""
    return built_binary() or Path(sys.executable).parent / "emp-worker"


def marked(marker: str) -> set[int]:
    """PIDs of the live processes whose environment holds `marker` (e.g. this test's key prefix)."""
    found: set[int] = set()
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and any(marker in v for v in proc.environ().values()):
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def family(pid: int) -> set[int]:
    """`pid` and its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def kill_all(pids: set[int]) -> None:
    """SIGKILL what a failed test left behind (only these PIDs)."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            continue
