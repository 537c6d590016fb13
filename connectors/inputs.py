"""Inputs a job gives as URLs (an init image, a mask, a LoadImage file), fetched by the worker.

A job's payload is untrusted, so a URL is fetched only when the operator allows its host *and
port*, and what comes back is bounded. One parser decides (httpx's, the one that sends the
request) and one rule applies to every connector:

- the allow-list (``EMP_<CONNECTOR>_INPUT_HOSTS``, a comma list) has entries ``host[:port]``:
  ``cdn.example.com``, ``*.example.com`` (any subdomain, not the domain itself), ``10.0.0.5:9000``,
  ``[::1]:8080``. An entry without a port allows only the scheme's default port (80 for http, 443
  for https): allowing ``img.example`` must not let a job reach ``img.example:6379``;
- only ``http`` and ``https``; no ``user:pass@``; host names compare lower-case, IDNA-encoded and
  without a trailing dot; an IP address only matches an entry that is that IP address (a wildcard
  never matches one), and numeric host spellings (``2130706433``, ``0x7f.1``) are refused;
- redirects are not followed (a 3xx could lead anywhere: it fails the job), the body is counted
  while it streams and the job fails as soon as it passes ``max_bytes``;
- a 4xx fails the job for good (the URL is wrong, expired or forbidden: the same on every
  worker), except 408 and 429, which say "later"; 5xx, connection trouble and timeouts are
  retryable;
- messages show the URL without its user info and query (a presigned URL's ``?X-Amz-Signature=``
  is a credential), and never the body of an error answer (S3 echoes the signature in it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx
from pydantic import Field, field_validator

from connectors.http import DEFAULT_PORTS, HttpEngine
from connectors.settings import ConnectorSettings
from worker.errors import JobError, PermanentJobError, RetryableJobError

__all__ = ["AllowedHost", "InputSettings", "check_input_url", "fetch_input", "parse_allowed_hosts", "shown_url"]

MAX_URL_CHARS = 8192
RETRYABLE_4XX = frozenset({408, 429})
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")


@dataclass(frozen=True)
class AllowedHost:
    """One allow-list entry: ``host`` lower-case (IDNA, no brackets), ``*.`` stripped when ``wildcard``,
    ``port`` None for the scheme's default port only."""

    host: str
    port: int | None = None
    wildcard: bool = False

    def allows(self, host: str, port: int, default_port: int) -> bool:
        if port != (self.port if self.port is not None else default_port):
            return False
        if self.wildcard:
            return _ip(host) is None and host.endswith("." + self.host)
        entry_ip, host_ip = _ip(self.host), _ip(host)
        if entry_ip is not None or host_ip is not None:
            return entry_ip is not None and entry_ip == host_ip
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return ("*." if self.wildcard else "") + host + (f":{self.port}" if self.port is not None else "")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _normal_host(raw_host: bytes) -> str:
    """httpx's raw (IDNA-encoded) host, lower-case, without a trailing dot; ValueError when it is no
    plain host name or IP address."""
    host = raw_host.decode("ascii", "replace").lower()
    if _ip(host) is not None:
        return str(_ip(host))
    host = host[:-1] if host.endswith(".") else host
    if not host or len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError("is not a host name or an IP address")
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        raise ValueError("is a numeric host that is not a plain IP address (e.g. 2130706433 or 0x7f.1)")
    return host


def parse_allowed_hosts(entries: str | Iterable[str]) -> tuple[AllowedHost, ...]:
    """The allow-list from a comma list (or its entries); ValueError naming the bad entry."""
    items = entries.split(",") if isinstance(entries, str) else entries
    return tuple(_parse_entry(item.strip()) for item in items if item.strip())


def _parse_entry(entry: str) -> AllowedHost:
    wildcard = entry.startswith("*.")
    rest = entry[2:] if wildcard else entry
    if any(c in rest for c in "*/@?#\\ ") or "://" in rest:
        raise ValueError(f"{entry!r}: an entry is host[:port] or *.domain[:port], no scheme, path or user")
    if rest.startswith("["):
        inside, bracket, port_part = rest[1:].partition("]")
        if not bracket or (port_part and not port_part.startswith(":")):
            raise ValueError(f"{entry!r}: an IPv6 address is written [address] or [address]:port")
        host_text, port_text = f"[{inside}]", port_part[1:] if port_part else None
    elif rest.count(":") > 1:
        raise ValueError(f"{entry!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    else:
        host_text, colon, port_text_or_empty = rest.partition(":")
        port_text = port_text_or_empty if colon else None
    try:
        host = _normal_host(httpx.URL(f"http://{host_text}/").raw_host)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"{entry!r}: {exc}") from None
    if wildcard and _ip(host) is not None:
        raise ValueError(f"{entry!r}: a wildcard names a domain, not an IP address")
    if port_text is not None and not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return AllowedHost(host, int(port_text) if port_text is not None else None, wildcard)


def shown_url(url: str | httpx.URL) -> str:
    """The URL as messages show it: no user info, no query, no fragment (at most 200 characters)."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except httpx.InvalidURL:
        return "(a URL that does not parse)"
    netloc = parsed.netloc.decode("ascii", "replace")
    path = parsed.raw_path.decode("ascii", "replace").split("?", 1)[0]
    shown = f"{parsed.scheme}://{netloc}{path}" + ("?..." if parsed.query else "")
    return shown if len(shown) <= 200 else shown[:200] + "..."


def check_input_url(url: str, allowed: Sequence[AllowedHost], *,
                    hosts_setting: str = "the input host list") -> httpx.URL:
    """The parsed URL when a job may have it fetched; PermanentJobError saying why not."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise PermanentJobError(f"an input URL must be a string of at most {MAX_URL_CHARS} characters")
    shown = shown_url(url)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise PermanentJobError(f"input {shown}: not a valid URL") from None
    default_port = DEFAULT_PORTS.get(parsed.scheme)
    if default_port is None:
        raise PermanentJobError(f"input {shown}: only http:// and https:// URLs are fetched")
    if parsed.userinfo:
        raise PermanentJobError(f"input {shown}: URLs with credentials (user:password@) are not fetched")
    try:
        host = _normal_host(parsed.raw_host)
    except ValueError as exc:
        raise PermanentJobError(f"input {shown}: the host {exc}") from None
    port = parsed.port if parsed.port is not None else default_port
    if not any(entry.allows(host, port, default_port) for entry in allowed):
        raise PermanentJobError(f"input {shown}: {host} port {port} is not in {hosts_setting}, so the worker "
                                "does not fetch it (send the data inline, or allow the host and port)")
    return parsed


class _InputHost(HttpEngine):
    """The server of one input: its answers are judged as a URL's, not as an engine's."""

    def __init__(self, url: httpx.URL, *, max_bytes: int, timeout_s: float, size_setting: str) -> None:
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        super().__init__(origin, name="input host", connect_retries=2, max_response_bytes=max_bytes,
                         timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
        self._size_setting = size_setting

    def error_for_answer(self, status: int, body: bytes, content_type: str, request: str) -> JobError:
        reason = _phrase(status)
        if 300 <= status < 400:
            return PermanentJobError(f"answered {status}{reason}: redirects are not followed (they could lead "
                                     "anywhere); give the final URL")
        if status in RETRYABLE_4XX or status >= 500:
            return RetryableJobError(f"answered {status}{reason}")
        return PermanentJobError(f"answered {status}{reason} (the URL is wrong, expired or not allowed; "
                                 "retrying cannot help)")

    def error_for_size(self, what: str, size: str) -> JobError:
        return PermanentJobError(f"is {size}, over this worker's limit of {self.max_response_bytes} bytes "
                                 f"({self._size_setting})")


def _phrase(status: int) -> str:
    phrase = httpx.codes.get_reason_phrase(status)
    return f" {phrase}" if phrase else ""


async def fetch_input(url: str, allowed_hosts: Sequence[AllowedHost], max_bytes: int, timeout_s: float, *,
                      hosts_setting: str = "the input host list", size_setting: str = "the input size limit") -> bytes:
    """The bytes at ``url`` (see the module's rules); JobErrors whose message names the URL without
    its user info or query. ``hosts_setting``/``size_setting``: the variables a message names."""
    parsed = check_input_url(url, allowed_hosts, hosts_setting=hosts_setting)
    shown = shown_url(parsed)
    target = parsed.copy_with(fragment=None)
    try:
        async with _InputHost(parsed, max_bytes=max_bytes, timeout_s=timeout_s, size_setting=size_setting) as http:
            response = await http.request("GET", str(target))
    except JobError as exc:
        raise type(exc)(f"input {shown}: {exc}") from exc
    return response.content


class InputSettings(ConnectorSettings):
    """Settings of a connector that fetches input URLs: ``INPUT_HOSTS`` (the allow-list, checked at
    start-up) and ``INPUT_TIMEOUT_S`` (each fetch, connect included)."""

    #: hosts (and ports) whose http(s) URLs a job may give as inputs: host[:port], *.domain[:port]
    input_hosts: str = Field("", max_length=4096)
    input_timeout_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("input_hosts")
    @classmethod
    def _check_input_hosts(cls, value: str) -> str:
        parse_allowed_hosts(value)
        return value

    def allowed_input_hosts(self) -> tuple[AllowedHost, ...]:
        return parse_allowed_hosts(self.input_hosts)
