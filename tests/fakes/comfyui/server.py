"""FakeComfyUI: the server's lifecycle (start, stop, kill, restart on the same port) and the test-facing API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
import weakref
from types import TracebackType
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.comfyui.behaviour import Behaviour, InterruptCall, Submitted, Upload
from tests.fakes.comfyui.engine import Engine
from tests.fakes.comfyui.execution import Hold
from tests.fakes.comfyui.files import Files
from tests.fakes.comfyui.hub import Hub, Socket
from tests.fakes.comfyui.jobs import Jobs
from tests.fakes.comfyui.nodes import BUILTIN_NODES, NodeSpec
from tests.fakes.comfyui.routes import FEATURES, MAX_UPLOAD, Api, new_item
from tests.fakes.comfyui.validation import validate


class FakeComfyUI:
    """A ComfyUI 0.3.64 look-alike on 127.0.0.1 (see the package docstring for how tests drive it)."""

    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = behaviour or Behaviour()
        self.host, self.port = host, port
        self.files = Files()
        self.specs: dict[str, NodeSpec] = {spec.name: spec for spec in BUILTIN_NODES}
        self.prompts: list[Submitted] = []
        self.interrupts: list[InterruptCall] = []
        self.queue_deletes: list[dict[str, Any]] = []
        self.uploads: list[Upload] = []
        self.frees: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every HTTP request, /ws included
        self.restarts = 0
        self.hub = Hub(self.behaviour)
        self.engine = Engine(self.behaviour, self.hub, self.files, self.specs)
        self.jobs = Jobs(self)
        self._api = Api(self)
        self._runner: web.AppRunner | None = None
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._api.origin_check], client_max_size=MAX_UPLOAD)
        self._api.add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        self.hub.start()
        self.engine.start()

    async def stop(self) -> None:
        """A clean shutdown: sockets get a close frame."""
        await self.engine.stop()
        await self.hub.stop()
        for socket in list(self.hub.sockets.values()):
            with contextlib.suppress(Exception):
                await socket.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def kill(self) -> None:
        """Like SIGKILL (or SIGINT, which 0.3.64 clients see the same way): every connection drops with no close
        frame (websockets: ConnectionClosedError 1006), and the port refuses connections until restart()."""
        await self.engine.stop()
        await self.hub.stop()
        self._abort_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Back on the SAME port with an empty queue and history, the number counter at 0, temp files gone
        (outputs and inputs stay on "disk"). Kills the server first if it is still up."""
        if self._runner is not None:
            await self.kill()
        self.files.clear_temp()
        self.hub = Hub(self.behaviour)
        self.engine = Engine(self.behaviour, self.hub, self.files, self.specs)
        self.restarts += 1
        await self.start()

    def track(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path))
        if request.transport is not None:
            self._transports.add(request.transport)

    def _abort_all(self) -> None:
        transports = list(self._transports)
        if self._runner is not None and self._runner.server is not None:
            connections = getattr(self._runner.server, "_connections", {})  # idle keep-alive ones too
            transports.extend(connections.values())
        for transport in transports:
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self._transports = weakref.WeakSet()

    # ---- driving it from tests ------------------------------------------------------------------------------
    def register_node(self, spec: NodeSpec) -> None:
        """Add (or replace) a node class: it appears in /object_info and prompts may use it."""
        self.specs[spec.name] = spec

    def hold(self, node_id: str, prompt_id: str | None = None) -> Hold:
        """Make node `node_id` wait, after its `executing` was sent, until hold.release(); await hold.wait_reached().
        Interrupts sent meanwhile take effect at the next node (or tick), as in the real server."""
        hold = Hold(node_id, prompt_id)
        self.engine.holds.append(hold)
        return hold

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until the queue is empty and nothing runs, and every message so far has been written to the sockets."""
        await self.engine.wait_idle(timeout_s)
        await asyncio.wait_for(self.hub.drain(), timeout_s)

    def enqueue(self, body: dict[str, Any], outputs: list[str]) -> tuple[str, float]:
        item, record = new_item(self, body, outputs)
        self.engine.put(item)
        self.prompts.append(record)
        return item.prompt_id, item.number

    def submit(self, graph: dict[str, Any], client_id: str | None = None, prompt_id: str | None = None,
               extra_data: dict[str, Any] | None = None) -> str:
        """Queue a prompt as another client would (validated; raises Rejected on a 400). Returns its prompt_id."""
        body: dict[str, Any] = {"prompt": graph, "extra_data": extra_data or {}}
        if client_id is not None:
            body["client_id"] = client_id
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        outputs, _ = validate(graph, self.specs, self._api.context())
        return self.enqueue(body, outputs)[0]

    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send any JSON message to one client id, or (sid None) to every socket."""
        self.hub.send(event, data, sid)

    def send_binary(self, frame: bytes, sid: str | None = None) -> None:
        self.hub.send_binary(frame, sid)

    def broadcast_other_client(self, prompt_id: str | None = None, node: str = "3") -> str:
        """Broadcast what a socket sees of ANOTHER client's prompt (pitfall 4): progress/progress_state of a
        prompt without client_id, and a TEXT frame. Returns the foreign prompt_id."""
        from tests.fakes.comfyui import media

        prompt_id = prompt_id or str(uuid.uuid4())
        state = {node: {"value": 1, "max": 2, "state": "running", "node_id": node, "prompt_id": prompt_id,
                        "display_node_id": node, "parent_node_id": None, "real_node_id": node}}
        self.hub.send("progress_state", {"prompt_id": prompt_id, "nodes": state}, None)
        self.hub.send("progress", {"value": 1, "max": 2, "prompt_id": prompt_id, "node": node}, None)
        self.hub.send_binary(media.text_frame(node, "someone else's node text"), None)
        return prompt_id

    @property
    def sockets(self) -> list[str]:
        """The clientIds in the socket table now (a closed duplicate removes its id: pitfall 5)."""
        return list(self.hub.sockets)

    async def drop_websockets(self) -> None:
        """Abort every /ws connection (no close frame) while HTTP keeps working: a network blip."""
        for socket in list(self.hub.sockets.values()):
            if isinstance(socket.transport, asyncio.Transport):
                socket.transport.abort()

    def clear_cache(self) -> None:
        self.engine.cache.clear()

    # ---- /ws ------------------------------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()  # no heartbeat: the real server sends no pings, it only answers them
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        socket = Socket(sid, ws, transport=request.transport)
        hub, engine = self.hub, self.engine
        hub.register(socket)
        hub.send_to_socket(socket, "status", {**engine.status_data(), "sid": sid})
        if engine.running is not None and engine.running.client_id == sid and engine.last_node is not None:
            hub.send_to_socket(socket, "executing", {"node": engine.last_node})  # no prompt_id (pitfall 5)
        first = True
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and first:
                    self._feature_flags(socket, message.data)
                first = False
        finally:
            hub.unregister(sid)
        return ws

    def _feature_flags(self, socket: Socket, text: str) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = json.loads(text)
            if message.get("type") == "feature_flags":
                socket.supports_preview_metadata = bool((message.get("data") or {}).get("supports_preview_metadata"))
                self.hub.send_to_socket(socket, "feature_flags", dict(FEATURES))
