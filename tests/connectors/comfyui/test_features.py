"""Outputs of every kind, input images, models and health, and a job's own timeout, against the
fake ComfyUI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from connectors.base import JobCancelled, StopReason
from connectors.testing import FakeJobContext, make_job, run_job
from tests.conftest import WorkerFactory, wait_until
from tests.connectors.comfyui.conftest import FAST, ConnectorFactory, blur_chain, graph
from tests.fakes.comfyui import FakeComfyUI, media
from worker.client import Client
from worker.errors import PermanentJobError


async def test_every_output_kind_is_fetched(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 321}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "kinds"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0}},
        "5": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8,
                                                           "filename_prefix": "clip", "format": "video/h264-mp4"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    connector = await comfy(fake)
    result, ctx = await run_job(connector, make_job("comfyui", workflow))
    kinds = {(f["node_id"], f["kind"]) for f in result["files"]}
    assert kinds >= {("2", "images"), ("3", "images"), ("4", "images"), ("5", "gifs"), ("6", "text")}
    by_node = {f["node_id"]: f for f in result["files"]}
    assert by_node["3"]["type"] == "temp" and by_node["4"]["content_type"] == "image/webp"
    assert by_node["5"]["content_type"] == "video/mp4"
    assert len([f for f in result["files"] if f["node_id"] == "2"]) == 2  # the batch of two
    for output, described in zip(ctx.outputs, result["files"], strict=True):
        assert output.name == described["name"] and output.size_bytes == described["size_bytes"] > 0
        assert output.data is not None or output.path is not None


async def test_audio_output(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    fake.files.put("input", "", "voice.flac", media.flac())
    connector = await comfy(fake)
    workflow = {"1": {"class_type": "LoadAudio", "inputs": {"audio": "voice.flac"}},
                "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/out"}}}
    result, ctx = await run_job(connector, make_job("comfyui", workflow))
    [audio] = result["files"]
    assert audio["kind"] == "audio" and audio["content_type"] == "audio/flac" and audio["subfolder"] == "audio"
    assert ctx.outputs[0].path is not None and ctx.outputs[0].path.read_bytes() == fake.files.get(
        "output", "audio", audio["filename"])


async def test_inline_input_image_is_uploaded_and_used(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    png = media.png(8, 8, 0x00FF00)
    fake.files.put("input", "", "face.png", media.png(4, 4, 1))  # same name, other bytes, already there
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "up"}}}
    connector = await comfy(fake)
    payload = {"workflow": workflow, "images": [{"name": "face.png", "data": base64.b64encode(png).decode()}]}
    result, _ = await run_job(connector, make_job("comfyui", payload))
    assert [(u.name, u.overwrite, u.size) for u in fake.uploads] == [("face.png", True, len(png))]
    assert fake.prompts[-1].graph["1"]["inputs"]["image"] == "face.png"
    assert result["files"][0]["filename"] == "up_00001_.png"


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=media.png(8, 8, 0x0000FF), content_type="image/png")

    async def denied(request: web.Request) -> web.Response:  # S3 echoes the signature it refused
        return web.Response(status=403, text=f"<Error><Signature>{request.query_string}</Signature></Error>")

    app = web.Application()
    app.router.add_get("/img.png", serve)
    app.router.add_get("/denied.png", denied)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_input_image_urls_only_from_allowed_hosts(fake: FakeComfyUI, comfy: ConnectorFactory,
                                                        image_host: str) -> None:
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "remote.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "url"}}}
    payload = {"workflow": workflow, "images": [{"name": "remote.png", "url": f"{image_host}/img.png"}]}
    refusing = await comfy(fake)
    with pytest.raises(PermanentJobError, match="is not in EMP_COMFYUI_INPUT_HOSTS"):
        await run_job(refusing, make_job("comfyui", payload))
    assert fake.uploads == [] and fake.prompts == []
    on_port_80 = await comfy(fake, EMP_COMFYUI_INPUT_HOSTS="127.0.0.1")  # the host, but not this port
    with pytest.raises(PermanentJobError, match="is not in EMP_COMFYUI_INPUT_HOSTS"):
        await run_job(on_port_80, make_job("comfyui", payload))
    allowing = await comfy(fake, EMP_COMFYUI_INPUT_HOSTS=image_host.removeprefix("http://"))
    result, _ = await run_job(allowing, make_job("comfyui", payload))
    assert fake.uploads[0].name == "remote.png" and result["files"][0]["filename"] == "url_00001_.png"


@pytest.mark.parametrize("url", ["{base}/denied.png?X-Amz-Signature=SECRET-SIG", "http://bob:SECRET-SIG@{host}/img.png"])
async def test_input_image_url_secrets_never_reach_the_error(fake: FakeComfyUI, comfy: ConnectorFactory,
                                                             image_host: str, url: str) -> None:
    host = image_host.removeprefix("http://")
    payload = {"workflow": graph("url"), "images": [{"name": "r.png", "url": url.format(base=image_host, host=host)}]}
    connector = await comfy(fake, EMP_COMFYUI_INPUT_HOSTS=host)
    with pytest.raises(PermanentJobError) as caught:  # a refused presigned URL is refused on every worker
        await run_job(connector, make_job("comfyui", payload))
    assert "SECRET-SIG" not in str(caught.value) and "input http://" in str(caught.value)
    assert fake.prompts == []


async def test_models_health_and_loaded(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    fake.behaviour.models["loras"] = ["detail.safetensors"]
    connector = await comfy(fake)
    models = await connector.models()
    assert models == {"comfyui": ["detail.safetensors", "sd_xl_base_1.0.safetensors",
                                  "v1-5-pruned-emaonly.safetensors"]}
    health = await connector.health()
    assert health.state.value == "ok" and "0.3.64" in health.message
    workflow = {**graph("loaded"),
                "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}}}
    await run_job(connector, make_job("comfyui", workflow))
    assert await connector.loaded_models() == ["sd_xl_base_1.0.safetensors"]
    await fake.kill()
    down = await connector.health()
    assert down.state.value == "down" and "unreachable" in down.message
    assert await connector.loaded_models() == []


async def test_jobs_requiring_a_missing_checkpoint_go_elsewhere(fake: FakeComfyUI, start_worker: WorkerFactory,
                                                                client: Client,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**FAST, "EMP_COMFYUI_URL": fake.url}.items():
        monkeypatch.setenv(key, value)
    await start_worker("models", connectors="comfyui")
    missing = await client.submit("comfyui", graph("nope"), requirements={"models": ["flux1-dev.safetensors"]})
    present = await client.submit("comfyui", graph("yes"), requirements={"models": ["sd_xl_base_1.0.safetensors"]})
    await wait_until(lambda: _status_is(client, present, "completed"), within_s=20)
    assert (await client.get(missing)).get("status") == "pending"


async def _status_is(client: Client, job_id: str, status: str) -> bool:
    return (await client.get(job_id)).get("status") == status


async def test_timeout_seconds_interrupts_only_this_prompt(fake: FakeComfyUI, start_worker: WorkerFactory,
                                                           client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**FAST, "EMP_COMFYUI_URL": fake.url}.items():
        monkeypatch.setenv(key, value)
    await start_worker("timeout", connectors="comfyui")
    hold = fake.hold("11")
    job_id = await client.submit("comfyui", {"workflow": blur_chain("slow"), "timeout_seconds": 1}, max_retries=0)
    await hold.wait_reached(20)
    await wait_until(lambda: bool(fake.interrupts), within_s=10)
    hold.release()
    await wait_until(lambda: _status_is(client, job_id, "failed"), within_s=20)
    job = await client.get(job_id)
    assert "timed out" in json.dumps(job)
    assert [c.body for c in fake.interrupts] == [{"prompt_id": fake.prompts[-1].prompt_id}]


async def test_a_refused_workflow_is_not_withdrawn_afterwards(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    """Seen against a real ComfyUI 0.3.64: after a 400 the connector used to send a /queue delete
    and an /interrupt (in the background) for a prompt that was never queued."""
    workflow = graph()
    workflow["1"]["inputs"]["width"] = -5
    connector = await comfy(fake)
    with pytest.raises(PermanentJobError, match="width"):
        await run_job(connector, make_job("comfyui", workflow))
    await run_job(connector, make_job("comfyui", graph()))  # a later job: any clean-up of the first came before
    posts = [path for method, path in fake.requests if method == "POST"]
    assert posts == ["/prompt", "/prompt"] and fake.interrupts == [] and fake.queue_deletes == []


async def test_outputs_live_in_the_jobs_own_directory_until_the_worker_cleans_it(
    fake: FakeComfyUI, comfy: ConnectorFactory
) -> None:
    connector = await comfy(fake)
    result, ctx = await run_job(connector, make_job("comfyui", graph("own-dir")))
    [output] = ctx.outputs
    assert output.path is not None and output.path.is_file() and result["files"]
    assert output.path.parent == ctx.temp_dir()  # not a directory of the connector's, kept until its next job
    ctx.cleanup()  # what the worker does once the outcome is recorded
    assert not output.path.exists()


async def test_a_stale_attempt_ending_leaves_its_retry_cancellable(fake: FakeComfyUI, comfy: ConnectorFactory) -> None:
    """A timed-out attempt whose task outlives the worker's wait shares its job id with the retry
    already running here: its end must not make the retry's run unreachable for interrupt()."""
    connector = await comfy(fake)
    hold = fake.hold("11")
    first = make_job("comfyui", blur_chain("stale"), job_id="same-job", attempt=1)
    retry = make_job("comfyui", blur_chain("retry", color=99), job_id="same-job", attempt=2)
    first_task = asyncio.create_task(run_job(connector, first))
    await hold.wait_reached()
    retry_ctx = FakeJobContext(retry)
    retry_task = asyncio.create_task(connector.run(retry, retry_ctx))
    await wait_until(lambda: any("queued" in u.message for u in retry_ctx.updates), within_s=10)
    retry_prompt = fake.prompts[-1].prompt_id
    first_task.cancel()  # the stale attempt's task ends now; its retry waits in ComfyUI's queue
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    retry_ctx.cancel(StopReason.CANCELLED)
    await connector.interrupt(retry, StopReason.CANCELLED)
    assert {"delete": [retry_prompt]} in fake.queue_deletes  # the retry's cancel reached ComfyUI
    retry_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, JobCancelled):
        await retry_task
    hold.release()
    await fake.wait_idle()
    assert retry_prompt not in fake.engine.history
