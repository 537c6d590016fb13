"""A ComfyUI job's payload, validated (payloads are untrusted: bounded, never executed).

Accepted shapes (emp-job-queue sends the workflow as the payload itself, or under ``workflow``)::

    {"1": {"class_type": "EmptyImage", "inputs": {...}}, "2": {...}}            # API format
    {"workflow": {"1": {...}}, "images": [...], "timeout_seconds": 600}

``images`` (or ``input_images``) are uploaded to ComfyUI's input folder before the prompt runs:
``[{"name": "face.png", "url": "https://..."}]`` or ``[{"name": "face.png", "data": "<base64>"}]``
(``data:image/png;base64,...`` also works). A workflow saved in ComfyUI's UI format (``nodes`` and
``links``) cannot run through the API and fails permanently, saying how to export it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.errors import PermanentJobError

MAX_NODES = 5000
MAX_IMAGES = 32
_NODE_ID = re.compile(r"^[A-Za-z0-9_:.\-]{1,64}$")
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()\-]{0,127}$")
_SUBFOLDER = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_PAYLOAD_KEYS = ("images", "input_images", "timeout_seconds", "workflow", "prompt")


@dataclass(frozen=True)
class InputImage:
    """An image to upload: inline bytes, or a URL to fetch (from an allowed host only)."""

    name: str
    data: bytes | None = None
    url: str = ""
    subfolder: str = ""


@dataclass(frozen=True)
class ComfyJobSpec:
    workflow: dict[str, dict[str, Any]]
    images: list[InputImage] = field(default_factory=list)

    def class_of(self, node_id: str) -> str:
        node = self.workflow.get(node_id)
        return str(node.get("class_type", "")) if node else ""

    def title_of(self, node_id: str) -> str:
        """The node's title (``_meta.title``) or class, for progress messages."""
        node = self.workflow.get(node_id) or {}
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, Mapping) else None
        return str(title or node.get("class_type") or f"node {node_id}")[:80]


def _bad(message: str) -> PermanentJobError:
    return PermanentJobError(f"invalid ComfyUI payload: {message}")


def is_ui_format(value: Mapping[str, Any]) -> bool:
    return isinstance(value.get("nodes"), list) and "links" in value


def _pick_workflow(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("workflow", "prompt"):
        if key in payload:
            value = payload[key]
            if not isinstance(value, Mapping):
                raise _bad(f"{key} must be an object of nodes, not {type(value).__name__}")
            return value
    if is_ui_format(payload):
        return payload  # refused by parse_workflow, saying how to export the API format
    # the payload itself is the graph; scalar keys beside the nodes (metadata) are not nodes
    return {k: v for k, v in payload.items() if k not in _PAYLOAD_KEYS and isinstance(v, Mapping)}


def parse_workflow(value: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format graph ``{node_id: {class_type, inputs}}``, checked; PermanentJobError otherwise."""
    if is_ui_format(value):
        raise _bad("this workflow is in ComfyUI's UI format (it has 'nodes' and 'links'); the API runs only "
                   "the API format: in ComfyUI use Workflow > Export (API) and send that file")
    if not value:
        raise _bad("the workflow has no nodes")
    if len(value) > MAX_NODES:
        raise _bad(f"the workflow has {len(value)} nodes, more than {MAX_NODES}")
    graph: dict[str, dict[str, Any]] = {}
    for node_id, node in value.items():
        if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
            raise _bad(f"node id {str(node_id)[:70]!r} is not a short id (letters, digits, _:.-)")
        if not isinstance(node, Mapping):
            raise _bad(f"node {node_id} must be an object with class_type and inputs")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise _bad(f"node {node_id} has no class_type (is this an API-format workflow?)")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping):
            raise _bad(f"node {node_id} ({class_type}): inputs must be an object")
        graph[node_id] = dict(node)
    return graph


def _decode(data: str, name: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    if len(data) > max_bytes * 4 // 3 + 8:
        raise _bad(f"image {name!r} is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"image {name!r}: data is not valid base64") from None
    if len(raw) > max_bytes:
        raise _bad(f"image {name!r} is {len(raw)} bytes, more than {max_bytes}")
    return raw


def _parse_image(item: Any, index: int, max_bytes: int) -> InputImage:
    if not isinstance(item, Mapping):
        raise _bad(f"images[{index}] must be an object with name and url or data")
    name = item.get("name") or item.get("filename")
    if not isinstance(name, str) or not _IMAGE_NAME.match(name) or ".." in name:
        raise _bad(f"images[{index}].name must be a plain file name (letters, digits, space, ._()-)")
    subfolder = item.get("subfolder") or ""
    if not isinstance(subfolder, str) or (subfolder and not _SUBFOLDER.match(subfolder)):
        raise _bad(f"images[{index}].subfolder must be one plain folder name")
    url, data = item.get("url"), item.get("data") or item.get("base64")
    if (url is None) == (data is None):
        raise _bad(f"images[{index}] ({name}) needs exactly one of url or data")
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 4096:
            raise _bad(f"images[{index}] ({name}): url must be an http(s) URL")
        return InputImage(name, url=url, subfolder=subfolder)
    if not isinstance(data, str):
        raise _bad(f"images[{index}] ({name}): data must be a base64 string")
    return InputImage(name, data=_decode(data, name, max_bytes), subfolder=subfolder)


def parse_payload(payload: Mapping[str, Any], *, max_image_bytes: int) -> ComfyJobSpec:
    """The job's workflow and input images; PermanentJobError naming what is wrong."""
    workflow = parse_workflow(_pick_workflow(payload))
    raw_images = payload.get("images", payload.get("input_images"))
    if raw_images is None:
        return ComfyJobSpec(workflow)
    if not isinstance(raw_images, list):
        raise _bad("images must be a list")
    if len(raw_images) > MAX_IMAGES:
        raise _bad(f"{len(raw_images)} input images, more than {MAX_IMAGES}")
    images = [_parse_image(item, i, max_image_bytes) for i, item in enumerate(raw_images)]
    return ComfyJobSpec(workflow, images)


def rename_inputs(workflow: dict[str, dict[str, Any]], renamed: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The workflow with string inputs equal to an uploaded name replaced by the name ComfyUI gave it."""
    if not renamed:
        return workflow
    out: dict[str, dict[str, Any]] = {}
    for node_id, node in workflow.items():
        inputs = node.get("inputs") or {}
        new_inputs = {k: renamed.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}
        out[node_id] = {**node, "inputs": new_inputs}
    return out
