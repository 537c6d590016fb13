"""An optional ComfyUI process per slot (``EMP_COMFYUI_COMMAND`` in ``EMP_COMFYUI_DIR``).

The process is pinned to its slot's GPU (``CUDA_VISIBLE_DEVICES=<GPU UUID>``), listens on the
slot's port (``{port}`` in the command), and writes its output to a log file. It is followed,
not timed: it is ready when ``/system_stats`` answers, and failed when it exits, whenever that
is (a cold start with many custom nodes may take minutes). When it dies it is started again
after a backoff (1 s doubling to ``EMP_COMFYUI_RESTART_MAX_S``, back to 1 s once it has stayed up
a minute); ``stop()`` ends it (SIGTERM, then SIGKILL) and stops restarting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from worker.errors import ConnectorError

log = logging.getLogger("emp.comfyui.supervisor")

READY_POLL_S = 0.5
STOP_GRACE_S = 10.0
STABLE_S = 60.0


class Supervisor:
    """Starts, follows, restarts and stops one ComfyUI process."""

    def __init__(self, command: str, cwd: str, port: int, *, gpu_uuid: str, log_path: Path,
                 probe: Callable[[], Awaitable[bool]], restart_max_s: float = 60.0) -> None:
        self.argv = shlex.split(command.replace("{port}", str(port)))
        self.cwd = cwd or None
        self.port = port
        self.gpu_uuid = gpu_uuid
        self.log_path = log_path
        self._probe = probe
        self._restart_max_s = restart_max_s
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.exits = 0  # how many times the process ended
        self.message = "not started"
        self._exited = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def start(self) -> None:
        """Start following (and starting) the process; idempotent."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._follow(), name=f"comfyui-{self.port}")

    async def wait_ready(self) -> None:
        """Return once ComfyUI answers; ConnectorError as soon as the process exits first."""
        self.start()
        exits = self.exits
        while not self.ready.is_set():
            waiters = [asyncio.ensure_future(self.ready.wait()), asyncio.ensure_future(self._exited.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if self.exits > exits and not self.ready.is_set():
                raise ConnectorError(f"ComfyUI (port {self.port}) exited before it was ready: {self.message}; "
                                     f"see {self.log_path}")

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self._signal(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                self._signal(proc, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.ready.clear()
        self.message = "stopped"

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # its own session: the signal reaches ComfyUI's children too

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.gpu_uuid:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_uuid
        return env

    async def _follow(self) -> None:
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            code = await self._run_once()
            self.exits += 1
            self.ready.clear()
            self._exited.set()
            self._exited.clear()
            if self._stopping:
                break
            delay = 1.0 if time.monotonic() - started > STABLE_S else min(self._restart_max_s, delay * 2)
            self.message = f"exited with code {code}; restarting in {delay:.0f}s"
            log.error("ComfyUI on port %d %s (log: %s)", self.port, self.message, self.log_path)
            await asyncio.sleep(delay)  # restart backoff

    async def _run_once(self) -> int | str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sink: IO[bytes] = await asyncio.to_thread(self.log_path.open, "ab")
        try:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, cwd=self.cwd, env=self._env(), stdin=asyncio.subprocess.DEVNULL,
                    stdout=sink, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self.message = f"could not be started: {exc}"
                return f"none ({exc.strerror or exc})"
            self.message = f"starting (pid {self.proc.pid})"
            log.info("ComfyUI on port %d starting: pid %d, log %s", self.port, self.proc.pid, self.log_path)
            watcher = asyncio.create_task(self._until_ready())
            try:
                return await self.proc.wait()
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        finally:
            sink.close()

    async def _until_ready(self) -> None:
        while self.running:
            if await self._probe():
                self.message = f"ready (pid {self.proc.pid if self.proc else '?'})"
                log.info("ComfyUI on port %d is ready", self.port)
                self.ready.set()
                return
            await asyncio.sleep(READY_POLL_S)  # polls /system_stats while the process starts
