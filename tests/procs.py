"""Real processes for tests: `python -m worker run` daemons (the test kit's) and CLI commands."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from connectors.testing import WorkerProcess

__all__ = ["WorkerProcess", "run_cli"]


async def run_cli(*args: str, cwd: Path | None = None, within_s: float = 60, **env: str) -> tuple[int, str, str]:
    """Run ``python -m worker ARGS`` with `env` added to this environment: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env={**os.environ, **env}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), within_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
