"""The A1111 connector against the fake A1111 (a real HTTP server on a loopback port): generation,
outputs, progress, interrupt, checkpoints, inputs, errors, health and engine faults."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from connectors.a1111 import A1111Connector
from connectors.base import HealthState, JobCancelled
from connectors.testing import FakeJobContext, make_job, run_job
from tests.conftest import wait_until
from tests.connectors.a1111.conftest import ConnectorFactory, small
from tests.fakes.a1111 import FakeA1111
from tests.fakes.a1111.wire import colour, png, png_size
from worker.errors import PermanentJobError, RetryableJobError

pytestmark = pytest.mark.timeout(60)

INIT = png(16, 16, (1, 2, 3))


async def _run(connector: A1111Connector, payload: dict[str, Any], **job: Any) -> tuple[dict[str, Any], FakeJobContext]:
    return await run_job(connector, make_job("a1111", payload, **job))


# -- generation and outputs -------------------------------------------------------------------


@pytest.mark.parametrize("nowebui", [False, True])
async def test_txt2img_batch_hands_each_image_over_without_the_grid(
    connector_for: ConnectorFactory, nowebui: bool
) -> None:
    async with FakeA1111(step_s=0.002, nowebui=nowebui) as fake:
        connector = await connector_for(fake)
        result, ctx = await _run(connector, small(batch_size=3, seed=40))
    assert [o.name for o in ctx.outputs] == ["image-000.png", "image-001.png", "image-002.png"]
    assert all(o.content_type == "image/png" and o.data for o in ctx.outputs)
    assert [png_size(o.data or b"") for o in ctx.outputs] == [(16, 16)] * 3  # the 48x16 grid is left out
    assert [o.data for o in ctx.outputs] == [png(16, 16, colour(s), _infotext(s)) for s in (40, 41, 42)]
    meta = result["metadata"]
    assert result["endpoint"] == "txt2img" and result["images"] == 3
    assert (meta["seed"], meta["seeds"], meta["sampler"], meta["steps"]) == (40, [40, 41, 42], "Euler", 10)
    assert meta["model"] == "v1-5-pruned-emaonly" and meta["scheduler"] == "Automatic"
    assert "data_base64" not in json.dumps(result) and len(json.dumps(result)) < 4096  # never images in the result


async def test_more_images_than_a_job_may_hand_over_fail_naming_the_count(connector: A1111Connector) -> None:
    ctx = FakeJobContext(make_job("a1111", small(batch_size=129, n_iter=2, steps=2)))
    with pytest.raises(PermanentJobError, match="produced 258 images; a job may return at most 256"):
        await run_job(connector, ctx.job, ctx)
    assert ctx.outputs == []  # not the first 256 and then a failure


def _infotext(seed: int) -> str:
    return (f"a red cube\nSteps: 10, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: {seed}, "
            "Size: 16x16, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


async def test_img2img_is_chosen_by_init_images_or_by_endpoint(fake: FakeA1111, connector: A1111Connector) -> None:
    encoded = base64.b64encode(INIT).decode()
    result, ctx = await _run(connector, small(init_images=[encoded], denoising_strength=0.5))
    assert result["endpoint"] == "img2img" and len(ctx.outputs) == 1
    result, _ = await _run(connector, small(endpoint="img2img", init_images=[f"data:image/png;base64,{encoded}"]))
    assert result["endpoint"] == "img2img"
    first, second = fake.engine.generations
    assert first.endpoint == second.endpoint == "img2img" and "endpoint" not in second.body
    assert first.body["init_images"] == [encoded]


async def test_an_unknown_endpoint_is_refused_before_a1111(fake: FakeA1111, connector: A1111Connector) -> None:
    with pytest.raises(PermanentJobError, match="endpoint must be one of txt2img, img2img"):
        await _run(connector, small(endpoint="extras"))
    assert not fake.engine.generations


# -- progress ---------------------------------------------------------------------------------


async def test_progress_rises_with_steps_and_eta(fake: FakeA1111, connector: A1111Connector) -> None:
    fake.engine.step_s = 0.01
    _, ctx = await _run(connector, small(steps=60, n_iter=2))
    running = [u for u in ctx.updates if u.current_step is not None]
    assert len(running) >= 5
    values = [u.progress for u in ctx.updates]
    assert values == sorted(values) and values[-1] == 100
    assert all(0 < u.progress < 100 and u.total_steps == 60 and u.eta_s is not None for u in running)
    assert any("batch 2/2" in u.message for u in running) and "step " in running[0].message
    assert all(u.preview is None for u in ctx.updates)  # previews are off by default
    assert all(p[1] == "/sdapi/v1/progress" for p in fake.requests if p[0] == "GET" and "progress" in p[1])


async def test_live_previews_when_the_worker_wants_them(fake: FakeA1111, connector: A1111Connector) -> None:
    fake.engine.step_s = 0.01
    job = make_job("a1111", small(steps=80))
    _, ctx = await run_job(connector, job, FakeJobContext(job, previews=True))
    previews = [u.preview for u in ctx.updates if u.preview]
    assert previews and png_size(previews[0]) == (8, 8)


# -- interrupt --------------------------------------------------------------------------------


async def test_cancel_interrupts_a1111_and_never_returns_a_result(fake: FakeA1111, connector: A1111Connector) -> None:
    fake.engine.step_s = 0.01
    with pytest.raises(JobCancelled):
        await run_job(connector, make_job("a1111", small(steps=2000)),
                      cancel_after=lambda ctx: any(u.current_step for u in ctx.updates))
    assert fake.interrupts == 1
    await wait_until(lambda: bool(fake.engine.generations) and fake.engine.generations[0].done)
    [generation] = fake.engine.generations
    assert generation.interrupted and generation.steps_done < 2000


async def test_an_interrupt_before_a1111_began_the_job_is_repeated(fake: FakeA1111, connector: A1111Connector) -> None:
    """A1111's begin() clears the interrupt flag: a job still waiting for the lock (here behind
    another client's) would run in full after an interrupt sent too early."""
    fake.engine.step_s = 0.01
    async with httpx.AsyncClient(base_url=fake.url, timeout=60) as other:
        first = asyncio.create_task(other.post("/sdapi/v1/txt2img", json=small(steps=300)))
        await wait_until(lambda: fake.engine.state.sampling_step >= 1)
        with pytest.raises(JobCancelled):
            await run_job(connector, make_job("a1111", small(steps=2000)),
                          cancel_after=lambda ctx: len(fake.engine.generations) == 2)
        assert (await first).status_code == 200
    ours = fake.engine.generations[1]
    assert ours.done and ours.interrupted and ours.steps_done < 2000 and fake.interrupts >= 2


async def test_a_partial_answer_is_not_a_success_even_unasked(fake: FakeA1111, connector: A1111Connector) -> None:
    """A1111 answers an interrupted job with 200; ours returns no result when it was not us."""
    fake.engine.step_s = 0.01
    task = asyncio.create_task(_run(connector, small(steps=2000)))
    await wait_until(lambda: fake.engine.state.sampling_step >= 3)
    fake.engine.state.interrupted = True  # someone pressed Interrupt in A1111's UI
    with pytest.raises(RetryableJobError, match="interrupted during the job by someone else"):
        await task


async def test_interrupt_of_a_job_not_at_a1111_does_nothing(fake: FakeA1111, connector: A1111Connector) -> None:
    from connectors.base import StopReason

    await connector.interrupt(make_job("a1111", small()), StopReason.CANCELLED)
    assert fake.interrupts == 0  # interrupt is global: it must not stop another client's job


# -- checkpoints ------------------------------------------------------------------------------


async def test_models_list_checkpoints_and_the_loaded_one(fake: FakeA1111, connector: A1111Connector) -> None:
    models = await connector.models()
    assert set(models) == {"a1111"}
    assert {"v1-5-pruned-emaonly.safetensors [6ce0161689]", "v1-5-pruned-emaonly", "sd_xl_base_1.0",
            "sd_xl_base_1.0.safetensors"} <= set(models["a1111"])
    assert "v1-5-pruned-emaonly" in await connector.loaded_models()
    assert "sd_xl_base_1.0" not in await connector.loaded_models()


async def test_a_required_checkpoint_runs_through_override_settings(fake: FakeA1111, connector: A1111Connector) -> None:
    result, _ = await _run(connector, small(), requirements={"models": ["sd_xl_base_1.0"]})
    [generation] = fake.engine.generations
    assert generation.body["override_settings"] == {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]"}
    assert generation.checkpoint.startswith("sd_xl_base_1.0") and result["metadata"]["model"] == "sd_xl_base_1.0"
    assert not fake.option_posts  # never the global options
    assert "sd_xl_base_1.0" in await connector.loaded_models()  # it stays loaded (EMP_A1111_RESTORE_CHECKPOINT)


async def test_the_payloads_own_checkpoint_is_kept_and_restored_when_asked(
    fake: FakeA1111, connector_for: ConnectorFactory
) -> None:
    connector = await connector_for(fake, restore_checkpoint="true")
    overrides = {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors", "CLIP_stop_at_last_layers": 2}
    await _run(connector, small(override_settings=overrides))
    [generation] = fake.engine.generations
    assert generation.body["override_settings"]["CLIP_stop_at_last_layers"] == 2
    assert generation.checkpoint.startswith("sd_xl_base_1.0")
    assert fake.engine.options["sd_model_checkpoint"].startswith("v1-5")  # A1111 reloaded its own


async def test_a_checkpoint_a1111_does_not_have_fails_before_generating(
    fake: FakeA1111, connector: A1111Connector
) -> None:
    with pytest.raises(RetryableJobError, match="checkpoint 'nope' is not on this A1111"):
        await _run(connector, small(override_settings={"sd_model_checkpoint": "nope"}))
    assert not fake.engine.generations  # A1111 would have silently used another checkpoint


# -- inputs given as URLs ---------------------------------------------------------------------


@pytest.fixture
async def files() -> AsyncIterator[str]:
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=INIT, content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 4096, content_type="image/png")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    async def denied(request: web.Request) -> web.Response:  # S3 echoes the signature it refused
        return web.Response(status=403, text=f"<Error><Signature>{request.query_string}</Signature></Error>")

    app = web.Application()
    app.router.add_get("/init.png", image)
    app.router.add_get("/big.png", big)
    app.router.add_get("/moved.png", moved)
    app.router.add_get("/denied.png", denied)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_input_urls_from_allowed_hosts_are_fetched_and_sent_as_base64(
    fake: FakeA1111, connector_for: ConnectorFactory, files: str
) -> None:
    connector = await connector_for(fake, input_hosts=files.removeprefix("http://"))
    await _run(connector, small(init_images=[f"{files}/init.png"], mask=f"{files}/init.png"))
    [generation] = fake.engine.generations
    assert generation.body["init_images"] == [base64.b64encode(INIT).decode()]
    assert generation.body["mask"] == base64.b64encode(INIT).decode()


@pytest.mark.parametrize(("path", "hosts", "message"), [
    ("/init.png", "", "is not in EMP_A1111_INPUT_HOSTS"),
    ("/init.png", "*.example.com", "is not in EMP_A1111_INPUT_HOSTS"),
    ("/init.png", "127.0.0.1", "is not in EMP_A1111_INPUT_HOSTS"),  # the host, but only on port 80
    ("/big.png", "FILES", r"over this worker's limit of 1024 bytes \(EMP_A1111_MAX_INPUT_BYTES\)"),
    ("/missing.png", "FILES", "answered 404"),
    ("/moved.png", "FILES", "answered 302"),  # redirects are not followed: they could lead anywhere
])
async def test_input_urls_are_bounded(
    fake: FakeA1111, connector_for: ConnectorFactory, files: str, path: str, hosts: str, message: str
) -> None:
    hosts = files.removeprefix("http://") if hosts == "FILES" else hosts
    connector = await connector_for(fake, input_hosts=hosts, max_input_bytes="1024")
    with pytest.raises(PermanentJobError, match=message):
        await _run(connector, small(init_images=[f"{files}{path}"]))
    assert not fake.engine.generations


@pytest.mark.parametrize("url", ["{files}/denied.png?X-Amz-Signature=SECRET-SIG", "http://bob:SECRET-SIG@{host}/init.png"])
async def test_input_url_secrets_never_reach_the_error(
    fake: FakeA1111, connector_for: ConnectorFactory, files: str, url: str
) -> None:
    host = files.removeprefix("http://")
    connector = await connector_for(fake, input_hosts=host)
    with pytest.raises(PermanentJobError) as caught:
        await _run(connector, small(init_images=[url.format(files=files, host=host)]))
    assert "SECRET-SIG" not in str(caught.value) and "input http://" in str(caught.value)


# -- errors -----------------------------------------------------------------------------------


async def test_a_validation_error_is_permanent_and_names_the_fields(connector: A1111Connector) -> None:
    with pytest.raises(PermanentJobError, match=r"invalid request fields: steps, cfg_scale") as caught:
        await _run(connector, small(steps="abc", cfg_scale="high"))
    assert "value is not a valid integer" in str(caught.value)


@pytest.mark.parametrize(("payload", "message"), [
    (small(script_name="nope"), "Script 'nope' not found"),
    (small(alwayson_scripts={"nope": {"args": []}}), "always on script nope not found"),
    (small(endpoint="img2img"), "Init image not found"),
    (small(init_images=["bm90IGFuIGltYWdl"]), "Invalid encoded image"),
])
async def test_script_and_init_image_errors_are_permanent(
    connector: A1111Connector, payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(PermanentJobError, match=message):
        await _run(connector, payload)


async def test_out_of_memory_is_retryable(fake: FakeA1111, connector: A1111Connector) -> None:
    fake.engine.faults.append("oom")
    with pytest.raises(RetryableJobError, match="ran out of GPU memory"):
        await _run(connector, small())
    result, _ = await _run(connector, small())  # the next attempt (here, on the same engine) runs
    assert result["images"] == 1


@pytest.mark.parametrize("auth", ["", "user:wrong-secret"])
async def test_bad_credentials_are_permanent_and_never_shown(connector_for: ConnectorFactory, auth: str) -> None:
    async with FakeA1111(auth="user:pass", step_s=0.002) as fake:
        connector = await connector_for(fake, auth=auth)
        with pytest.raises(PermanentJobError, match="check EMP_A1111_AUTH") as caught:
            await _run(connector, small())
        health = await connector.health()
        good = await connector_for(fake, auth="user:pass")
        result, _ = await _run(good, small())
    assert "wrong-secret" not in str(caught.value) and "401" in str(caught.value)
    assert health.state is HealthState.DOWN and "check EMP_A1111_AUTH" in health.message
    assert "wrong-secret" not in health.message and result["images"] == 1


# -- the engine going away --------------------------------------------------------------------


async def test_killed_mid_job_fails_retryable_at_once_and_health_follows(
    fake: FakeA1111, connector: A1111Connector
) -> None:
    fake.engine.step_s = 0.01
    task = asyncio.create_task(_run(connector, small(steps=5000)))
    await wait_until(lambda: fake.engine.state.sampling_step >= 3)
    killed = time.monotonic()
    await fake.kill()
    with pytest.raises(RetryableJobError):
        await task
    assert time.monotonic() - killed < 10
    assert (await connector.health()).state is HealthState.DOWN
    await fake.restart()
    assert (await connector.health()).state is HealthState.OK
    result, _ = await _run(connector, small())
    assert result["images"] == 1


async def test_an_engine_that_is_not_running_is_retryable_within_seconds(connector_for: ConnectorFactory) -> None:
    async with FakeA1111() as fake:
        url = fake.url
    connector = await connector_for(None, url=url)
    started = time.monotonic()
    with pytest.raises(RetryableJobError, match="is unreachable"):
        await _run(connector, small())
    assert time.monotonic() - started < 10
    health = await connector.health()
    assert health.state is HealthState.DOWN and "unreachable" in health.message


async def test_an_engine_that_stops_answering_progress_fails_the_job(
    fake: FakeA1111, connector_for: ConnectorFactory
) -> None:
    connector = await connector_for(fake, stall_s="0.5", request_timeout_s="0.2")
    fake.engine.step_s = 0.01
    task = asyncio.create_task(_run(connector, small(steps=5000)))
    await wait_until(lambda: fake.engine.state.sampling_step >= 3)
    fake.progress_answers.clear()
    with pytest.raises(RetryableJobError, match="EMP_A1111_STALL_S"):
        await task
    assert fake.interrupts == 0
