"""Bytes the fake serves: real (tiny) PNG files, minimal WebP/GIF/FLAC/MP4 files, and ComfyUI's binary WS frames.

Binary frame layouts (COMFYUI.md §1.3, pinned against progress_binary_*.json and client_filtering.json):

    1 PREVIEW_IMAGE               [u32 1][u32 format 1=JPEG 2=PNG][image bytes]
    3 TEXT                        [u32 3][u32 len(node_id)][node_id utf-8][text utf-8]
    4 PREVIEW_IMAGE_WITH_METADATA [u32 4][u32 len(json)][json][image bytes]

All integers are big-endian. The metadata JSON uses Python's default separators (", " and ": "), as the
real server's json.dumps does.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import zlib
from typing import Any

PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2  # server-internal only, never on the wire
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

FORMAT_JPEG = 1
FORMAT_PNG = 2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A 1x1 lossless WebP and a 1x1 GIF: valid files, the smallest there are.
TINY_WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")
TINY_GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=64)
def _idat(width: int, height: int, color: int) -> bytes:
    rgb = bytes(((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF))
    row = b"\x00" + rgb * width  # filter type 0, then the pixels
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return b"".join(parts)


def png(width: int, height: int, color: int = 0, text: dict[str, str] | None = None) -> bytes:
    """A real RGB PNG filled with `color` (0xRRGGBB), with optional tEXt chunks (ComfyUI writes prompt/workflow)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    chunks.append(_chunk(b"IDAT", _idat(width, height, color)))
    chunks.append(_chunk(b"IEND", b""))
    return PNG_MAGIC + b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None when the bytes are not a PNG (LoadImage then fails like PIL)."""
    if len(data) < 24 or not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def flac() -> bytes:
    """A FLAC stream with only its STREAMINFO block (44.1 kHz, mono, 16 bit, 0 samples)."""
    info = struct.pack(">HH", 4096, 4096) + b"\x00\x00\x00" + b"\x00\x00\x00"
    packed = (44100 << 44) | (0 << 41) | (15 << 36) | 0  # rate, channels-1, bits-1, total samples
    info += packed.to_bytes(8, "big") + b"\x00" * 16  # then the MD5 of no audio
    return b"fLaC" + bytes((0x80,)) + len(info).to_bytes(3, "big") + info


def mp4() -> bytes:
    """An MP4 that holds just an `ftyp` box: enough for magic-number sniffing."""
    body = b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41"
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body


def preview_frame(image: bytes, image_format: int = FORMAT_PNG) -> bytes:
    """Event 1, sent when the client did not negotiate supports_preview_metadata."""
    return struct.pack(">II", PREVIEW_IMAGE, image_format) + image


def text_frame(node_id: str, text: str) -> bytes:
    """Event 3: node status text, broadcast with no prompt_id."""
    node = node_id.encode()
    return struct.pack(">II", TEXT, len(node)) + node + text.encode()


def preview_metadata_frame(image: bytes, metadata: dict[str, Any]) -> bytes:
    """Event 4: the metadata names the node and prompt the preview belongs to."""
    encoded = json.dumps(metadata).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(encoded)) + encoded + image


def decode_frame(frame: bytes) -> dict[str, Any]:
    """Split a binary frame into its fields (for tests and for clients of the fake)."""
    (event,) = struct.unpack(">I", frame[:4])
    if event == PREVIEW_IMAGE:
        (image_format,) = struct.unpack(">I", frame[4:8])
        return {"event_type": event, "image_type": image_format, "image": frame[8:]}
    if event == TEXT:
        (length,) = struct.unpack(">I", frame[4:8])
        return {"event_type": event, "node_id": frame[8:8 + length].decode(), "text": frame[8 + length:].decode()}
    if event == PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", frame[4:8])
        return {"event_type": event, "metadata": json.loads(frame[8:8 + length]), "image": frame[8 + length:]}
    return {"event_type": event, "payload": frame[4:]}
