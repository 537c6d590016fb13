"""The ``http-put`` output store: each output is PUT to a URL the submitter gives in the job's
``ctx.storage`` (typically presigned), so the worker holds no cloud credentials::

    "ctx": {"storage": {"provider": "http-put",
                        "urls": ["https://bucket.s3.example/out/0.png?X-Amz-Signature=..."],
                        "public_urls": ["https://cdn.example/out/0.png"]}}

``urls`` is a list (by output index) or an object (by output name); ``url_template`` instead
gives one URL for all, with ``{key}``, ``{job_id}``, ``{index}`` and ``{name}`` filled in. The
result lists ``public_urls`` / ``public_url_template`` when given, else the upload URL without
its query string (which is where a presigned URL keeps its signature: never shown).

A job may only upload to the hosts the operator lists in ``EMP_HTTP_PUT_HOSTS`` (``host`` or
``host:port``, comma separated); redirects are not followed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import Field, field_validator

from connectors.settings import ConnectorSettings
from connectors.stores import OutputStore, Stored, StoreError, Upload

MAX_URL_CHARS = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpPutSettings(ConnectorSettings):
    """EMP_HTTP_PUT_*."""

    hosts: str = Field("", max_length=4096)  # the hosts a job may upload to
    timeout_s: float = Field(300.0, gt=0, le=3600)

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip():
                parse_host(item)  # its ValueError says what is wrong
        return value

    def allowed(self) -> set[tuple[str, int]]:
        return {where for item in self.hosts.split(",") if item.strip() for where in parse_host(item)}


def parse_host(item: str) -> set[tuple[str, int]]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` as the (host, port) pairs it allows (no
    port: 443 and 80)."""
    item = item.strip().lower()
    try:
        parts = urlsplit(f"//{item}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{item!r} is not a host or host:port ({exc})") from None
    if not host or parts.path or parts.query or parts.username is not None or port == 0:
        raise ValueError(f"{item!r} is not a host or host:port")
    return {(host, port)} if port else {(host, 443), (host, 80)}


def safe_url(url: httpx.URL) -> str:
    """The URL without its query and fragment (a presigned URL's signature lives there)."""
    return str(url.copy_with(query=None, fragment=None))


class HttpPutStore(OutputStore):
    name = "http-put"
    aliases = ("presigned",)
    settings_class = HttpPutSettings
    settings: HttpPutSettings

    def __init__(self, settings: ConnectorSettings) -> None:
        super().__init__(settings)
        self._client = httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(self.settings.timeout_s,
                                                                                       connect=10.0))

    def target(self, upload: Upload) -> tuple[httpx.URL, str]:
        """The URL to PUT to, checked against EMP_HTTP_PUT_HOSTS, and the URL the result lists."""
        storage = upload.storage
        put_url = _pick(storage, "urls", "url_template", upload)
        if put_url is None:
            raise StoreError("ctx.storage gives no upload URL for output "
                             f"{upload.index} ({upload.output.name!r}): add 'urls' or 'url_template'", retryable=False)
        url = _checked(put_url, self.settings.allowed())
        public = _pick(storage, "public_urls", "public_url_template", upload)
        return url, public if public is not None else safe_url(url)

    async def put(self, upload: Upload) -> Stored:
        url, public = self.target(upload)
        headers = {"Content-Type": upload.content_type, "Content-Length": str(upload.size_bytes)}
        try:
            response = await self._client.put(url, content=upload.chunks(), headers=headers)
        except httpx.HTTPError as exc:
            raise StoreError(f"PUT {safe_url(url)} failed: {type(exc).__name__}: {exc}".replace(str(url), safe_url(url))
                             ) from exc
        if response.is_success:
            return Stored(public, upload.size_bytes)
        retryable = response.status_code >= 500 or response.status_code in (408, 429)
        raise StoreError(f"PUT {safe_url(url)} answered {response.status_code} {response.reason_phrase}"
                         + ("" if retryable else " (is the presigned URL expired or for another object?)"),
                         retryable=retryable)

    async def close(self) -> None:
        await self._client.aclose()


def _pick(storage: Mapping[str, Any], listed: str, template: str, upload: Upload) -> str | None:
    urls = storage.get(listed)
    found: Any = None
    if isinstance(urls, list) and upload.index < len(urls):
        found = urls[upload.index]
    elif isinstance(urls, Mapping):
        found = urls.get(upload.output.name)
    elif isinstance(storage.get(template), str):
        job_part = upload.key.rsplit("/", 2)[-2]  # the job id as the key holds it: safe in a path
        fill = {"key": upload.key, "job_id": job_part, "index": str(upload.index), "name": upload.output.name}
        found = storage[template]
        for placeholder, value in fill.items():
            found = found.replace("{" + placeholder + "}", value)
    if found is None:
        return None
    if not isinstance(found, str) or not found or len(found) > MAX_URL_CHARS:
        raise StoreError(f"ctx.storage.{listed}: each URL must be a string of at most {MAX_URL_CHARS} characters",
                         retryable=False)
    return found


def _checked(raw: str, allowed: set[tuple[str, int]]) -> httpx.URL:
    """`raw` as a URL on an allowed host; StoreError (permanent) otherwise."""
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError) as exc:
        raise StoreError(f"ctx.storage: {raw[:60]!r}... is not a URL", retryable=False) from exc
    if url.scheme not in _DEFAULT_PORTS or not url.host:
        raise StoreError("ctx.storage: upload URLs must be http:// or https://", retryable=False)
    if url.userinfo:
        raise StoreError("ctx.storage: upload URLs may not carry user:password@", retryable=False)
    where = (url.host.lower(), url.port or _DEFAULT_PORTS[url.scheme])
    if where not in allowed:
        hint = "set EMP_HTTP_PUT_HOSTS" if not allowed else "EMP_HTTP_PUT_HOSTS does not list it"
        raise StoreError(f"ctx.storage: uploads to {where[0]}:{where[1]} are not allowed on this worker ({hint})",
                         retryable=False)
    return url
