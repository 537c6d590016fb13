"""Replays a recorded ComfyUI trace's client side against the fake, and compares what comes back.

A trace (tests/fakes/fixtures/comfyui/*.json) lists what the client did (ws_open, ws_send, http, ws_client_close,
action kill/restart) and what it received (ws_recv), each with `t`. `replay` does the same actions in order of
`t`; before each one it waits until every socket has received as many messages as it had in the trace by then
(the replay's only synchronisation, with a deadline). Then `Comparison` puts both sides through one normaliser:
prompt ids, client ids and timestamps become placeholders, floats are marked so 1 and 1.0 differ (progress_state
uses both), tracebacks are dropped, and queue `number`s are reduced to their type.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from tests.fakes.comfyui import FakeComfyUI, media

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DEADLINE_S = 10.0


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


# ---- normalising ----------------------------------------------------------------------------------------------
@dataclass
class Normaliser:
    ids: dict[str, str] = field(default_factory=dict)

    def placeholder(self, value: str) -> str:
        return self.ids.setdefault(value, f"<id{len(self.ids)}>")

    def __call__(self, value: Any, key: str | None = None) -> Any:
        if key == "timestamp":
            return "<ts>"
        if key == "number":
            return f"<{type(value).__name__}>"
        if key == "traceback":
            return "<traceback>"
        if key == "current_outputs" and isinstance(value, list):  # a set in the server: any order
            return sorted(self(v) for v in value)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, float):
            return f"float:{value}"
        if isinstance(value, str) and (UUID.match(value) or HEX_ID.match(value)):
            return self.placeholder(value)
        if isinstance(value, dict):
            return {self(k) if isinstance(k, str) else k: self(v, k) for k, v in value.items()}
        if isinstance(value, list):
            if len(value) == 5 and isinstance(value[1], str) and UUID.match(value[1]):  # a queue item
                return [f"<{type(value[0]).__name__}>", *[self(v) for v in value[1:]]]
            return [self(v) for v in value]
        return value


def keys_only(value: Any) -> Any:
    """The structure of a value: dict keys (recursively; a list by its first item), no leaf values or types."""
    if isinstance(value, dict):
        return {k: keys_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [keys_only(value[0])] if value else []
    return "*"


def png_info(data: bytes) -> dict[str, Any]:
    size = media.png_size(data)
    return {"size": list(size) if size else None}


def describe_frame(frame: bytes) -> dict[str, Any]:
    """A binary frame as the traces describe it (event type, node/text, image format and size, metadata)."""
    decoded = media.decode_frame(frame)
    out: dict[str, Any] = {"event_type": decoded["event_type"]}
    if "node_id" in decoded:
        out.update(node_id=decoded["node_id"], text=decoded["text"])
    if "image_type" in decoded:
        out["image_type"] = decoded["image_type"]
    if "metadata" in decoded:
        out["metadata"] = decoded["metadata"]
    if "image" in decoded:
        out["image"] = png_info(decoded["image"])
    return out


def describe_recorded_frame(binary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"event_type": binary["event_type"]}
    for key in ("node_id", "text", "image_type", "metadata"):
        if key in binary:
            out[key] = binary[key]
    if "image" in binary:
        out["image"] = {"size": binary["image"]["size"]}
    return out


def label(item: dict[str, Any]) -> str:
    return item["type"] if "type" in item else f"binary:{item['event_type']}"


# ---- replaying ------------------------------------------------------------------------------------------------
@dataclass
class Received:
    items: list[dict[str, Any]] = field(default_factory=list)  # {"type", "data"} or a describe_frame dict
    ended: BaseException | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class Scenario:
    """How to replay one fixture: knobs to set, files already on the server's disk, hooks by event seq."""

    name: str
    setup: Callable[[FakeComfyUI], None] = lambda fake: None
    wait_before: dict[int, Callable[[FakeComfyUI], bool]] = field(default_factory=dict)
    before: dict[int, Callable[[FakeComfyUI], None]] = field(default_factory=dict)
    rewrite: dict[int, Callable[[dict[str, Any]], None]] = field(default_factory=dict)  # fix a recorded request body
    upload_bytes: list[bytes] = field(default_factory=list)
    outputs: tuple[str, ...] = ()  # output files already on the server's disk when the trace began
    # count only non-tick messages when waiting (the fake and the trace may differ in how many ticks come)
    lenient_ticks: bool = False


TICKS = ("progress_state", "progress", "binary:1", "binary:4")


@dataclass
class HttpResult:
    event: dict[str, Any]
    response: httpx.Response | None
    error: BaseException | None = None


class Replay:
    def __init__(self, fake: FakeComfyUI, trace: dict[str, Any], scenario: Scenario) -> None:
        self.fake, self.trace, self.scenario = fake, trace, scenario
        self.events: list[dict[str, Any]] = trace["events"]
        self.sockets: dict[str, ClientConnection] = {}
        self.received: dict[str, Received] = {}
        self.http: list[HttpResult] = []
        self.uploads = list(scenario.upload_bytes)
        self.ids: dict[str, str] = {}  # the trace's server-made prompt ids -> the fake's

    def _swap(self, value: Any) -> Any:
        if isinstance(value, str):
            for old, new in self.ids.items():
                value = value.replace(old, new)
            return value
        if isinstance(value, dict):
            return {k: self._swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._swap(v) for v in value]
        return value

    def expected(self, socket: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == "ws_recv" and e["socket"] == socket]

    def _counts(self, items: list[dict[str, Any]]) -> int:
        return sum(1 for item in items if not (self.scenario.lenient_ticks and label(item) in TICKS))

    def _due(self, event: dict[str, Any]) -> dict[str, int]:
        mark = (event["t"], event["seq"])
        before: dict[str, list[dict[str, Any]]] = {}
        for other in self.events:
            if other["kind"] == "ws_recv" and (other["t"], other["seq"]) < mark:
                before.setdefault(other["socket"], []).extend(recorded_items([other]))
        return {socket: self._counts(items) for socket, items in before.items()}

    async def _wait_counts(self, counts: dict[str, int]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while any(self._counts(self.received[s].items) < n for s, n in counts.items() if s in self.received):
            if loop.time() > deadline:
                have = {s: len(r.items) for s, r in self.received.items()}
                raise AssertionError(f"replay stalled: wanted {counts}, have {have}")
            await asyncio.sleep(0.005)

    async def run(self, client: httpx.AsyncClient) -> None:
        actions = [e for e in self.events if e["kind"] not in ("ws_recv", "ws_closed")]
        for event in sorted(actions, key=lambda e: (e.get("t", 0.0), e["seq"])):
            if "t" in event:
                await self._wait_counts(self._due(event))
            if (check := self.scenario.wait_before.get(event["seq"])) is not None:
                await _wait_for(lambda: check(self.fake))
            if (hook := self.scenario.before.get(event["seq"])) is not None:
                hook(self.fake)
            await self._do(event, client)
        await self.fake.wait_idle(DEADLINE_S)
        await self._wait_counts({s: self._counts(recorded_items(self.expected(s))) for s in self.received})
        for name, socket in self.sockets.items():
            if self.received[name].ended is None:
                await socket.close()

    async def _do(self, event: dict[str, Any], client: httpx.AsyncClient) -> None:
        kind = event["kind"]
        if kind == "ws_open":
            await self._open(event["socket"], event["url"])
        elif kind == "ws_send":
            await self.sockets[event["socket"]].send(json.dumps(event["message"]))
        elif kind == "ws_client_close":
            if self.received[event["socket"]].ended is None:
                await self.sockets[event["socket"]].close()
        elif kind in ("http", "http_error"):
            self.http.append(await self._request(event, client))
        elif kind == "ws_connect_error":
            try:
                async with websockets.connect(self.fake.ws_url.removesuffix("/ws") + event["url"], open_timeout=2):
                    pass
            except OSError as exc:
                self.http.append(HttpResult(event, None, exc))
        elif kind == "action":
            await self._action(event["action"])

    async def _action(self, action: str) -> None:
        if action.startswith("os.kill"):
            await self.fake.kill()
            for received in self.received.values():  # the sockets' readers end on their own
                if received.task is not None:
                    await asyncio.wait_for(asyncio.shield(received.task), DEADLINE_S)
        elif action.startswith("server restarted"):
            await self.fake.restart()

    async def _open(self, name: str, url: str) -> None:
        socket = await websockets.connect(self.fake.ws_url.removesuffix("/ws") + url, max_size=None)
        received = Received()
        self.sockets[name], self.received[name] = socket, received
        received.task = asyncio.create_task(_read(socket, received))

    async def _request(self, event: dict[str, Any], client: httpx.AsyncClient) -> HttpResult:
        request = self._swap(event["request"])
        kwargs: dict[str, Any] = {"params": request.get("query"), "headers": request.get("headers")}
        if "json" in request:
            kwargs["json"] = request["json"]
            if (rewrite := self.scenario.rewrite.get(event["seq"])) is not None:
                rewrite(kwargs["json"])
        elif "raw_body" in request:
            kwargs["content"] = request["raw_body"].encode()
        elif "multipart_files" in request:
            spec = request["multipart_files"]["image"]
            payload = self.uploads.pop(0) if self.uploads else b"\x00" * spec["len"]
            kwargs["files"] = {"image": (spec["filename"], payload, spec["content_type"])}
            kwargs["data"] = request.get("multipart_fields") or {}
        try:
            response = await client.request(request["method"], request["path"], **kwargs)
            wanted = event.get("response", {}).get("json")
            deadline = asyncio.get_running_loop().time() + DEADLINE_S
            while _is_history(request) and wanted and response.json() == {}:  # the trace's client polled
                assert asyncio.get_running_loop().time() < deadline, "history never appeared"
                await asyncio.sleep(0.01)
                response = await client.request(request["method"], request["path"], **kwargs)
            self._learn_ids(event, response)
            return HttpResult(event, response)
        except httpx.HTTPError as exc:
            return HttpResult(event, None, exc)


    def _learn_ids(self, event: dict[str, Any], response: httpx.Response) -> None:
        recorded = event.get("response", {}).get("json")
        if event["request"]["path"].endswith("/prompt") and isinstance(recorded, dict) and "prompt_id" in recorded:
            self.ids.setdefault(recorded["prompt_id"], response.json()["prompt_id"])


def _is_history(request: dict[str, Any]) -> bool:
    return bool(request["method"] == "GET" and request["path"].startswith("/history/"))


async def _wait_for(predicate: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("scenario condition not met")
        await asyncio.sleep(0.002)


async def _read(socket: ClientConnection, received: Received) -> None:
    try:
        async for message in socket:
            if isinstance(message, bytes):
                received.items.append(describe_frame(message))
            else:
                received.items.append(json.loads(message))
    except websockets.ConnectionClosedError as exc:
        received.ended = exc


def recorded_items(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["message"] if e["frame"] == "text" else describe_recorded_frame(e["binary"]) for e in events]
