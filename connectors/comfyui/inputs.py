"""Input images of a job, uploaded to ComfyUI's input folder before its prompt is queued.

An image given by URL is fetched by :func:`connectors.inputs.fetch_input`: only from a host and
port the operator allows (``EMP_COMFYUI_INPUT_HOSTS``), no redirects, bounded by
``EMP_COMFYUI_MAX_INPUT_IMAGE_BYTES``; a job's payload is untrusted and must not turn the worker
against its network.
"""

from __future__ import annotations

from collections.abc import Sequence

from connectors.comfyui.client import ComfyClient
from connectors.comfyui.payload import InputImage
from connectors.inputs import AllowedHost, fetch_input


async def fetch(url: str, allowed: Sequence[AllowedHost], max_bytes: int, timeout_s: float) -> bytes:
    return await fetch_input(url, allowed, max_bytes, timeout_s, hosts_setting="EMP_COMFYUI_INPUT_HOSTS",
                             size_setting="EMP_COMFYUI_MAX_INPUT_IMAGE_BYTES")


async def upload_all(client: ComfyClient, images: list[InputImage], *, allowed: Sequence[AllowedHost],
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
