"""Output stores: where a job's outputs go when they are not inlined in its result.

A store is a plugin like a connector: a subclass of :class:`OutputStore` returned from the
``emp_output_stores`` hook. The worker picks one per job, from the job's ``ctx.storage.provider``
when it names one, else ``EMP_OUTPUT_STORE`` (default ``local``), and calls ``put`` once per
output that is not inlined::

    class BucketStore(OutputStore):
        name = "bucket"
        settings_class = BucketSettings    # EMP_BUCKET_* (credentials come from here, never from a job)

        async def put(self, upload: Upload) -> Stored:
            async for chunk in upload.chunks():
                ...                        # send it
            return Stored(url=f"https://cdn.example/{upload.key}", size_bytes=upload.size_bytes)

``upload.key`` is deterministic per job and output index (a retry overwrites rather than
duplicates). The worker retries a put that raises a retryable :class:`StoreError` (or any
``OSError``) with backoff, checks the stored size, and fails the job as retryable with the
store's message (its ``secrets()`` masked) when every try failed. A job's ``ctx`` is untrusted
input: a store validates what it reads there and refuses a target the operator did not allow.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

from connectors.base import Output
from connectors.settings import ConnectorSettings
from worker.errors import JobError
from worker.protocol import Job

CHUNK_BYTES = 1024 * 1024
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(JobError):
    """A put failed; `retryable` False when the job's storage request itself is wrong."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def prefix_of(ctx: Mapping[str, Any], default: str = "") -> str:
    """The object-name prefix a job asks for (``ctx.prefix`` or ``ctx.storage.prefix``, as
    emp-job-queue's submitters send it), as ``a/b/``: each part letters, digits and ``._-``."""
    storage = ctx.get("storage") if isinstance(ctx.get("storage"), Mapping) else {}
    raw = ctx.get("prefix") or storage.get("prefix") or default  # type: ignore[union-attr]
    if not raw:
        return ""
    if not isinstance(raw, str) or len(raw) > 512:
        raise StoreError("ctx.prefix must be a string of at most 512 characters", retryable=False)
    parts = [p for p in raw.split("/") if p]
    for part in parts:
        if not _SAFE_PART.match(part) or part.strip(".") == "":
            raise StoreError(f"ctx.prefix {raw[:100]!r}: each part must be letters, digits, '.', '_' or '-' "
                             "(no '..', no empty parts)", retryable=False)
    return "".join(f"{p}/" for p in parts)


@dataclass(frozen=True)
class Upload:
    """One output to store, and the job it belongs to."""

    job: Job
    index: int
    output: Output
    key: str  # "{prefix}{job}/{index:03d}-{name}": deterministic per job and output index
    size_bytes: int

    @property
    def content_type(self) -> str:
        return self.output.content_type

    @property
    def storage(self) -> Mapping[str, Any]:
        """The job's ``ctx.storage`` (untrusted: validate what you read)."""
        storage = self.job.ctx.get("storage")
        return storage if isinstance(storage, Mapping) else {}

    def open(self) -> IO[bytes]:
        """The output's bytes as a file object (a file on disk is not read whole)."""
        if self.output.data is not None:
            return io.BytesIO(self.output.data)
        assert self.output.path is not None
        return open(self.output.path, "rb")

    async def chunks(self, size: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The output's bytes in chunks, read off the event loop."""
        source = await asyncio.to_thread(self.open)
        try:
            while chunk := await asyncio.to_thread(source.read, size):
                yield chunk
        finally:
            source.close()


@dataclass(frozen=True)
class Stored:
    """Where an output now is: the URL its reader uses, and the size the store has."""

    url: str
    size_bytes: int
    extra: Mapping[str, Any] = field(default_factory=dict)  # listed in the result beside the URL


class OutputStore:
    """Base class of output stores (see the module docstring)."""

    #: the name EMP_OUTPUT_STORE and ctx.storage.provider use
    name: ClassVar[str] = ""
    #: other names a job's ctx.storage.provider may use for it (e.g. "aws" for s3)
    aliases: ClassVar[tuple[str, ...]] = ()
    settings_class: ClassVar[type[ConnectorSettings]] = ConnectorSettings
    #: "" means EMP_<NAME>_ (non-alphanumerics as _)
    settings_prefix: ClassVar[str] = ""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings

    @classmethod
    def env_prefix(cls) -> str:
        return cls.settings_prefix or "EMP_" + re.sub(r"[^A-Za-z0-9]", "_", cls.name).upper() + "_"

    @classmethod
    def load_settings(cls) -> ConnectorSettings:
        """This store's settings from the environment; ConfigError (one line) when invalid."""
        return cls.settings_class.load(cls.env_prefix())

    def secrets(self) -> Sequence[str]:
        """Values never to show in a message (passwords, keys, tokens)."""
        return ()

    async def put(self, upload: Upload) -> Stored:
        raise NotImplementedError

    async def close(self) -> None:
        """Called at shutdown: release clients and connections."""
