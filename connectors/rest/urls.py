"""Where a REST job may send a request: pure functions, no I/O.

A job names an ``endpoint`` relative to the base URL the operator configured for its service. The
rule is deliberately narrow, so that no trick (``..``, ``//host``, ``%2e%2e``, ``%2f``, ``\\``,
``user@host``, ``[::1]``, ``file:``, an absolute URL) can point the worker at another host, port,
scheme, or a path outside the base::

    >>> join_url("http://127.0.0.1:8000/api/", "/v1/tasks?limit=2")
    'http://127.0.0.1:8000/api/v1/tasks?limit=2'

- the endpoint is printable ASCII (anything else must be percent-encoded);
- its path is segments of RFC 3986 path characters, ``@`` excepted; no empty segment (``//``), no
  ``.`` or ``..`` segment, raw or percent-encoded, and no percent-encoded ``/``, ``\\`` or ``%``;
- ``;`` path parameters (``/cars;v=2``) are allowed, but no ``;``-separated piece of a segment may be
  ``.`` or ``..`` and the piece before the first ``;`` may not be empty: Tomcat, Jetty and Spring drop
  ``;params`` before they normalise the path, so ``/api/..;/admin`` is ``/admin`` to them, and other
  servers read the pieces in other orders (``/api/;../admin``); ``%3B`` counts as ``;``;
- the first segment has no ``:`` (it would read as a scheme: ``file:``, ``http:``, ``localhost:80``);
- an optional ``?query`` of URL query characters; no ``#fragment``;
- it is appended to the base path (a leading ``/`` stays under it), and the joined URL is parsed
  again and must have the base's scheme, host, port and path prefix.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import httpx

from connectors.http import DEFAULT_PORTS, origin

MAX_ENDPOINT_CHARS = 2048
MAX_TASK_ID_CHARS = 256
TASK_ID_PLACEHOLDER = "{task_id}"

_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")  # pchar without '@'
_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:/?@]|%[0-9A-Fa-f]{2})*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_TASK_ID = re.compile(r"[A-Za-z0-9_~.\-]+")


class ForbiddenTarget(ValueError):
    """The endpoint could leave the configured base URL; the message says why."""


def join_url(base: str, endpoint: str) -> str:
    """``endpoint`` appended to ``base`` (a URL from :func:`normalize_base`); ForbiddenTarget if it
    could reach anything but a path under ``base``."""
    if not isinstance(endpoint, str):
        raise ForbiddenTarget("the endpoint must be a string")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise ForbiddenTarget(f"the endpoint is longer than {MAX_ENDPOINT_CHARS} characters")
    bad = next((c for c in endpoint if not 0x21 <= ord(c) <= 0x7E), None)
    if bad is not None:
        raise ForbiddenTarget(f"character {bad!r} is not allowed (percent-encode it)")
    if "#" in endpoint:
        raise ForbiddenTarget("a #fragment is not allowed")
    path, has_query, query = endpoint.partition("?")
    scheme = _SCHEME.match(path)
    if scheme:
        raise ForbiddenTarget(f"an absolute URL ({scheme.group(0)}) is not allowed: give a path under the base URL")
    if path.startswith("//"):
        raise ForbiddenTarget("'//' would name another host")
    segments = _segments(path)
    if has_query and not _QUERY.fullmatch(query):
        raise ForbiddenTarget(f"the query has a character that is not allowed: {_first_bad(query, _QUERY)!r}")
    joined = base + "/".join(segments) + (f"?{query}" if has_query else "")
    _check_under(base, joined)
    return joined


def _segments(path: str) -> list[str]:
    relative = path[1:] if path.startswith("/") else path
    if not relative:
        return []
    segments = relative.split("/")
    if ":" in segments[0]:
        raise ForbiddenTarget("a ':' in the first segment reads as a scheme or a host:port")
    for index, segment in enumerate(segments):
        if not segment:
            if index == len(segments) - 1:
                continue  # a trailing slash
            raise ForbiddenTarget("an empty segment ('//') is not allowed")
        if not _SEGMENT.fullmatch(segment):
            raise ForbiddenTarget(f"character {_first_bad(segment, _SEGMENT)!r} is not allowed in a path")
        decoded = unquote(segment)
        if decoded in (".", ".."):
            raise ForbiddenTarget("'.' and '..' segments are not allowed (encoded or not)")
        _check_parameters(decoded)
        if any(c in decoded for c in "/\\%") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            raise ForbiddenTarget("a percent-encoded '/', '\\', '%' or control character is not allowed")
    return segments


def _check_parameters(decoded: str) -> None:
    """A segment with ``;`` path parameters: none of its pieces may act as a dot segment or an empty one
    for a server that strips the parameters before normalising (``..;x``) or after (``x;..``)."""
    if ";" not in decoded:
        return
    pieces = decoded.split(";")
    if any(piece in (".", "..") for piece in pieces):
        raise ForbiddenTarget("'.' and '..' segments are not allowed, with ';' parameters either ('..;x', ';..')")
    if not pieces[0]:
        raise ForbiddenTarget("a segment that is only ';' parameters reads as an empty segment: not allowed")


def _first_bad(text: str, allowed: re.Pattern[str]) -> str:
    """The first character of ``text`` that ``allowed`` refuses (``%`` for a malformed escape)."""
    index = 0
    while index < len(text):
        step = 3 if text[index] == "%" else 1
        if not allowed.fullmatch(text[index:index + step]):
            return text[index]
        index += step
    return "%"


def _check_under(base: str, joined: str) -> None:
    """Defence in depth: the joined URL, parsed as the HTTP client parses it, stays under base."""
    try:
        url, root = httpx.URL(joined), httpx.URL(base)
    except httpx.InvalidURL as exc:
        raise ForbiddenTarget(f"the URL cannot be parsed: {exc}") from None
    if (origin(url) != origin(root) or url.userinfo or not url.raw_path.startswith(root.raw_path)):
        raise ForbiddenTarget("the URL would leave the configured base URL")


def normalize_base(url: str) -> str:
    """The operator's base URL checked and ending in ``/``; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. https://api.example.com/v1")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials: give them in auth (from the environment)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must not have a ?query or #fragment")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError("has an invalid port") from None
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    _segments(path.rstrip("/"))  # no '..' or odd characters in the operator's path either
    return f"{parts.scheme}://{parts.netloc}{path}"


def fill_task_id(template: str, task_id: str) -> str:
    """A status or cancel path template with ``{task_id}`` filled in; the id must be a plain token
    (letters, digits, ``_~.-``), so a service's answer cannot steer the next request."""
    if not (0 < len(task_id) <= MAX_TASK_ID_CHARS and _TASK_ID.fullmatch(task_id)) or task_id in (".", ".."):
        raise ForbiddenTarget(f"task id {task_id[:80]!r} is not a plain token (letters, digits, '_~.-', "
                              f"at most {MAX_TASK_ID_CHARS})")
    return template.replace(TASK_ID_PLACEHOLDER, task_id)
