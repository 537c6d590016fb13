"""Where a job's outputs go: small ones inline in the result, the rest into an output store.

A connector hands each output to ``JobContext.add_output`` (bytes, or a file path for large
ones). After a successful run the worker lists them in the result as ``outputs: [{name,
size_bytes, content_type, url}]``; one at most ``EMP_OUTPUT_INLINE_BYTES`` carries its bytes
instead of a URL (``text`` when it is UTF-8 text, else ``data_base64``). Larger ones go to the
``local`` store (``EMP_OUTPUT_DIR``, URLs under ``EMP_OUTPUT_BASE_URL`` or ``file://``), named
``{job}/{attempt}/{index}-{name}`` so a re-run of an attempt overwrites its own files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from connectors.base import JobResult, Output
from worker.errors import JobError, PermanentJobError, RetryableJobError
from worker.protocol import Job
from worker.settings import Settings

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEXT_TYPES = ("text/", "application/json")


class OutputError(JobError):
    """An output could not be placed (the job fails with this message)."""


def object_name(job: Job, index: int, output: Output) -> str:
    """Deterministic per job, attempt and output index; a job id unsafe in a path is hashed."""
    job_part = job.id if _SAFE_ID.match(job.id) and ".." not in job.id else hashlib.sha256(job.id.encode()).hexdigest()
    return f"{job_part}/{job.attempt}/{index:03d}-{output.name}"


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


def _store_local(root: Path, name: str, output: Output) -> tuple[int, str]:
    """Write the output under `root` (atomically: a reader never sees half a file)."""
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as sink:
            if output.data is not None:
                sink.write(output.data)
            else:
                with open(str(output.path), "rb") as source:
                    shutil.copyfileobj(source, sink, 1024 * 1024)
        size = os.path.getsize(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size, target.resolve().as_uri()


async def place_outputs(settings: Settings, job: Job, outputs: Sequence[Output], result: JobResult) -> JobResult:
    """The result with its ``outputs`` list; OutputError when one cannot be placed."""
    placed: list[dict[str, Any]] = []
    for index, output in enumerate(outputs):
        try:
            size = output.size_bytes
        except OSError as exc:
            raise RetryableJobError(f"output {output.name!r}: cannot read {output.path}: {exc}") from exc
        if size <= settings.output_inline_bytes:
            placed.append(await asyncio.to_thread(_inline, output))
            continue
        if not settings.output_dir:
            raise PermanentJobError(
                f"output {output.name!r} is {size} bytes, over EMP_OUTPUT_INLINE_BYTES="
                f"{settings.output_inline_bytes}, and no output store is configured (set EMP_OUTPUT_DIR)")
        name = object_name(job, index, output)
        try:
            written, file_uri = await asyncio.to_thread(_store_local, Path(settings.output_dir), name, output)
        except OSError as exc:
            raise OutputError(f"output {output.name!r}: writing it to EMP_OUTPUT_DIR failed: {exc}") from exc
        if written != size:
            raise OutputError(f"output {output.name!r}: wrote {written} of {size} bytes")
        base = settings.output_base_url.rstrip("/")
        url = f"{base}/{name}" if base else file_uri
        placed.append({"name": output.name, "size_bytes": size, "content_type": output.content_type, "url": url})
    return {**result, "outputs": placed}
