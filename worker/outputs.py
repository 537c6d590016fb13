"""Where a job's outputs go: small ones inline in the result, the rest into an output store.

A connector hands each output to ``JobContext.add_output`` (bytes, or a file path for large
ones). After a successful run the worker lists them in the result as ``outputs: [{name,
size_bytes, content_type, url}]``, plus the fields emp-job-queue's clients read: ``output_files``
(``{filename, url, mime_type, filesize}``), and ``image_url`` / ``mime_type`` of the first image,
video or audio output. An output of at most ``EMP_OUTPUT_INLINE_BYTES`` that is not media
carries its bytes instead of a URL (``text`` when it is UTF-8 text, else ``data_base64``); media
(declared, or recognised by its first bytes) always goes to a store, so no base64 image lands
in a Redis record, event or stream. A ``data:`` URI, or a long base64 string of a media file, in
a connector's result is turned into an output too, its place in the result taking the stored URL.

The store is the one the job's ``ctx.storage.provider`` names, else ``EMP_OUTPUT_STORE``
(connectors/stores/). Object names are ``{ctx.prefix}{job}/{index:03d}-{name}``: a retry
overwrites the earlier attempt's objects. A put is tried ``PUT_TRIES`` times with backoff and
its size checked; a failure fails the job as retryable with the store's message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from connectors.base import JobResult, Output
from connectors.stores import OutputStore, Stored, StoreError, Upload, prefix_of
from worker.errors import ConfigError, PermanentJobError, RetryableJobError
from worker.protocol import Job
from worker.retry import Backoff
from worker.settings import Settings

log = logging.getLogger("emp.outputs")

PUT_TRIES = 3
EMBEDDED_MIN_CHARS = 1024  # a base64 string at least this long in a result becomes an output
MAX_EMBEDDED = 32
MAX_DEPTH = 64  # a result nested deeper is refused (and never walked to a RecursionError)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEXT_TYPES = ("text/", "application/json")
_MEDIA_TYPES = ("image/", "video/", "audio/")
_BASE64 = re.compile(r"^[A-Za-z0-9+/\r\n]+={0,2}\s*$|^[A-Za-z0-9_\-\r\n]+={0,2}\s*$")
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)
# first bytes -> content type: what a connector hands over as application/octet-stream is still media
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"), (b"\xff\xd8\xff", 0, "image/jpeg"), (b"GIF8", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"), (b"ftyp", 4, "video/mp4"), (b"\x1aE\xdf\xa3", 0, "video/webm"),
    (b"WAVE", 8, "audio/wav"), (b"ID3", 0, "audio/mpeg"), (b"OggS", 0, "audio/ogg"), (b"fLaC", 0, "audio/flac"),
)
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
               "video/mp4": ".mp4", "video/webm": ".webm", "audio/wav": ".wav", "audio/mpeg": ".mp3",
               "audio/ogg": ".ogg", "audio/flac": ".flac"}


def sniff(head: bytes) -> str | None:
    """The media type the first bytes of a file show, if any."""
    for magic, offset, content_type in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return content_type
    return None


def object_name(job: Job, index: int, output: Output) -> str:
    """Deterministic per job and output index; a job id unsafe in a path is hashed."""
    job_part = job.id if _SAFE_ID.match(job.id) and ".." not in job.id else hashlib.sha256(job.id.encode()).hexdigest()
    return f"{job_part}/{index:03d}-{output.name}"


def _head(output: Output) -> bytes:
    with open(str(output.path), "rb") as source:
        return source.read(16)


def _inline(output: Output) -> dict[str, Any]:
    data = output.data if output.data is not None else Path(str(output.path)).read_bytes()
    entry: dict[str, Any] = {"name": output.name, "size_bytes": len(data), "content_type": output.content_type}
    if output.content_type.startswith(_TEXT_TYPES):
        try:
            entry["text"] = data.decode()
            return entry
        except UnicodeDecodeError:
            pass
    entry["data_base64"] = base64.b64encode(data).decode()
    return entry


def _decoded(text: str) -> tuple[bytes, str | None, bool] | None:
    """The bytes a base64 string or data: URI holds, its declared type, and whether it was a data:
    URI; None when it is neither (standard or URL-safe alphabet)."""
    declared, is_uri = None, False
    match = _DATA_URI.match(text)
    if match:
        declared, text, is_uri = match.group(1), text[match.end():], True
    elif len(text) < EMBEDDED_MIN_CHARS or not _BASE64.match(text):
        return None
    compact = "".join(text.split())
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4)), declared, is_uri
        return base64.b64decode(compact, validate=True), declared, is_uri
    except (binascii.Error, ValueError):
        return None


class _Slot:
    """Where an extracted file's URL goes back into the result (no JSON value can look like one)."""

    def __init__(self, index: int) -> None:
        self.index = index


def extract_embedded(value: Any, found: list[Output], where: str = "result", *, large_bytes: int = 64 * 1024,
                     depth: int = 0) -> Any:
    """`value` with each file embedded as base64 replaced by a placeholder, its bytes appended to
    `found`: every ``data:`` URI, and each long base64 string that holds an image, video or audio
    file or is over `large_bytes`. PermanentJobError for a result nested too deep, or holding more
    files than MAX_EMBEDDED (they would otherwise stay in Redis as base64)."""
    if depth > MAX_DEPTH:
        raise PermanentJobError(f"the connector's result nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        return {k: extract_embedded(v, found, f"{where}.{k}", large_bytes=large_bytes, depth=depth + 1)
                for k, v in value.items()}
    if isinstance(value, list):
        return [extract_embedded(v, found, f"{where}.{i}", large_bytes=large_bytes, depth=depth + 1)
                for i, v in enumerate(value)]
    if not isinstance(value, str) or (decoded := _decoded(value)) is None:
        return value
    data, declared, is_uri = decoded
    content_type = sniff(data[:16]) or declared
    if content_type is None and not is_uri and len(data) <= large_bytes:
        return value  # e.g. a long hex digest: valid base64, but no file
    if len(found) >= MAX_EMBEDDED:
        raise PermanentJobError(f"the connector's result embeds more than {MAX_EMBEDDED} files as base64; "
                                "hand files to ctx.add_output instead")
    content_type = content_type or "application/octet-stream"
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", where)[-120:].strip("._-") or "output"
    found.append(Output(stem + _EXTENSIONS.get(content_type, ".bin"), content_type, data))
    return _Slot(len(found) - 1)


def _fill(value: Any, urls: Sequence[str]) -> Any:
    if isinstance(value, _Slot):
        return urls[value.index]
    if isinstance(value, dict):
        return {k: _fill(v, urls) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, urls) for v in value]
    return value


class OutputPlacer:
    """Places one worker's job outputs: inline, or through the store the job (or the operator) picks."""

    def __init__(self, settings: Settings, store_classes: Mapping[str, type[OutputStore]]) -> None:
        self.settings = settings
        self.classes = dict(store_classes)  # name and alias -> class
        self._stores: dict[type[OutputStore], OutputStore] = {}

    def allowed(self) -> list[str]:
        """The stores a job may pick (EMP_OUTPUT_STORES; by default EMP_OUTPUT_STORE and http-put)."""
        listed = [n.strip() for n in self.settings.output_stores.split(",") if n.strip()]
        return listed or [self.settings.output_store, "http-put"]

    def check(self) -> None:
        """Start-up check: the stores exist and their settings are valid (ConfigError)."""
        if self.settings.output_store not in self.classes:
            raise ConfigError(f"EMP_OUTPUT_STORE={self.settings.output_store!r}: unknown output store; "
                              f"available: {', '.join(sorted(self.classes))}")
        unknown = [n for n in self.allowed() if n not in self.classes]
        if unknown:
            raise ConfigError(f"EMP_OUTPUT_STORES={self.settings.output_stores!r}: unknown output store "
                              f"{unknown[0]!r}; available: {', '.join(sorted(self.classes))}")
        for name in {self.settings.output_store, *self.allowed()}:
            self.classes[name].load_settings()

    def _store(self, name: str) -> OutputStore:
        cls = self.classes[name]
        if cls not in self._stores:
            self._stores[cls] = cls(cls.load_settings())
        return self._stores[cls]

    def store_for(self, job: Job) -> OutputStore:
        storage = job.ctx.get("storage")
        provider = storage.get("provider") if isinstance(storage, Mapping) else job.ctx.get("provider")
        name = provider if isinstance(provider, str) and provider else self.settings.output_store
        if name not in self.classes:
            raise PermanentJobError(f"ctx.storage.provider {str(name)[:60]!r} is not an output store on this worker "
                                    f"(available: {', '.join(sorted(self.classes))})")
        allowed = {self.classes.get(n) for n in self.allowed()}
        if name != self.settings.output_store and self.classes[name] not in allowed:
            raise PermanentJobError(f"ctx.storage.provider {name!r} is not allowed on this worker: it takes "
                                    f"{', '.join(self.allowed())} (EMP_OUTPUT_STORES)")
        try:
            return self._store(name)
        except ConfigError as exc:
            raise PermanentJobError(f"output store {name!r} is not configured on this worker: {exc}") from exc

    async def place(self, job: Job, outputs: Sequence[Output], result: JobResult) -> JobResult:
        """The result with its outputs listed; a JobError when one cannot be placed."""
        embedded: list[Output] = []
        result = extract_embedded(result, embedded, large_bytes=self.settings.output_inline_bytes)
        placed: list[dict[str, Any]] = []
        store: OutputStore | None = None
        for index, output in enumerate([*outputs, *embedded]):
            try:
                size = output.size_bytes
                sniffed = sniff(output.data[:16] if output.data is not None else await asyncio.to_thread(_head, output))
            except OSError as exc:
                raise RetryableJobError(f"output {output.name!r}: cannot read {output.path}: {exc}") from exc
            if sniffed and output.content_type == "application/octet-stream":
                output = dataclasses.replace(output, content_type=sniffed)
            media = sniffed is not None or output.content_type.startswith(_MEDIA_TYPES)
            if size <= self.settings.output_inline_bytes and not media and index < len(outputs):
                placed.append(_inline(output) if output.data is not None else await asyncio.to_thread(_inline, output))
                continue
            store = store or self.store_for(job)
            key = prefix_of(job.ctx) + object_name(job, index, output)
            stored = await self._put(store, Upload(job, index, output, key, size))
            placed.append({"name": output.name, "size_bytes": size, "content_type": output.content_type,
                           "url": stored.url, **stored.extra})
        urls = [entry.get("url", "") for entry in placed[len(outputs):]]
        return {**_fill(result, urls), **_listing(result, placed)}

    async def _put(self, store: OutputStore, upload: Upload) -> Stored:
        backoff = Backoff(base_s=0.5, max_s=5.0)
        for attempt in range(1, PUT_TRIES + 1):
            try:
                try:
                    async with asyncio.timeout(self.settings.output_upload_timeout_s):
                        stored = await store.put(upload)
                except TimeoutError:
                    raise StoreError(f"the upload took over {self.settings.output_upload_timeout_s:g}s "
                                     "(EMP_OUTPUT_UPLOAD_TIMEOUT_S)") from None
                if stored.size_bytes != upload.size_bytes:
                    raise StoreError(f"the store holds {stored.size_bytes} of its {upload.size_bytes} bytes")
                return stored
            except (StoreError, OSError) as exc:
                message = _redact(str(exc), store.secrets())
                retryable = not isinstance(exc, StoreError) or exc.retryable
                if not retryable:
                    raise PermanentJobError(f"output {upload.output.name!r}: {store.name} store: {message}") from exc
                if attempt == PUT_TRIES:
                    raise RetryableJobError(f"output {upload.output.name!r}: {store.name} store failed "
                                            f"{PUT_TRIES} times: {message}") from exc
                delay = backoff.next_delay()
                log.warning("output %r of job %s: %s store: %s; trying again in %.1fs", upload.output.name,
                            upload.job.id, store.name, message, delay)
                await asyncio.sleep(delay)  # upload backoff
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for store in self._stores.values():
            try:
                await store.close()
            except Exception as exc:  # a plugin's close must not stop the shutdown
                log.warning("output store %s: close failed: %s", store.name, exc)


def _listing(result: JobResult, placed: list[dict[str, Any]]) -> dict[str, Any]:
    """``outputs`` plus the emp-job-queue fields for the stored ones."""
    stored = [p for p in placed if "url" in p]
    listing: dict[str, Any] = {"outputs": placed}
    if stored:
        listing["output_files"] = [{"filename": p["name"], "url": p["url"], "mime_type": p["content_type"],
                                    "filesize": p["size_bytes"]} for p in stored]
        media = [p for p in stored if p["content_type"].startswith(_MEDIA_TYPES)] or stored
        if "image_url" not in result:
            listing["image_url"], listing["mime_type"] = media[0]["url"], media[0]["content_type"]
    return listing


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:1000]

