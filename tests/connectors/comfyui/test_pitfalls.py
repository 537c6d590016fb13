"""The twelve pitfalls of COMFYUI.md §1.4, one test each, against the fake ComfyUI (a real HTTP +
WebSocket server replaying 0.3.64's behaviour), through the connector as the worker drives it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from connectors.base import MAX_OUTPUTS, JobCancelled
from connectors.testing import FakeJobContext, make_job, run_job
from tests.conftest import wait_until
from tests.connectors.comfyui.conftest import ConnectorFactory, blur_chain, graph
from tests.fakes.comfyui import Failure, FakeComfyUI
from worker.errors import PermanentJobError, RetryableJobError


def websocket_graph(batch: int, color: int = 8518937) -> dict[str, Any]:
    """progress_binary_*.json's workflow: GetImageSize sends a TEXT frame, SaveImageWebsocket one
    preview-format frame per image (its only output: pitfall 9)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 1, "color": color}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": ["2", 0], "height": 32, "batch_size": batch,
                                                     "color": color + 1}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["4", 0]}},
    }


async def test_pitfall_01_prompt_answer_after_its_messages(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    fake.behaviour.prompt_response_delay_s = 0.5  # every message, up to executing{null}, comes first
    connector = await comfy(fake)
    result, ctx = await run_job(connector, make_job("comfyui", graph("p01")))
    submitted = fake.prompts[-1]
    assert submitted.body["prompt_id"] == result["prompt_id"]  # chosen by the connector, not the answer
    assert uuid.UUID(result["prompt_id"]).version == 4
    assert [f["filename"] for f in result["files"]] == ["p01_00001_.png"]
    assert any("Invert Image" in u.message for u in ctx.updates)  # the early messages were not lost


async def test_pitfall_02_history_race(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    fake.behaviour.history_delay_s = 0.2  # execution_success goes out before the history write
    fake.behaviour.history_empty_reads = 2  # and two reads after it still answer {}
    connector = await comfy(fake)
    result, _ = await run_job(connector, make_job("comfyui", graph("p02")))
    assert [f["filename"] for f in result["files"]] == ["p02_00001_.png"]
    reads = [path for method, path in fake.requests if path == f"/history/{result['prompt_id']}"]
    assert len(reads) >= 3  # asked again while empty, instead of declaring the job lost


async def test_pitfall_03_fully_cached_prompt(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    first, _ = await run_job(connector, make_job("comfyui", graph("p03")))
    second, ctx = await run_job(connector, make_job("comfyui", graph("p03")))  # identical: every node cached
    assert second["files"][0]["filename"] == first["files"][0]["filename"]  # the old file, not written again
    assert second["files"][0]["cached"] is True
    assert ctx.updates[-1].progress == 100
    assert len(ctx.outputs) == 1 and ctx.outputs[0].path is not None and ctx.outputs[0].path.stat().st_size > 0


async def test_pitfall_04_broadcasts_of_other_prompts_are_not_ours(fake: FakeComfyUI,
                                                                   comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    hold = fake.hold("1")
    other = fake.submit(websocket_graph(3, color=1000))  # another client's prompt, no client_id: broadcast
    job = asyncio.create_task(run_job(connector, make_job("comfyui", websocket_graph(2))))
    await hold.wait_reached()
    fake.broadcast_other_client(node="5")  # progress/progress_state/TEXT of yet another prompt
    hold.release()
    result, ctx = await asyncio.wait_for(job, 30)
    websocket_files = [f for f in result["files"] if f["kind"] == "websocket"]
    assert len(websocket_files) == 2  # its own batch of 2, none of the other prompt's 3 images
    assert all(u.data is None or u.data.get("node") != "5" or u.progress > 0 for u in ctx.updates)
    assert "someone else" not in str(result.get("node_text"))
    assert fake.engine.history[other]["status"]["status_str"] == "success"


async def test_pitfall_05_socket_lost_reconnects_with_a_fresh_client_id(fake: FakeComfyUI,
                                                                        comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    hold = fake.hold("11")
    job = asyncio.create_task(run_job(connector, make_job("comfyui", blur_chain("p05"))))
    await hold.wait_reached()
    first_id = fake.prompts[-1].client_id
    await fake.drop_websockets()  # a network blip: no close frame, HTTP keeps working
    await wait_until(lambda: bool(fake.sockets) and first_id not in fake.sockets, within_s=10)
    hold.release()
    result, _ = await asyncio.wait_for(job, 30)  # finished by reconciling through /history
    assert [f["filename"] for f in result["files"]] == ["p05_00001_.png"]
    assert connector.engine is not None and connector.engine.socket.client_id != first_id
    assert len(fake.sockets) == 1  # never two sockets under one id


async def test_pitfall_06_server_dies_mid_job(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    hold = fake.hold("11")
    job = asyncio.create_task(run_job(connector, make_job("comfyui", blur_chain("p06"))))
    await hold.wait_reached()
    started = time.monotonic()
    await fake.kill()
    with pytest.raises(RetryableJobError, match="stopped answering"):
        await asyncio.wait_for(job, 15)
    assert time.monotonic() - started < 10
    assert (await connector.health()).state.value == "down"
    await fake.restart()  # back on the same port, history empty: the next job runs
    await wait_until(lambda: connector.engine is not None and connector.engine.socket.connected.is_set(), 10)
    result, _ = await run_job(connector, make_job("comfyui", graph("p06b")))
    assert result["files"][0]["filename"] == "p06b_00001_.png"


async def test_pitfall_06_restarted_server_lost_the_prompt(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    connector = await comfy(fake, EMP_COMFYUI_UNREACHABLE_S="20")
    hold = fake.hold("11")
    job = asyncio.create_task(run_job(connector, make_job("comfyui", blur_chain("p06c"))))
    await hold.wait_reached()
    await fake.restart()  # back at once, with an empty queue and history
    with pytest.raises(RetryableJobError, match="lost prompt"):
        await asyncio.wait_for(job, 15)


async def test_pitfall_07_cancel_is_prompt_scoped(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    hold = fake.hold("11")
    job = make_job("comfyui", blur_chain("p07"))

    async def release_once_interrupted() -> None:
        await wait_until(lambda: bool(fake.interrupts), within_s=10)
        hold.release()  # the held node ends; the flag stops the prompt before the next one

    releaser = asyncio.create_task(release_once_interrupted())
    with pytest.raises(JobCancelled):
        await run_job(connector, job, cancel_after=lambda ctx: hold.reached.is_set())
    await releaser
    assert [call.body for call in fake.interrupts] == [{"prompt_id": fake.prompts[-1].prompt_id}]
    assert fake.interrupts[0].hit
    await fake.wait_idle()
    history = fake.engine.history[fake.prompts[-1].prompt_id]
    assert history["status"]["messages"][-1][0] == "execution_interrupted"
    result, _ = await run_job(connector, make_job("comfyui", graph("p07next")))  # not hit by the interrupt
    assert result["files"][0]["filename"] == "p07next_00001_.png"


async def test_pitfall_07_cancel_of_a_pending_prompt_deletes_it(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    hold = fake.hold("11")
    fake.submit(blur_chain("blocker", color=77))  # someone else's prompt runs; ours waits behind it
    await hold.wait_reached()
    with pytest.raises(JobCancelled):
        await run_job(connector, make_job("comfyui", graph("p07p")),
                      cancel_after=lambda ctx: any("queued" in u.message for u in ctx.updates))
    ours = fake.prompts[-1].prompt_id
    assert fake.queue_deletes == [{"delete": [ours]}]
    assert fake.interrupts == []  # the running prompt (not ours) was left alone
    hold.release()
    await fake.wait_idle()
    assert ours not in fake.engine.history


async def test_pitfall_07_cancel_uses_the_jobs_api_when_present(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    fake.behaviour.jobs_api = True
    connector = await comfy(fake)
    hold = fake.hold("11")
    job = make_job("comfyui", blur_chain("p07j"))
    releaser = asyncio.create_task(_release_when(lambda: bool(fake.cancels), hold))
    with pytest.raises(JobCancelled):
        await run_job(connector, job, cancel_after=lambda ctx: hold.reached.is_set())
    await releaser
    assert fake.cancels == [fake.prompts[-1].prompt_id] and fake.interrupts == []


async def _release_when(condition: Any, hold: Any) -> None:
    await wait_until(condition, within_s=10)
    hold.release()


async def test_pitfall_08_a_late_interrupt_does_not_hit_the_next_prompt(fake: FakeComfyUI,
                                                                         comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    job = make_job("comfyui", graph("p08"))
    result, _ = await run_job(connector, job)
    from connectors.base import StopReason

    await connector.interrupt(job, StopReason.CANCELLED)  # lands after the job ended (a starved loop)
    assert fake.interrupts == []  # nothing to stop: no call at all, certainly not a global one
    ctx = FakeJobContext(make_job("comfyui", blur_chain("p08next")))
    later, _ = await run_job(connector, ctx.job, ctx)
    assert later["files"][0]["filename"] == "p08next_00001_.png" and result["files"]


async def test_pitfall_09_websocket_only_outputs(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)
    result, ctx = await run_job(connector, make_job("comfyui", websocket_graph(3)))
    assert fake.engine.history[result["prompt_id"]]["outputs"] == {}  # history has nothing of it
    images = [f for f in result["files"] if f["kind"] == "websocket"]
    assert len(images) == 3 and all(f["content_type"] == "image/png" and f["node_id"] == "5" for f in images)
    assert [o.path.read_bytes()[:8] for o in ctx.outputs if o.path] == [b"\x89PNG\r\n\x1a\n"] * 3
    assert ctx.updates[-1].progress == 100  # though progress.value stopped at max - 1
    assert result["node_text"]["2"].startswith("width: 48, height: 32")  # GetImageSize's TEXT frame


async def test_pitfall_10_accepted_with_node_errors(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    partial = {**graph("p10"), "9": {"class_type": "LoadImage", "inputs": {"image": "no_such_file.png"}},
               "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}}
    connector = await comfy(fake)
    with pytest.raises(PermanentJobError, match=r"node 9 \(LoadImage\).*no_such_file.png"):
        await run_job(connector, make_job("comfyui", partial))
    assert fake.queue_deletes and fake.queue_deletes[0] == {"delete": [fake.prompts[-1].prompt_id]}
    tolerant = await comfy(fake, EMP_COMFYUI_ALLOW_PARTIAL="true")
    await fake.wait_idle()
    result, _ = await run_job(tolerant, make_job("comfyui", {**partial, "3": {**partial["3"], "inputs": {
        "images": ["2", 0], "filename_prefix": "p10ok"}}}))
    assert "no_such_file.png" in result["node_errors"]
    assert [f["filename"] for f in result["files"]] == ["p10ok_00001_.png"]


@pytest.mark.parametrize(("failure", "expected"), [
    (Failure(class_type="ImageInvert", exception_type="PIL.UnidentifiedImageError",
             exception_message="cannot identify image file"), PermanentJobError),
    (Failure(class_type="ImageInvert"), RetryableJobError),  # torch.OutOfMemoryError "Allocation on device"
])
async def test_pitfall_11_one_failing_node_fails_the_prompt(fake: FakeComfyUI, comfy: ConnectorFactory,
                                                             failure: Failure, expected: type[Exception]) -> None:
    fake.behaviour.fail = failure
    two_branches = {**graph("p11"), "4": {"class_type": "EmptyImage", "inputs": {
        "width": 8, "height": 8, "batch_size": 1, "color": 5}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "p11b"}}}
    connector = await comfy(fake)
    with pytest.raises(expected, match=r"node 2 \(ImageInvert\)") as caught:
        await run_job(connector, make_job("comfyui", two_branches))
    assert failure.exception_type in str(caught.value)


# -- pitfall 12: no authentication of its own; the connector reaches it through an authenticating proxy


@contextlib.asynccontextmanager
async def auth_proxy(upstream: str, token: str) -> AsyncIterator[str]:
    """An HTTP + WebSocket reverse proxy that demands ``Authorization: Bearer <token>``."""
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401, text="missing or wrong token")
        target = upstream + request.path_qs
        if request.path == "/ws":
            down = web.WebSocketResponse()
            await down.prepare(request)
            async with session.ws_connect(target.replace("http", "ws", 1)) as up:
                async def pump_up() -> None:
                    async for message in down:
                        await up.send_str(message.data)
                pumping = asyncio.create_task(pump_up())
                async for message in up:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await down.send_str(message.data)
                    elif message.type == aiohttp.WSMsgType.BINARY:
                        await down.send_bytes(message.data)
                pumping.cancel()
            return down
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type",)}
        async with session.request(request.method, target, data=await request.read(), headers=headers) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                headers={k: v for k, v in answer.headers.items()
                                         if k.lower() in ("content-type", "content-disposition")})

    app = web.Application(client_max_size=200 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await session.close()


async def test_pitfall_12_no_auth_so_it_sits_behind_a_proxy(fake: FakeComfyUI, comfy: ConnectorFactory,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    token = "t0ken-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    async with auth_proxy(fake.url, token) as proxied:
        shut_out = await comfy(fake, start=False, EMP_COMFYUI_URL=proxied)
        with pytest.raises(RetryableJobError, match="401") as refused:
            await shut_out.start()
        assert token not in str(refused.value)
        connector = await comfy(fake, EMP_COMFYUI_URL=proxied, EMP_COMFYUI_TOKEN=token)
        result, ctx = await run_job(connector, make_job("comfyui", graph("p12")))
        assert any("Invert Image" in u.message for u in ctx.updates)  # the socket got through the proxy too
        assert result["files"][0]["filename"] == "p12_00001_.png"
        await connector.stop()
    assert all(path != "/" for _, path in fake.requests)
    assert token not in caplog.text and token not in str(result)


@pytest.mark.parametrize(("saved", "streamed"), [(0, 300), (200, 100), (256, 1)])
async def test_more_outputs_than_a_job_may_hand_over_fail_naming_the_count(
    fake: FakeComfyUI, comfy: ConnectorFactory, saved: int, streamed: int
) -> None:
    workflow = websocket_graph(streamed)
    if saved:
        workflow["6"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": saved,
                                                                "color": 5}}
        workflow["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "many"}}
    connector = await comfy(fake)
    ctx = FakeJobContext(make_job("comfyui", workflow))
    with pytest.raises(PermanentJobError, match=f"produced {saved + streamed} outputs; a job may return at most 256"):
        await run_job(connector, ctx.job, ctx)
    assert ctx.outputs == []  # nothing handed over
    assert len(list(ctx.temp_dir().iterdir())) <= MAX_OUTPUTS  # frames past the limit were not written


async def test_reconcile_asks_the_jobs_api_when_the_server_has_it(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    fake.behaviour.jobs_api = True
    connector = await comfy(fake)
    hold = fake.hold("11")
    job = asyncio.create_task(run_job(connector, make_job("comfyui", blur_chain("jobs-api"))))
    await hold.wait_reached()
    prompt = f"/api/jobs/{fake.prompts[-1].prompt_id}"
    await fake.drop_websockets()  # followed by polling from now on
    start = len(fake.requests)
    await wait_until(lambda: fake.requests[start:].count(("GET", prompt)) >= 2, within_s=10)
    polled = fake.requests[start:]
    assert ("GET", "/queue") not in polled  # "still running" came from /api/jobs/{id} alone
    hold.release()
    result, _ = await asyncio.wait_for(job, 30)
    assert [f["filename"] for f in result["files"]] == ["jobs-api_00001_.png"]  # the outputs: from /history


async def test_without_the_jobs_api_reconcile_uses_history_and_queue(fake: FakeComfyUI,
                                                                     comfy: ConnectorFactory) -> None:
    connector = await comfy(fake)  # without /api/jobs (0.3.64): /history and /queue as before
    hold = fake.hold("11")
    job = asyncio.create_task(run_job(connector, make_job("comfyui", blur_chain("no-jobs-api"))))
    await hold.wait_reached()
    await fake.drop_websockets()
    start = len(fake.requests)
    await wait_until(lambda: ("GET", "/queue") in fake.requests[start:], within_s=10)
    hold.release()
    result, _ = await asyncio.wait_for(job, 30)
    assert result["files"]
