"""Each knob and control of the fake ComfyUI, exercised with plain httpx and websockets clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.fakes.comfyui import Failure, FakeComfyUI, NodeResult, NodeSpec, media

WAIT_S = 10.0


def image_graph(prefix: str = "t", color: int = 0x112233, save: str = "SaveImage") -> dict[str, Any]:
    inputs: dict[str, Any] = {"images": ["2", 0]}
    if save != "PreviewImage":
        inputs["filename_prefix"] = prefix
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": save, "inputs": inputs}}


def sampler_graph(steps: int = 3, ckpt: str = "sd_xl_base_1.0.safetensors") -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "s"}},
    }


class Socket:
    """A /ws client that collects every message in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[Any] = []  # dicts for text frames, bytes for binary ones
        self.closed: BaseException | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.messages.append(message if isinstance(message, bytes) else json.loads(message))
        except websockets.ConnectionClosed as exc:
            self.closed = exc

    def types(self) -> list[str]:
        return [m["type"] if isinstance(m, dict) else f"binary:{media.decode_frame(m)['event_type']}"
                for m in self.messages]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if isinstance(m, dict) and m["type"] == kind]

    async def wait_for(self, kind: str, **match: Any) -> dict[str, Any]:
        async def found() -> dict[str, Any]:
            while True:
                for data in self.of(kind):
                    if all(data.get(k) == v for k, v in match.items()):
                        return data
                await asyncio.sleep(0.002)

        return await asyncio.wait_for(found(), WAIT_S)

    async def done(self, prompt_id: str) -> None:
        await self.wait_for("executing", node=None, prompt_id=prompt_id)

    async def settle(self, fake: FakeComfyUI) -> None:
        """Everything the fake sent so far has reached this socket (a ping's pong comes after it)."""
        await fake.wait_idle()
        pong = await self.ws.ping()
        await asyncio.wait_for(pong, WAIT_S)
        for _ in range(3):
            await asyncio.sleep(0)

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self.task, WAIT_S)


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI() as server:
        yield server


@pytest.fixture
async def http(fake: FakeComfyUI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=WAIT_S) as client:
        yield client


async def connect(fake: FakeComfyUI, client_id: str | None = None, metadata: bool = False) -> Socket:
    url = fake.ws_url + (f"?clientId={client_id}" if client_id else "")
    ws = await websockets.connect(url, max_size=None)
    if metadata:
        await ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    socket = Socket(ws)
    await socket.wait_for("status")
    return socket


async def submit(http: httpx.AsyncClient, graph: dict[str, Any], client_id: str | None = "c1",
                 **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"prompt": graph, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    return await http.post("/prompt", json=body)


async def test_prompt_answer_can_come_after_all_its_messages(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    fake.behaviour.prompt_response_delay_s = 0.3
    socket = await connect(fake, "c1")
    prompt_id = str(uuid.uuid4())
    answer = asyncio.create_task(submit(http, image_graph(), prompt_id=prompt_id))
    await socket.done(prompt_id)
    assert not answer.done()  # pitfall 1: the WS said "finished" before POST /prompt answered
    assert (await answer).json()["prompt_id"] == prompt_id
    await socket.close()


async def test_history_is_empty_right_after_execution_success(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    fake.behaviour.history_delay_s = 0.3
    socket = await connect(fake, "c1")
    prompt_id = (await submit(http, image_graph())).json()["prompt_id"]
    await socket.wait_for("execution_success", prompt_id=prompt_id)
    assert (await http.get(f"/history/{prompt_id}")).json() == {}
    await socket.done(prompt_id)  # executing{null} comes after the write
    assert (await http.get(f"/history/{prompt_id}")).json()[prompt_id]["status"]["status_str"] == "success"
    await socket.close()


async def test_history_empty_reads(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    fake.behaviour.history_empty_reads = 2
    prompt_id = fake.submit(image_graph())
    await fake.wait_idle()
    reads = [(await http.get(f"/history/{prompt_id}")).json() for _ in range(3)]
    assert reads[:2] == [{}, {}] and prompt_id in reads[2]


async def test_execution_error_stops_the_prompt(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    fake.behaviour.fail = Failure(class_type="ImageInvert", exception_type="torch.OutOfMemoryError",
                                  exception_message="Allocation on device ")
    socket = await connect(fake, "c1")
    prompt_id = (await submit(http, image_graph())).json()["prompt_id"]
    await socket.done(prompt_id)
    error = socket.of("execution_error")[0]
    assert (error["node_id"], error["node_type"], error["executed"]) == ("2", "ImageInvert", ["1"])
    assert error["exception_type"] == "torch.OutOfMemoryError" and isinstance(error["traceback"], list)
    assert not socket.of("executed") and not socket.of("execution_success")
    assert socket.types()[-3:] == ["execution_error", "status", "executing"]
    entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["outputs"] == {} and entry["status"]["messages"][-1][0] == "execution_error"
    await socket.close()


async def test_sampler_ticks_and_fails_at_a_tick(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    socket = await connect(fake, "c1")
    prompt_id = (await submit(http, sampler_graph(steps=4))).json()["prompt_id"]
    await socket.done(prompt_id)
    assert [(p["value"], p["max"], p["node"]) for p in socket.of("progress")] == [(v, 4, "3") for v in (1, 2, 3, 4)]
    fake.behaviour.fail = Failure(node="3", exception_type="RuntimeError", exception_message="boom", at_tick=2)
    prompt_id = (await submit(http, sampler_graph(steps=5))).json()["prompt_id"]
    await socket.done(prompt_id)
    assert [p["value"] for p in socket.of("progress") if p["prompt_id"] == prompt_id] == [1, 2]
    assert socket.of("execution_error")[-1]["exception_message"] == "boom"
    await socket.close()


@pytest.mark.parametrize("metadata", [False, True])
async def test_sampler_previews(fake: FakeComfyUI, http: httpx.AsyncClient, metadata: bool) -> None:
    fake.behaviour.sampler_previews = True
    socket = await connect(fake, "c1", metadata=metadata)
    prompt_id = (await submit(http, sampler_graph(steps=2))).json()["prompt_id"]
    await socket.done(prompt_id)
    ticks = [t for t in socket.types() if t in ("progress", "binary:1", "binary:4")]
    assert ticks == (["binary:4", "progress"] * 2 if metadata else ["progress", "binary:1"] * 2)
    frame = media.decode_frame(next(m for m in socket.messages if isinstance(m, bytes)))
    assert media.png_size(frame["image"]) == (8, 8)
    if metadata:
        assert frame["metadata"]["prompt_id"] == prompt_id and frame["metadata"]["node_id"] == "3"
    fake.behaviour.sampler_previews = False
    prompt_id = (await submit(http, sampler_graph(steps=3))).json()["prompt_id"]
    await socket.done(prompt_id)
    assert len([m for m in socket.messages if isinstance(m, bytes)]) == 2  # none from the second prompt
    await socket.close()


async def test_validation_errors_and_partial_acceptance(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    unknown = {**image_graph(), "2": {"class_type": "NoSuchNode", "inputs": {}}}
    body = (await submit(http, unknown)).json()
    assert body["error"]["type"] == "invalid_prompt" and body["node_errors"] == {}
    answer = await submit(http, sampler_graph(ckpt="missing.safetensors"))
    assert answer.status_code == 400
    error = answer.json()["node_errors"]["4"]["errors"][0]
    assert error["type"] == "value_not_in_list" and error["extra_info"]["received_value"] == "missing.safetensors"
    partial = {**image_graph(), "9": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
               "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}}
    answer = await submit(http, partial)
    assert answer.status_code == 200 and answer.json()["node_errors"]["9"]["dependent_outputs"] == ["10"]
    assert fake.prompts[-1].outputs == ["3"]


async def test_client_prompt_id_number_front_and_uuid_rule(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    hold = fake.hold("1")
    first = (await submit(http, image_graph(), prompt_id="any-string")).json()
    assert (first["prompt_id"], first["number"], first["node_errors"]) == ("any-string", 0, {})
    assert (await submit(http, image_graph(color=1), number=7.5)).json()["number"] == 7.5
    assert (await submit(http, image_graph(color=2), front=True)).json()["number"] == -2
    pending = (await http.get("/queue")).json()["queue_pending"]
    assert [item[0] for item in pending] == [-2, 7.5]  # a lower number runs earlier
    fake.behaviour.require_uuid_prompt_id = True
    refused = await submit(http, image_graph(color=3), prompt_id="not-a-uuid")
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_prompt_id"
    hold.release()
    await fake.wait_idle()


async def test_interrupts_global_and_targeted(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    socket = await connect(fake, "c1")
    hold = fake.hold("2")
    prompt_id = (await submit(http, image_graph())).json()["prompt_id"]
    await hold.wait_reached()
    await http.post("/interrupt", json={"prompt_id": "someone-else"})  # not running: no effect
    await http.post("/interrupt", json={"prompt_id": prompt_id})
    hold.release()  # node 2 never ticks: it runs to completion, node 3 is interrupted
    await socket.done(prompt_id)
    interrupted = socket.of("execution_interrupted")[0]
    assert (interrupted["node_id"], interrupted["executed"]) == ("3", ["2", "1"])
    assert [(call.prompt_id, call.hit) for call in fake.interrupts] == [("someone-else", False), (prompt_id, True)]
    entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert (entry["status"]["status_str"], entry["outputs"]) == ("error", {})
    hold = fake.hold("1")
    prompt_id = (await submit(http, image_graph(color=9))).json()["prompt_id"]
    await hold.wait_reached()
    assert (await http.post("/interrupt")).content == b""  # no body: global
    hold.release()
    await socket.done(prompt_id)
    assert socket.of("execution_interrupted")[-1]["node_id"] == "2" and fake.interrupts[-1].body is None
    await socket.close()


async def test_queue_delete_and_clear(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    hold = fake.hold("1")
    running = (await submit(http, image_graph())).json()["prompt_id"]
    await hold.wait_reached()
    pending = [(await submit(http, image_graph(color=c))).json()["prompt_id"] for c in (1, 2, 3)]
    queue = (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [running]
    assert [item[1] for item in queue["queue_pending"]] == pending and len(queue["queue_pending"][0]) == 5
    assert (await http.post("/queue", json={"delete": [pending[0], running]})).content == b""
    assert [item[1] for item in (await http.get("/queue")).json()["queue_pending"]] == pending[1:]
    await http.post("/queue", json={"clear": True})
    hold.release()
    await fake.wait_idle()
    assert fake.queue_deletes == [{"delete": [pending[0], running]}, {"clear": True}]
    assert list(fake.engine.history) == [running]  # deleted prompts never reach history
    assert (await http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 0}}


async def test_upload_and_view(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    first, second = media.png(4, 4, 1), media.png(4, 4, 2)
    names = []
    for data in (first, second, first):
        answer = await http.post("/upload/image", files={"image": ("in.png", data, "image/png")},
                                 data={"subfolder": "sub"})
        names.append(answer.json())
    assert [n["name"] for n in names] == ["in.png", "in (1).png", "in.png"]
    assert names[0] == {"name": "in.png", "subfolder": "sub", "type": "input"}
    assert fake.uploads[1].name == "in (1).png"
    view = await http.get("/view", params={"filename": "in (1).png", "subfolder": "sub", "type": "input"})
    assert view.content == second and view.headers["content-type"] == "image/png"
    statuses = [(await http.get("/view", params=query)).status_code for query in (
        {"filename": "missing.png"}, {"filename": "../x.png"}, {"filename": "x.png", "type": "bogus"},
        {"filename": "in.png", "subfolder": "../..", "type": "input"})]
    assert statuses == [404, 400, 400, 403]


async def test_kill_drops_everything_and_restart_comes_back_empty(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    socket = await connect(fake, "c1")
    hold = fake.hold("2")
    prompt_id = (await submit(http, image_graph())).json()["prompt_id"]
    await hold.wait_reached()
    port = fake.port
    await fake.kill()
    await asyncio.wait_for(socket.task, WAIT_S)
    assert isinstance(socket.closed, websockets.ConnectionClosedError) and socket.closed.rcvd is None
    with pytest.raises(httpx.ConnectError):
        await http.get("/queue")
    with pytest.raises(OSError):
        await websockets.connect(fake.ws_url)
    await fake.restart()
    assert fake.port == port
    assert (await http.get(f"/history/{prompt_id}")).json() == {}
    assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    assert (await submit(http, image_graph(color=5))).json()["number"] == 0
    await fake.wait_idle()


async def test_dropped_websockets_and_silent_ws(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    socket = await connect(fake, "c1")
    await fake.drop_websockets()
    await asyncio.wait_for(socket.task, WAIT_S)
    assert isinstance(socket.closed, websockets.ConnectionClosedError)
    assert (await http.get("/prompt")).status_code == 200
    fake.behaviour.silent_ws = True
    quiet = Socket(await websockets.connect(fake.ws_url + "?clientId=c2"))
    fake.submit(image_graph(), client_id="c2")
    await quiet.settle(fake)
    assert quiet.messages == []
    await quiet.close()


async def test_one_socket_per_client_id(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    old = await connect(fake, "dup")
    new = await connect(fake, "dup")
    await old.close()  # pitfall 5: this removes "dup" although `new` is still open
    assert fake.sockets == []
    prompt_id = fake.submit(image_graph(), client_id="dup")
    await new.settle(fake)
    assert new.types() == ["status"] and prompt_id in fake.engine.history
    await new.close()


async def test_reconnect_mid_prompt_gets_executing_without_prompt_id(fake: FakeComfyUI) -> None:
    first = await connect(fake, "c1")
    hold = fake.hold("2")
    fake.submit(image_graph(), client_id="c1")
    await hold.wait_reached()
    await first.close()
    again = await connect(fake, "c1")
    await again.wait_for("executing")
    assert again.messages[:2] == [
        {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": "c1"}},
        {"type": "executing", "data": {"node": "2"}}]
    hold.release()
    await fake.wait_idle()
    await again.close()


async def test_routing_without_client_id_and_foreign_broadcasts(fake: FakeComfyUI) -> None:
    mine = await connect(fake, "c1")
    anonymous = await connect(fake)
    assert mine.of("status")[0]["sid"] == "c1" and len(anonymous.of("status")[0]["sid"]) == 32
    fake.submit(image_graph(), client_id=None)
    foreign = fake.broadcast_other_client()
    for socket in (mine, anonymous):
        await socket.settle(fake)
        kinds = set(socket.types())
        assert kinds == {"status", "progress_state", "progress", "binary:3"}  # no execution_*/executing/executed
        assert any(p["prompt_id"] == foreign for p in socket.of("progress"))
        await socket.close()


async def test_output_kinds(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    fake.files.put("input", "", "voice.wav", b"RIFF....WAVE")
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6}},
        "4": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8,
                                                           "filename_prefix": "vid", "format": "video/h264-mp4"}},
        "5": {"class_type": "LoadAudio", "inputs": {"audio": "voice.wav"}},
        "6": {"class_type": "SaveAudio", "inputs": {"audio": ["5", 0], "filename_prefix": "audio/clip"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": "hello"}},
    }
    prompt_id = fake.submit(graph, client_id="c1")
    await fake.wait_idle()
    outputs = fake.engine.history[prompt_id]["outputs"]
    assert [i["type"] for i in outputs["2"]["images"]] == ["temp", "temp"]
    assert outputs["3"]["animated"] == [True] and outputs["3"]["images"][0]["filename"] == "anim_00001_.webp"
    assert outputs["4"]["gifs"][0]["filename"] == "vid_00001.mp4"
    assert outputs["6"]["audio"][0] == {"filename": "clip_00001_.flac", "subfolder": "audio", "type": "output"}
    assert outputs["7"] == {"text": ["hello"]}
    expected = [(outputs["3"]["images"][0], "image/webp", b"RIFF"), (outputs["6"]["audio"][0], "audio/flac", b"fLaC"),
                (outputs["2"]["images"][0], "image/png", media.PNG_MAGIC)]
    for ref, content_type, magic in expected:
        view = await http.get("/api/view", params=ref)
        assert view.headers["content-type"] in (content_type, "audio/x-flac") and view.content.startswith(magic)
    await fake.restart()  # temp files are deleted when the server starts; outputs stay
    assert (await http.get("/view", params=outputs["2"]["images"][0])).status_code == 404
    assert (await http.get("/view", params=outputs["3"]["images"][0])).status_code == 200


async def test_cache_knob_and_custom_nodes(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    def run(ctx: Any, inputs: dict[str, Any]) -> NodeResult:
        return NodeResult(ui={"text": [inputs["words"].upper()]}, ticks=2)

    fake.register_node(NodeSpec("Shout", {"words": ["STRING", {}]}, output_node=True, run=run))
    assert "Shout" in (await http.get("/object_info")).json()
    socket = await connect(fake, "c1")
    graph = {"1": {"class_type": "Shout", "inputs": {"words": "hi"}}}
    first = fake.submit(graph, client_id="c1")
    await socket.done(first)
    cached = fake.submit(graph, client_id="c1")
    await socket.done(cached)
    fake.behaviour.cache = False
    fresh = fake.submit(graph, client_id="c1")
    await socket.done(fresh)
    assert [c["nodes"] for c in socket.of("execution_cached")] == [[], ["1"], []]
    assert [e["output"] for e in socket.of("executed")] == [{"text": ["HI"]}] * 3
    assert len(socket.of("progress")) == 4  # the cached run did not tick
    await socket.close()


async def test_jobs_api(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    assert (await http.get("/api/jobs")).status_code == 404
    fake.behaviour.jobs_api = True
    hold = fake.hold("1")
    running = fake.submit(image_graph())
    await hold.wait_reached()
    pending = fake.submit(image_graph(color=1))
    jobs = (await http.get("/api/jobs")).json()["jobs"]
    assert [(j["id"], j["status"]) for j in jobs] == [(running, "in_progress"), (pending, "pending")]
    assert (await http.post(f"/api/jobs/{pending}/cancel")).json() == {"cancelled": True}
    assert (await http.post(f"/api/jobs/{pending}/cancel")).json() == {"cancelled": False}
    assert (await http.post("/api/jobs/cancel", json={"job_ids": [running]})).json() == {"cancelled": [running]}
    hold.release()
    await fake.wait_idle()
    assert (await http.get(f"/api/jobs/{running}")).json()["status"] == "failed"
    missing = await http.get("/api/jobs/nope")
    assert (missing.status_code, missing.json()) == (404, {"error": "Job not found"})


async def test_simple_endpoints_and_origin(fake: FakeComfyUI, http: httpx.AsyncClient) -> None:
    fake.behaviour.devices = [{"name": "cuda:1 X", "type": "cuda", "index": 1, "vram_total": 8, "vram_free": 4,
                               "torch_vram_total": 0, "torch_vram_free": 0}]
    stats = (await http.get("/api/system_stats")).json()
    assert stats["devices"][0]["index"] == 1 and stats["system"]["comfyui_version"] == "0.3.64"
    assert (await http.get("/models/nope")).status_code == 404
    assert "sd_xl_base_1.0.safetensors" in (await http.get("/models/checkpoints")).json()
    assert (await http.get("/object_info/Nope")).json() == {}
    origin = {"Origin": "http://elsewhere:1"}
    assert (await http.post("/prompt", json={"prompt": image_graph()}, headers=origin)).status_code == 403
    fake.behaviour.check_origin = False
    assert (await http.post("/prompt", json={"prompt": image_graph()}, headers=origin)).status_code == 200
    await fake.wait_idle()
    assert (await http.post("/free", json={"unload_models": True})).status_code == 200 and fake.frees
