"""The prompt queue, the one worker that executes it, the interrupt flag and the in-memory history.

End of a prompt (history_race.json, pitfall 2): the final event (execution_success / _error / _interrupted)
is sent, THEN the history entry is written (after Behaviour.history_delay_s), then `status` with the lower
queue_remaining, then `executing {node: null}`. status messages are broadcast on put, on get (same count),
on completion and on queue delete/clear (interrupt.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.comfyui.behaviour import Behaviour
from tests.fakes.comfyui.execution import Hold, PromptRun, QueueItem, now_ms
from tests.fakes.comfyui.files import Files
from tests.fakes.comfyui.hub import Hub
from tests.fakes.comfyui.nodes import NodeSpec

MAX_HISTORY = 10_000


@dataclass
class Engine:
    behaviour: Behaviour
    hub: Hub
    files: Files
    specs: dict[str, NodeSpec]
    pending: list[tuple[float, int, QueueItem]] = field(default_factory=list)
    running: QueueItem | None = None
    history: dict[str, dict[str, Any]] = field(default_factory=dict)
    counter: int = 0
    seq: int = 0
    interrupted: bool = False
    last_node: str | None = None
    cache: dict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = field(default_factory=dict)
    holds: list[Hold] = field(default_factory=list)
    empty_reads: dict[str, int] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._loop(), name="fake-comfyui-executor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ---- queue ------------------------------------------------------------------------------------------------
    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running is not None else 0)

    def status_data(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def broadcast_status(self) -> None:
        self.hub.send("status", self.status_data(), None)

    def next_number(self, body: dict[str, Any]) -> float:
        """A server counter (restarting at 0), or the body's `number`; `front` queues it as -counter."""
        number: float = self.counter
        if "number" in body:
            number = float(body["number"])
        elif body.get("front"):
            number = -self.counter
        self.counter += 1
        return number

    def put(self, item: QueueItem) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (item.number, self.seq, item))
        self._idle.clear()
        self.broadcast_status()
        self._wake.set()

    def pending_items(self) -> list[QueueItem]:
        return [entry[2] for entry in sorted(self.pending)]

    def delete(self, prompt_ids: list[str]) -> None:
        """POST /queue {delete}: pending prompts only; a running prompt stays."""
        for prompt_id in prompt_ids:
            kept = [entry for entry in self.pending if entry[2].prompt_id != prompt_id]
            if len(kept) != len(self.pending):
                self.pending = kept
                heapq.heapify(self.pending)
                self.broadcast_status()
                self.broadcast_status()  # interrupt.json records two status messages per deleted prompt

    def clear(self) -> None:
        self.pending = []
        self.broadcast_status()

    def interrupt(self, prompt_id: str | None) -> bool:
        """Global (prompt_id None) or targeted: a targeted one only hits the prompt running right now."""
        if prompt_id is not None and (self.running is None or self.running.prompt_id != prompt_id):
            return False
        self.interrupted = True
        return True

    # ---- history ----------------------------------------------------------------------------------------------
    def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        entry = self.history.get(prompt_id)
        if entry is not None and self.empty_reads.get(prompt_id, 0) > 0:
            self.empty_reads[prompt_id] -= 1
            return None
        return entry

    def _write_history(self, run: PromptRun, final: tuple[str, dict[str, Any]], messages: list[Any]) -> None:
        success = final[0] == "execution_success"
        outputs = run.outputs if success else {}
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs}
        self.history.pop(run.pid, None)  # a duplicate prompt_id overwrites the earlier entry
        self.history[run.pid] = {
            "prompt": run.item.wire(), "outputs": outputs,
            "status": {"status_str": "success" if success else "error", "completed": success,
                       "messages": [*messages, list(final)]},
            "meta": meta}
        while len(self.history) > MAX_HISTORY:
            del self.history[next(iter(self.history))]
        self.empty_reads[run.pid] = self.behaviour.history_empty_reads

    # ---- execution --------------------------------------------------------------------------------------------
    async def wait_idle(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                if self.behaviour.pickup_delay_s:
                    await asyncio.sleep(self.behaviour.pickup_delay_s)
                continue
            _, _, item = heapq.heappop(self.pending)
            self.running = item
            self.interrupted = False  # the flag is reset when a prompt starts
            self.broadcast_status()
            try:
                await self._execute(item)
            finally:
                self.running = None
                self.last_node = None

    def _on_node(self, node_id: str) -> None:
        self.last_node = node_id

    async def _execute(self, item: QueueItem) -> None:
        run = PromptRun(item, self.specs, self.behaviour, self.hub, self.files, self.cache,
                        lambda: self.interrupted, self.holds, self._on_node)
        start = {"prompt_id": item.prompt_id, "timestamp": now_ms()}
        run.to_client("execution_start", start)
        if self.behaviour.start_delay_s:
            await asyncio.sleep(self.behaviour.start_delay_s)
        self._prune_cache(run)
        cached_msg = {"nodes": [n for n in item.graph if run.cached(n)], "prompt_id": item.prompt_id,
                      "timestamp": now_ms()}
        run.to_client("execution_cached", cached_msg)
        final = await run.run()
        event, data = final
        if event == "execution_interrupted":
            self.hub.send(event, data, item.client_id)  # broadcast when there is no client_id
        else:
            run.to_client(event, data)
        if self.behaviour.history_delay_s:
            await asyncio.sleep(self.behaviour.history_delay_s)
        self._write_history(run, final, [["execution_start", start], ["execution_cached", cached_msg]])
        self.running = None
        self.broadcast_status()
        self.last_node = None
        run.to_client("executing", {"node": None, "prompt_id": item.prompt_id})

    def _prune_cache(self, run: PromptRun) -> None:
        """Like the classic cache: only outputs of nodes in the prompt now starting are kept."""
        keep = {run.signature(node_id) for node_id in run.item.graph}
        for key in [k for k in self.cache if k not in keep]:
            del self.cache[key]
