"""The A1111 connector: one Stable Diffusion WebUI (or an API-compatible fork: Forge, reForge)
per worker slot, reached over its HTTP API (``--api`` or ``--nowebui``).

A job's generation is one blocking POST (A1111 answers when the job is done); meanwhile a second
connection polls ``/sdapi/v1/progress`` (A1111 runs one job at a time, so the progress is this
job's). ``interrupt`` posts ``/sdapi/v1/interrupt``; A1111 then still answers the POST with 200
and the partial images, which are dropped: the job ends cancelled (or handed back on a drain),
never completed. Images go through ``ctx.add_output``, the grid of a batch left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx

from connectors.a1111 import api, request
from connectors.a1111.settings import A1111Settings
from connectors.base import Connector, ConnectorConfig, Health, HealthState, JobContext, JobResult, StopReason
from worker.errors import JobError, RetryableJobError
from worker.matching import required_models
from worker.protocol import Job

log = logging.getLogger("emp.connector.a1111")

PROGRESS_PATH = "/sdapi/v1/progress"
HEALTH_PATH = "/sdapi/v1/progress?skip_current_image=true"
INTERRUPT_WAIT_S = 3.0  # within the worker's 5 s for interrupt()
INTERRUPT_CHECK_S = 0.1


class A1111Connector(Connector):
    name = "a1111"
    service_types = ("a1111",)
    max_concurrent_jobs = 1  # A1111 runs one generation at a time behind a lock
    settings_class = A1111Settings
    settings: A1111Settings

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        s = self.settings
        self.url = s.url_for(config.slot_index)
        auth = s.basic_auth("EMP_A1111_AUTH")  # the user:pass of A1111's --api-auth
        # generations: one long request; control: progress, interrupt, health, models (a pool of its own)
        self.http = api.A1111Http(self.url, name="a1111", auth=auth, connect_retries=s.connect_retries,
                                  timeout=httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s),
                                  max_response_bytes=s.max_response_bytes)
        self.control = api.A1111Http(self.url, name="a1111", auth=auth, connect_retries=0,
                                     timeout=httpx.Timeout(s.request_timeout_s, connect=s.connect_timeout_s))
        self._generating: set[tuple[str, int]] = set()  # (job id, attempt) whose generation request is out
        self._aliases: dict[str, str] = {}  # every name of a checkpoint -> its title
        self._listing: Any = []  # /sdapi/v1/sd-models, as last read

    async def stop(self) -> None:
        await self.http.aclose()
        await self.control.aclose()

    # -- engine state ---------------------------------------------------------------------------

    async def health(self) -> Health:
        ok, message = await self.control.probe(HEALTH_PATH, timeout=self.settings.request_timeout_s)
        return Health(HealthState.OK if ok else HealthState.DOWN, message)

    async def _checkpoints(self) -> Any:
        self._listing = await self.control.get_json("/sdapi/v1/sd-models")
        self._aliases = request.checkpoint_aliases(self._listing)
        return self._listing

    async def models(self) -> dict[str, list[str]]:
        return {"a1111": request.advertised(await self._checkpoints())}

    async def loaded_models(self) -> list[str]:
        options = await self.control.get_json("/sdapi/v1/options")
        title = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        if not isinstance(title, str) or not title:
            return []
        title = self._aliases.get(title, title)
        return request.advertised(self._listing, title) or [title]

    async def interrupt(self, job: Job, reason: StopReason) -> None:
        """POST /sdapi/v1/interrupt, again if A1111 had not begun the job yet (its begin() clears
        the flag), until the job's request has its answer or INTERRUPT_WAIT_S have passed."""
        deadline = time.monotonic() + INTERRUPT_WAIT_S
        timeout = min(self.settings.request_timeout_s, INTERRUPT_WAIT_S)
        sent = False
        # (id, attempt): a retry of the same job, claimed here at once, is another job to stop or not
        while (job.id, job.attempt) in self._generating and time.monotonic() < deadline:
            if not sent or await self._running_uninterrupted(timeout):
                await self.control.post_json("/sdapi/v1/interrupt", None, timeout=timeout)
                log.info("asked A1111 at %s to interrupt job %s (%s)", self.http.base_url, job.id, reason.value)
                sent = True
            await asyncio.sleep(INTERRUPT_CHECK_S)  # until the generation request returns

    async def _running_uninterrupted(self, timeout: float) -> bool:  # noqa: ASYNC109
        reply = await self.control.get_json(PROGRESS_PATH, params={"skip_current_image": "true"}, timeout=timeout)
        state = reply.get("state") if isinstance(reply, dict) else None
        return isinstance(state, dict) and (state.get("job_count") or 0) > 0 and state.get("interrupted") is False

    # -- a job ----------------------------------------------------------------------------------

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        endpoint, body = request.request_body(job.payload)
        body = await self._with_checkpoint(body, job)
        s = self.settings
        body = await request.inline_inputs(body, s.allowed_input_hosts(), s.max_input_bytes, s.input_timeout_s)
        ctx.raise_if_cancelled()
        ctx.progress(0, f"sent to A1111 ({endpoint})")
        reply = await self._generate(job, ctx, endpoint, body)
        ctx.raise_if_cancelled()  # interrupted: A1111 answered 200 with a partial result
        generated = await asyncio.to_thread(api.decode_reply, reply)
        await self._check_complete()
        for index, data in enumerate(generated.images):
            content_type, ext = api.image_type(data)
            ctx.add_output(f"image-{index:03d}.{ext}", data, content_type=content_type)
        ctx.progress(100, f"{len(generated.images)} image(s)")
        return {"endpoint": endpoint, "images": len(generated.images), "metadata": api.metadata_of(generated.info)}

    async def _with_checkpoint(self, body: dict[str, Any], job: Job) -> dict[str, Any]:
        required = required_models(job.requirements)
        asked = (body.get("override_settings") or {}).get("sd_model_checkpoint")
        if asked is None and not required:
            return body
        if not self._aliases or (isinstance(asked, str) and asked not in self._aliases):
            await self._checkpoints()  # a checkpoint added since the last listing
        title = request.choose_checkpoint(body, required, self._aliases)
        return request.with_checkpoint(body, title, self.settings.restore_checkpoint)

    async def _generate(self, job: Job, ctx: JobContext, endpoint: str, body: dict[str, Any]) -> Any:
        """POST the generation while polling progress; whichever ends first decides."""
        self._generating.add((job.id, job.attempt))
        post = asyncio.create_task(self.http.request("POST", f"/sdapi/v1/{endpoint}", json=body))
        poll = asyncio.create_task(self._poll(ctx))
        try:
            await asyncio.wait({post, poll}, return_when=asyncio.FIRST_COMPLETED)
            if not post.done():
                poll.result()  # the poller only ends by raising (the engine stopped answering)
            response = post.result()
        finally:
            self._generating.discard((job.id, job.attempt))
            await _reap(post, poll)
        return await asyncio.to_thread(_json_body, response)

    async def _poll(self, ctx: JobContext) -> None:
        """Report A1111's progress until cancelled; RetryableJobError when it has not answered for
        EMP_A1111_STALL_S (a hung or vanished engine)."""
        s = self.settings
        params = {"skip_current_image": "false" if ctx.previews else "true"}
        best = 0.0
        answered = time.monotonic()
        while True:
            await asyncio.sleep(s.progress_interval_s)  # the polling interval
            try:
                reply = await self.control.get_json(PROGRESS_PATH, params=params)
            except JobError as exc:
                if time.monotonic() - answered > s.stall_s:
                    raise RetryableJobError(f"a1111 stopped answering during the job for {s.stall_s:.0f}s "
                                            f"(EMP_A1111_STALL_S): {exc}") from exc
                continue
            answered = time.monotonic()
            progress = api.progress_of(reply)
            if progress is None:
                continue
            best = max(best, min(progress.percent, 99.0))  # 100 once the images are in
            ctx.progress(best, progress.message, step=progress.step, total_steps=progress.total_steps,
                         eta_s=progress.eta_s, preview=_preview(progress, ctx), preview_type="image/png")

    async def _check_complete(self) -> None:
        """A1111 answers an interrupted job with 200 too: if someone else (its UI, another client)
        interrupted or skipped this one, the partial result is not a success."""
        try:
            reply = await self.control.get_json(PROGRESS_PATH, params={"skip_current_image": "true"})
        except JobError:
            return  # the reply came; a lost progress answer does not make it partial
        state = reply.get("state") if isinstance(reply, dict) else None
        if isinstance(state, dict) and (state.get("interrupted") is True or state.get("skipped") is True):
            raise RetryableJobError("a1111 was interrupted during the job by someone else (its UI or another "
                                    "client); its partial result is not kept")


async def _reap(*tasks: asyncio.Task[Any]) -> None:
    """Cancel the tasks, wait for them to end and collect their exceptions (none is left unread)."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


def _json_body(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except (ValueError, RecursionError):
        raise RetryableJobError(f"a1111 answered {response.status_code} with a body that is not JSON") from None


def _preview(progress: api.Progress, ctx: JobContext) -> bytes | None:
    text = progress.preview_b64
    if not ctx.previews or text is None or len(text) > ctx.preview_max_bytes * 4 // 3 + 4:
        return None
    with contextlib.suppress(JobError):
        return api.decode_image(text, 0)
    return None
