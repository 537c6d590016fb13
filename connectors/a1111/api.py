"""A1111's wire format (v1.10.1, see COMFYUI.md §2): its error answers as job errors, its progress
reply as a progress report, its generation reply as images and metadata. Pure functions, plus
the HttpEngine subclass that maps errors."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connectors.base import MAX_OUTPUTS
from connectors.http import HttpEngine, body_excerpt
from worker.errors import JobError, PermanentJobError, RetryableJobError

AUTH_HINT = "check EMP_A1111_AUTH (the user:pass of A1111's --api-auth)"
#: 500 answers whose detail blames the job's input, not the engine
INPUT_DETAILS = ("Invalid encoded image", "Requests not allowed", "Request to local resource not allowed")
MAX_METADATA_CHARS = 2000
MAX_LISTED = 64


# -- errors -------------------------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def validation_fields(detail: list[Any]) -> list[str]:
    """The field names of FastAPI's 422 ``detail`` list (``loc`` without its leading "body")."""
    fields: list[str] = []
    for item in detail:
        loc = item.get("loc") if isinstance(item, dict) else None
        if isinstance(loc, list):
            path = [str(p) for p in loc]
            path = path[1:] if path[:1] == ["body"] and len(path) > 1 else path
            name = ".".join(path)
            if name not in fields:
                fields.append(name)
    return fields


def a1111_error(status: int, body: bytes, content_type: str, request: str, *, name: str = "a1111",
                redact: Callable[[str], str] | None = None) -> JobError:
    """The JobError for one of A1111's error answers: FastAPI's 422 list, or its handler's
    ``{error, detail, body, errors}``."""
    clean = redact or (lambda text: text)
    data = _json(body)
    data = data if isinstance(data, dict) else {}
    detail, kind, errors = data.get("detail"), data.get("error"), data.get("errors")
    excerpt = clean(body_excerpt(body, content_type))
    where = f"{name} answered {status} to {request}"
    if status in (401, 403):
        return PermanentJobError(f"{where}: {excerpt or 'not authorised'}; {AUTH_HINT}")
    if status == 422 and isinstance(detail, list):
        fields = ", ".join(validation_fields(detail)) or "?"
        return PermanentJobError(f"{where}: invalid request fields: {fields} ({excerpt})")
    if status == 404 and detail == "Not Found" and not kind:
        return RetryableJobError(f"{where}: no such route; start A1111 with --api (or --nowebui)")
    if status in (400, 404, 413, 422):
        return PermanentJobError(f"{where}: {excerpt} (the job's input; retrying cannot help)")
    text = f"{kind or ''} {errors or ''}"
    if status == 500 and ("OutOfMemory" in text or "out of memory" in text.lower()):
        return RetryableJobError(f"{where}: A1111 ran out of GPU memory ({excerpt}); another worker may fit it")
    if status == 500 and isinstance(detail, str) and detail in INPUT_DETAILS:
        return PermanentJobError(f"{where}: {detail} (an input image of the job; retrying cannot help)")
    return RetryableJobError(f"{where}: {excerpt}" if excerpt else where)


class A1111Http(HttpEngine):
    """HttpEngine with A1111's error answers mapped (see :func:`a1111_error`)."""

    def error_for_answer(self, status: int, body: bytes, content_type: str, request: str) -> JobError:
        return a1111_error(status, body, content_type, request, name=self.name, redact=self.redact)


# -- progress -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    percent: float
    message: str
    step: int | None
    total_steps: int | None
    eta_s: float | None
    interrupted: bool
    preview_b64: str | None = None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def progress_of(reply: Any) -> Progress | None:
    """A ``/sdapi/v1/progress`` reply as a progress report; None while A1111 is idle or between
    ``begin()`` and its first batch (job_count <= 0)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("state"), dict):
        return None
    state = reply["state"]
    job_count = _number(state.get("job_count")) or 0
    if job_count <= 0:
        return None
    fraction = min(1.0, max(0.0, _number(reply.get("progress")) or 0.0))
    step, total = _number(state.get("sampling_step")), _number(state.get("sampling_steps"))
    job_no = int(_number(state.get("job_no")) or 0)
    eta = _number(reply.get("eta_relative"))
    eta = eta if eta is not None and eta >= 0 else None
    parts = [f"step {int(step)}/{int(total)}" if step is not None and total else "starting"]
    if job_count > 1:
        parts.append(f"batch {min(job_no + 1, int(job_count))}/{int(job_count)}")
    if eta is not None:
        parts.append(f"about {eta:.0f}s left")
    preview = reply.get("current_image")
    return Progress(
        percent=round(fraction * 100, 2), message=", ".join(parts),
        step=int(step) if step is not None and total else None, total_steps=int(total) if total else None,
        eta_s=eta, interrupted=state.get("interrupted") is True or state.get("skipped") is True,
        preview_b64=preview if isinstance(preview, str) and preview else None,
    )


# -- results ------------------------------------------------------------------------------------

_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png", "png"), (b"\xff\xd8\xff", "image/jpeg", "jpg"),
               (b"GIF8", "image/gif", "gif"))


def image_type(data: bytes) -> tuple[str, str]:
    """(content type, file extension) of an image from its first bytes."""
    for magic, content_type, ext in _SIGNATURES:
        if data.startswith(magic):
            return content_type, ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return "application/octet-stream", "bin"


def decode_image(text: Any, index: int) -> bytes:
    if not isinstance(text, str):
        raise RetryableJobError(f"a1111 returned image {index} as {type(text).__name__}, not base64 text")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RetryableJobError(f"a1111 returned image {index} that is not valid base64") from None


@dataclass(frozen=True)
class Generated:
    images: list[bytes]  # the grid left out
    info: dict[str, Any]


def decode_info(raw: Any) -> dict[str, Any]:
    """``info`` is a JSON string inside the JSON reply: decoded a second time ({} if it is not)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        value = _json(raw.encode())
        if isinstance(value, dict):
            return value
    return {}


def decode_reply(reply: Any) -> Generated:
    """The images of a txt2img/img2img reply from ``index_of_first_image`` on (a batch's grid
    comes first), and its decoded info. Runs in a thread: the reply can be large."""
    if not isinstance(reply, dict) or not isinstance(reply.get("images", []), list):
        raise RetryableJobError("a1111 answered the generation with something other than {images, info}")
    info = decode_info(reply.get("info"))
    images = reply.get("images") or []
    first = info.get("index_of_first_image", 0)
    first = first if isinstance(first, int) and not isinstance(first, bool) and 0 <= first <= len(images) else 0
    if len(images) - first > MAX_OUTPUTS:  # before decoding them: the count follows from the request
        raise PermanentJobError(f"a1111 produced {len(images) - first} images; a job may return at most {MAX_OUTPUTS} "
                                "(ask for a smaller batch_size * n_iter)")
    return Generated([decode_image(text, i) for i, text in enumerate(images) if i >= first], info)


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_METADATA_CHARS]
    if isinstance(value, list):
        return [_clip(v) for v in value[:MAX_LISTED]]
    if isinstance(value, dict):
        return {str(k)[:100]: _clip(v) for k, v in list(value.items())[:MAX_LISTED]}
    return value


_METADATA_KEYS = {
    "seed": "seed", "all_seeds": "seeds", "subseed": "subseed", "sampler_name": "sampler", "steps": "steps",
    "cfg_scale": "cfg_scale", "width": "width", "height": "height", "batch_size": "batch_size",
    "sd_model_name": "model", "sd_model_hash": "model_hash", "sd_vae_name": "vae",
    "denoising_strength": "denoising_strength", "clip_skip": "clip_skip", "styles": "styles",
    "job_timestamp": "job_timestamp", "version": "version", "prompt": "prompt",
    "negative_prompt": "negative_prompt", "infotexts": "infotexts",
}


def metadata_of(info: dict[str, Any]) -> dict[str, Any]:
    """The result's metadata from A1111's decoded info: seed, sampler, steps, model, ... (bounded)."""
    meta = {out: _clip(info[key]) for key, out in _METADATA_KEYS.items() if info.get(key) is not None}
    extra = info.get("extra_generation_params")
    if isinstance(extra, dict) and isinstance(extra.get("Schedule type"), str):
        meta["scheduler"] = extra["Schedule type"][:100]
    return meta
