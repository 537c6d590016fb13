"""A prompt's outputs: found in its history entry (every kind: images, gifs and videos, audio,
3D files, text) and in SaveImageWebsocket's binary frames (its only trace, COMFYUI.md pitfall 9),
fetched through ``/view`` into files and handed to the worker with ``ctx.add_output``.

History ``outputs`` are ``{node_id: {kind: [item, ...]}}`` where a file item is
``{filename, subfolder, type}`` (``type`` output, temp or input), a text item is a string, and
other values (``animated: [true]``) are flags, not outputs. Nothing found is dropped: more
outputs than a job may hand over fail the job, saying so.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.base import MAX_OUTPUTS
from worker.errors import PermanentJobError

MAX_TEXT_OUTPUT = 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTRA_TYPES = {
    ".webp": "image/webp", ".webm": "video/webm", ".mp4": "video/mp4", ".mov": "video/quicktime",
    ".gif": "image/gif", ".flac": "audio/flac", ".opus": "audio/opus", ".ogg": "audio/ogg",
    ".mp3": "audio/mpeg", ".wav": "audio/wav", ".glb": "model/gltf-binary", ".gltf": "model/gltf+json",
    ".obj": "model/obj", ".stl": "model/stl", ".ply": "application/ply", ".fbx": "application/octet-stream",
    ".latent": "application/octet-stream", ".safetensors": "application/octet-stream",
    ".json": "application/json", ".txt": "text/plain",
}


@dataclass(frozen=True)
class OutputRef:
    """One output a node produced: a file on the server (``filename``), a text, or a local file
    already captured from the socket (``local``)."""

    node_id: str
    kind: str  # the history key: images, gifs, videos, audio, 3d, text, ... or "websocket"
    filename: str = ""
    subfolder: str = ""
    type: str = "output"
    text: str | None = None
    local: Path | None = None
    cached: bool = False

    def view_params(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def _file_ref(node_id: str, kind: str, item: Mapping[str, Any], cached: bool) -> OutputRef | None:
    filename = item.get("filename")
    if not isinstance(filename, str) or not filename:
        return None
    subfolder = item.get("subfolder") if isinstance(item.get("subfolder"), str) else ""
    kind_of_file = item.get("type") if isinstance(item.get("type"), str) else "output"
    return OutputRef(node_id, kind, filename, subfolder or "", kind_of_file or "output", cached=cached)


def discover(outputs: Mapping[str, Any], cached_nodes: Iterable[str] = ()) -> list[OutputRef]:
    """Every output a history entry's ``outputs`` (or the ``executed`` messages) lists."""
    cached = set(cached_nodes)
    found: list[OutputRef] = []
    seen: set[tuple[str, str, str, str]] = set()
    for node_id, by_kind in outputs.items():
        if not isinstance(by_kind, Mapping):
            continue
        for kind, items in by_kind.items():
            for item in items if isinstance(items, list) else [items]:
                ref: OutputRef | None = None
                if isinstance(item, Mapping):
                    ref = _file_ref(str(node_id), str(kind), item, str(node_id) in cached)
                elif isinstance(item, str):
                    ref = OutputRef(str(node_id), str(kind), text=item[:MAX_TEXT_OUTPUT],
                                    cached=str(node_id) in cached)
                if ref is None:
                    continue  # a flag such as animated: [true]
                key = (ref.node_id, ref.filename, ref.subfolder, ref.type) if ref.filename else \
                      (ref.node_id, ref.kind, str(len(found)), "text")
                if key not in seen:
                    seen.add(key)
                    found.append(ref)
    check_count(len(found))
    return found


def check_count(count: int) -> None:
    """PermanentJobError when a prompt produced more outputs than a job may hand over (the count
    follows from the workflow, so it is the same on every worker)."""
    if count > MAX_OUTPUTS:
        raise PermanentJobError(f"the workflow produced {count} outputs; a job may return at most "
                                f"{MAX_OUTPUTS} (save fewer files, e.g. a smaller batch)")


def output_name(ref: OutputRef, index: int, used: set[str]) -> str:
    """A unique name ``ctx.add_output`` accepts: ``<node>-<filename>`` with unsafe characters as _."""
    base = ref.filename.rsplit("/", 1)[-1] if ref.filename else f"{ref.kind}-{index}.txt"
    name = _UNSAFE.sub("_", f"{ref.node_id}-{base}").strip("._-") or f"output-{index}"
    name = name[:190]
    if not name[0].isalnum():
        name = "o" + name
    candidate, n = name, 1
    while candidate in used:
        stem, dot, ext = name.rpartition(".")
        candidate = f"{stem}-{n}.{ext}" if dot and stem else f"{name}-{n}"
        n += 1
    used.add(candidate)
    return candidate


def content_type_for(filename: str, header: str = "") -> str:
    """The response's content type unless it is the generic one; else guessed from the name."""
    header = header.split(";", 1)[0].strip().lower()
    if header and header != "application/octet-stream":
        return header
    suffix = Path(filename).suffix.lower()
    return _EXTRA_TYPES.get(suffix) or mimetypes.guess_type(filename)[0] or "application/octet-stream"


def describe(ref: OutputRef, name: str, size: int, content_type: str) -> dict[str, Any]:
    """The result's entry for one output (the worker's ``outputs`` entry of that ``name`` has its URL)."""
    entry: dict[str, Any] = {"node_id": ref.node_id, "kind": ref.kind, "name": name, "size_bytes": size,
                             "content_type": content_type}
    if ref.filename:
        entry.update(filename=ref.filename, subfolder=ref.subfolder, type=ref.type)
    if ref.cached:
        entry["cached"] = True  # written by an earlier prompt: the node's result came from ComfyUI's cache
    return entry
