"""HttpEngine against a real HTTP/1.1 server on a loopback port (httpx.MockTransport only where a
test counts client-side attempts), and the pure error mapping as a table."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors import http as http_module
from connectors.http import HttpEngine, body_excerpt, connect_backoff_s, error_for_status
from worker.errors import ConfigError, JobError, PermanentJobError, RetryableJobError

pytestmark = pytest.mark.timeout(30)

JSON = {"Content-Type": "application/json"}


# -- a real engine on a loopback port -----------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # read the request, never answer (until the server stops)
    declare_length: bool = True  # False: no Content-Length, the body ends when the connection closes


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeEngine:
    """A minimal HTTP/1.1 server: canned replies by path, every request and connection counted."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply] = {}
        self.requests: list[Seen] = []
        self.connections = 0
        self._release = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path.split("?")[0] == path]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1  # before any await: handlers start in accept order
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, target, _ = (await reader.readline()).decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(Seen(method, target, headers, body))
        reply = self.routes.get(target.split("?")[0], Reply(404, b'{"detail":"Not Found"}', JSON))
        if reply.hang:
            await self._release.wait()
            return
        head = [f"HTTP/1.1 {reply.status} X", "Connection: close", *(f"{k}: {v}" for k, v in reply.headers.items())]
        if reply.declare_length:
            head.append(f"Content-Length: {len(reply.body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)
        await writer.drain()


@pytest.fixture
async def server() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine()
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
def refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def counting(fail: Callable[[httpx.Request], httpx.Response]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return fail(request)

    return httpx.MockTransport(handler), calls


def raising(exc_type: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return fail


# -- happy path and error answers over real HTTP -----------------------------------------------


async def test_json_round_trip_under_the_base_path(server: FakeEngine) -> None:
    server.routes["/api/echo"] = Reply(200, b'{"id": "p-1", "queued": 2}', JSON)
    server.routes["/api/stats"] = Reply(200, b'{"gpu": "fake"}', JSON)
    server.routes["/api/empty"] = Reply(204)
    async with HttpEngine(f"{server.url}/api", name="fake") as engine:
        assert await engine.post_json("/echo", {"prompt": "a cat", "steps": 20}) == {"id": "p-1", "queued": 2}
        assert await engine.get_json("stats", params={"verbose": 1}) == {"gpu": "fake"}
        assert await engine.get_json("/empty") is None
    posted = server.seen("/api/echo")[0]
    assert posted.method == "POST"
    assert json.loads(posted.body) == {"prompt": "a cat", "steps": 20}
    assert posted.headers["content-type"] == "application/json"
    assert posted.headers["user-agent"].startswith("emp-worker/")
    assert server.seen("/api/stats")[0].path == "/api/stats?verbose=1"


async def test_request_returns_a_read_response(server: FakeEngine) -> None:
    server.routes["/raw"] = Reply(201, b"made", {"X-Id": "7"})
    async with HttpEngine(server.url, name="fake") as engine:
        response = await engine.request("PUT", "/raw", content=b"payload", headers={"X-Job": "j1"})
    assert (response.status_code, response.content, response.headers["x-id"]) == (201, b"made", "7")
    assert server.seen("/raw")[0].body == b"payload"
    assert server.seen("/raw")[0].headers["x-job"] == "j1"


async def test_422_with_fastapi_detail_is_permanent_and_names_the_fields(server: FakeEngine) -> None:
    detail = {"detail": [
        {"type": "int_parsing", "loc": ["body", "steps"], "msg": "Input should be a valid integer", "input": "x"},
        {"type": "missing", "loc": ["body", "seed"], "msg": "Field required", "input": None},
    ]}
    server.routes["/generate"] = Reply(422, json.dumps(detail).encode(), JSON)
    async with HttpEngine(server.url, name="a1111") as engine:
        with pytest.raises(PermanentJobError) as caught:
            await engine.post_json("/generate", {"steps": "x"})
    message = str(caught.value)
    assert "a1111 answered 422 Unprocessable" in message
    assert "POST /generate" in message
    assert "steps: Input should be a valid integer; seed: Field required" in message


async def test_500_is_retryable_with_a_short_body_excerpt(server: FakeEngine) -> None:
    body = "Traceback (most recent call last): CUDA out of memory " + "z" * 5000
    server.routes["/prompt"] = Reply(500, body.encode(), {"Content-Type": "text/plain"})
    async with HttpEngine(server.url, name="comfyui") as engine:
        with pytest.raises(RetryableJobError) as caught:
            await engine.post_json("/prompt", {})
    message = str(caught.value)
    assert "comfyui answered 500 Internal Server Error to POST /prompt" in message
    assert "CUDA out of memory" in message
    assert len(message) < 500
    assert len(server.seen("/prompt")) == 1  # an answered request is never retried here


async def test_non_json_success_is_retryable(server: FakeEngine) -> None:
    server.routes["/stats"] = Reply(200, b"<html>proxy login</html>", {"Content-Type": "text/html"})
    async with HttpEngine(server.url, name="fake") as engine:
        with pytest.raises(RetryableJobError, match=r"not JSON: .*proxy login"):
            await engine.get_json("/stats")


async def test_redirects_are_not_followed(server: FakeEngine) -> None:
    server.routes["/moved"] = Reply(302, b"", {"Location": "http://evil.example/steal"})
    async with HttpEngine(server.url, name="fake") as engine:
        with pytest.raises(RetryableJobError, match="302 Found"):
            await engine.get_json("/moved")
    assert server.connections == 1


# -- connect retries and transport errors -------------------------------------------------------


async def test_refused_port_is_retried_then_unreachable(refused_port: int) -> None:
    async with HttpEngine(f"http://127.0.0.1:{refused_port}", name="comfyui", connect_retries=2,
                          retry_backoff_s=0.0) as engine:
        with pytest.raises(RetryableJobError) as caught:
            await engine.get_json("/system_stats")
    message = str(caught.value)
    assert message.startswith(f"comfyui at http://127.0.0.1:{refused_port} is unreachable: ConnectError")
    assert "(3 attempt(s)); is it running?" in message


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
@pytest.mark.parametrize("retries", [0, 1, 3])
async def test_connect_errors_are_retried_connect_retries_times(error: type[httpx.TransportError],
                                                                retries: int) -> None:
    transport, calls = counting(raising(error))
    async with HttpEngine("http://engine:8188", name="fake", connect_retries=retries, retry_backoff_s=0.0,
                          transport=transport) as engine:
        with pytest.raises(RetryableJobError, match=f"unreachable: {error.__name__}: simulated"):
            await engine.post_json("/prompt", {"a": 1})  # safe for POST: it never reached the engine
    assert len(calls) == retries + 1


async def test_a_connect_error_then_success_returns_the_answer() -> None:
    outcomes: list[Callable[[httpx.Request], httpx.Response]] = [
        raising(httpx.ConnectError), raising(httpx.ConnectError), lambda r: httpx.Response(200, json={"ok": 1})]
    transport, calls = counting(lambda request: outcomes[len(calls) - 1](request))
    async with HttpEngine("http://engine", name="fake", retry_backoff_s=0.001, transport=transport) as engine:
        assert await engine.post_json("/prompt", {}) == {"ok": 1}
    assert len(calls) == 3
    assert {c.content for c in calls} == {b"{}"}  # the same body each time


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError,
                                   httpx.ReadError])
async def test_other_transport_errors_are_not_retried(error: type[httpx.TransportError]) -> None:
    transport, calls = counting(raising(error))
    async with HttpEngine("http://engine", name="fake", connect_retries=3, transport=transport) as engine:
        with pytest.raises(RetryableJobError, match=error.__name__) as caught:
            await engine.post_json("/prompt", {})
    assert "unreachable" not in str(caught.value)
    assert len(calls) == 1


async def test_read_timeout_against_a_real_server_is_sent_once(server: FakeEngine) -> None:
    server.routes["/slow"] = Reply(hang=True)
    server.routes["/ok"] = Reply(200, b"{}", JSON)
    async with HttpEngine(server.url, name="comfyui", connect_retries=3, retry_backoff_s=0.0,
                          timeout=httpx.Timeout(10.0, read=0.3)) as engine:
        with pytest.raises(RetryableJobError, match=r"did not answer POST /slow in time \(ReadTimeout"):
            await engine.post_json("/slow", {"work": 1})
        await engine.get_json("/ok")  # answered, so every earlier connection was accepted first
    assert server.connections == 2
    assert len(server.seen("/slow")) == 1


async def test_per_request_timeout_overrides_the_default(server: FakeEngine) -> None:
    server.routes["/slow"] = Reply(hang=True)
    async with HttpEngine(server.url, name="fake", timeout=60.0) as engine:
        with pytest.raises(RetryableJobError, match="in time"):
            await engine.get_json("/slow", timeout=0.2)


# -- secrets ------------------------------------------------------------------------------------


async def test_bearer_token_is_sent_and_never_shown(server: FakeEngine) -> None:
    token = "tok-9f8e7d6c5b4a"
    server.routes["/echo"] = Reply(500, f"bad header Authorization: Bearer {token}".encode())
    server.routes["/denied"] = Reply(401, json.dumps({"detail": f"token {token} expired"}).encode(), JSON)
    async with HttpEngine(server.url, name="rest", token=token) as engine:
        with pytest.raises(RetryableJobError) as echoed:
            await engine.get_json("/echo")
        with pytest.raises(RetryableJobError) as denied:
            await engine.get_json("/denied")
    assert server.seen("/echo")[0].headers["authorization"] == f"Bearer {token}"
    for caught in (echoed, denied):
        assert token not in str(caught.value)
        assert "***" in str(caught.value)
    assert "check the credentials" in str(denied.value)


async def test_basic_auth_from_the_url_is_sent_redacted_and_never_shown(server: FakeEngine) -> None:
    password = "pa55-w0rd-xyz"
    encoded = base64.b64encode(f"op:{password}".encode()).decode()
    server.routes["/echo"] = Reply(403, f"Authorization: Basic {encoded} (password {password})".encode())
    async with HttpEngine(f"http://op:{password}@127.0.0.1:{server.port}", name="rest") as engine:
        assert engine.base_url == f"http://op:***@127.0.0.1:{server.port}"
        with pytest.raises(RetryableJobError, match="check the credentials") as caught:
            await engine.get_json("/echo")
    assert server.seen("/echo")[0].headers["authorization"] == f"Basic {encoded}"
    assert password not in str(caught.value)
    assert encoded not in str(caught.value)


# -- only the configured host -------------------------------------------------------------------

BASE = "http://127.0.0.1:8188"


@pytest.mark.parametrize("path", [
    "//evil.example/x",
    "http://127.0.0.1@evil/",
    "http://127.0.0.1:8188@evil/",
    "\\\\evil",
    "\\evil\\x",
    "/\\evil/x",
    "http://evil.example/x",
    "https://127.0.0.1:8188/x",  # another scheme
    "http://127.0.0.1:8189/x",  # another port
    "http://localhost:8188/x",  # another host name, even if it resolves here
    "http://user:pw@127.0.0.1:8188/x",  # credentials of the job's own
    "ftp://127.0.0.1:8188/x",
    "file:///etc/passwd",
    "evil.example:80/x",
    "http:evil.example",
    "/x\r\nHost: evil.example",
    "/x y",
    "http://[::1]:8188/",
])
async def test_paths_outside_the_engine_host_are_refused(path: str) -> None:
    transport, calls = counting(lambda r: httpx.Response(200, json={}))
    async with HttpEngine(BASE, name="comfyui", transport=transport) as engine:
        with pytest.raises(PermanentJobError, match=r"may only reach the configured engine host \(http://127"):
            await engine.get_json(path)
        ok, message = await engine.probe(path)
    assert not ok
    assert "may only reach" in message
    assert calls == []


@pytest.mark.parametrize(("path", "sent"), [
    ("/view", "http://127.0.0.1:8188/api/view"),
    ("view", "http://127.0.0.1:8188/api/view"),
    ("/view?filename=a.png", "http://127.0.0.1:8188/api/view?filename=a.png"),
    ("http://127.0.0.1:8188/other", "http://127.0.0.1:8188/other"),
    ("HTTP://127.0.0.1:8188/other", "http://127.0.0.1:8188/other"),
    ("/%2F%2Fevil.example/x", "http://127.0.0.1:8188/api/%2F%2Fevil.example/x"),
    ("/v1/models:generate", "http://127.0.0.1:8188/api/v1/models:generate"),
])
async def test_relative_paths_and_same_origin_urls_reach_the_engine(path: str, sent: str) -> None:
    transport, calls = counting(lambda r: httpx.Response(200, json={}))
    async with HttpEngine(f"{BASE}/api", name="comfyui", transport=transport) as engine:
        await engine.get_json(path)
    assert [str(c.url) for c in calls] == [sent]


@pytest.mark.parametrize("path", ["http://evil.example/x", "http://127.0.0.1@evil/", "https://127.0.0.1:8188/"])
async def test_the_final_url_is_checked_even_if_the_path_check_is_fooled(path: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_module, "_foreign_target", lambda base, path: False)
    transport, calls = counting(lambda r: httpx.Response(200, json={}))
    async with HttpEngine(BASE, name="comfyui", transport=transport) as engine:
        with pytest.raises(PermanentJobError, match="may only reach"):
            await engine.get_json(path)
    assert calls == []


async def test_a_host_header_override_is_refused() -> None:
    transport, calls = counting(lambda r: httpx.Response(200, json={}))
    async with HttpEngine(BASE, name="comfyui", transport=transport) as engine:
        with pytest.raises(PermanentJobError, match="may only reach"):
            await engine.get_json("/x", headers={"host": "evil.example"})
    assert calls == []


# -- size limits, streaming and downloads -------------------------------------------------------


@pytest.mark.parametrize("declare_length", [True, False])
async def test_a_body_over_max_response_bytes_is_refused(server: FakeEngine, declare_length: bool) -> None:
    server.routes["/big"] = Reply(200, b"x" * 2001, declare_length=declare_length)
    server.routes["/fits"] = Reply(200, b"y" * 2000, declare_length=declare_length)
    async with HttpEngine(server.url, name="fake", max_response_bytes=2000) as engine:
        assert (await engine.request("GET", "/fits")).content == b"y" * 2000
        with pytest.raises(PermanentJobError, match="over this worker's limit of 2000 bytes"):
            await engine.request("GET", "/big")


async def test_stream_yields_the_body_in_chunks(server: FakeEngine) -> None:
    data = os.urandom(300_000)
    server.routes["/file"] = Reply(200, data, {"Content-Type": "image/png"}, declare_length=False)
    async with HttpEngine(server.url, name="fake") as engine, engine.stream("GET", "/file") as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"] == "image/png"
        chunks = [chunk async for chunk in streamed.aiter_bytes()]
    assert b"".join(chunks) == data


async def test_stream_raises_the_mapped_error_before_the_block(server: FakeEngine) -> None:
    entered = False
    async with HttpEngine(server.url, name="fake") as engine:
        with pytest.raises(PermanentJobError, match="404 Not Found to GET /missing: Not Found"):
            async with engine.stream("GET", "/missing"):
                entered = True
    assert not entered


async def test_download_to_writes_the_file(server: FakeEngine, tmp_path: Path) -> None:
    data = os.urandom(500_000)
    server.routes["/view"] = Reply(200, data, {"Content-Type": "image/png"}, declare_length=False)
    target = tmp_path / "out.png"
    async with HttpEngine(server.url, name="comfyui") as engine:
        size, content_type = await engine.download_to("/view", target, params={"filename": "out.png"})
    assert size == len(data) and content_type == "image/png"
    assert target.read_bytes() == data
    assert await asyncio.to_thread(os.listdir, tmp_path) == ["out.png"]
    assert server.seen("/view")[0].path == "/view?filename=out.png"


@pytest.mark.parametrize("route", ["/big", "/missing"])
async def test_a_failed_download_leaves_no_file(server: FakeEngine, tmp_path: Path, route: str) -> None:
    server.routes["/big"] = Reply(200, b"x" * 100_000, declare_length=False)
    async with HttpEngine(server.url, name="comfyui", max_response_bytes=50_000) as engine:
        with pytest.raises(PermanentJobError):
            await engine.download_to(route, tmp_path / "out.bin")
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


# -- probe and configuration --------------------------------------------------------------------


async def test_probe_reports_without_raising(server: FakeEngine, refused_port: int) -> None:
    server.routes["/health"] = Reply(200, b"{}", JSON)
    server.routes["/busy"] = Reply(503, b"warming up")
    async with HttpEngine(server.url, name="fake") as engine:
        assert await engine.probe("/health") == (True, f"fake at {server.url} answered 200")
        ok, message = await engine.probe("/busy")
        assert not ok
        assert "503 Service Unavailable to GET /busy: warming up" in message
    async with HttpEngine(f"http://127.0.0.1:{refused_port}", name="fake", connect_retries=5,
                          retry_backoff_s=10.0) as engine:
        ok, message = await engine.probe()  # one attempt: the long backoff is never waited
    assert not ok
    assert "unreachable" in message
    assert "(1 attempt(s))" in message


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"base_url": "ftp://127.0.0.1"}, "must be an http"),
    ({"base_url": "127.0.0.1:8188"}, "must be an http"),
    ({"base_url": "http://"}, "must be an http"),
    ({"base_url": "http://op:secret@host:x/"}, "must be an http"),  # httpx: invalid port
    ({"connect_retries": -1}, "connect_retries"),
    ({"max_response_bytes": 0}, "max_response_bytes"),
    ({"token": "t", "auth": ("u", "p")}, "not both"),
    ({"verify": "/nonexistent/ca.pem"}, "CA bundle"),
])
def test_bad_configuration_is_a_config_error(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"base_url": "http://127.0.0.1:8188", **kwargs}
    with pytest.raises(ConfigError, match=match) as caught:
        HttpEngine(arguments.pop("base_url"), name="fake", **arguments)
    assert "secret" not in str(caught.value)


async def test_a_ca_bundle_path_is_accepted(tmp_path: Path) -> None:
    bundle = ssl.get_default_verify_paths().cafile
    if not bundle:
        pytest.skip("this system has no default CA bundle file")
    async with HttpEngine("https://127.0.0.1:8188", name="fake", verify=bundle) as engine:
        assert engine.base_url == "https://127.0.0.1:8188"


# -- the pure mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [
    *((s, PermanentJobError) for s in (400, 404, 405, 410, 413, 414, 415, 422)),
    *((s, RetryableJobError) for s in (401, 403)),
    *((s, RetryableJobError) for s in (408, 409, 423, 425, 429, 500, 502, 503, 504, 507, 599)),
    *((s, RetryableJobError) for s in (300, 302, 304, 402, 406, 418, 451, 499)),
])
def test_error_for_status(status: int, kind: type[JobError]) -> None:
    error = error_for_status("engine", status, b"why", "text/plain", request="GET /x")
    assert type(error) is kind
    assert str(error).startswith(f"engine answered {status}")
    assert "to GET /x: why" in str(error)
    assert ("check the credentials" in str(error)) == (status in (401, 403))


def test_error_for_status_without_body_or_known_reason() -> None:
    assert str(error_for_status("e", 599, b"", "")) == "e answered 599"


FASTAPI_422 = json.dumps({"detail": [
    {"loc": ["body", "steps"], "msg": "Input should be a valid integer"},
    {"loc": ["body", "prompt", 0, "text"], "msg": "Field required"},
    {"loc": ["query", "n"], "msg": "too big"},
]})


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (FASTAPI_422, "application/json",
     "steps: Input should be a valid integer; prompt.0.text: Field required; query.n: too big"),
    ('{"detail": "Not Found"}', "application/json", "Not Found"),
    ('{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", '
     '"details": "", "extra_info": {}}, "node_errors": {}}', "application/json", "Prompt outputs failed validation"),
    ('{"error": {"message": "bad", "details": "node 3"}}', "application/json", "bad: node 3"),
    ('{"error": "HTTPException", "detail": "Not Found", "body": "", "errors": "404: Not Found"}',
     "application/json", "HTTPException - Not Found - 404: Not Found"),
    ('{"message": "model not loaded"}', "", "model not loaded"),
    ('{"other": 1}', "application/json", '{"other":1}'),
    ('[{"msg": "a"}, {"msg": "b"}]', "application/json", "a; b"),
    (json.dumps({"detail": [{"msg": str(i)} for i in range(8)]}), "application/json", "0; 1; 2; 3; 4 (and 3 more)"),
    ('{"a":', "application/json", '{"a":'),
    ("<html><head><title>502 Bad Gateway</title></head><body><h1>nginx</h1></body></html>", "text/html",
     "502 Bad Gateway nginx"),
    ("  line one\n\n  line two  ", "text/plain", "line one line two"),
    ("x" * 1000, "text/plain", "x" * 300 + "..."),
    (b"\xff\xfeoops", "", "\ufffd\ufffdoops"),
    ("", "application/json", ""),
])
def test_body_excerpt(body: str | bytes, content_type: str, expected: str) -> None:
    assert body_excerpt(body, content_type) == expected


def test_body_excerpt_survives_hostile_json() -> None:
    assert body_excerpt("[" * 100_000, "application/json") == "[" * 300 + "..."
    deep = json.dumps({"detail": [[[[[["too deep"]]]]]]})
    assert len(body_excerpt(deep, "application/json")) <= 303


@pytest.mark.parametrize("body", [
    "a" * 290 + "TOKEN-abcdef-123456",  # straddles the 300-character cut
    '{"error": "bad token TOKEN-abcdef-\\u0031\\u0032\\u0033456"}',  # escaped inside JSON
    "<p>TOKEN-abcdef-123456</p>",
])
def test_body_excerpt_redacts_secrets_before_cutting(body: str) -> None:
    excerpt = body_excerpt(body, "", secrets=["TOKEN-abcdef-123456", ""])
    assert "TOKEN" not in excerpt
    assert "***" in excerpt


@pytest.mark.parametrize(("retry", "base_s", "jitter", "expected"), [
    (0, 0.5, 0.0, 0.25),
    (0, 0.5, 0.5, 0.375),
    (1, 0.5, 0.0, 0.5),
    (3, 0.5, 0.0, 2.0),
    (4, 0.5, 0.0, 2.5),  # capped at 5 s, halved by the jitter floor
    (1000, 0.5, 0.0, 2.5),
    (2, 0.0, 0.9, 0.0),
])
def test_connect_backoff(retry: int, base_s: float, jitter: float, expected: float) -> None:
    assert connect_backoff_s(retry, base_s, jitter) == pytest.approx(expected)
