"""HttpEngine: the one httpx helper every HTTP engine connector uses (ComfyUI, A1111, REST).

It owns timeouts, connect retries, error mapping, response size limits and the rule that a job
may only reach the configured engine host::

    class MyEngineConnector(Connector):
        name = "my-engine"
        service_types = ("my-engine",)

        async def start(self) -> None:
            url = self.config.env.get("MY_ENGINE_URL", "http://127.0.0.1:7860")
            self.http = HttpEngine(url, name="my-engine", token=self.config.env.get("MY_ENGINE_TOKEN"))

        async def run(self, job: Job, ctx: JobContext) -> JobResult:
            queued = await self.http.post_json("/generate", {"prompt": job.payload["prompt"]})
            got = await self.http.download_to(f"/outputs/{queued['id']}", ctx.temp_dir() / "out.png")
            ctx.add_output("out.png", path=ctx.temp_dir() / "out.png", content_type=got.content_type)
            return {"id": queued["id"], "bytes": got.size}

        async def health(self) -> Health:
            ok, message = await self.http.probe("/health")
            return Health(HealthState.OK if ok else HealthState.DOWN, message)

        async def stop(self) -> None:
            await self.http.aclose()

Errors (all ``JobError``s, so a job fails and the worker goes on):

- the engine answered non-2xx: ``error_for_status`` (400/404/405/410/413/414/415/422 are
  permanent; 401/403 are retryable and say to check the worker's credentials; the rest retryable);
- connect errors (refused, connect or pool timeout) are retried ``connect_retries`` times with
  capped exponential backoff (the request never reached the engine, so this is safe for POST),
  then ``RetryableJobError`` "... is unreachable ...; is it running?";
- read/write timeouts and other transport errors are NOT retried (the engine may have started the
  work): ``RetryableJobError`` at once, and the job's own retry policy decides;
- a body over ``max_response_bytes`` is ``PermanentJobError``: its size follows from the job's input
  (the same job gives the same output on every worker), so retrying would only burn GPU time;
- a path outside the engine's host (``//evil/x``, ``http://127.0.0.1@evil/``, ...) is
  ``PermanentJobError``: job payloads are untrusted and must not turn the worker against the network.

Configured tokens and passwords never appear in a message. Redirects are not followed (a 3xx is a
retryable error), so no answer can send a request to another host either.
"""

from __future__ import annotations

import asyncio
import base64
import json as jsonlib
import os
import random
import re
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import httpx

from worker import __version__
from worker.errors import ConfigError, JobError, PermanentJobError, RetryableJobError
from worker.settings import redact_url

__all__ = ["Downloaded", "HttpEngine", "StreamedResponse", "error_for_status"]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_BACKOFF_S = 5.0  # cap of the backoff between connect attempts
ERROR_BODY_BYTES = 64 * 1024  # how much of an error answer is read to explain it
EXCERPT_CHARS = 300
DOWNLOAD_CHUNK_BYTES = 1024 * 1024  # one thread hop per MiB written

PERMANENT_STATUSES = frozenset({400, 404, 405, 410, 413, 414, 415, 422})  # the job's input is bad
CREDENTIAL_STATUSES = frozenset({401, 403})  # this worker's configuration is bad, not the job
# everything else non-2xx (408, 409, 423, 425, 429, 5xx, 3xx, unknown) is retryable

# The `timeout` parameters below are httpx timeouts (connect/read/write/pool, each bounded), not a
# deadline for the whole call, hence the ASYNC109 ignores.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
DEFAULT_PORTS = {"http": 80, "https": 443}  # the schemes an engine may use, and their ports
_PrimitiveData = str | int | float | bool | None
Params = Mapping[str, _PrimitiveData | Sequence[_PrimitiveData]]


# -- pure decisions ---------------------------------------------------------------------------


def error_for_status(
    name: str, status: int, body: bytes | str, content_type: str, *, request: str = "",
    secrets: Iterable[str] = (),
) -> JobError:
    """The JobError for a non-2xx answer of engine ``name``, with a short excerpt of its body.

    ``request`` (e.g. ``"POST /prompt"``) is named in the message; every string in ``secrets``
    (tokens, passwords) is replaced by ``***`` in the excerpt.
    """
    reason = _reason(status)
    where = f" to {request}" if request else ""
    excerpt = body_excerpt(body, content_type, secrets=secrets)
    message = f"{name} answered {status}{' ' + reason if reason else ''}{where}"
    if excerpt:
        message += f": {excerpt}"
    if status in PERMANENT_STATUSES:
        return PermanentJobError(f"{message} (the engine refused this job's input; retrying cannot help)")
    if status in CREDENTIAL_STATUSES:
        return RetryableJobError(f"{message}; check the credentials (token or user/password) this worker "
                                 f"is configured with for {name}")
    return RetryableJobError(message)


def body_excerpt(body: bytes | str, content_type: str, *, secrets: Iterable[str] = (),
                 limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters explaining an error body: JSON ``error``/``message``/``detail``
    fields (FastAPI's 422 list as ``field: message``), else the start of the text, tags stripped."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    secrets = [s for s in secrets if s]
    data = _json_or_none(text, content_type)
    summary = _summarize(data) if data is not None else _plain(_redact(text, secrets), content_type)
    return _clip(_redact(summary, secrets), limit)


def connect_backoff_s(retry: int, base_s: float, jitter: float) -> float:
    """Seconds to wait before connect retry ``retry`` (0-based): ``base_s * 2**retry`` capped at
    MAX_BACKOFF_S, drawn from [half, full] of that by ``jitter`` in [0, 1)."""
    full = min(MAX_BACKOFF_S, base_s * 2.0 ** min(retry, 30))
    return full * (0.5 + 0.5 * jitter)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _json_or_none(text: str, content_type: str) -> Any:
    if "json" not in content_type.lower() and not text.lstrip().startswith(("{", "[")):
        return None
    try:
        return jsonlib.loads(text)
    except (ValueError, RecursionError):
        return None


def _summarize(data: Any) -> str:
    if isinstance(data, dict):
        parts: list[str] = []
        for key in ("error", "message", "detail", "details", "errors"):
            part = _render(data.get(key))
            if part and part not in parts:
                parts.append(part)
        if parts:
            return " - ".join(parts)
    return _render(data)


def _render(value: Any, depth: int = 0) -> str:
    """One line for a JSON value; validation items ({"loc": [...], "msg": ...}) as ``loc: msg``."""
    if value is None or value == "" or depth > 3:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        parts = [p for p in (_render(item, depth + 1) for item in value[:5]) if p]
        more = f" (and {len(value) - 5} more)" if len(value) > 5 else ""
        return "; ".join(parts) + more
    if isinstance(value, dict):
        if isinstance(value.get("msg"), str):
            loc = value.get("loc")
            path = [str(p) for p in loc] if isinstance(loc, list) else []
            if path[:1] == ["body"]:  # FastAPI puts the request part first: ["body", "steps"]
                path = path[1:]
            return f"{'.'.join(path)}: {value['msg']}" if path else str(value["msg"])
        if isinstance(value.get("message"), str):
            details = value.get("details")
            extra = f": {details}" if isinstance(details, str) and details else ""
            return f"{value['message']}{extra}"
    return jsonlib.dumps(value, separators=(",", ":"), default=str)[: EXCERPT_CHARS * 2]


def _plain(text: str, content_type: str) -> str:
    if "html" in content_type.lower() or text.lstrip().startswith("<"):
        text = re.sub(r"<[^>]*>", " ", text)
    return " ".join(text.split())


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, lower-case, the default port filled in: what must match for
    two URLs to reach the same server."""
    scheme = url.scheme.lower()
    return scheme, url.host.lower(), url.port or DEFAULT_PORTS.get(scheme)


def _foreign_target(base: httpx.URL, path: str) -> bool:
    """True when ``path`` could leave the base URL's scheme, host and port."""
    if path.startswith("//") or any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in path):
        return True
    try:
        url = httpx.URL(path)
    except httpx.InvalidURL:
        return True
    if not (url.scheme or url.host or url.userinfo):
        return False  # relative: merged under the base URL
    return bool(url.userinfo) or not url.host or origin(url) != origin(base)


# -- the client ---------------------------------------------------------------------------------


class Downloaded(NamedTuple):
    """What :meth:`HttpEngine.download_to` wrote: its size, and the answer's ``Content-Type``."""

    size: int
    content_type: str


class StreamedResponse:
    """A 2xx answer whose body is read in chunks, bounded by the engine's max_response_bytes."""

    def __init__(self, response: httpx.Response, engine: HttpEngine, what: str) -> None:
        self.response = response
        self._engine = engine
        self._what = what

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers

    async def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The decoded body; PermanentJobError as soon as it passes max_response_bytes."""
        seen = 0
        with self._engine._transport_errors(self._what):
            async for chunk in self.response.aiter_bytes(chunk_size):
                seen += len(chunk)
                if seen > self._engine.max_response_bytes:
                    raise self._engine.error_for_size(self._what, f"more than {seen} bytes")
                yield chunk


class HttpEngine:
    """One engine's HTTP API: an ``httpx.AsyncClient`` for ``base_url`` with the worker's rules.

    Paths are relative to ``base_url`` (a leading ``/`` stays under its path); an absolute URL is
    allowed only with the base URL's scheme, host and port. Credentials come from ``auth``
    (basic), ``token`` (bearer) or the URL's ``user:password@``. ``connect_retries=3`` means up
    to 4 connection attempts. ``verify`` is a bool, a CA bundle path or an ``ssl.SSLContext``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        connect_retries: int = 3,
        retry_backoff_s: float = 0.5,
        auth: tuple[str, str] | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        verify: bool | str | ssl.SSLContext = True,
        transport: httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.name = name
        self._shown_url = redact_url(base_url)
        url = self._parse_base(base_url)
        if url.userinfo:
            if auth is None and (url.username or url.password):
                auth = (url.username, url.password or "")
            url = url.copy_with(userinfo=b"")
        self._check_settings(connect_retries, retry_backoff_s, max_response_bytes, auth, token)
        self._base = url
        self.connect_retries = connect_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_response_bytes = max_response_bytes
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._secrets = self._secrets_of(auth, token)
        default_headers = {"User-Agent": f"emp-worker/{__version__}", **(headers or {})}
        if token:
            default_headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            base_url=url, timeout=self._timeout, auth=httpx.BasicAuth(*auth) if auth else None,
            headers=default_headers, verify=self._ssl_context(verify), transport=transport,
            follow_redirects=False,
        )

    def _parse_base(self, base_url: str) -> httpx.URL:
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in DEFAULT_PORTS or not url.host:
            raise ConfigError(f"{self.name} URL {self._shown_url!r}: must be an http:// or https:// URL "
                              "with a host, e.g. http://127.0.0.1:8188")
        return url

    def _check_settings(self, retries: int, backoff_s: float, max_bytes: int,
                        auth: tuple[str, str] | None, token: str | None) -> None:
        if retries < 0 or backoff_s < 0 or max_bytes <= 0:
            raise ConfigError(f"{self.name}: connect_retries and retry_backoff_s must be >= 0 and "
                              f"max_response_bytes > 0 (got {retries}, {backoff_s}, {max_bytes})")
        if auth and token:
            raise ConfigError(f"{self.name}: configure a bearer token or a user/password, not both")

    def _ssl_context(self, verify: bool | str | ssl.SSLContext) -> ssl.SSLContext | bool:
        if not isinstance(verify, str):
            return verify
        try:
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self.name}: CA bundle {verify!r} cannot be used: {exc}") from None

    @staticmethod
    def _secrets_of(auth: tuple[str, str] | None, token: str | None) -> tuple[str, ...]:
        secrets = [token] if token else []
        if auth and auth[1]:
            secrets += [auth[1], base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()]
        return tuple(sorted(secrets, key=len, reverse=True))  # longest first: no partial leftovers

    @property
    def base_url(self) -> str:
        """The engine's URL as given, any password replaced by ***."""
        return self._shown_url

    async def __aenter__(self) -> HttpEngine:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self, method: str, path: str, *, json: Any = None, params: Params | None = None,
        content: bytes | str | None = None, headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,  # noqa: ASYNC109
    ) -> httpx.Response:
        """Send a request and read its body (at most max_response_bytes); mapped JobError for a
        non-2xx answer. ``timeout=None`` means the engine's default, never "no timeout"."""
        async with self._open(method, path, json=json, params=params, content=content,
                              headers=headers, timeout=timeout) as streamed:
            body = bytearray()
            async for chunk in streamed.aiter_bytes():
                body += chunk
        response = streamed.response
        response._content = bytes(body)  # what httpx's own Response.aread() sets
        return response

    async def get_json(self, path: str, *, params: Params | None = None,
                       headers: Mapping[str, str] | None = None,
                       timeout: httpx.Timeout | float | None = None) -> Any:  # noqa: ASYNC109
        """GET ``path`` and return its JSON (None for an empty body)."""
        response = await self.request("GET", path, params=params, headers=headers, timeout=timeout)
        return self._json_of(response)

    async def post_json(self, path: str, body: Any, *, params: Params | None = None,
                        headers: Mapping[str, str] | None = None,
                        timeout: httpx.Timeout | float | None = None) -> Any:  # noqa: ASYNC109
        """POST ``body`` as JSON to ``path`` and return the JSON answer (None for an empty body)."""
        response = await self.request("POST", path, json=body, params=params, headers=headers,
                                      timeout=timeout)
        return self._json_of(response)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, json: Any = None, params: Params | None = None,
        content: bytes | str | None = None, headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[StreamedResponse]:
        """``async with engine.stream("GET", "/big") as r: async for chunk in r.aiter_bytes():``;
        a non-2xx answer raises before the block runs."""
        async with self._open(method, path, json=json, params=params, content=content,
                              headers=headers, timeout=timeout) as streamed:
            yield streamed

    async def download_to(self, path: str, dest: str | os.PathLike[str], *, params: Params | None = None,
                          headers: Mapping[str, str] | None = None,
                          timeout: httpx.Timeout | float | None = None) -> Downloaded:  # noqa: ASYNC109
        """GET ``path`` into the file ``dest``; returns its size and content type. Written to
        ``dest.part`` and renamed at the end, so a failed download leaves no file behind."""
        target = Path(dest)
        partial = target.with_name(target.name + ".part")
        written = 0
        async with self.stream("GET", path, params=params, headers=headers, timeout=timeout) as streamed:
            content_type = streamed.headers.get("Content-Type", "")
            file = await asyncio.to_thread(partial.open, "wb")
            try:
                async for chunk in streamed.aiter_bytes(DOWNLOAD_CHUNK_BYTES):
                    await asyncio.to_thread(file.write, chunk)
                    written += len(chunk)
            except BaseException:
                file.close()
                partial.unlink(missing_ok=True)
                raise
            await asyncio.to_thread(file.close)
        os.replace(partial, target)
        return Downloaded(written, content_type)

    async def probe(self, path: str = "/", timeout: float = 5.0) -> tuple[bool, str]:  # noqa: ASYNC109
        """(True, message) when ``path`` answers 2xx, else (False, why); one attempt, never raises
        for engine trouble. For connectors' ``health()``."""
        try:
            async with self._open("GET", path, timeout=timeout, retries=0) as streamed:
                response = streamed.response
                return True, f"{self.name} at {self.base_url} answered {response.status_code}"
        except JobError as exc:
            return False, str(exc)

    def error_for_answer(self, status: int, body: bytes, content_type: str, request: str) -> JobError:
        """The JobError for a non-2xx answer (``body``: at most 64 KiB of it; ``request``: e.g.
        ``"POST /prompt"``). The default is :func:`error_for_status`; a connector whose engine has
        its own error format overrides this in a subclass, passing any text it takes from the
        body through :meth:`redact`."""
        return error_for_status(self.name, status, body, content_type, request=request, secrets=self._secrets)

    def error_for_response(self, response: httpx.Response, body: bytes, request: str) -> JobError:
        """The JobError for a non-2xx ``response`` when its headers matter too (``Retry-After``,
        ``Location``); the default is :meth:`error_for_answer`."""
        return self.error_for_answer(response.status_code, body, response.headers.get("Content-Type", ""), request)

    def error_for_size(self, what: str, size: str) -> JobError:
        """The JobError for an answer over ``max_response_bytes`` (``size``: e.g. ``"more than 1025
        bytes"``). Permanent by default: the size follows from the job's input."""
        return PermanentJobError(f"{self.name} answered {what} with {size}, over this worker's limit of "
                                 f"{self.max_response_bytes} bytes (max_response_bytes); the job's output "
                                 "is too big to fetch")

    def redact(self, text: str) -> str:
        """``text`` with every configured token and password replaced by ``***``."""
        return _redact(text, self._secrets)

    # -- internals ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _open(
        self, method: str, path: str, *, json: Any = None, params: Params | None = None,
        content: bytes | str | None = None, headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None, retries: int | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[StreamedResponse]:
        request = self._build(method, path, json=json, params=params, content=content, headers=headers,
                              timeout=timeout)
        what = f"{request.method} {request.url.path}"
        response = await self._send(request, what, self.connect_retries if retries is None else retries)
        try:
            if not response.is_success:
                raise await self._error_of(response, what)
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise self.error_for_size(what, f"{declared} bytes")
            yield StreamedResponse(response, self, what)
        finally:
            await response.aclose()

    def _build(self, method: str, path: str, *, json: Any, params: Params | None, content: bytes | str | None,
               headers: Mapping[str, str] | None, timeout: httpx.Timeout | float | None) -> httpx.Request:
        if _foreign_target(self._base, path) or any(k.lower() == "host" for k in headers or {}):
            raise self._foreign(path)
        request = self._client.build_request(
            method, path, json=json, params=params, content=content, headers=headers,
            timeout=self._timeout if timeout is None else timeout,
        )
        if origin(request.url) != origin(self._base):  # the final URL, whatever the parsing above
            raise self._foreign(path)
        return request

    async def _send(self, request: httpx.Request, what: str, retries: int) -> httpx.Response:
        attempt = 0
        while True:
            try:
                with self._transport_errors(what, connecting=True):
                    return await self._client.send(request, stream=True)
            except _ConnectFailed as failed:
                if attempt >= retries:
                    raise self._unreachable(failed.cause, attempt + 1) from failed.cause
            await asyncio.sleep(connect_backoff_s(attempt, self.retry_backoff_s, random.random()))
            attempt += 1

    @contextmanager
    def _transport_errors(self, what: str, *, connecting: bool = False) -> Iterator[None]:
        """httpx's transport errors as JobErrors; while ``connecting``, connect errors become
        _ConnectFailed for _send to retry."""
        try:
            yield
        except _CONNECT_ERRORS as exc:
            if not connecting:
                raise RetryableJobError(f"{self.name} at {self.base_url} failed during {what}: "
                                        f"{type(exc).__name__}: {self._detail(exc)}") from exc
            raise _ConnectFailed(exc) from exc
        except httpx.TimeoutException as exc:
            raise RetryableJobError(f"{self.name} at {self.base_url} did not answer {what} in time "
                                    f"({type(exc).__name__}); not retried here: the engine may have "
                                    "started the work") from exc
        except httpx.TransportError as exc:
            raise RetryableJobError(f"{self.name} at {self.base_url} failed during {what}: "
                                    f"{type(exc).__name__}: {self._detail(exc)}") from exc

    async def _error_of(self, response: httpx.Response, what: str) -> JobError:
        body = bytearray()
        with self._transport_errors(what):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= ERROR_BODY_BYTES:
                    break
        return self.error_for_response(response, bytes(body[:ERROR_BODY_BYTES]), what)

    def _json_of(self, response: httpx.Response) -> Any:
        if not response.content:
            return None
        try:
            return response.json()
        except (ValueError, RecursionError):
            excerpt = body_excerpt(response.content, "text/plain", secrets=self._secrets)
            raise RetryableJobError(f"{self.name} answered {response.status_code} to {response.request.method} "
                                    f"{response.request.url.path} with a body that is not JSON: {excerpt}") from None

    def _detail(self, exc: BaseException) -> str:
        return _clip(_redact(str(exc), self._secrets), 200) or "no detail"

    def _unreachable(self, exc: BaseException, attempts: int) -> RetryableJobError:
        return RetryableJobError(f"{self.name} at {self.base_url} is unreachable: {type(exc).__name__}: "
                                 f"{self._detail(exc)} ({attempts} attempt(s)); is it running?")

    def _foreign(self, path: str) -> PermanentJobError:
        host = f"{self._base.scheme}://{self._base.netloc.decode('ascii')}"
        return PermanentJobError(f"{self.name}: the job may only reach the configured engine host ({host}); "
                                 f"refused {_clip(path, 100)!r}")


class _ConnectFailed(Exception):
    """Internal: a connect error inside _transport_errors, for _send to retry."""

    def __init__(self, cause: httpx.TransportError) -> None:
        super().__init__(str(cause))
        self.cause = cause
