"""Input URLs (connectors/inputs.py): the allow-list rule as a table of URLs x allow-lists, and
fetch_input against a real aiohttp server on a loopback port (answers, redirects, sizes, secrets)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from connectors.a1111.settings import A1111Settings
from connectors.comfyui.settings import ComfyUISettings
from connectors.inputs import AllowedHost, check_input_url, fetch_input, parse_allowed_hosts, shown_url
from worker.errors import ConfigError, JobError, PermanentJobError, RetryableJobError

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-SIGNATURE-value"


# -- the rule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "hosts", "allowed"), [
    # a host without a port: its scheme's default port only
    ("http://img.example/a.png", "img.example", True),
    ("https://img.example/a.png", "img.example", True),
    ("http://img.example:80/a.png", "img.example", True),
    ("https://img.example:443/a.png", "img.example", True),
    ("http://img.example:6379/", "img.example", False),  # a job must not reach any local port
    ("http://img.example:8080/a.png", "img.example", False),
    ("https://img.example:80/a.png", "img.example", False),
    ("http://img.example:443/a.png", "img.example", False),
    # a host with a port: that port only, either scheme
    ("http://img.example:8080/a.png", "img.example:8080", True),
    ("https://img.example:8080/a.png", "img.example:8080", True),
    ("http://img.example/a.png", "img.example:8080", False),
    ("http://img.example:8081/a.png", "img.example:8080", False),
    ("http://img.example/a.png", "img.example:80", True),
    ("https://img.example/a.png", "img.example:80", False),
    # names: case, trailing dot, IDNA; nothing looser
    ("http://IMG.Example/a.png", "img.example", True),
    ("http://img.example./a.png", "img.example", True),
    ("http://img.example/a.png", "IMG.EXAMPLE.", True),
    ("http://münchen.example/a.png", "xn--mnchen-3ya.example", True),
    ("http://xn--mnchen-3ya.example/a.png", "münchen.example", True),
    ("http://img.example.evil.com/", "img.example", False),
    ("http://evilimg.example/", "img.example", False),
    ("http://img.example%2eevil.com/", "img.example", False),
    # wildcards: any subdomain, not the domain itself, never an IP
    ("http://a.cdn.example.com/x", "*.example.com", True),
    ("http://a.b.example.com/x", "*.example.com", True),
    ("http://example.com/x", "*.example.com", False),
    ("http://evil-example.com/x", "*.example.com", False),
    ("http://a.example.com:8080/x", "*.example.com", False),
    ("http://a.example.com:8080/x", "*.example.com:8080", True),
    # IP literals: only when listed literally
    ("http://127.0.0.1/x", "127.0.0.1", True),
    ("http://127.0.0.1:8188/x", "127.0.0.1", False),
    ("http://127.0.0.1:8188/x", "127.0.0.1:8188", True),
    ("http://127.0.0.1/x", "localhost", False),
    ("http://localhost/x", "127.0.0.1", False),
    ("http://2130706433/x", "127.0.0.1", False),
    ("http://0x7f000001/x", "127.0.0.1", False),
    ("http://0x7f.1/x", "127.0.0.1", False),
    ("http://127.1/x", "127.0.0.1", False),
    ("http://[::1]/x", "[::1]", True),
    ("http://[::1]:8080/x", "[::1]:8080", True),
    ("http://[0:0::1]:8080/x", "[::1]:8080", True),
    ("http://[::1]:8081/x", "[::1]:8080", False),
    ("http://[::ffff:127.0.0.1]/x", "127.0.0.1", False),
    ("http://[fe80::1%25eth0]/x", "[fe80::1]", False),
    # schemes and credentials
    ("ftp://img.example/a.png", "img.example", False),
    ("file:///etc/passwd", "img.example", False),
    ("gopher://img.example:70/", "img.example:70", False),
    ("http://user:pw@img.example/a.png", "img.example", False),
    ("http://img.example@evil.example/a.png", "img.example", False),
    ("http://evil.example\\@img.example/a.png", "img.example", False),
    ("http:///a.png", "img.example", False),
    ("//img.example/a.png", "img.example", False),
    # nothing allowed
    ("http://img.example/a.png", "", False),
])
def test_which_urls_an_allow_list_lets_through(url: str, hosts: str, allowed: bool) -> None:
    entries = parse_allowed_hosts(hosts)
    if allowed:
        assert check_input_url(url, entries)
    else:
        with pytest.raises(PermanentJobError):
            check_input_url(url, entries)


@pytest.mark.parametrize("entry", ["*", "*.", "http://img.example", "img.example/x", "user@img.example",
                                   "img.example:0", "img.example:65536", "img.example:http", "img.example:",
                                   "::1", "[::1", "[::1]x", "a*.example.com", "*.127.0.0.1", "2130706433",
                                   "img example"])
def test_bad_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=r"entry|port|IPv6|wildcard|host|numeric"):
        parse_allowed_hosts(entry)


def test_a_refusal_names_the_setting_host_and_port() -> None:
    with pytest.raises(PermanentJobError, match=r"img\.example port 6379 is not in EMP_X_INPUT_HOSTS"):
        check_input_url("http://img.example:6379/", parse_allowed_hosts("img.example"),
                        hosts_setting="EMP_X_INPUT_HOSTS")


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:pw@img.example/a.png?X-Amz-Signature=abc#f", "https://img.example/a.png?..."),
    ("http://img.example:8080/a/b.png", "http://img.example:8080/a/b.png"),
    ("not a url\x00", "(a URL that does not parse)"),
])
def test_urls_are_shown_without_user_info_or_query(url: str, shown: str) -> None:
    assert shown_url(url) == shown


@pytest.mark.parametrize("settings_class", [A1111Settings, ComfyUISettings])
def test_a_bad_allow_list_stops_start_up_naming_the_variable(
    settings_class: type[A1111Settings | ComfyUISettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "EMP_A1111_" if settings_class is A1111Settings else "EMP_COMFYUI_"
    monkeypatch.setenv(prefix + "INPUT_HOSTS", "img.example, http://evil/")
    with pytest.raises(ConfigError, match=f"{prefix}INPUT_HOSTS=.*no scheme"):
        settings_class.load(prefix)
    monkeypatch.setenv(prefix + "INPUT_HOSTS", "img.example, [::1]:9000")
    monkeypatch.setenv(prefix + "INPUT_TIMEOUT_S", "7")
    loaded = settings_class.load(prefix)
    assert [str(h) for h in loaded.allowed_input_hosts()] == ["img.example", "[::1]:9000"]
    assert loaded.input_timeout_s == 7


# -- fetching -----------------------------------------------------------------------------------------


@dataclass
class Files:
    url: str
    port: int
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def files() -> AsyncIterator[Files]:
    served = Files("", 0)

    async def handle(request: web.Request) -> web.StreamResponse:
        served.hits.append(request.path_qs)
        name = request.match_info["name"]
        if name == "ok.png":
            return web.Response(body=b"\x89PNG-data", content_type="image/png")
        if name == "moved.png":
            raise web.HTTPFound(f"http://127.0.0.1:{served.port}/ok.png?from=redirect")
        if name == "chunked.png":  # no Content-Length: counted while it streams
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"x" * 1024)
            await response.write_eof()
            return response
        if name == "declared.png":
            return web.Response(body=b"x" * 4096)
        status = int(name.split(".")[0])
        # an error body that echoes the request, as S3 does with SignatureDoesNotMatch
        return web.Response(status=status, text=f"<Error><Signature>{request.query_string}</Signature></Error>")

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    served.port = runner.addresses[0][1]
    served.url = f"http://127.0.0.1:{served.port}"
    yield served
    await runner.cleanup()


def _allow(files: Files) -> tuple[AllowedHost, ...]:
    return parse_allowed_hosts(f"127.0.0.1:{files.port}")


async def test_an_allowed_url_is_fetched_with_its_query(files: Files) -> None:
    data = await fetch_input(f"{files.url}/ok.png?X-Amz-Signature={SECRET}#frag", _allow(files), 1024, 5)
    assert data == b"\x89PNG-data" and files.hits == [f"/ok.png?X-Amz-Signature={SECRET}"]


async def test_the_allowed_host_on_another_port_is_not_fetched(files: Files) -> None:
    with pytest.raises(PermanentJobError, match=f"port {files.port} is not in"):
        await fetch_input(f"{files.url}/ok.png", parse_allowed_hosts("127.0.0.1"), 1024, 5)
    assert files.hits == []


@pytest.mark.parametrize(("name", "error", "match"), [
    ("404.png", PermanentJobError, "answered 404 Not Found"),
    ("403.png", PermanentJobError, "answered 403 Forbidden .*retrying cannot help"),
    ("401.png", PermanentJobError, "answered 401"),
    ("410.png", PermanentJobError, "answered 410"),
    ("408.png", RetryableJobError, "answered 408"),
    ("429.png", RetryableJobError, "answered 429"),
    ("500.png", RetryableJobError, "answered 500"),
    ("503.png", RetryableJobError, "answered 503"),
    ("moved.png", PermanentJobError, "answered 302 Found: redirects are not followed"),
    ("chunked.png", PermanentJobError, "over this worker's limit of 1024 bytes \\(EMP_T_MAX\\)"),
    ("declared.png", PermanentJobError, "4096 bytes, over this worker's limit of 1024 bytes"),
])
async def test_answers_map_to_job_errors_without_secrets(files: Files, name: str, error: type[JobError],
                                                         match: str) -> None:
    url = f"{files.url}/{name}?X-Amz-Signature={SECRET}"
    with pytest.raises(error, match=match) as caught:
        await fetch_input(url, _allow(files), 1024, 5, size_setting="EMP_T_MAX")
    message = str(caught.value)
    assert type(caught.value) is error
    assert SECRET not in message and "Amz" not in message, message
    assert f"input {files.url}/{name}?..." in message
    assert files.hits == [f"/{name}?X-Amz-Signature={SECRET}"]  # one request: no redirect followed


async def test_an_unreachable_host_is_retryable_and_secret_free() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetryableJobError, match="unreachable") as caught:
        await fetch_input(f"http://127.0.0.1:{port}/a.png?sig={SECRET}", parse_allowed_hosts(f"127.0.0.1:{port}"),
                          1024, 2)
    assert SECRET not in str(caught.value)


async def test_credentials_in_a_url_are_refused_and_never_shown(files: Files) -> None:
    with pytest.raises(PermanentJobError, match="credentials") as caught:
        await fetch_input(f"http://bob:{SECRET}@127.0.0.1:{files.port}/ok.png?token={SECRET}", _allow(files),
                          1024, 5)
    assert SECRET not in str(caught.value) and "bob" not in str(caught.value)
    assert files.hits == []
