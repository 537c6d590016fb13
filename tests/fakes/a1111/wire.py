"""What the fake A1111 says and checks, built from the fixtures (tests/fakes/fixtures/a1111/,
copied from A1111 v1.10.1's source by hand): request fields with their types and defaults,
pydantic v1's validation messages, the error bodies, and real PNG images."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "a1111"
VERSION = "v1.10.1"


@functools.cache
def fixture(name: str) -> dict[str, Any]:
    """One fixture file (``txt2img``, ``img2img``, ``progress``, ``errors``, ``control_endpoints``)."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def request_fields(endpoint: str) -> dict[str, dict[str, Any]]:
    fields: dict[str, dict[str, Any]] = fixture(endpoint)["request_fields"]
    return fields


def info_keys() -> list[str]:
    """The keys of ``info`` in the order A1111's Processed.js() writes them."""
    info = json.loads(fixture("txt2img")["example_response"]["json"]["info"])
    return list(info)


# -- errors -------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTPException raised inside A1111: its handler answers {error, detail, body, errors}."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class ValidationFailed(Exception):
    """A request body FastAPI refused: 422 {detail: [{loc, msg, type}]}, bypassing A1111's handler."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors


class OutOfMemoryError(RuntimeError):
    """torch.cuda.OutOfMemoryError, as its class name reaches A1111's error body."""


def handler_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """A1111's api_middleware answer for an exception (Starlette 0.26: an HTTPException's str is "")."""
    if isinstance(exc, ApiError):
        return exc.status, {"error": "HTTPException", "detail": exc.detail, "body": "", "errors": ""}
    return 500, {"error": type(exc).__name__, "detail": "", "body": "", "errors": str(exc)}


# -- pydantic v1 validation ---------------------------------------------------------------------

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _base(kind: str) -> str:
    kind = kind.removeprefix("Optional[").removesuffix("]") if kind.startswith("Optional[") else kind
    return kind.split("[", 1)[0]


def _int(value: Any) -> int:
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().lstrip("+-").isdigit()):
        return int(value)
    raise ValueError("value is not a valid integer", "type_error.integer")


def _float(value: Any) -> float:
    try:
        if isinstance(value, int | float | str):
            return float(value)
    except ValueError:
        pass
    raise ValueError("value is not a valid float", "type_error.float")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower() if isinstance(value, int | str) else ""
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError("value could not be parsed to a boolean", "type_error.bool")


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise ValueError("str type expected", "type_error.str")


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("value is not a valid list", "type_error.list")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("value is not a valid dict", "type_error.dict")
    return value


_COERCE: dict[str, Callable[[Any], Any]] = {"int": _int, "float": _float, "bool": _bool, "str": _str,
                                            "list": _list, "dict": _dict}


def coerce(kind: str, value: Any) -> Any:
    """``value`` as pydantic v1 would coerce it for a field of type ``kind``; ValueError(msg, type)."""
    value = _COERCE.get(_base(kind), lambda v: v)(value)
    return [_str(v) for v in value] if kind.endswith("list[str]]") else value


def validate(endpoint: str, body: Any) -> dict[str, Any]:
    """The request model: every known field (defaults filled in), unknown keys ignored; raises
    ValidationFailed with every error, as FastAPI does."""
    if not isinstance(body, dict):
        raise ValidationFailed([{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}])
    model: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, spec in request_fields(endpoint).items():
        value = body.get(name, spec["default"])
        if value is None:
            if spec["default"] is not None and not spec["type"].startswith("Optional["):
                errors.append({"loc": ["body", name], "msg": "none is not an allowed value",
                               "type": "type_error.none.not_allowed"})
            model[name] = None
            continue
        try:
            model[name] = coerce(spec["type"], value)
        except ValueError as exc:
            msg, kind = exc.args
            errors.append({"loc": ["body", name], "msg": msg, "type": kind})
    if errors:
        raise ValidationFailed(errors)
    return model


def json_error(text: str) -> ValidationFailed:
    """FastAPI 0.94's answer to a body that is not JSON."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return ValidationFailed([{"loc": ["body", exc.pos], "msg": str(exc), "type": "value_error.jsondecode",
                                  "ctx": {"msg": exc.msg, "doc": exc.doc, "pos": exc.pos, "lineno": exc.lineno,
                                          "colno": exc.colno}}])
    raise AssertionError("the text is JSON")


# -- images -------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, rgb: tuple[int, int, int], text: str = "") -> bytes:
    """A real RGB PNG of one colour, the infotext in a ``parameters`` tEXt chunk as A1111 writes it."""
    row = b"\x00" + bytes(rgb) * width
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    if text:
        chunks.append(_chunk(b"tEXt", b"parameters\x00" + text.encode("latin-1", "replace")))
    chunks += [_chunk(b"IDAT", zlib.compress(row * height)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def colour(seed: int) -> tuple[int, int, int]:
    return (seed * 67) % 256, (seed * 131) % 256, (seed * 197) % 256


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_image(text: str) -> bytes:
    """An input image as A1111's decode_base64_to_image takes it (plain base64 or a data: URL);
    ApiError 500 "Invalid encoded image" when it is not an image."""
    if text.startswith("data:image/"):
        text = text.split(";")[1].split(",")[1] if ";" in text and "," in text else ""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(500, "Invalid encoded image") from None
    if not data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8")):
        raise ApiError(500, "Invalid encoded image")
    return data
