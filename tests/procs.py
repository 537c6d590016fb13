"""Worker processes for fault tests: real `python -m worker run` daemons."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from types import TracebackType
from typing import Any


class WorkerProcess:
    """``async with WorkerProcess(url, prefix, id) as proc:`` -- killed on exit if still running."""

    def __init__(self, redis_url: str, prefix: str, worker_id: str, *, args: tuple[str, ...] = (), **env: Any) -> None:
        self.args = args
        values = {
            "EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": prefix, "EMP_WORKER_ID": worker_id,
            "EMP_CONNECTORS": "simulation", "EMP_HEARTBEAT_INTERVAL_S": "0.5", "EMP_LEASE_S": "2",
            "EMP_POLL_INTERVAL_S": "2", "EMP_RETRY_BACKOFF_S": "0", "EMP_RETRY_EXCLUSION_S": "0",
            "EMP_LOG_LEVEL": "WARNING", "EMP_LOG_FORMAT": "text",
        }
        values.update({k: str(v) for k, v in env.items()})
        self.env = {**os.environ, **values}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as this object; closed on exit
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run", *self.args], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, within_s: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), within_s)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    async def __aenter__(self) -> WorkerProcess:
        return self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                await self.wait(20)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.wait(5)
        self.log.close()
