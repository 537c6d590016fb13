"""The ``local`` output store: files in a directory (``EMP_OUTPUT_DIR``, default ``outputs`` in the
working directory), listed under ``EMP_OUTPUT_BASE_URL`` when the directory is served, else as
``file://`` URLs. Files are written atomically: a reader never sees half of one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import field_validator

from connectors.settings import ConnectorSettings
from connectors.stores import OutputStore, Stored, StoreError, Upload

FILE_MODE = 0o644


class LocalSettings(ConnectorSettings):
    """EMP_OUTPUT_DIR and EMP_OUTPUT_BASE_URL."""

    dir: str = "outputs"
    base_url: str = ""

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class LocalStore(OutputStore):
    name = "local"
    aliases = ("file",)
    settings_class = LocalSettings
    settings_prefix = "EMP_OUTPUT_"
    settings: LocalSettings

    async def put(self, upload: Upload) -> Stored:
        try:
            size, uri = await asyncio.to_thread(_write, Path(self.settings.dir) / upload.key, upload)
        except OSError as exc:
            raise StoreError(f"writing it under EMP_OUTPUT_DIR={self.settings.dir!r} failed: {exc}") from exc
        base = self.settings.base_url.rstrip("/")
        return Stored(f"{base}/{upload.key}" if base else uri, size)


def _write(target: Path, upload: Upload) -> tuple[int, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would keep the file from whatever serves the directory
    try:
        with os.fdopen(fd, "wb") as sink, upload.open() as source:
            shutil.copyfileobj(source, sink, 1024 * 1024)
        size = os.path.getsize(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size, target.resolve().as_uri()
