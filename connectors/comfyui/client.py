"""ComfyUI's HTTP API (0.3.64, plus the newer ``/api/jobs`` routes when the server has them),
over :class:`connectors.http.HttpEngine` (timeouts, connect retries, host lock, redaction).

Every call is bounded by the engine's timeouts. Answers ComfyUI gives without feedback
(``/interrupt``, ``/queue`` delete) are confirmed by the caller through messages or history.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from connectors.comfyui.errors import validation_error
from connectors.http import HttpEngine
from worker.errors import JobError, PermanentJobError, RetryableJobError

_FEATURE_TTL_S = 300.0


class ComfyHttp(HttpEngine):
    """HttpEngine that reads ComfyUI's own error format for POST /prompt (node_errors)."""

    def error_for_answer(self, status: int, body: bytes, content_type: str, request: str) -> JobError:
        method, _, path = request.partition(" ")
        if method == "POST" and path.endswith("/prompt") and status in (400, 500):
            text = self.redact(body.decode("utf-8", "replace"))
            try:
                decoded: Any = json.loads(text)
            except ValueError:
                decoded = text
            return validation_error(status, decoded)
        if method == "GET" and path.endswith("/view") and status == 404:
            # an output the history listed is gone (a temp file after a restart): another run makes it again
            return RetryableJobError("ComfyUI no longer has an output file its history listed (404 from /view)")
        return super().error_for_answer(status, body, content_type, request)


@dataclass(frozen=True)
class Submitted:
    prompt_id: str
    number: float | None = None
    node_errors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueState:
    running: frozenset[str]
    pending: frozenset[str]

    def has(self, prompt_id: str) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


def _ids(items: Any) -> frozenset[str]:
    found = set()
    for item in items if isinstance(items, list) else []:
        if isinstance(item, list | tuple) and len(item) > 1 and isinstance(item[1], str):
            found.add(item[1])
    return frozenset(found)


class ComfyClient:
    """The calls the connector makes; JobErrors on failure (retryable unless the input is bad)."""

    def __init__(self, engine: ComfyHttp, *, poll_timeout_s: float = 10.0) -> None:
        self.engine = engine
        self.poll_timeout_s = poll_timeout_s
        self._jobs_api: bool | None = None
        self._jobs_checked = -_FEATURE_TTL_S

    async def aclose(self) -> None:
        await self.engine.aclose()

    # -- prompts ------------------------------------------------------------------------------------

    async def submit(self, workflow: Mapping[str, Any], client_id: str, prompt_id: str,
                     extra_data: Mapping[str, Any] | None = None) -> Submitted:
        body: dict[str, Any] = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        answer = await self.engine.post_json("/prompt", body)
        if not isinstance(answer, Mapping):
            raise RetryableJobError(f"ComfyUI answered POST /prompt with {type(answer).__name__}, not an object")
        node_errors = answer.get("node_errors")
        number = answer.get("number")
        return Submitted(str(answer.get("prompt_id") or prompt_id),
                         float(number) if isinstance(number, int | float) else None,
                         dict(node_errors) if isinstance(node_errors, Mapping) else {})

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry; None while it is unknown, queued, or lost (``{}``)."""
        answer = await self.engine.get_json(f"/history/{prompt_id}", timeout=self.poll_timeout_s)
        if not isinstance(answer, Mapping):
            return None
        entry = answer.get(prompt_id)
        return dict(entry) if isinstance(entry, Mapping) else None

    async def job_status(self, prompt_id: str) -> str | None:
        """A newer server's ``/api/jobs/{id}`` ``status`` (pending, in_progress, completed, failed, or
        whatever else it says), None when it does not know the prompt (404). Only ``status`` is
        read: COMFYUI.md §1.6 documents nothing else of the job object."""
        try:
            answer = await self.engine.get_json(f"/api/jobs/{prompt_id}", timeout=self.poll_timeout_s)
        except PermanentJobError:  # 404 {"error": "Job not found"}
            return None
        status = answer.get("status") if isinstance(answer, Mapping) else None
        return status if isinstance(status, str) else ""

    async def queue(self) -> QueueState:
        answer = await self.engine.get_json("/queue", timeout=self.poll_timeout_s)
        if not isinstance(answer, Mapping):
            raise RetryableJobError("ComfyUI answered GET /queue with something other than an object")
        return QueueState(_ids(answer.get("queue_running")), _ids(answer.get("queue_pending")))

    # -- cancel ---------------------------------------------------------------------------------------

    async def has_jobs_api(self) -> bool:
        """Whether the server has the newer ``/api/jobs`` routes (checked again every 5 minutes)."""
        now = asyncio.get_running_loop().time()
        if self._jobs_api is not None and now - self._jobs_checked < _FEATURE_TTL_S:
            return self._jobs_api
        try:
            async with self.engine.stream("GET", "/api/jobs", params={"limit": 1},
                                          timeout=self.poll_timeout_s) as answer:
                self._jobs_api = "json" in answer.headers.get("Content-Type", "")
        except PermanentJobError:  # 404/405: an older server
            self._jobs_api = False
        self._jobs_checked = now
        return self._jobs_api

    def forget_features(self) -> None:
        """The server may have been replaced (restart, upgrade): detect its routes again."""
        self._jobs_api = None

    async def cancel(self, prompt_id: str, *, running: bool | None = None) -> str:
        """Stop one prompt, and only that one; returns how. ``running``: whether it is known to
        run now (None: look in /queue)."""
        if await self.has_jobs_api():
            await self.engine.post_json(f"/api/jobs/{prompt_id}/cancel", {}, timeout=self.poll_timeout_s)
            return "jobs_api"
        if running is None:
            state = await self.queue()
            running = prompt_id in state.running
            if not running and prompt_id not in state.pending:
                return "not_queued"
        if not running:
            await self.engine.post_json("/queue", {"delete": [prompt_id]}, timeout=self.poll_timeout_s)
            if prompt_id not in (await self.queue()).running:
                return "queue_delete"
            # it started between the look and the delete (which spares running prompts): interrupt it
        await self.engine.post_json("/interrupt", {"prompt_id": prompt_id}, timeout=self.poll_timeout_s)
        return "interrupt"

    async def withdraw(self, prompt_id: str) -> None:
        """Take a prompt back whatever its state: delete it from the queue, then a targeted
        interrupt (each a no-op when it does not apply). Both scoped to this prompt."""
        await self.engine.post_json("/queue", {"delete": [prompt_id]}, timeout=self.poll_timeout_s)
        await self.engine.post_json("/interrupt", {"prompt_id": prompt_id}, timeout=self.poll_timeout_s)

    # -- files --------------------------------------------------------------------------------------

    async def upload_image(self, name: str, data: bytes, *, subfolder: str = "") -> tuple[str, str]:
        """Upload one input image (overwriting its name); returns ComfyUI's (name, subfolder)."""
        fields = {"type": "input", "overwrite": "true"}
        if subfolder:
            fields["subfolder"] = subfolder
        encoded = httpx.Request("POST", "http://upload.invalid/", data=fields,
                                files={"image": (name, data, "application/octet-stream")})
        body = encoded.read()
        answer = await self.engine.request("POST", "/upload/image", content=body,
                                           headers={"Content-Type": encoded.headers["Content-Type"]})
        try:
            decoded = answer.json()
        except ValueError:
            decoded = None
        if not isinstance(decoded, Mapping) or not isinstance(decoded.get("name"), str):
            raise RetryableJobError("ComfyUI answered POST /upload/image without the stored name")
        return decoded["name"], str(decoded.get("subfolder") or "")

    async def view_to(self, params: Mapping[str, str], dest: Path) -> tuple[int, str]:
        """Stream one file from /view into ``dest``; returns (size, content type header)."""
        return await self.engine.download_to("/view", dest, params=dict(params))

    # -- server facts --------------------------------------------------------------------------------

    async def system_stats(self, timeout_s: float) -> dict[str, Any]:
        answer = await self.engine.get_json("/system_stats", timeout=timeout_s)
        if not isinstance(answer, Mapping):
            raise RetryableJobError("ComfyUI answered GET /system_stats with something other than an object")
        return dict(answer)

    async def model_folders(self) -> list[str] | None:
        """``/models`` (folder names); None when the server has no such route."""
        try:
            answer = await self.engine.get_json("/models", timeout=self.poll_timeout_s)
        except PermanentJobError:
            return None
        return [f for f in answer if isinstance(f, str)] if isinstance(answer, list) else None

    async def models_in(self, folder: str) -> list[str]:
        try:
            answer = await self.engine.get_json(f"/models/{folder}", timeout=self.poll_timeout_s)
        except PermanentJobError:  # 404: no such folder on this server
            return []
        return [m for m in answer if isinstance(m, str)] if isinstance(answer, list) else []

    async def node_choices(self, class_type: str, input_name: str) -> list[str]:
        """The options of one combo input (e.g. CheckpointLoaderSimple's ckpt_name) from /object_info."""
        try:
            answer = await self.engine.get_json(f"/object_info/{class_type}", timeout=self.poll_timeout_s)
        except PermanentJobError:
            return []
        spec = answer.get(class_type) if isinstance(answer, Mapping) else None
        required = (spec or {}).get("input", {}).get("required", {}) if isinstance(spec, Mapping) else {}
        choice = required.get(input_name) if isinstance(required, Mapping) else None
        if isinstance(choice, list) and choice:
            options = choice[0]
            if isinstance(options, list):
                return [o for o in options if isinstance(o, str)]
            if options == "COMBO" and len(choice) > 1 and isinstance(choice[1], Mapping):
                listed = choice[1].get("options")
                return [o for o in listed if isinstance(o, str)] if isinstance(listed, list) else []
        return []
