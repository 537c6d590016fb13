"""Running one prompt: the plan (what is cached, what runs, in which order) and the messages of each node.

Per node that runs (success_trace.json): progress_state(running), executing, [TEXT frame], per tick
[progress_state, (format-4 preview), progress, (format-1 preview)], [executed], progress_state(finished).
A cached output node only replays `executed` and a finished progress_state with int 1/1 (cached_rerun.json);
cached non-output nodes send nothing. Interrupts are checked after `executing` and at each tick (pitfall 7).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.comfyui import media
from tests.fakes.comfyui.behaviour import Behaviour, Failure
from tests.fakes.comfyui.files import Files
from tests.fakes.comfyui.hub import Hub
from tests.fakes.comfyui.nodes import NodeFailure, NodeResult, NodeSpec

TRACEBACK = ['  File "/opt/ComfyUI/execution.py", line 496, in execute\n',
             '  File "/opt/ComfyUI/execution.py", line 315, in get_output_data\n']


def now_ms() -> int:
    return int(time.time() * 1000)


class Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


@dataclass
class Hold:
    """A node that waits, after its `executing` was sent, until the test releases it (FakeComfyUI.hold)."""

    node_id: str
    prompt_id: str | None = None
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()

    async def wait_reached(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self.reached.wait(), timeout_s)


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    graph: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    seq: int

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return None if value is None else str(value)

    def wire(self) -> list[Any]:
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs]


@dataclass
class NodeContextImpl:
    node_id: str
    graph: dict[str, Any]
    extra_data: dict[str, Any]
    sampler_previews: bool
    files: Files
    behaviour: Behaviour

    def save(self, folder: str, prefix: str, ext: str, data: bytes, *, trailing: str = "_") -> dict[str, Any]:
        return dict(self.files.save_numbered(folder, prefix, ext, data, trailing))

    def read_input(self, name: str) -> bytes | None:
        subfolder, _, filename = name.rpartition("/")
        return self.files.get("input", subfolder, filename)

    def input_names(self) -> list[str]:
        return self.files.names("input")

    def checkpoints(self) -> list[str]:
        return list(self.behaviour.models.get("checkpoints", []))


class Progress:
    """The cumulative progress_state snapshot; sent to the client, or broadcast when there is none."""

    def __init__(self, hub: Hub, prompt_id: str, client_id: str | None) -> None:
        self.hub, self.prompt_id, self.client_id = hub, prompt_id, client_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str, value: float, maximum: float) -> dict[str, Any]:
        return {"value": value, "max": maximum, "state": "running", "node_id": node_id, "prompt_id": self.prompt_id,
                "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}

    def _send(self) -> None:
        self.hub.send("progress_state", {"prompt_id": self.prompt_id, "nodes": copy.deepcopy(self.nodes)},
                      self.client_id)

    def start(self, node_id: str) -> None:
        self.nodes[node_id] = self._entry(node_id, 0.0, 1.0)
        self._send()

    def tick(self, node_id: str, value: int, maximum: int) -> None:
        self.nodes[node_id].update(value=value, max=maximum)
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self.nodes.setdefault(node_id, self._entry(node_id, 1, 1))
        entry.update(state="finished", value=entry["max"])
        self._send()


@dataclass
class PromptRun:
    item: QueueItem
    specs: dict[str, NodeSpec]
    behaviour: Behaviour
    hub: Hub
    files: Files
    cache: dict[str, tuple[tuple[Any, ...], dict[str, Any] | None]]
    engine_interrupted: Callable[[], bool]  # the server-wide interrupt flag
    holds: list[Hold]
    on_node: Callable[[str], None]  # told the node now executing (a reconnecting socket gets executing{node})
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    signatures: dict[str, str] = field(default_factory=dict)
    current: str = ""
    progress: Progress = field(init=False)

    @property
    def pid(self) -> str:
        return self.item.prompt_id

    @property
    def cid(self) -> str | None:
        return self.item.client_id

    def class_of(self, node_id: str) -> str:
        return str(self.item.graph[node_id]["class_type"])

    def to_client(self, event: str, data: dict[str, Any]) -> None:
        if self.cid is not None:
            self.hub.send(event, data, self.cid)

    # ---- the plan -------------------------------------------------------------------------------------------
    def links(self, node_id: str) -> list[tuple[str, list[Any]]]:
        inputs = self.item.graph[node_id].get("inputs") or {}
        return [(name, v) for name, v in inputs.items()
                if isinstance(v, list) and len(v) == 2 and str(v[0]) in self.item.graph]

    def signature(self, node_id: str, visiting: frozenset[str] = frozenset()) -> str:
        if node_id in self.signatures:
            return self.signatures[node_id]
        node = self.item.graph[node_id]
        spec = self.specs[node["class_type"]]
        parts: list[Any] = [node["class_type"]]
        for name, value in sorted((node.get("inputs") or {}).items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in self.item.graph:
                source = str(value[0])
                parts.append([name, "cycle" if source in visiting else self.signature(source, visiting | {node_id}),
                              value[1]])
            else:
                parts.append([name, value])
            if name in spec.custom_inputs:  # like IS_CHANGED: a re-uploaded file is a new input
                data = self.context(node_id).read_input(str(value)) or b""
                parts.append(hashlib.sha256(data).hexdigest())
        self.signatures[node_id] = json.dumps(parts, sort_keys=True, default=str)
        return self.signatures[node_id]

    def cached(self, node_id: str) -> bool:
        return self.behaviour.cache and self.signature(node_id) in self.cache

    def make_plan(self) -> tuple[list[str], set[str]]:
        """(nodes to run or replay in order, the replayed cached output nodes)."""
        needed: list[str] = []
        replay: set[str] = set()

        def visit(node_id: str, is_output: bool) -> None:
            if node_id in needed:
                return
            if self.cached(node_id):
                self.values[node_id] = self.cache[self.signature(node_id)][0]
                if is_output:
                    needed.append(node_id)
                    replay.add(node_id)
                return
            needed.append(node_id)
            for _, link in self.links(node_id):
                visit(str(link[0]), False)

        for output in self.item.outputs:
            visit(output, True)
        return self.order([n for n in self.item.graph if n in needed], replay), replay

    def order(self, nodes: list[str], replay: set[str]) -> list[str]:
        """Topological order, preferring output nodes, then nodes one or two links before an output."""
        pending, order = list(nodes), []
        done: set[str] = set()
        deps = {n: {str(v[0]) for _, v in self.links(n)} & set(nodes) if n not in replay else set() for n in nodes}
        feeds = {n: [m for m in nodes if n in deps[m]] for n in nodes}
        is_output = {n: self.specs[self.class_of(n)].output_node for n in nodes}
        while pending:
            ready = [n for n in pending if deps[n] <= done] or pending[:1]
            pick = next((n for n in ready if is_output[n]), None) \
                or next((n for n in ready if any(is_output[m] for m in feeds[n])), None) \
                or next((n for n in ready if any(is_output[k] for m in feeds[n] for k in feeds[m])), ready[0])
            order.append(pick)
            done.add(pick)
            pending.remove(pick)
        return order

    # ---- running nodes ----------------------------------------------------------------------------------------
    def context(self, node_id: str) -> NodeContextImpl:
        return NodeContextImpl(node_id, self.item.graph, self.item.extra_data, self.behaviour.sampler_previews,
                               self.files, self.behaviour)

    def inputs_of(self, node_id: str) -> dict[str, Any]:
        spec = self.specs[self.class_of(node_id)]
        resolved: dict[str, Any] = {}
        for name, value in (self.item.graph[node_id].get("inputs") or {}).items():
            kind = (spec.required.get(name) or spec.optional.get(name) or ["*"])[0]
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in self.values:
                source = self.values[str(value[0])]
                resolved[name] = source[value[1]] if isinstance(value[1], int) and value[1] < len(source) else None
            elif kind == "INT":
                resolved[name] = int(value)
            elif kind == "FLOAT":
                resolved[name] = float(value)
            else:
                resolved[name] = value
        return resolved

    def replay(self, node_id: str) -> None:
        outputs, ui = self.cache[self.signature(node_id)]
        self.values[node_id] = outputs
        if ui is not None:
            self.outputs[node_id] = ui
            self.to_client("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": self.pid})
        self.progress.finish(node_id)

    async def run_node(self, node_id: str) -> None:
        class_type = self.class_of(node_id)
        self.current = node_id
        self.progress.start(node_id)
        self.on_node(node_id)
        self.to_client("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.pid})
        if self.engine_interrupted():
            raise Interrupted(node_id)
        for hold in [h for h in self.holds if h.node_id == node_id and h.prompt_id in (None, self.pid)]:
            hold.reached.set()
            await hold.released.wait()
        failure = self.behaviour.fail if self.behaviour.fail and self.behaviour.fail.matches(node_id, class_type) \
            else None
        if failure is not None and failure.at_tick is None:
            raise NodeFailure(failure.exception_type, failure.exception_message)
        spec = self.specs[class_type]
        inputs = self.inputs_of(node_id)
        result = spec.run(self.context(node_id), inputs) if spec.run else NodeResult((None,) * len(spec.outputs))
        if result.text is not None:
            self.hub.send_binary(media.text_frame(node_id, result.text), None)  # broadcast, no prompt_id
        await self.ticks(node_id, result, failure)
        if delay := self.behaviour.node_delay(class_type):
            await asyncio.sleep(delay)
        self.values[node_id] = result.outputs
        self.executed.append(node_id)
        if result.ui is not None:
            self.outputs[node_id] = result.ui
            self.to_client("executed", {"node": node_id, "display_node": node_id, "output": result.ui,
                                        "prompt_id": self.pid})
        self.cache[self.signature(node_id)] = (result.outputs, result.ui)
        self.progress.finish(node_id)

    async def ticks(self, node_id: str, result: NodeResult, failure: Failure | None) -> None:
        for index in range(result.ticks):
            await asyncio.sleep(self.behaviour.step_delay_s)
            if self.engine_interrupted():
                raise Interrupted(node_id)
            if failure is not None and failure.at_tick == index:
                raise NodeFailure(failure.exception_type, failure.exception_message)
            value = result.first_tick + index
            self.tick_messages(node_id, value, result)
        if failure is not None and failure.at_tick is not None:
            raise NodeFailure(failure.exception_type, failure.exception_message)

    def tick_messages(self, node_id: str, value: int, result: NodeResult) -> None:
        self.progress.tick(node_id, value, result.ticks)
        image = result.tick_images[value - result.first_tick] if result.tick_images else None
        metadata = image is not None and self.hub.supports_metadata(self.cid)
        if image is not None and metadata:
            self.hub.send_binary(media.preview_metadata_frame(image, {
                "node_id": node_id, "prompt_id": self.pid, "display_node_id": node_id, "parent_node_id": None,
                "real_node_id": node_id, "image_type": "image/png"}), self.cid)
        self.hub.send("progress", {"value": value, "max": result.ticks, "prompt_id": self.pid, "node": node_id},
                      self.cid)
        if image is not None and not metadata:
            self.hub.send_binary(media.preview_frame(image), self.cid)

    async def run(self) -> tuple[str, dict[str, Any]]:
        """Execute; returns the final (event, data): execution_success, execution_error or execution_interrupted."""
        self.progress = Progress(self.hub, self.pid, self.cid)
        replay: set[str] = set()
        try:
            self.plan, replay = self.make_plan()
            for node_id in self.plan:
                if node_id in replay:
                    self.replay(node_id)
                else:
                    await self.run_node(node_id)
        except Interrupted as exc:
            return "execution_interrupted", {"prompt_id": self.pid, "node_id": exc.node_id,
                                             "node_type": self.class_of(exc.node_id),
                                             "executed": self.executed[::-1], "timestamp": now_ms()}
        except NodeFailure as exc:
            return "execution_error", self.error_data(exc)
        return "execution_success", {"prompt_id": self.pid, "timestamp": now_ms()}

    def error_data(self, exc: NodeFailure) -> dict[str, Any]:
        node_id = self.current
        current: dict[str, list[Any]] = {}
        for name, value in (self.item.graph.get(node_id, {}).get("inputs") or {}).items():
            current[name] = [f"<output {value[1]} of node {value[0]}>" if isinstance(value, list) else value]
        return {"prompt_id": self.pid, "node_id": node_id, "node_type": self.class_of(node_id) if node_id else "",
                "executed": self.executed[::-1], "exception_message": exc.message,
                "exception_type": exc.exception_type, "traceback": list(TRACEBACK), "current_inputs": current,
                "current_outputs": list(self.plan), "timestamp": now_ms()}
