"""ComfyUI behind TLS signed by a private CA: EMP_COMFYUI_CA_BUNDLE (and TLS_VERIFY) apply to the
/ws socket as well as to the HTTP calls. A TLS-terminating proxy (a real server on a loopback port,
certificates made here) stands in front of the fake ComfyUI."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connectors.comfyui import ComfyUIConnector
from connectors.testing import make_connector, make_job, run_job
from tests.connectors.comfyui.conftest import FAST, graph
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_servers import Certs, make_certs
from worker.errors import ConfigError, JobError

pytestmark = pytest.mark.timeout(60)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


@pytest.fixture
async def tls_url(fake: FakeComfyUI, certs: Certs) -> AsyncIterator[str]:
    """https://localhost:<port>: TLS (the CA's server certificate) forwarded to the fake's plain port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    tasks: set[asyncio.Task[None]] = set()

    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", fake.port)
        except OSError:
            client_writer.close()
            return
        both = [asyncio.ensure_future(_pipe(client_reader, upstream_writer)),
                asyncio.ensure_future(_pipe(upstream_reader, client_writer))]
        tasks.update(both)
        await asyncio.wait(both)

    server = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    yield f"https://localhost:{port}"
    server.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


async def _started(env: dict[str, str]) -> ComfyUIConnector:
    connector = make_connector(ComfyUIConnector, env={**FAST, **env})
    try:
        await connector.start()
    except BaseException:
        await connector.stop()
        raise
    return connector


async def test_the_ca_bundle_is_trusted_by_the_socket_too(fake: FakeComfyUI, tls_url: str, certs: Certs) -> None:
    connector = await _started({"EMP_COMFYUI_URL": tls_url, "EMP_COMFYUI_CA_BUNDLE": str(certs.ca)})
    try:
        assert connector.engine is not None and connector.engine.socket.connected.is_set()
        result, ctx = await run_job(connector, make_job("comfyui", graph("tls")))
        assert result["files"][0]["filename"] == "tls_00001_.png" and ctx.outputs
        assert fake.sockets  # connected over the wss:// socket, through the proxy
    finally:
        await connector.stop()


async def test_an_untrusted_certificate_is_refused_by_http_and_socket(tls_url: str, certs: Certs) -> None:
    with pytest.raises(JobError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await _started({"EMP_COMFYUI_URL": tls_url, "EMP_COMFYUI_CA_BUNDLE": str(certs.other_ca)})
    # asyncio (3.11) leaves the socket of a failed TLS handshake to the garbage collector, with a
    # ResourceWarning that would surface in whichever later test collects it: collect it here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def test_tls_verify_false_reaches_both(tls_url: str) -> None:
    connector = await _started({"EMP_COMFYUI_URL": tls_url, "EMP_COMFYUI_TLS_VERIFY": "false"})
    try:
        assert connector.engine is not None and connector.engine.socket.connected.is_set()
    finally:
        await connector.stop()


def test_an_unreadable_ca_bundle_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"EMP_COMFYUI_CA_BUNDLE=.*cannot be used"):
        make_connector(ComfyUIConnector, env={"EMP_COMFYUI_CA_BUNDLE": str(tmp_path / "missing.pem")})

