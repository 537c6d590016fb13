"""Fixtures for the ComfyUI connector's tests: a fake ComfyUI on a loopback port, and connectors
pointed at it with short, test-sized patience settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from connectors.comfyui import ComfyUIConnector
from connectors.testing import make_connector
from tests.fakes.comfyui import FakeComfyUI

FAST = {"EMP_COMFYUI_STALL_S": "2", "EMP_COMFYUI_POLL_S": "0.2", "EMP_COMFYUI_UNREACHABLE_S": "2",
        "EMP_COMFYUI_CONNECT_TIMEOUT_S": "2", "EMP_COMFYUI_REQUEST_TIMEOUT_S": "10"}

ConnectorFactory = Callable[..., Awaitable[ComfyUIConnector]]


def graph(prefix: str = "out", color: int = 16711680, size: int = 64) -> dict[str, Any]:
    """EmptyImage -> ImageInvert -> SaveImage, the workflow of success_trace.json."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
              "_meta": {"title": "EmptyImage"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Invert Image"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix},
              "_meta": {"title": "Save Image"}},
    }


def blur_chain(prefix: str = "long", color: int = 274513) -> dict[str, Any]:
    """EmptyImage -> ImageBlur x3 -> SaveImage: a job with nodes to hold, interrupt or kill in."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": color}},
        "10": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
        "11": {"class_type": "ImageBlur", "inputs": {"image": ["10", 0], "blur_radius": 3, "sigma": 1.0}},
        "12": {"class_type": "ImageBlur", "inputs": {"image": ["11", 0], "blur_radius": 3, "sigma": 1.0}},
        "99": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}},
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI() as server:
        yield server


@pytest.fixture
async def comfy() -> AsyncIterator[ConnectorFactory]:
    """``await comfy(fake, **env)``: a started connector for `fake`; stopped at the end of the test."""
    made: list[ComfyUIConnector] = []

    async def factory(server: FakeComfyUI, *, start: bool = True, gpu_index: int | None = None,
                      **env: str) -> ComfyUIConnector:
        values = {**FAST, "EMP_COMFYUI_URL": server.url, **env}
        connector = make_connector(ComfyUIConnector, env=values, gpu_index=gpu_index)
        made.append(connector)
        if start:
            await connector.start()
        return connector

    yield factory
    for connector in made:
        await asyncio.wait_for(connector.stop(), 20)
