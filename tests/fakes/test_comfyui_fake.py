"""The fake ComfyUI pinned to the real 0.3.64 server's traces: each fixture's client side is replayed against the
fake, and every socket must receive the same messages in the same order with the same (normalised) data, and
every HTTP call the same status, headers and body. Knob-by-knob tests are in test_comfyui_fake_knobs.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import websockets

from tests.fakes.comfyui import FakeComfyUI, media
from tests.fakes.comfyui_trace import (
    HttpResult,
    Normaliser,
    Replay,
    Scenario,
    keys_only,
    label,
    load,
    recorded_items,
)

PNG_A = media.png(64, 64, 0xFF0000, {"note": '"fixture"', "prompt": "{}"})
PNG_B = media.png(64, 64, 0x00FF00, {"note": '"fixture"', "prompt": "{}"})
KEYS_ONLY = {"system_stats"}  # machine-specific values: only the structure is pinned


def _blurs(fake: FakeComfyUI) -> None:
    fake.behaviour.node_delays["ImageBlur"] = 0.15  # the traces' blurs took ~3 s: long enough to act during one


def _blurs_slow_start(fake: FakeComfyUI) -> None:
    _blurs(fake)
    fake.behaviour.start_delay_s = 0.05  # J2 was queued between J1's execution_start and execution_cached


def _slow_pickup(fake: FakeComfyUI) -> None:
    fake.behaviour.pickup_delay_s = 0.05  # J5, J6 and J7 were all queued before the worker took J5


def _fifth_tick(fake: FakeComfyUI) -> bool:
    """J4 was interrupted after its 5th progress tick (value 4)."""
    fake.behaviour.step_delay_s = 0.02
    return sum(1 for _, kind in fake.hub.sent if kind == "progress") >= 5


def _slow_nodes(fake: FakeComfyUI) -> None:
    fake.behaviour.node_delay_s = 0.05  # the trace's first history poll came while the prompt still ran


def _run_11(fake: FakeComfyUI) -> None:
    """The trimmed-away runs 1-10 left their files; run 11 is the one whose history write came late."""
    for counter in range(2, 12):
        fake.files.put("output", "", f"fixture_race_{counter:05}_.png", media.png(8, 8))
    fake.behaviour.history_delay_s = 0.3


def _misc(fake: FakeComfyUI) -> None:
    fake.behaviour.models["checkpoints"] = []


def _recorded_color(body: dict[str, Any]) -> None:
    body["prompt"]["1"]["inputs"]["color"] = 6163740  # what the server stored (the trace's summary says so)


SCENARIOS = {
    "success_trace": Scenario("success_trace"),
    "cached_rerun": Scenario("cached_rerun"),
    "progress_binary_legacy": Scenario("progress_binary_legacy"),
    "progress_binary_metadata": Scenario("progress_binary_metadata"),
    "execution_error": Scenario("execution_error", upload_bytes=[b"this is no image!"]),
    "invalid_prompt": Scenario("invalid_prompt", outputs=("fixture_invalid_base_00001_.png",)),
    "client_filtering": Scenario("client_filtering", setup=_slow_nodes),
    "ws_duplicate_clientid": Scenario("ws_duplicate_clientid", setup=_slow_nodes),
    "ws_reconnect": Scenario("ws_reconnect", setup=_blurs, wait_before={17: lambda f: f.engine.last_node == "12"},
                             outputs=("fixture_long_00001_.png", "fixture_long_00002_.png")),
    "server_killed_sigkill": Scenario("server_killed_sigkill", setup=_blurs),
    "server_killed_sigint": Scenario("server_killed_sigint", setup=_blurs),
    "history_race": Scenario("history_race", before={222: _run_11}),
    "misc_endpoints": Scenario("misc_endpoints", setup=_misc, rewrite={27: _recorded_color},
                               upload_bytes=[PNG_A, PNG_B, PNG_A]),
    "interrupt": Scenario("interrupt", setup=_blurs_slow_start, lenient_ticks=True, wait_before={74: _fifth_tick},
                          before={92: _slow_pickup}),
}


async def replay(name: str) -> Replay:
    scenario = SCENARIOS[name]
    async with FakeComfyUI() as fake:
        scenario.setup(fake)
        for filename in scenario.outputs:
            fake.files.put("output", "", filename, media.png(8, 8))
        async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
            run = Replay(fake, load(name), scenario)
            await run.run(client)
    return run


def compare_sockets(run: Replay, want_norm: Normaliser, got_norm: Normaliser) -> None:
    for socket, received in run.received.items():
        want = recorded_items(run.expected(socket))
        assert [label(m) for m in received.items] == [label(m) for m in want], f"socket {socket}: message order"
        for index, (got, expected) in enumerate(zip(received.items, want, strict=True)):
            assert got_norm(got) == want_norm(expected), f"socket {socket}, message {index} ({label(expected)})"


def compare_http(run: Replay, want_norm: Normaliser, got_norm: Normaliser) -> None:
    for result in run.http:
        event = result.event
        name = event.get("label", event["kind"])
        if event["kind"] == "http_error":
            assert isinstance(result.error, httpx.ConnectError), name
        elif event["kind"] == "ws_connect_error":
            assert isinstance(result.error, ConnectionRefusedError), name
        else:
            compare_response(result, want_norm, got_norm)


def compare_response(result: HttpResult, want_norm: Normaliser, got_norm: Normaliser) -> None:
    want, got, name = result.event["response"], result.response, result.event.get("label")
    assert got is not None, f"{name}: {result.error!r}"
    assert got.status_code == want["status"], name
    for header in ("content-type", "content-disposition"):
        if header in want["headers"]:
            assert got.headers.get(header) == want["headers"][header], f"{name}: {header}"
    if want["headers"].get("content-length") == "0":
        assert got.content == b"", name
    if "json" in want:
        if name in KEYS_ONLY:
            assert keys_only(got.json()) == keys_only(want["json"]), name
        else:
            assert got_norm(got.json()) == want_norm(want["json"]), name
    elif "json_summary" in want:
        compare_summary(got.json(), want["json_summary"], want_norm, got_norm, str(name))
    elif "text" in want:
        assert got.text == want["text"], name
    elif "binary" in want:
        compare_binary(got.content, want["binary"], str(name))


def compare_summary(body: Any, summary: dict[str, Any], want_norm: Normaliser, got_norm: Normaliser,
                    name: str) -> None:
    """The traces summarise big bodies; pin each summarised fact."""
    if "empty" in summary:
        assert (body == {}) == summary["empty"], name
    for key in ("keys", "prompt_ids"):
        if key in summary:
            assert got_norm(list(body)) == want_norm(summary[key]), name
    if "status_str" in summary:
        assert next(iter(body.values()))["status"]["status_str"] == summary["status_str"], name
    if "queue_running" in summary:
        assert got_norm(_queue_summary(body)) == want_norm(
            {k: summary[k] for k in ("queue_running", "queue_pending")}), name
    if "EmptyImage" in summary:
        assert body["EmptyImage"] == summary["EmptyImage"], name


def _queue_summary(body: dict[str, Any]) -> dict[str, Any]:
    def item(entry: list[Any]) -> dict[str, Any]:
        return {"number": entry[0], "prompt_id": entry[1], "prompt_node_ids": list(entry[2]), "extra_data": entry[3],
                "outputs_to_execute": entry[4], "item_len": len(entry)}

    return {key: [item(e) for e in body[key]] for key in ("queue_running", "queue_pending")}


def compare_binary(data: bytes, want: dict[str, Any], name: str) -> None:
    if want["pil_format"] == "PNG":
        assert data[:8].hex() == want["magic_hex"], name
        assert list(media.png_size(data) or ()) == want["size"], name
        if "png_text_keys" in want:
            assert sorted(_png_text_keys(data)) == sorted(want["png_text_keys"]), name
    elif want["pil_format"] == "WEBP":
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", name


def _png_text_keys(data: bytes) -> list[str]:
    keys, offset = [], 8
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8]
        if kind == b"tEXt":
            keys.append(data[offset + 8:offset + 8 + length].split(b"\x00", 1)[0].decode())
        offset += 12 + length
    return keys


EXACT = [name for name in SCENARIOS if name != "interrupt"]


@pytest.mark.parametrize("name", EXACT)
async def test_fake_replays_the_trace(name: str) -> None:
    run = await replay(name)
    want_norm, got_norm = Normaliser(), Normaliser()
    compare_sockets(run, want_norm, got_norm)
    compare_http(run, want_norm, got_norm)


@pytest.mark.parametrize("name", ["server_killed_sigkill", "server_killed_sigint"])
async def test_a_killed_server_ends_the_socket_without_a_close_frame(name: str) -> None:
    run = await replay(name)
    ended = run.received["A"].ended
    assert isinstance(ended, websockets.ConnectionClosedError)
    closed = next(e for e in load(name)["events"] if e["kind"] == "ws_closed" and e["socket"] == "A")
    assert type(ended).__name__ == closed["exception"]
    assert ended.rcvd is None and ended.sent is None  # "no close frame received or sent"


def _collapsed(items: list[dict[str, Any]]) -> list[str]:
    """Message labels with repeated progress ticks folded: the fake notices an interrupt at the very next tick,
    the traced server (its loop busy with 60 kB previews) a few ticks later (pitfall 8)."""
    labels = [label(m) for m in items]
    out: list[str] = []
    for name in labels:
        out.append(name)
        if len(out) >= 6 and out[-3:] == out[-6:-3]:
            del out[-3:]
    return out


async def test_fake_replays_the_interrupt_trace() -> None:
    run = await replay("interrupt")
    want = recorded_items(run.expected("A"))
    got = run.received["A"].items
    assert _collapsed(got) == _collapsed(want)
    ticks = {"progress_state", "progress", "binary:1"}
    want_norm, got_norm = Normaliser(), Normaliser()
    assert [got_norm(m) for m in got if label(m) not in ticks] == [want_norm(m) for m in want if label(m) not in ticks]
    compare_http(run, want_norm, got_norm)


def _without_tooltips(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_tooltips(v) for k, v in value.items() if k not in ("tooltip", "output_tooltips")}
    if isinstance(value, list):
        if value and isinstance(value[0], list):  # a choice list: machine- and version-specific
            return ["<choices>", *[_without_tooltips(v) for v in value[1:]]]
        return [_without_tooltips(v) for v in value]
    return value


@pytest.mark.parametrize("node", load("object_info_sample")["nodes"])
async def test_object_info_matches_the_recorded_definitions(node: str) -> None:
    recorded = load("object_info_sample")["nodes"][node]
    async with FakeComfyUI() as fake, httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        body = (await client.get(f"/object_info/{node}")).json()
    assert _without_tooltips(body[node]) == _without_tooltips(recorded)
    assert ("output_tooltips" in body[node]) == ("output_tooltips" in recorded)
