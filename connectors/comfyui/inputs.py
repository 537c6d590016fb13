"""Input images of a job, uploaded to ComfyUI's input folder before its prompt is queued.

An image given by URL is fetched only from a host the operator allows
(``EMP_COMFYUI_INPUT_HOSTS``), through an HttpEngine locked to that host (no redirects, so no
answer can lead elsewhere), and bounded by ``EMP_COMFYUI_MAX_INPUT_IMAGE_BYTES``: a job's payload
is untrusted and must not turn the worker against its network.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from connectors.comfyui.client import ComfyClient
from connectors.comfyui.payload import InputImage
from connectors.http import HttpEngine
from worker.errors import PermanentJobError


def check_url(url: str, allowed: frozenset[str]) -> tuple[str, str]:
    """(origin, path+query) of an input URL whose host is allowed; PermanentJobError otherwise."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise PermanentJobError(f"input image URL {url[:100]!r} must be a plain http(s) URL")
    if host not in allowed:
        shown = ", ".join(sorted(allowed)) or "none: set EMP_COMFYUI_INPUT_HOSTS to allow some"
        raise PermanentJobError(f"input image host {host!r} is not allowed (allowed: {shown})")
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path or "/"
    return origin, f"{path}?{parts.query}" if parts.query else path


async def fetch(url: str, allowed: frozenset[str], max_bytes: int, timeout_s: float) -> bytes:
    origin, path = check_url(url, allowed)
    async with HttpEngine(origin, name="input image host", max_response_bytes=max_bytes, connect_retries=1,
                          timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))) as engine:
        answer = await engine.request("GET", path)
    return answer.content


async def upload_all(client: ComfyClient, images: list[InputImage], *, allowed: frozenset[str],
                     max_bytes: int, timeout_s: float) -> dict[str, str]:
    """Upload every image; returns {name the workflow uses: name ComfyUI stored it under} for
    those ComfyUI stored under another name (or in a subfolder)."""
    renamed: dict[str, str] = {}
    for image in images:
        data = image.data if image.data is not None else await fetch(image.url, allowed, max_bytes, timeout_s)
        name, subfolder = await client.upload_image(image.name, data, subfolder=image.subfolder)
        stored = f"{subfolder}/{name}" if subfolder else name
        wanted = f"{image.subfolder}/{image.name}" if image.subfolder else image.name
        if stored != wanted:
            renamed[wanted] = stored
        if image.subfolder:
            renamed.setdefault(image.name, stored)
    return renamed
