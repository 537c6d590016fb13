"""Real storage servers for tests, each in its own process on a free loopback port: moto's S3
server and Azure's emulator Azurite; and a proxy that makes chosen writes to them fail.

    with moto_server(workdir) as url: ...       # http://127.0.0.1:<port>, S3 API (path-style)
    with azurite_server(binary, workdir) as url: ...   # blob endpoint; account AZURITE_ACCOUNT
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import aiohttp
from aiohttp import web
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]
AZURITE_HINT = "azurite not installed: npm install --prefix .ci/node azurite"
AZURITE_ACCOUNT = "devstoreaccount1"
# the emulator's published development key (not a secret)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _listening(log: Path, pattern: str, proc: subprocess.Popen[bytes], name: str, within_s: float) -> str:
    """The URL a server prints once it listens (read from its log, with a deadline)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)  # polling the log for the server's own "listening" line
    raise RuntimeError(f"{name} did not start within {within_s}s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def _server(name: str, args: list[str], workdir: Path, pattern: str) -> Iterator[str]:
    """Run a server until the block ends; its URL, once it says it listens."""
    log = workdir / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        yield _listening(log, pattern, proc, name, within_s=60)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)



def moto_server(workdir: Path) -> contextlib.AbstractContextManager[str]:
    """moto's S3 server (``python -m moto.server``); its URL."""
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
    return _server("moto", args, workdir, r"Running on (http://127\.0\.0\.1:\d+)")


def azurite_binary() -> str | None:
    """Azurite's blob service: the copy .ci/run installs under .ci/node, else one on PATH."""
    local = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


def azurite_server(binary: str, workdir: Path) -> contextlib.AbstractContextManager[str]:
    """Azurite's blob service, its data under `workdir` (no telemetry: it reaches nothing outside); its URL."""
    args = [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(workdir), "--silent", "--loose",
            "--skipApiVersionCheck", "--disableTelemetry"]
    return _server("azurite", args, workdir, r"listens on (http://127\.0\.0\.1:\d+)")


def connection_string(blob_url: str, key: str = AZURITE_KEY) -> str:
    """A connection string for Azurite's development account at `blob_url`."""
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={blob_url}/{AZURITE_ACCOUNT};")


class FlakyProxy:
    """A reverse proxy in front of a real storage server: it answers 503 to the next PUTs of a
    path it was told to fail, and forwards everything else as it came (recording PUT bodies)."""

    _DROPPED: ClassVar[set[str]] = {"content-length", "transfer-encoding", "connection", "expect", "keep-alive"}

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.failing: Counter[str] = Counter()
        self.bodies: dict[str, list[bytes]] = {}
        self.url = ""

    def fail_next(self, suffix: str, times: int) -> None:
        self.failing[suffix] += times

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.raw_path.split("?")[0]
        if request.method == "PUT":
            for suffix in self.failing:
                if path.endswith(suffix):
                    self.bodies.setdefault(suffix, []).append(body)
                    if self.failing[suffix] > 0:
                        self.failing[suffix] -= 1
                        return web.Response(status=503, text="injected failure")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._DROPPED}
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(request.method, url, headers=headers, data=body or None,
                                         skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),
                                         allow_redirects=False) as answer:
            data = await answer.read()
            head = request.method == "HEAD"  # its Content-Length is the object's size: kept
            out = {k: v for k, v in answer.headers.items()
                   if k.lower() not in self._DROPPED or (head and k.lower() == "content-length")}
            return web.Response(status=answer.status, body=None if head else data, headers=out)

    async def __aenter__(self) -> FlakyProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()


