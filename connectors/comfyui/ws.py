"""ComfyUI's ``/ws?clientId=`` socket: one connection per connector, messages routed by prompt_id.

* Each connection uses a **fresh clientId** (COMFYUI.md pitfall 5: an old socket closing after a
  new one registered under the same id silently unregisters the new one). A prompt submitted under
  an earlier clientId gets no more messages after a reconnect: its subscriber is told
  (``RECONNECTED``) and reconciles through /queue and /history.
* JSON messages go to the subscriber of their ``data.prompt_id``; messages for a prompt nobody
  subscribed to yet are buffered (bounded) and replayed on ``subscribe`` (pitfall 1).
* Binary frames (``parse_binary``): type 4 carries its prompt_id; type 1 has none and goes to the
  prompt this socket sees running; type 3 (TEXT) is broadcast by the server to every socket with only
  a node id (pitfall 4), so it goes to our running prompt only when that prompt is executing that
  very node, and is dropped otherwise.
* The connection ends without a close frame when ComfyUI dies (pitfall 6): subscribers get
  ``DISCONNECTED`` at once, and the socket reconnects with backoff until ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import struct
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

log = logging.getLogger("emp.comfyui.ws")
# websockets logs the handshake's headers (the Authorization header with them) at DEBUG: its own
# logger for our connections never goes below INFO, whatever the root level
_protocol_log = logging.getLogger("emp.comfyui.ws.protocol")
_protocol_log.setLevel(logging.INFO)

DISCONNECTED = "_disconnected"
RECONNECTED = "_reconnected"
BINARY = "_binary"
BUFFER_PROMPTS = 64
BUFFER_MESSAGES = 2000
BUFFER_TTL_S = 120.0
MAX_BACKOFF_S = 5.0

EVENT_NAMES = {1: "PREVIEW_IMAGE", 2: "UNENCODED_PREVIEW_IMAGE", 3: "TEXT", 4: "PREVIEW_IMAGE_WITH_METADATA"}
_IMAGE_FORMATS = {1: "image/jpeg", 2: "image/png"}


# -- binary frames (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryFrame:
    """One decoded binary frame; ``image`` for previews, ``text`` for TEXT frames."""

    event: int
    image: bytes = b""
    image_type: str = ""
    node_id: str | None = None
    prompt_id: str | None = None
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return EVENT_NAMES.get(self.event, f"UNKNOWN_{self.event}")


def parse_binary(frame: bytes) -> BinaryFrame | None:
    """Decode a binary frame (``[u32 BE event type][...]``); None when it is malformed or unknown."""
    if len(frame) < 8:
        return None
    event, word = struct.unpack_from(">II", frame, 0)
    if event == 1:
        return BinaryFrame(1, image=frame[8:], image_type=_IMAGE_FORMATS.get(word, "application/octet-stream"))
    if event == 3:
        end = 8 + word
        if word > 256 or end > len(frame):
            return None
        node_id, text = frame[8:end].decode("utf-8", "replace"), frame[end:].decode("utf-8", "replace")
        return BinaryFrame(3, node_id=node_id, text=text)
    if event == 4:
        end = 8 + word
        if word > 64 * 1024 or end > len(frame):
            return None
        try:
            meta = json.loads(frame[8:end])
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        node, prompt = meta.get("node_id"), meta.get("prompt_id")
        return BinaryFrame(4, image=frame[end:], image_type=str(meta.get("image_type") or "image/png"),
                           node_id=str(node) if node is not None else None,
                           prompt_id=str(prompt) if prompt is not None else None, metadata=meta)
    return None


# -- routing (pure state) ---------------------------------------------------------------------------


Event = tuple[str, Any]  # (message type, data) | (BINARY, BinaryFrame) | (DISCONNECTED/RECONNECTED, None)


class Router:
    """Which subscriber gets a message. Knows the prompt this socket sees running and its node."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[Event]] = {}
        self.buffered: OrderedDict[str, tuple[float, deque[Event]]] = OrderedDict()
        self.running_prompt: str | None = None
        self.running_node: str | None = None

    def subscribe(self, prompt_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.queues[prompt_id] = queue
        _, early = self.buffered.pop(prompt_id, (0.0, deque()))
        for event in early:
            queue.put_nowait(event)
        return queue

    def unsubscribe(self, prompt_id: str) -> None:
        self.queues.pop(prompt_id, None)
        if self.running_prompt == prompt_id:
            self.running_prompt = self.running_node = None

    def broadcast(self, kind: str) -> None:
        for queue in self.queues.values():
            queue.put_nowait((kind, None))

    def text(self, raw: str, now: float) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        kind, data = str(message.get("type")), message["data"]
        prompt = data.get("prompt_id")
        if not isinstance(prompt, str):
            return  # status broadcasts, reconnect's executing without prompt_id, feature_flags
        self._follow(kind, data, prompt)
        self._deliver(prompt, (kind, data), now)

    def _follow(self, kind: str, data: Mapping[str, Any], prompt: str) -> None:
        if kind == "executing":
            node = data.get("node")
            if node is None:
                if self.running_prompt == prompt:
                    self.running_prompt = self.running_node = None
            else:
                self.running_prompt, self.running_node = prompt, str(node)
        elif kind == "progress" and prompt in self.queues:
            self.running_prompt = prompt
            if data.get("node") is not None:
                self.running_node = str(data["node"])
        elif kind in ("execution_error", "execution_interrupted", "execution_success") and \
                self.running_prompt == prompt:
            self.running_node = None

    def binary(self, raw: bytes, now: float) -> None:
        frame = parse_binary(raw)
        if frame is None:
            return
        if frame.event == 4 and frame.prompt_id:
            self._deliver(frame.prompt_id, (BINARY, frame), now)
            return
        ours = self.running_prompt if self.running_prompt in self.queues else None
        if ours is None:
            return  # a frame we cannot attribute to one of our prompts (pitfall 4): dropped
        if frame.event == 1 or (frame.event == 3 and frame.node_id == self.running_node):
            self._deliver(ours, (BINARY, frame), now)

    def _deliver(self, prompt: str, event: Event, now: float) -> None:
        queue = self.queues.get(prompt)
        if queue is not None:
            queue.put_nowait(event)
            return
        if isinstance(event[1], BinaryFrame):
            return  # previews of a prompt nobody waits for are not worth keeping
        while self.buffered and (len(self.buffered) >= BUFFER_PROMPTS or
                                 now - next(iter(self.buffered.values()))[0] > BUFFER_TTL_S):
            self.buffered.popitem(last=False)
        _, early = self.buffered.setdefault(prompt, (now, deque(maxlen=BUFFER_MESSAGES)))
        early.append(event)


# -- the connection -------------------------------------------------------------------------------


class ComfySocket:
    """Keeps one socket to ComfyUI open (reconnecting with a fresh clientId) and routes its messages."""

    def __init__(self, http_url: str, *, headers: Mapping[str, str] | None = None, open_timeout_s: float = 10.0,
                 max_frame_bytes: int = 128 * 1024 * 1024, preview_metadata: bool = True,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        base = http_url.rstrip("/")
        self._ws_base = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
        self._headers = dict(headers or {})
        self._open_timeout_s = open_timeout_s
        self._max_frame = max_frame_bytes
        self._preview_metadata = preview_metadata
        self._ssl_context = ssl_context  # for wss:// (None: the system's CAs, verified)
        self.router = Router()
        self.client_id = ""
        self.connected = asyncio.Event()
        self.connections = 0  # how many times it connected (each one a new clientId)
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="comfyui-ws")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        self.connected.clear()

    async def wait_connected(self, timeout_s: float) -> bool:
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        return self.connected.is_set()

    def subscribe(self, prompt_id: str) -> asyncio.Queue[Event]:
        return self.router.subscribe(prompt_id)

    def unsubscribe(self, prompt_id: str) -> None:
        self.router.unsubscribe(prompt_id)

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._connect_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except (OSError, WebSocketException, TimeoutError, ValueError) as exc:
                self.last_error = f"{type(exc).__name__}: {_status_of(exc) or str(exc)[:200]}"
                log.debug("ComfyUI socket %s: %s", self._ws_base, self.last_error)
            if self.connected.is_set():
                self.connected.clear()
            failures += 1
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.1 * 2 ** min(failures, 6)))  # reconnect backoff

    async def _connect_once(self) -> None:
        client_id = uuid.uuid4().hex
        url = f"{self._ws_base}/ws?clientId={client_id}"
        ssl_arg = self._ssl_context if url.startswith("wss") else None
        async with connect(url, additional_headers=self._headers, open_timeout=self._open_timeout_s,
                           max_size=self._max_frame, proxy=None, compression=None, ssl=ssl_arg,
                           user_agent_header="emp-worker", logger=_protocol_log) as conn:
            if self._preview_metadata:
                await conn.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            await self._await_status(conn)
            self.client_id = client_id
            self.connections += 1
            self.connected.set()
            if self.connections > 1:
                self.router.broadcast(RECONNECTED)
            try:
                await self._read(conn)
            finally:
                self.connected.clear()
                self.router.broadcast(DISCONNECTED)

    async def _await_status(self, conn: ClientConnection) -> None:
        """The server's first frame is a status; until it came the clientId is not registered."""
        deadline = time.monotonic() + self._open_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("ComfyUI sent no status on the new socket")
            raw = await asyncio.wait_for(conn.recv(), left)
            if isinstance(raw, str) and '"status"' in raw:
                self.router.text(raw, time.monotonic())
                return

    async def _read(self, conn: ClientConnection) -> None:
        async for raw in conn:
            now = time.monotonic()
            if isinstance(raw, bytes):
                self.router.binary(raw, now)
            else:
                self.router.text(raw, now)


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    return ""
