"""The fake A1111 pinned to the fixtures derived from A1111 v1.10.1's source (tests/fakes/fixtures/
a1111/): each example request gets the recorded status and JSON shape, errors come in both of
A1111's formats, and the behaviour the connector relies on (one job at a time, the progress
formula, interrupt returning a partial 200, per-request checkpoints, auth) holds."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.fakes.a1111 import FakeA1111
from tests.fakes.a1111.wire import fixture, png_size

pytestmark = pytest.mark.timeout(60)

API = "/sdapi/v1"


@pytest.fixture
async def fake() -> AsyncIterator[FakeA1111]:
    async with FakeA1111(step_s=0.002) as server:
        yield server


@pytest.fixture
async def http(fake: FakeA1111) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=30) as client:
        yield client


def _example(name: str) -> dict[str, Any]:
    example: dict[str, Any] = fixture(name)["example_response"]
    return example


# -- generation -------------------------------------------------------------------------------


async def test_txt2img_example_answers_the_recorded_response(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/txt2img", json=fixture("txt2img")["example_request"])
    want = _example("txt2img")
    assert reply.status_code == want["status"] == 200
    assert reply.headers["content-type"] == "application/json" and "x-process-time" in reply.headers
    body = reply.json()
    assert set(body) == set(want["json"]) == {"images", "parameters", "info"}
    assert body["parameters"] == want["json"]["parameters"]  # the request model echoed, defaults filled in
    assert isinstance(body["info"], str)  # JSON inside JSON
    info, recorded = json.loads(body["info"]), json.loads(want["json"]["info"])
    assert list(info) == list(recorded)
    assert {k: v for k, v in info.items() if k != "job_timestamp"} == {
        k: v for k, v in recorded.items() if k != "job_timestamp"}
    [image] = body["images"]
    data = base64.b64decode(image, validate=True)  # plain base64, no data: prefix
    assert png_size(data) == (64, 64) and b"tEXtparameters\x00a red cube on a table" in data


async def test_img2img_example_answers_the_recorded_shape(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/img2img", json=fixture("img2img")["example_request"])
    want = _example("img2img")["json"]
    body = reply.json()
    assert reply.status_code == 200 and set(body) == set(want)
    assert list(body["parameters"]) == list(want["parameters"])  # include_init_images is not echoed
    assert body["parameters"]["init_images"] is None and body["parameters"]["mask"] is None
    assert body["parameters"]["denoising_strength"] == 0.6
    assert list(json.loads(body["info"])) == list(json.loads(want["info"]))


async def test_a_batch_puts_the_grid_first(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/txt2img", json={"steps": 2, "width": 32, "height": 16, "batch_size": 3})
    body = reply.json()
    info = json.loads(body["info"])
    sizes = [png_size(base64.b64decode(i)) for i in body["images"]]
    assert info["index_of_first_image"] == 1 and len(info["all_seeds"]) == 3
    assert sizes == [(96, 16), (32, 16), (32, 16), (32, 16)]


async def test_send_images_false_answers_no_images(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/txt2img", json={"steps": 1, "width": 8, "height": 8, "send_images": False})
    assert reply.status_code == 200 and reply.json()["images"] == []


# -- progress and control ---------------------------------------------------------------------


async def test_idle_progress_is_the_recorded_idle_shape(http: httpx.AsyncClient) -> None:
    reply = await http.get(f"{API}/progress")
    assert reply.json() == fixture("progress")["examples"]["idle"]["json"]


@pytest.mark.parametrize("example", ["running", "interrupted_flag_seen"])
async def test_progress_follows_the_recorded_formula(fake: FakeA1111, http: httpx.AsyncClient, example: str) -> None:
    recorded = fixture("progress")["examples"][example]["json"]
    for key, value in recorded["state"].items():
        setattr(fake.engine.state, key, value)
    fake.engine.state.current_image = "preview"
    reply = (await http.get(f"{API}/progress")).json()
    assert set(reply) == set(recorded) and reply["state"] == recorded["state"]
    assert reply["progress"] == pytest.approx(recorded["progress"])
    assert reply["current_image"] == "preview"
    skipped = (await http.get(f"{API}/progress", params={"skip_current_image": "true"})).json()
    assert skipped["current_image"] is None


async def test_progress_reports_the_running_job(fake: FakeA1111, http: httpx.AsyncClient) -> None:
    fake.engine.step_s = 0.01
    job = asyncio.create_task(http.post(f"{API}/txt2img", json={"steps": 400, "n_iter": 2, "width": 8, "height": 8}))
    await wait_until(lambda: fake.engine.state.sampling_step >= 5)
    reply = (await http.get(f"{API}/progress", params={"skip_current_image": "true"})).json()
    state = reply["state"]
    assert state["job"] == "scripts_txt2img" and state["job_count"] == 2 and state["sampling_steps"] == 400
    assert 0.01 < reply["progress"] < 0.51 and reply["eta_relative"] > 0
    await http.post(f"{API}/interrupt")
    assert (await job).status_code == 200


async def test_interrupt_ends_the_job_early_with_a_partial_200(fake: FakeA1111, http: httpx.AsyncClient) -> None:
    fake.engine.step_s = 0.01
    job = asyncio.create_task(http.post(f"{API}/txt2img", json={"steps": 1000, "n_iter": 3, "width": 8, "height": 8}))
    await wait_until(lambda: fake.engine.state.sampling_step >= 3)
    reply = await http.post(f"{API}/interrupt")
    assert reply.status_code == 200 and reply.json() == {}
    answer = await job
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1  # the interrupted batch; the rest skipped
    [record] = fake.engine.generations
    assert record.interrupted and record.steps_done < 1000
    after = (await http.get(f"{API}/progress")).json()["state"]
    assert after["interrupted"] is True and after["job_count"] == 0  # the flag stays until the next job


async def test_one_generation_at_a_time(fake: FakeA1111, http: httpx.AsyncClient) -> None:
    fake.engine.step_s = 0.005
    running: list[int] = []

    async def watch() -> None:
        while True:
            running.append(sum(1 for g in fake.engine.generations if g.steps_done and not g.done))
            await asyncio.sleep(0.002)  # sampling the fake's state while the jobs run

    watcher = asyncio.create_task(watch())
    replies = await asyncio.gather(*(http.post(f"{API}/txt2img", json={"steps": 20, "width": 8, "height": 8})
                                     for _ in range(3)))
    watcher.cancel()
    assert [r.status_code for r in replies] == [200, 200, 200] and max(running) == 1


async def test_skip_answers_null(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/skip")
    assert reply.status_code == 200 and reply.content == b"null"


async def test_models_and_options_are_the_recorded_shapes(http: httpx.AsyncClient) -> None:
    endpoints = fixture("control_endpoints")["endpoints"]
    models = (await http.get(f"{API}/sd-models")).json()
    assert models[0] == endpoints["GET /sdapi/v1/sd-models"]["response"]["json"][0]
    options = (await http.get(f"{API}/options")).json()
    recorded = endpoints["GET /sdapi/v1/options"]["response"]["json"]
    assert {k: options[k] for k in recorded if k != "..."} == {k: v for k, v in recorded.items() if k != "..."}
    for path in ("memory", "samplers", "schedulers"):
        key = "response_cuda" if path == "memory" else "response"
        assert (await http.get(f"{API}/{path}")).json() == endpoints[f"GET /sdapi/v1/{path}"][key]["json"]


async def test_posting_options_loads_a_checkpoint_or_fails_like_a1111(http: httpx.AsyncClient) -> None:
    recorded = fixture("control_endpoints")["endpoints"]["POST /sdapi/v1/options"]
    reply = await http.post(f"{API}/options", json={"sd_model_checkpoint": "sd_xl_base_1.0"})
    assert reply.status_code == 200 and reply.content == b"null"
    assert (await http.get(f"{API}/options")).json()["sd_model_checkpoint"].startswith("sd_xl_base_1.0.safetensors")
    bad = await http.post(f"{API}/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert bad.status_code == 500 and bad.json() == recorded["error_unknown_checkpoint"]["json"]


@pytest.mark.parametrize("restore", [True, False])
async def test_override_settings_switch_the_checkpoint_for_one_request(
    fake: FakeA1111, http: httpx.AsyncClient, restore: bool
) -> None:
    body = {"steps": 2, "width": 8, "height": 8, "override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0"},
            "override_settings_restore_afterwards": restore}
    info = json.loads((await http.post(f"{API}/txt2img", json=body)).json()["info"])
    loaded = (await http.get(f"{API}/options")).json()["sd_model_checkpoint"]
    assert info["sd_model_name"] == "sd_xl_base_1.0"
    assert loaded.startswith("v1-5" if restore else "sd_xl_base_1.0")


async def test_an_unknown_override_checkpoint_silently_falls_back(http: httpx.AsyncClient) -> None:
    body = {"steps": 1, "width": 8, "height": 8, "override_settings": {"sd_model_checkpoint": "nope"}}
    info = json.loads((await http.post(f"{API}/txt2img", json=body)).json()["info"])
    assert info["sd_model_name"] == "v1-5-pruned-emaonly"


# -- errors -----------------------------------------------------------------------------------


def _error(name: str) -> dict[str, Any]:
    example: dict[str, Any] = fixture("errors")["examples"][name]
    return example


def _same_error(reply: httpx.Response, example: dict[str, Any]) -> None:
    assert reply.status_code == example["status"]
    want = dict(example["json"])
    if want.get("errors") == "<str(exception)>":
        want["errors"] = ""  # str(HTTPException) under the pinned Starlette 0.26
    assert reply.json() == want
    for header, value in example.get("headers", {}).items():
        assert reply.headers[header] == value


@pytest.mark.parametrize(("name", "method", "path", "body"), [
    ("script_not_found (script_name unknown)", "POST", "txt2img", {"script_name": "nope"}),
    ("alwayson_script_not_found", "POST", "txt2img", {"alwayson_scripts": {"nope": {"args": []}}}),
    ("img2img_without_init_images", "POST", "img2img", {"prompt": "x"}),
    ("invalid_base64_image", "POST", "img2img", {"init_images": ["not base64!"]}),
    ("url_image_pointing_to_local_address", "POST", "img2img", {"init_images": ["http://127.0.0.1/x.png"]}),
    ("request_validation (steps='abc')", "POST", "txt2img", {"steps": "abc"}),
    ("unknown_route", "GET", "nope", None),
    ("wrong_method (GET /sdapi/v1/txt2img)", "GET", "txt2img", None),
])
async def test_errors_come_in_the_recorded_formats(
    http: httpx.AsyncClient, name: str, method: str, path: str, body: Any
) -> None:
    reply = await http.request(method, f"{API}/{path}", json=body)
    _same_error(reply, _error(name))


async def test_a_body_that_is_not_json_gets_fastapis_decode_error(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    _same_error(reply, _error("malformed_json_body (body '{not json'; approximate: FastAPI 0.94 wraps "
                              "json.JSONDecodeError, msg text comes from Python's json module)"))


async def test_cuda_out_of_memory_is_a_500_in_a1111s_handler_format(fake: FakeA1111, http: httpx.AsyncClient) -> None:
    fake.engine.faults.append("oom")
    reply = await http.post(f"{API}/txt2img", json={"steps": 5, "width": 8, "height": 8})
    recorded = _error("unhandled exception inside generation (e.g. CUDA OOM)")["json"]
    assert reply.status_code == 500 and set(reply.json()) == set(recorded)
    assert reply.json()["error"] == "OutOfMemoryError" and reply.json()["errors"].startswith("CUDA out of memory")
    assert (await http.get(f"{API}/progress")).json()["state"]["job_count"] == 0  # state.end() ran


async def test_basic_auth_guards_every_api_route() -> None:
    async with FakeA1111(auth="user:pass") as fake, httpx.AsyncClient(base_url=fake.url) as http:
        _same_error(await http.get(f"{API}/progress"), _error("auth_missing (--api-auth set, no Authorization header)"))
        _same_error(await http.get(f"{API}/sd-models", auth=("user", "wrong")), _error("auth_wrong_credentials"))
        assert (await http.get(f"{API}/progress", auth=("user", "pass"))).status_code == 200
        assert (await http.get("/")).status_code == 200  # the UI is not behind --api-auth


# -- server variants and faults ---------------------------------------------------------------


async def test_nowebui_serves_only_the_api() -> None:
    async with FakeA1111(nowebui=True) as fake, httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.get(f"{API}/progress")).status_code == 200
        assert (await http.get("/")).json() == {"detail": "Not Found"}
        assert (await http.post("/internal/progress", json={"id_task": "x"})).status_code == 404
        assert (await http.get(f"{API}/cmd-flags")).json()["nowebui"] is True


async def test_ui_mode_answers_internal_progress(http: httpx.AsyncClient) -> None:
    reply = await http.post("/internal/progress", json={"id_task": "task(x)", "id_live_preview": -1})
    assert set(reply.json()) == set(fixture("progress")["internal_progress_ui_mode_only"]["response_done"])


async def test_large_bodies_are_gzipped(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/txt2img", json={"steps": 1, "width": 8, "height": 8})
    small = await http.get(f"{API}/progress")
    assert len(reply.content) >= 1000 and reply.json()["images"]
    assert reply.headers.get("content-encoding") == "gzip" and "content-encoding" not in small.headers


async def test_kill_resets_connections_and_restart_comes_back_on_the_same_port(
    fake: FakeA1111, http: httpx.AsyncClient
) -> None:
    fake.engine.step_s = 0.01
    job = asyncio.create_task(http.post(f"{API}/txt2img", json={"steps": 1000, "width": 8, "height": 8}))
    await wait_until(lambda: fake.engine.state.sampling_step >= 2)
    port = fake.port
    await fake.kill()
    with pytest.raises(httpx.TransportError):
        await job
    with pytest.raises(httpx.ConnectError):
        await http.get(f"{API}/progress")
    await fake.restart()
    assert fake.port == port
    reply = await http.get(f"{API}/progress")
    assert reply.status_code == 200 and reply.json()["state"]["job_count"] == 0 and not fake.engine.generations
