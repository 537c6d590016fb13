"""What a ComfyUI failure means for the job: pure functions from ComfyUI's answers to JobErrors.

    ComfyUI says                                   the job
    ---------------------------------------------  ---------------------------------------------
    POST /prompt 400 {error, node_errors}          PermanentJobError naming each node and message
    POST /prompt 200 with node_errors              PermanentJobError (some outputs would never come)
    execution_error, CUDA/torch out of memory      RetryableJobError (another worker may have room)
    execution_error, device/driver/network fault   RetryableJobError
    execution_error, anything else (bad input)     PermanentJobError with node, type and message
    execution_interrupted we did not ask for       RetryableJobError (someone else stopped it)
    prompt in neither /queue nor /history          RetryableJobError (ComfyUI restarted: lost)

Messages are bounded and carry no tracebacks (they are stored in the job record).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker.errors import JobError, PermanentJobError, RetryableJobError

MAX_NODES_NAMED = 5
MAX_TEXT = 300

# torch.cuda.OutOfMemoryError, torch.OutOfMemoryError, "CUDA out of memory", "HIP out of memory",
# "MPS backend out of memory", "Allocation on device 0 would exceed allowed memory" (ComfyUI's own)
_OOM = re.compile(r"out ?of ?memory|OutOfMemory|Allocation on device|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
# the GPU or its driver failed, not the workflow: another worker (another GPU) may succeed
_DEVICE = re.compile(r"CUDA error|cuDNN error|CUBLAS_STATUS|NCCL|device-side assert|illegal memory access|"
                     r"CUDA driver|no CUDA GPUs|HIP error|ECC error", re.IGNORECASE)
# exception types that say "the network or a remote service failed" (API nodes, downloads)
_TRANSIENT_TYPES = re.compile(r"(^|\.)(ConnectionError|ConnectTimeout|ReadTimeout|TimeoutError|Timeout|"
                              r"ClientConnectorError|ServerDisconnectedError|RemoteDisconnected|"
                              r"ConnectionResetError|BrokenPipeError|TemporaryFailure)$")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _clip(text: Any, limit: int = MAX_TEXT) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _node_label(node_id: Any, class_type: Any) -> str:
    return f"node {node_id} ({class_type})" if class_type else f"node {node_id}"


def describe_node_errors(node_errors: Mapping[str, Any]) -> str:
    """One line for ComfyUI's ``node_errors``: ``node 2 (ImageInvert): Required input is missing: image``."""
    parts: list[str] = []
    for node_id, entry in list(node_errors.items())[:MAX_NODES_NAMED]:
        entry = _mapping(entry)
        errors = _list(entry.get("errors"))
        texts = []
        for error in errors[:3]:
            if not isinstance(error, Mapping):
                continue
            message, details = error.get("message") or error.get("type") or "error", error.get("details")
            texts.append(f"{message}: {details}" if details else str(message))
        parts.append(f"{_node_label(node_id, entry.get('class_type'))}: {'; '.join(texts) or 'invalid'}")
    more = len(node_errors) - MAX_NODES_NAMED
    if more > 0:
        parts.append(f"and {more} more node(s)")
    return _clip(" | ".join(parts), 1500)


def validation_error(status: int, body: Any) -> JobError:
    """The JobError for a refused POST /prompt (``body`` is its decoded JSON, or text)."""
    if not isinstance(body, Mapping):
        text = _clip(body) if body else "no body"
        if status >= 500:
            return RetryableJobError(f"ComfyUI answered {status} to POST /prompt: {text}")
        return PermanentJobError(f"ComfyUI refused the workflow ({status}): {text}")
    error = _mapping(body.get("error"))
    kind = str(error.get("type") or "invalid_prompt")
    message = str(error.get("message") or body.get("error") or "invalid workflow")
    details = error.get("details")
    line = f"ComfyUI refused the workflow ({kind}): {_clip(message)}"
    if details:
        line += f" ({_clip(details, 200)})"  # an unknown class_type is named only here: "Node ID '#2'"
    node_errors = body.get("node_errors")
    if isinstance(node_errors, Mapping) and node_errors:
        line += f"; {describe_node_errors(node_errors)}"
    if status >= 500:
        return RetryableJobError(line)
    return PermanentJobError(line + " (fix the workflow; retrying cannot help)")


def partial_workflow_error(node_errors: Mapping[str, Any]) -> PermanentJobError:
    """ComfyUI queued the workflow (200) but will drop the outputs that depend on invalid nodes."""
    return PermanentJobError(
        "ComfyUI accepted only part of the workflow; these outputs would never be produced: "
        f"{describe_node_errors(node_errors)} (fix the workflow, or set EMP_COMFYUI_ALLOW_PARTIAL=true "
        "to run what is valid)")


def is_out_of_memory(exception_type: str, message: str) -> bool:
    return bool(_OOM.search(exception_type) or _OOM.search(message))


def execution_error(data: Mapping[str, Any]) -> JobError:
    """The JobError for an ``execution_error`` message (or the one stored in history)."""
    node, node_type = data.get("node_id"), data.get("node_type")
    exc_type = str(data.get("exception_type") or "Exception")
    exc_message = str(data.get("exception_message") or "").strip()
    where = _node_label(node, node_type)
    text = f"ComfyUI failed at {where}: {exc_type}: {_clip(exc_message) or 'no message'}"
    if is_out_of_memory(exc_type, exc_message):
        return RetryableJobError(f"{text} (out of GPU memory; another worker may have room)")
    if _DEVICE.search(exc_message) or _DEVICE.search(exc_type):
        return RetryableJobError(f"{text} (a GPU or driver fault, not the workflow)")
    if _TRANSIENT_TYPES.search(exc_type):
        return RetryableJobError(f"{text} (a network or remote service fault)")
    return PermanentJobError(f"{text} (the workflow or its inputs are bad; retrying cannot help)")


def interrupted_error(data: Mapping[str, Any]) -> RetryableJobError:
    """An ``execution_interrupted`` the worker did not ask for (someone used ComfyUI's stop)."""
    where = _node_label(data.get("node_id"), data.get("node_type"))
    return RetryableJobError(f"ComfyUI interrupted the workflow at {where}, and this worker did not ask it "
                             "to (someone else stopped it on the server)")


def lost_error(prompt_id: str, why: str) -> RetryableJobError:
    return RetryableJobError(f"ComfyUI lost prompt {prompt_id}: {why} (it is in neither /queue nor /history; "
                             "the server was probably restarted)")


def error_from_history(entry: Mapping[str, Any]) -> JobError | None:
    """The failure a finished history entry records (None when it succeeded)."""
    status = _mapping(entry.get("status"))
    if status.get("status_str") != "error":
        return None
    messages = _list(status.get("messages"))
    for item in messages:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], Mapping):
            if item[0] == "execution_error":
                return execution_error(item[1])
            if item[0] == "execution_interrupted":
                return interrupted_error(item[1])
    return RetryableJobError("ComfyUI recorded the workflow as failed without saying why")


class LostPrompt(Exception):  # an internal signal, turned into lost_error by the runner
    """Internal: the prompt is in neither /queue nor /history."""


def cached_nodes(entry: Mapping[str, Any]) -> set[str]:
    """The nodes a history entry says came from the cache (its execution_cached message)."""
    messages = _list(_mapping(entry.get("status")).get("messages"))
    found: set[str] = set()
    for item in messages:
        if isinstance(item, list | tuple) and len(item) == 2 and item[0] == "execution_cached" \
                and isinstance(item[1], Mapping) and isinstance(item[1].get("nodes"), list):
            found.update(str(n) for n in item[1]["nodes"])
    return found
