"""From a job's payload to an A1111 request: the endpoint, the checkpoint, and inputs given as
URLs fetched here (only from hosts the operator allows, bounded) and sent as base64.

A payload is the A1111 request body as emp-job-queue sends it, plus an optional ``endpoint``
("txt2img" or "img2img"; without it a payload with ``init_images`` is img2img). A checkpoint
comes from ``override_settings.sd_model_checkpoint`` or else from a model the job requires; it
is sent per request in ``override_settings``, never through the global options.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from typing import Any

from connectors.inputs import AllowedHost, fetch_input
from worker.errors import PermanentJobError, RetryableJobError

ENDPOINTS = ("txt2img", "img2img")
WORKER_KEYS = ("endpoint",)  # payload keys for the worker, not sent to A1111
MAX_URL_INPUTS = 16
MAX_SHOWN_MODELS = 10


def endpoint_of(payload: dict[str, Any]) -> str:
    endpoint = payload.get("endpoint")
    if endpoint is None:
        return "img2img" if payload.get("init_images") else "txt2img"
    if endpoint not in ENDPOINTS:
        raise PermanentJobError(f"a1111 payload: endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r:.60}")
    return str(endpoint)


def request_body(payload: Any) -> tuple[str, dict[str, Any]]:
    """(endpoint, the body to send): the payload without the worker's own keys."""
    if not isinstance(payload, dict):
        raise PermanentJobError("a1111 payload must be a JSON object (an A1111 request body), "
                                f"not {type(payload).__name__}")
    endpoint = endpoint_of(payload)
    body = {k: v for k, v in payload.items() if k not in WORKER_KEYS}
    overrides = body.get("override_settings")
    if overrides is not None and not isinstance(overrides, dict):
        raise PermanentJobError("a1111 payload: override_settings must be an object")
    return endpoint, body


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_aliases(models: Any) -> dict[str, str]:
    """Every name a checkpoint of ``/sdapi/v1/sd-models`` goes by (title, model name, file name,
    hash) -> its title, which is what ``sd_model_checkpoint`` takes."""
    aliases: dict[str, str] = {}
    for model in models if isinstance(models, list) else []:
        title = model.get("title") if isinstance(model, dict) else None
        if not isinstance(title, str) or not title:
            continue
        filename = model.get("filename")
        base = os.path.basename(filename.replace("\\", "/")) if isinstance(filename, str) else None
        for alias in (title, model.get("model_name"), base, model.get("hash"), model.get("sha256")):
            if isinstance(alias, str) and alias:
                aliases.setdefault(alias, title)
    return aliases


def advertised(models: Any, title: str | None = None) -> list[str]:
    """The names advertised for matching: each checkpoint's title, model name and file name (only
    the checkpoint ``title``'s when given)."""
    names: list[str] = []
    for model in models if isinstance(models, list) else []:
        if not isinstance(model, dict) or not isinstance(model.get("title"), str):
            continue
        if title is not None and model["title"] != title:
            continue
        filename = model.get("filename")
        base = os.path.basename(filename.replace("\\", "/")) if isinstance(filename, str) else None
        names += [n for n in (model["title"], model.get("model_name"), base) if isinstance(n, str) and n]
    return sorted(set(names))


def choose_checkpoint(body: dict[str, Any], required: Sequence[str], aliases: dict[str, str]) -> str | None:
    """The title to run with: the payload's own ``sd_model_checkpoint`` (which must exist here:
    A1111 would silently fall back to another one), else the first required model that is a
    checkpoint here, else None (whatever is loaded)."""
    overrides = body.get("override_settings") or {}
    asked = overrides.get("sd_model_checkpoint")
    if asked is not None:
        if not isinstance(asked, str) or asked not in aliases:
            shown = ", ".join(sorted(set(aliases.values()))[:MAX_SHOWN_MODELS]) or "none"
            raise RetryableJobError(f"a1111: checkpoint {str(asked)[:200]!r} is not on this A1111 (it has: {shown}); "
                                    "another worker may have it")
        return aliases[asked]
    return next((aliases[m] for m in required if m in aliases), None)


def with_checkpoint(body: dict[str, Any], title: str | None, restore: bool) -> dict[str, Any]:
    if title is None:
        return body
    overrides = {**(body.get("override_settings") or {}), "sd_model_checkpoint": title}
    out = {**body, "override_settings": overrides}
    out.setdefault("override_settings_restore_afterwards", restore)
    return out


# -- inputs given as URLs ----------------------------------------------------------------------


def url_inputs(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, url) of each input image given as an http(s) URL: ``init_images[i]`` and ``mask``."""
    found: list[tuple[str, str]] = []
    images = body.get("init_images")
    if isinstance(images, list):
        found += [(f"init_images[{i}]", v) for i, v in enumerate(images) if _is_url(v)]
    if _is_url(body.get("mask")):
        found.append(("mask", body["mask"]))
    return found


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


async def inline_inputs(body: dict[str, Any], allowed: Sequence[AllowedHost], max_bytes: int,
                        timeout_s: float) -> dict[str, Any]:
    """The body with every input URL replaced by the base64 of what it points at (fetched by
    :func:`connectors.inputs.fetch_input`: allowed hosts and ports only, bounded, no redirects)."""
    found = url_inputs(body)
    if not found:
        return body
    if len(found) > MAX_URL_INPUTS:
        raise PermanentJobError(f"a1111 payload gives {len(found)} input URLs; at most {MAX_URL_INPUTS} are fetched")
    out = dict(body)
    if isinstance(out.get("init_images"), list):
        out["init_images"] = list(out["init_images"])
    for where, url in found:
        fetched = await fetch_input(url, allowed, max_bytes, timeout_s, hosts_setting="EMP_A1111_INPUT_HOSTS",
                                    size_setting="EMP_A1111_MAX_INPUT_BYTES")
        data = base64.b64encode(fetched).decode("ascii")
        if where == "mask":
            out["mask"] = data
        else:
            out["init_images"][int(where[len("init_images["):-1])] = data
    return out
