"""The /ws socket table and the one publisher task that sends every message, in order, like ComfyUI's.

Routing (COMFYUI.md §1.3, client_filtering.json): a message has a target sid or None (broadcast to every
socket in the table). The table holds ONE socket per clientId: a newer socket replaces an older one, and
closing ANY socket removes its clientId's entry (ws_duplicate_clientid.json: the newer socket then receives
nothing at all, pitfall 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.comfyui.behaviour import Behaviour


@dataclass
class Socket:
    sid: str
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None = None
    supports_preview_metadata: bool = False


@dataclass
class Hub:
    behaviour: Behaviour
    sockets: dict[str, Socket] = field(default_factory=dict)
    sent: list[tuple[str | None, str]] = field(default_factory=list)  # (target sid or None, type or "binary:N")
    _outbox: asyncio.Queue[tuple[str | None, str | bytes, Socket | None]] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._outbox = asyncio.Queue()
        self._task = asyncio.create_task(self._publish(), name="fake-comfyui-ws-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def register(self, socket: Socket) -> None:
        self.sockets[socket.sid] = socket

    def unregister(self, sid: str) -> None:
        self.sockets.pop(sid, None)  # whichever socket closed: the real server's cleanup does the same

    def supports_metadata(self, sid: str | None) -> bool:
        socket = self.sockets.get(sid) if sid is not None else None
        return socket is not None and socket.supports_preview_metadata

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Queue a JSON message for one client (sid) or every socket (None)."""
        self._outbox.put_nowait((sid, json.dumps({"type": event, "data": data}), None))

    def send_binary(self, frame: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((sid, frame, None))

    def send_to_socket(self, socket: Socket, event: str, data: dict[str, Any]) -> None:
        """A message for one socket object, whether or not it is (still) in the table (connect-time messages)."""
        self._outbox.put_nowait((socket.sid, json.dumps({"type": event, "data": data}), socket))

    async def drain(self) -> None:
        """Return once everything queued so far has been written to the sockets."""
        await self._outbox.join()

    async def _publish(self) -> None:
        while True:
            sid, payload, direct = await self._outbox.get()
            try:
                if not self.behaviour.silent_ws:
                    await self._deliver(sid, payload, direct)
            finally:
                self._outbox.task_done()

    async def _deliver(self, sid: str | None, payload: str | bytes, direct: Socket | None) -> None:
        if direct is not None:
            targets = [direct]
        elif sid is None:
            targets = list(self.sockets.values())
        else:
            targets = [self.sockets[sid]] if sid in self.sockets else []
        label = f"binary:{int.from_bytes(payload[:4], 'big')}" if isinstance(payload, bytes) else \
            str(json.loads(payload)["type"])
        self.sent.append((sid, label))
        for socket in targets:
            await _write(socket.ws, payload)


async def _write(ws: web.WebSocketResponse, payload: str | bytes) -> None:
    if ws.closed:
        return
    with contextlib.suppress(ConnectionError, RuntimeError):
        if isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload)
