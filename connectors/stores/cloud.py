"""What the cloud stores (``s3``, ``azure``) share: their client library is optional, a job may
name its bucket only from the operator's list, and a job's ``cdnUrl`` only changes the URL listed.

A job's ``ctx.storage`` as emp-job-queue sends it::

    {"provider": "azure", "bucket": "<bucket or container>", "cdnUrl": "cdn.example.com"}

``bucket`` is honoured only when it is the configured one or listed in the ``ALLOWED_*`` setting;
credentials, endpoints and everything else come from the operator's environment, never a job.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlsplit

from connectors.stores import StoreError
from worker.errors import ConfigError

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}(:[0-9]{1,5})?$")
_BASE_PATH = re.compile(r"^(/(?!\.+(?:/|$))[A-Za-z0-9._~-]+)*/?$")  # no "." or ".." segment
MAX_NAME_CHARS = 255


def require(store: str, module: str, package: str) -> ModuleType:
    """Import a store's client library; a one-line ConfigError saying what to install when missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"EMP_OUTPUT_STORE={store} needs {package}: pip install 'emp-worker[{store}]'") from None


def names(listed: str) -> set[str]:
    """A comma-separated setting as a set of names."""
    return {item.strip() for item in listed.split(",") if item.strip()}


def http_url(value: str) -> str:
    """A settings validator: empty, or an http(s) URL."""
    if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
        raise ValueError("must be an http:// or https:// URL")
    return value


def chosen_bucket(storage: Mapping[str, Any], fields: Iterable[str], configured: str, allowed: set[str],
                  settings: tuple[str, str]) -> str:
    """The bucket a job's ``ctx.storage`` names (in the first of `fields` it has), when the operator
    allows it; else `configured`. `settings` names the two settings, for the message."""
    asked: Any = next((storage[f] for f in fields if storage.get(f) not in (None, "")), None)
    if asked is None or asked == configured:
        return configured
    if not isinstance(asked, str) or len(asked) > MAX_NAME_CHARS:
        raise StoreError(f"ctx.storage.bucket must be a name of at most {MAX_NAME_CHARS} characters", retryable=False)
    if asked in allowed:
        return asked
    shown = re.sub(r"[^A-Za-z0-9._-]", "?", asked[:64])
    raise StoreError(f"ctx.storage.bucket {shown!r} is not allowed on this worker: it is neither {settings[0]} "
                     f"nor listed in {settings[1]}", retryable=False)


def cdn_base(storage: Mapping[str, Any]) -> str | None:
    """The base URL a job's ``ctx.storage.cdnUrl`` asks the result to list (a host, with or without
    scheme and a base path); None when absent. Only the listed URL changes: bytes go where the
    operator's settings say."""
    raw = storage.get("cdnUrl", storage.get("cdn_url"))
    if raw in (None, ""):
        return None
    if not isinstance(raw, str) or len(raw) > 512:
        raise StoreError("ctx.storage.cdnUrl must be a host name of at most 512 characters", retryable=False)
    text = raw if "://" in raw else f"https://{raw}"
    try:
        parts = urlsplit(text)
        netloc_ok = bool(_HOST.match(parts.netloc))
    except ValueError:
        netloc_ok = False
    if (not netloc_ok or parts.scheme not in ("http", "https") or parts.query or parts.fragment
            or not _BASE_PATH.match(parts.path)):
        raise StoreError("ctx.storage.cdnUrl must be an http(s) host such as 'cdn.example.com' "
                         "(no user@, query or odd characters)", retryable=False)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def joined(base: str, key: str) -> str:
    """`key` under the base URL, its characters quoted."""
    return f"{base.rstrip('/')}/{quote(key, safe='/')}"


def redacted(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret, and any SAS/presigned signature, masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"(?i)((?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"]+",
                  r"\1***", text)
