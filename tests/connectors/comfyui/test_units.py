"""The ComfyUI connector's pure parts, from messages and answers a real ComfyUI 0.3.64 sent
(copied from the captured traces): payload checks, failure taxonomy, progress, outputs, frames
and routing."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import pytest

from connectors.comfyui import errors
from connectors.comfyui.outputs import content_type_for, discover, output_name
from connectors.comfyui.payload import parse_payload, rename_inputs
from connectors.comfyui.progress import PromptTracker
from connectors.comfyui.settings import ComfyUISettings
from connectors.comfyui.ws import BINARY, Router, parse_binary
from worker.errors import ConfigError, PermanentJobError, RetryableJobError

PID = "fe43a0a3-4eee-454e-92a6-d6a754825158"
GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16711680},
          "_meta": {"title": "EmptyImage"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Invert Image"}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"},
          "_meta": {"title": "Save Image"}},
}
# success_trace.json, in order (progress_state snapshots abridged to the node that changed)
SUCCESS: list[tuple[str, dict[str, Any]]] = [
    ("execution_start", {"prompt_id": PID, "timestamp": 1795436380493}),
    ("execution_cached", {"nodes": [], "prompt_id": PID, "timestamp": 1795436380507}),
    ("progress_state", {"prompt_id": PID, "nodes": {"1": {"value": 0.0, "max": 1.0, "state": "running", "node_id": "1",
                                                          "display_node_id": "1"}}}),
    ("executing", {"node": "1", "display_node": "1", "prompt_id": PID}),
    ("progress_state", {"prompt_id": PID, "nodes": {"1": {"value": 1.0, "max": 1.0, "state": "finished", "node_id": "1",
                                                          "display_node_id": "1"}}}),
    ("executing", {"node": "2", "display_node": "2", "prompt_id": PID}),
    ("executing", {"node": "3", "display_node": "3", "prompt_id": PID}),
    ("executed", {"node": "3", "display_node": "3", "prompt_id": PID, "output": {
        "images": [{"filename": "fixture_success_1795436380_00001_.png", "subfolder": "", "type": "output"}]}}),
    ("execution_success", {"prompt_id": PID, "timestamp": 1795436380508}),
    ("executing", {"node": None, "prompt_id": PID}),
]


def spec_of(graph: dict[str, Any] = GRAPH) -> Any:
    return parse_payload(graph, max_image_bytes=1024)


# -- payload -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "found"), [
    (GRAPH, None),
    ({"workflow": GRAPH, "timeout_seconds": 30}, None),
    ({"prompt": GRAPH}, None),
    ({**GRAPH, "job_note": "scalar metadata beside the nodes is not a node"}, None),
    ({"nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "version": 0.4}, "UI format"),
    ({"workflow": {"nodes": [], "links": []}}, "Export (API)"),
    ({"workflow": "not a graph"}, "must be an object"),
    ({}, "no nodes"),
    ({"1": {"inputs": {}}}, "has no class_type"),
    ({"1": {"class_type": "X", "inputs": []}}, "inputs must be an object"),
    ({"../1": {"class_type": "X", "inputs": {}}}, "is not a short id"),
    ({"workflow": GRAPH, "images": "x"}, "images must be a list"),
    ({"workflow": GRAPH, "images": [{"name": "../a.png", "data": "AA=="}]}, "plain file name"),
    ({"workflow": GRAPH, "images": [{"name": "a.png"}]}, "exactly one of url or data"),
    ({"workflow": GRAPH, "images": [{"name": "a.png", "data": "!!notbase64"}]}, "not valid base64"),
    ({"workflow": GRAPH, "images": [{"name": "a.png", "data": base64.b64encode(b"x" * 2000).decode()}]},
     "larger than 1024"),
    ({"workflow": GRAPH, "images": [{"name": "a.png", "url": "file:///etc/passwd"}]}, "http(s) URL"),
])
def test_payload_shapes(payload: dict[str, Any], found: str | None) -> None:
    if found is None:
        assert set(spec_of(payload).workflow) == {"1", "2", "3"}
        return
    with pytest.raises(PermanentJobError, match=found.replace("(", r"\(").replace(")", r"\)")):
        spec_of(payload)


def test_payload_images_decode_and_rename() -> None:
    png = b"\x89PNG\r\n\x1a\nrest"
    spec = spec_of({"workflow": {"4": {"class_type": "LoadImage", "inputs": {"image": "face.png"}}},
                    "images": [{"name": "face.png",
                                "data": "data:image/png;base64," + base64.b64encode(png).decode()}]})
    assert spec.images[0].data == png
    renamed = rename_inputs(spec.workflow, {"face.png": "face (1).png"})
    assert renamed["4"]["inputs"]["image"] == "face (1).png"


# -- failures ------------------------------------------------------------------------------------------


def test_validation_400_names_node_and_message() -> None:  # invalid_prompt.json: missing_required_input
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"2": {"errors": [{"type": "required_input_missing", "message": "Required input is missing",
                                              "details": "image", "extra_info": {"input_name": "image"}}],
                                  "dependent_outputs": ["3"], "class_type": "ImageInvert"}}}
    error = errors.validation_error(400, body)
    assert isinstance(error, PermanentJobError)
    assert "node 2 (ImageInvert): Required input is missing: image" in str(error)


def test_validation_unknown_class_is_named_in_details() -> None:  # unknown_class_type
    body = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.",
                      "details": "Node ID '#2'", "extra_info": {}}, "node_errors": {}}
    error = errors.validation_error(400, body)
    assert isinstance(error, PermanentJobError) and "NoSuchNode" in str(error) and "#2" in str(error)


def test_validation_500_plain_text_is_retryable() -> None:  # malformed_json_body: text/plain, not JSON
    assert isinstance(errors.validation_error(500, "500 Internal Server Error\n\nServer got itself in trouble"),
                      RetryableJobError)


@pytest.mark.parametrize(("exception_type", "message", "retryable"), [
    ("torch.OutOfMemoryError", "Allocation on device ", True),
    ("torch.cuda.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("RuntimeError", "HIP out of memory", True),
    ("RuntimeError", "CUDA error: an illegal memory access was encountered", True),
    ("requests.exceptions.ConnectionError", "Max retries exceeded", True),
    ("PIL.UnidentifiedImageError", "cannot identify image file '/opt/ComfyUI/input/corrupt.png'\n", False),
    ("ValueError", "width must be a multiple of 8", False),
    ("Exception", "", False),
])
def test_execution_error_classification(exception_type: str, message: str, retryable: bool) -> None:
    data = {"prompt_id": PID, "node_id": "4", "node_type": "LoadImage", "exception_type": exception_type,
            "exception_message": message, "traceback": ["  File \"execution.py\", line 496, in execute\n"]}
    error = errors.execution_error(data)
    assert error.retryable is retryable
    assert "node 4 (LoadImage)" in str(error) and exception_type in str(error) and "execution.py" not in str(error)


def test_history_error_entry() -> None:  # execution_error.json's history entry
    entry = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {"prompt_id": PID}], ["execution_cached", {"nodes": ["1"], "prompt_id": PID}],
        ["execution_error", {"prompt_id": PID, "node_id": "4", "node_type": "LoadImage",
                             "exception_type": "PIL.UnidentifiedImageError", "exception_message": "cannot identify"}]]}}
    error = errors.error_from_history(entry)
    assert isinstance(error, PermanentJobError) and "UnidentifiedImageError" in str(error)
    assert errors.cached_nodes(entry) == {"1"}
    assert errors.error_from_history({"status": {"status_str": "success", "completed": True}}) is None


# -- progress ------------------------------------------------------------------------------------------


def test_progress_success_trace() -> None:
    tracker = PromptTracker(spec_of())
    percents = []
    for kind, data in SUCCESS:
        tracker.feed(kind, data)
        percents.append(tracker.percent())
    assert tracker.done and tracker.succeeded
    assert percents == sorted(percents) and max(percents) < 100
    assert tracker.executed["3"]["images"][0]["filename"] == "fixture_success_1795436380_00001_.png"


def test_progress_message_names_ticking_node() -> None:
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
             "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0]}}}
    tracker = PromptTracker(spec_of(graph))
    tracker.feed("executing", {"node": "1", "prompt_id": PID})
    tracker.feed("executing", {"node": "2", "prompt_id": PID})
    tracker.feed("progress", {"value": 2, "max": 30, "prompt_id": PID, "node": "2"}, now=10.0)
    tracker.feed("progress", {"value": 12, "max": 30, "prompt_id": PID, "node": "2"}, now=20.0)
    snap = tracker.snapshot(now=20.0)
    assert snap.message == "KSampler 12/30" and (snap.step, snap.total_steps) == (12, 30)
    assert snap.eta_s == 18.0  # 10 ticks took 10 s; 18 to go
    assert snap.percent == pytest.approx(100 * (1 + 12 / 30) / 2)
    assert snap.data == {"node": "2", "class_type": "KSampler"}


# -- outputs -------------------------------------------------------------------------------------------


def test_discover_every_kind() -> None:
    outputs = {
        "9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]},
        "10": {"images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}], "animated": [True]},
        "11": {"gifs": [{"filename": "clip_00001.mp4", "subfolder": "video", "type": "output",
                         "format": "video/h264-mp4"}]},
        "12": {"audio": [{"filename": "ComfyUI_00001_.flac", "subfolder": "audio", "type": "output"}]},
        "13": {"3d": [{"filename": "mesh.glb", "subfolder": "3d", "type": "output"}]},
        "14": {"text": ["a caption"]},
        "15": {"images": [{"filename": "ComfyUI_temp_abc_00001_.png", "subfolder": "", "type": "temp"}]},
    }
    found = discover(outputs, cached_nodes={"9"})
    assert [(r.node_id, r.kind) for r in found] == [("9", "images"), ("10", "images"), ("11", "gifs"),
                                                   ("12", "audio"), ("13", "3d"), ("14", "text"), ("15", "images")]
    assert found[0].cached and not found[1].cached
    assert found[5].text == "a caption"
    assert content_type_for("mesh.glb") == "model/gltf-binary"
    assert content_type_for("a.flac", "application/octet-stream") == "audio/flac"
    assert content_type_for("a.png", "image/png; charset=x") == "image/png"


def test_output_names_are_safe_and_unique() -> None:
    refs = discover({"3": {"images": [{"filename": "fixture_upload (1).png", "subfolder": "", "type": "output"},
                                      {"filename": "fixture_upload_1_.png", "subfolder": "", "type": "output"}]}})
    used: set[str] = set()
    names = [output_name(ref, i, used) for i, ref in enumerate(refs)]
    assert names[0] == "3-fixture_upload_1_.png" and names[1] == "3-fixture_upload_1_-1.png"


def test_too_many_outputs_fail_permanently() -> None:
    items = [{"filename": f"x{i}.png", "subfolder": "", "type": "output"} for i in range(300)]
    with pytest.raises(PermanentJobError, match="at most"):
        discover({"1": {"images": items}})


# -- binary frames and routing ---------------------------------------------------------------------------

TEXT_FRAME = base64.b64decode("AAAAAwAAAAEyd2lkdGg6IDQ4LCBoZWlnaHQ6IDMyCiBiYXRjaCBzaXplOiAx")  # progress_binary_*
LEGACY_PREVIEW = base64.b64decode(  # progress_binary_legacy.json: type 1, format 2 (PNG)
    "AAAAAQAAAAKJUE5HDQoaCgAAAA1JSERSAAAAMAAAACAIAgAAANu2bEsAAABSSURBVHgB7dIxEQAhEARBQML7QhLeqVcwKUGTTnLV7DzfHi+99dIx"
    "/y0Oqh8hRKgEqtsQoRKobkOESqC6DREqgeo2RKgEqtsQoRKobkOESqD6BekXARyCYslGAAAAAElFTkSuQmCC")


def meta_frame(prompt_id: str, node: str = "5") -> bytes:
    meta = json.dumps({"node_id": node, "prompt_id": prompt_id, "display_node_id": node, "parent_node_id": None,
                       "real_node_id": node, "image_type": "image/png"}).encode()
    return struct.pack(">II", 4, len(meta)) + meta + b"\x89PNG\r\n\x1a\n"


def test_parse_binary_frames() -> None:
    text = parse_binary(TEXT_FRAME)
    assert text is not None and text.name == "TEXT" and text.node_id == "2"
    assert text.text == "width: 48, height: 32\n batch size: 1"
    legacy = parse_binary(LEGACY_PREVIEW)
    assert legacy is not None and legacy.image_type == "image/png" and legacy.image.startswith(b"\x89PNG")
    with_meta = parse_binary(meta_frame(PID))
    assert with_meta is not None and with_meta.prompt_id == PID and with_meta.node_id == "5"
    assert parse_binary(b"\x00\x00") is None and parse_binary(struct.pack(">II", 3, 999) + b"x") is None
    assert parse_binary(struct.pack(">II", 9, 0)) is None


async def test_router_routes_by_prompt_and_buffers_early_messages() -> None:
    router = Router()
    mine = router.subscribe("mine")
    other = json.dumps({"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": "other", "node": "5"}})
    router.text(other, 0.0)
    router.text(json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}), 0.0)
    router.text(json.dumps({"type": "executing", "data": {"node": "12"}}), 0.0)  # reconnect's: no prompt_id
    assert mine.empty()
    early = router.subscribe("other")  # its messages arrived before anyone waited for them (pitfall 1)
    assert early.get_nowait()[0] == "progress"
    router.binary(meta_frame("other"), 0.0)
    assert mine.empty() and early.get_nowait()[0] == BINARY


async def test_router_drops_text_frames_it_cannot_attribute() -> None:
    router = Router()
    mine = router.subscribe(PID)
    router.binary(TEXT_FRAME, 0.0)  # broadcast by the server while no prompt of ours runs
    router.binary(LEGACY_PREVIEW, 0.0)
    assert mine.empty()
    router.text(json.dumps({"type": "executing", "data": {"node": "3", "prompt_id": PID}}), 0.0)
    router.binary(TEXT_FRAME, 0.0)  # node 2's text while ours runs node 3: another prompt's
    assert mine.get_nowait()[0] == "executing" and mine.empty()
    router.text(json.dumps({"type": "executing", "data": {"node": "2", "prompt_id": PID}}), 0.0)
    router.binary(TEXT_FRAME, 0.0)
    mine.get_nowait()
    assert mine.get_nowait()[1].text.startswith("width")
    await asyncio.sleep(0)


# -- settings -------------------------------------------------------------------------------------------


def test_settings_slot_urls_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_COMFYUI_PORT_STEP", "10")
    monkeypatch.setenv("EMP_COMFYUI_TOKEN", "s3cret-token")
    s = ComfyUISettings.load("EMP_COMFYUI_")
    assert s.url_for(0) == "http://127.0.0.1:8188" and s.url_for(2) == "http://127.0.0.1:8208"
    assert "s3cret" not in repr(s) and s.bearer() == "s3cret-token"
    monkeypatch.setenv("EMP_COMFYUI_AUTH", "no-colon-password")
    with pytest.raises(ConfigError) as caught:
        ComfyUISettings.load("EMP_COMFYUI_").basic_auth()
    assert "no-colon-password" not in str(caught.value)
    monkeypatch.setenv("EMP_COMFYUI_COMMAND", "python main.py")
    with pytest.raises(ConfigError, match="port"):
        ComfyUISettings.load("EMP_COMFYUI_")
