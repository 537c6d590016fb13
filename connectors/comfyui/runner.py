"""One job on ComfyUI, per the flow of COMFYUI.md §1.5.

1. Upload input images; subscribe to a client-generated ``prompt_id`` on the socket *before*
   POST /prompt (its messages may arrive before the answer: pitfall 1).
2. Follow the prompt's messages into a :class:`PromptTracker` (progress to the worker) until
   ``executing {node: null}``. Whenever the socket drops, the prompt was submitted under an
   earlier clientId, or nothing was heard for ``STALL_S``, reconcile: /history (the prompt ended),
   /queue (it still waits or runs), neither (ComfyUI restarted: lost, retryable); a newer server's
   ``/api/jobs/{id}`` answers "still pending or running" in one call (only its ``status`` is
   trusted; anything else goes the 0.3.64 way, and results always come from /history). An unreachable
   ComfyUI fails the job after ``UNREACHABLE_S``. No wait is unbounded.
3. Read /history (asked again while empty: pitfall 2), turn a failure into its JobError, and fetch
   every output through /view into files handed to ``ctx.add_output``.

``stop()`` (the connector's interrupt) cancels only this prompt and waits, bounded, to see it end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.base import MAX_OUTPUTS, JobCancelled, JobContext, JobResult, StopReason
from connectors.comfyui import errors, inputs, outputs
from connectors.comfyui.client import ComfyClient
from connectors.comfyui.payload import ComfyJobSpec, rename_inputs
from connectors.comfyui.progress import PromptTracker
from connectors.comfyui.settings import ComfyUISettings
from connectors.comfyui.ws import BINARY, DISCONNECTED, RECONNECTED, BinaryFrame, ComfySocket, Event
from worker.errors import JobError, PermanentJobError, RetryableJobError

log = logging.getLogger("emp.comfyui")

STOP_CONFIRM_S = 3.5  # within the worker's 5 s interrupt budget
WEBSOCKET_OUTPUT_CLASSES = frozenset({"SaveImageWebsocket"})
STILL_QUEUED = frozenset({"pending", "in_progress"})  # /api/jobs statuses of a prompt that has not ended
MAX_TEXTS = 50
MAX_TEXT_CHARS = 4000


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


@dataclass
class Engine:
    """What a run needs from its connector."""

    client: ComfyClient
    socket: ComfySocket
    settings: ComfyUISettings


class PromptRun:
    def __init__(self, engine: Engine, spec: ComfyJobSpec, ctx: JobContext, scratch: Path) -> None:
        self.engine = engine
        self.client = engine.client
        self.settings = engine.settings
        self.spec = spec
        self.ctx = ctx
        self.scratch = scratch
        self.prompt_id = str(uuid.uuid4())
        self.client_id = ""
        self.tracker = PromptTracker(spec)
        self.submitted = asyncio.Event()
        self.ended = asyncio.Event()  # the prompt will not run any more (done, interrupted, lost, deleted)
        self.stop_reason: StopReason | None = None
        self.node_errors: dict[str, Any] = {}
        self.ws_outputs: list[outputs.OutputRef] = []  # at most MAX_OUTPUTS written to disk
        self.ws_frames = 0  # every SaveImageWebsocket frame, kept or not
        self.texts: dict[str, str] = {}
        self.cancel_route = ""

    # -- the job ------------------------------------------------------------------------------------

    async def execute(self) -> JobResult:
        s = self.settings
        renamed = await inputs.upload_all(self.client, self.spec.images, allowed=s.allowed_input_hosts(),
                                          max_bytes=s.max_input_image_bytes, timeout_s=s.input_timeout_s)
        workflow = rename_inputs(self.spec.workflow, renamed)
        socket = self.engine.socket
        await socket.wait_connected(s.connect_timeout_s)
        self.client_id = socket.client_id if socket.connected.is_set() else ""
        queue = socket.subscribe(self.prompt_id)
        try:
            await self._submit(workflow)
            entry = await self._follow(queue)
            if entry is None:
                entry = await self._final_history()
            self.ended.set()
            return await self._finish(entry)
        finally:
            if self.submitted.is_set() and not self.ended.is_set() and not self.cancel_route:
                _spawn(self._withdraw())  # cancelled mid-prompt (or mid-POST) before stop() could: do not leave it
            self.ended.set()
            socket.unsubscribe(self.prompt_id)

    async def _submit(self, workflow: dict[str, dict[str, Any]]) -> None:
        extra = {"emp_job_id": self.ctx.job.id}
        try:
            answer = await self.client.submit(workflow, self.client_id, self.prompt_id, extra)
        except RetryableJobError:
            await self._withdraw()  # the POST may have queued it before the answer was lost
            raise
        except PermanentJobError:
            self.ended.set()  # refused (400): nothing was queued, so there is nothing to withdraw
            raise
        finally:
            self.submitted.set()
        self.node_errors = answer.node_errors
        if answer.node_errors and not self.settings.allow_partial:
            await self._withdraw()
            raise errors.partial_workflow_error(answer.node_errors)
        log.info("job %s: ComfyUI prompt %s queued (number %s)", self.ctx.job.id, self.prompt_id, answer.number)
        self.ctx.progress(0, "queued in ComfyUI", data={"prompt_id": self.prompt_id})

    async def _withdraw(self) -> None:
        self.ended.set()
        with contextlib.suppress(JobError):
            await self.client.withdraw(self.prompt_id)

    # -- following ----------------------------------------------------------------------------------

    async def _follow(self, queue: asyncio.Queue[Event]) -> dict[str, Any] | None:
        """Until the prompt ended: None when the socket said so, else its history entry."""
        s = self.settings
        polling = not self.client_id
        last_news = time.monotonic()
        while True:
            wait_s = s.poll_s if polling else max(0.05, s.stall_s - (time.monotonic() - last_news))
            try:
                kind, data = await asyncio.wait_for(queue.get(), wait_s)
            except TimeoutError:
                kind, data = "", None
            if kind == DISCONNECTED or (kind == RECONNECTED and self.engine.socket.client_id != self.client_id):
                polling = True  # messages for this prompt went to a socket that is gone (pitfall 5)
            elif kind == BINARY:
                self._on_binary(data)
                last_news = time.monotonic()
                continue
            elif kind and kind != RECONNECTED:
                last_news = time.monotonic()
                if self._on_message(kind, data):
                    return None
                continue
            if polling or time.monotonic() - last_news >= s.stall_s:
                entry = await self.reconcile()
                if entry is not None:
                    return entry
                last_news = time.monotonic()

    def _on_message(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Feed one message to the tracker; True when the prompt ended."""
        now = time.monotonic()
        if self.tracker.feed(kind, data, now):
            snap = self.tracker.snapshot(now)
            self.ctx.progress(snap.percent, snap.message, step=snap.step, total_steps=snap.total_steps,
                              eta_s=snap.eta_s, data=snap.data)
        if self.tracker.interrupted is not None or self.tracker.error is not None:
            self.ended.set()  # stop() waits for this; executing{null} follows
        return self.tracker.done

    def _on_binary(self, frame: BinaryFrame) -> None:
        node = frame.node_id or self.tracker.current
        if frame.event == 3:
            if node is not None and (node in self.texts or len(self.texts) < MAX_TEXTS):
                self.texts[node] = frame.text[:MAX_TEXT_CHARS]
            return
        if node is not None and self.spec.class_of(node) in WEBSOCKET_OUTPUT_CLASSES:
            self._keep_websocket_image(node, frame)  # its only trace (pitfall 9)
        elif self.ctx.previews and frame.image:
            snap = self.tracker.snapshot(time.monotonic())
            self.ctx.progress(snap.percent, snap.message, step=snap.step, total_steps=snap.total_steps,
                              data=snap.data, preview=frame.image, preview_type=frame.image_type)

    def _keep_websocket_image(self, node: str, frame: BinaryFrame) -> None:
        self.ws_frames += 1
        if len(self.ws_outputs) >= MAX_OUTPUTS:
            return  # the job fails at the end (too many outputs): no more disk for frames it cannot hand over
        index = sum(1 for ref in self.ws_outputs if ref.node_id == node)
        suffix = ".jpg" if "jpeg" in frame.image_type else ".png"
        path = self.scratch / f"ws-{node}-{index:05d}{suffix}"
        path.write_bytes(frame.image)  # one frame, already in memory: bounded by the socket's max size
        self.ws_outputs.append(outputs.OutputRef(node, "websocket", filename=path.name, type="websocket",
                                                 local=path))

    async def reconcile(self) -> dict[str, Any] | None:
        """Where the prompt is: its history entry (it ended), None (queued or running), or a
        RetryableJobError (lost: in neither; or ComfyUI unreachable for UNREACHABLE_S)."""
        s = self.settings
        first_failure: float | None = None
        while True:
            try:
                return await self._locate()
            except errors.LostPrompt as lost:
                self.ended.set()
                raise errors.lost_error(self.prompt_id, str(lost)) from None
            except RetryableJobError as exc:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if now - first_failure >= s.unreachable_s:
                    self.ended.set()
                    raise RetryableJobError(f"ComfyUI at {self.client.engine.base_url} stopped answering during "
                                            f"the job ({s.unreachable_s:g}s): {exc}") from exc
                await asyncio.sleep(min(0.5, s.poll_s))  # ComfyUI unreachable: ask again shortly

    async def _locate(self) -> dict[str, Any] | None:
        if await self.client.has_jobs_api() and await self.client.job_status(self.prompt_id) in STILL_QUEUED:
            return None  # one call where /history and /queue take two; any other answer: the 0.3.64 way
        entry = await self.client.history(self.prompt_id)
        if entry is not None:
            return entry
        if (await self.client.queue()).has(self.prompt_id):
            return None
        for attempt in range(self.settings.history_retries):  # history is written after the queue moves on
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))
            entry = await self.client.history(self.prompt_id)
            if entry is not None:
                return entry
        if (await self.client.queue()).has(self.prompt_id):
            return None
        raise errors.LostPrompt("it never finished, and ComfyUI no longer knows it")

    async def _final_history(self) -> dict[str, Any] | None:
        """The history entry after executing{null}; asked again while empty (pitfall 2)."""
        for attempt in range(self.settings.history_retries + 1):
            entry = await self.client.history(self.prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))
        log.warning("job %s: ComfyUI has no history for prompt %s; using what the socket reported",
                    self.ctx.job.id, self.prompt_id)
        return None

    # -- the end ------------------------------------------------------------------------------------

    async def _finish(self, entry: dict[str, Any] | None) -> JobResult:
        if self.stop_reason is not None:
            raise JobCancelled(self.stop_reason.value)
        failure = self._failure(entry)
        if failure is not None:
            raise failure
        found = dict(self.tracker.executed)
        cached = set(self.tracker.cached)
        if entry is not None:
            history_outputs = entry.get("outputs")
            if isinstance(history_outputs, Mapping):
                found.update(history_outputs)
            cached |= errors.cached_nodes(entry)
        discovered = outputs.discover(found, cached)
        outputs.check_count(len(discovered) + self.ws_frames)
        refs = discovered + self.ws_outputs
        files = await self._hand_over(refs)
        self.ctx.progress(100, "done", data={"prompt_id": self.prompt_id})
        result: JobResult = {"prompt_id": self.prompt_id, "files": files}
        if self.node_errors:
            result["node_errors"] = errors.describe_node_errors(self.node_errors)
        if self.texts:
            result["node_text"] = dict(self.texts)
        return result

    def _failure(self, entry: dict[str, Any] | None) -> JobError | None:
        if entry is not None:
            found = errors.error_from_history(entry)
            if found is not None:
                return found
            return None
        if self.tracker.error is not None:
            return errors.execution_error(self.tracker.error)
        if self.tracker.interrupted is not None:
            return errors.interrupted_error(self.tracker.interrupted)
        if not self.tracker.succeeded:
            return errors.lost_error(self.prompt_id, "it ended without success, and ComfyUI kept no history")
        return None

    async def _hand_over(self, refs: list[outputs.OutputRef]) -> list[dict[str, Any]]:
        used: set[str] = set()
        files = []
        for index, ref in enumerate(refs):
            name = outputs.output_name(ref, index, used)
            if ref.text is not None:
                data = ref.text.encode()
                self.ctx.add_output(name, data, content_type="text/plain; charset=utf-8")
                files.append(outputs.describe(ref, name, len(data), "text/plain; charset=utf-8"))
                continue
            if ref.local is not None:
                path, size, header = ref.local, ref.local.stat().st_size, ""
            else:
                path = self.scratch / name
                size, header = await self.client.view_to(ref.view_params(), path)
            content_type = outputs.content_type_for(ref.filename, header)
            self.ctx.add_output(name, path=path, content_type=content_type)
            files.append(outputs.describe(ref, name, size, content_type))
        return files

    # -- stopping ------------------------------------------------------------------------------------

    async def stop(self, reason: StopReason) -> None:
        """Cancel this prompt only (never a global interrupt) and wait, bounded, to see it end."""
        self.stop_reason = reason
        deadline = time.monotonic() + STOP_CONFIRM_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.submitted.wait(), STOP_CONFIRM_S / 2)
        if not self.submitted.is_set() or self.ended.is_set():
            return
        running = self.tracker.current is not None and not self.tracker.done
        try:
            self.cancel_route = await self.client.cancel(self.prompt_id, running=True if running else None)
        except JobError as exc:
            log.warning("job %s: cancelling ComfyUI prompt %s failed: %s", self.ctx.job.id, self.prompt_id, exc)
            return
        if self.cancel_route in ("queue_delete", "not_queued"):
            self.ended.set()  # a deleted prompt never runs nor shows up in history
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), max(0.1, deadline - time.monotonic()))
        if not self.ended.is_set():
            log.warning("job %s: ComfyUI has not confirmed that prompt %s stopped (%s); a node that never "
                        "ticks runs to its end first", self.ctx.job.id, self.prompt_id, self.cancel_route)
