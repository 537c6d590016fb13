"""One prompt's state, from the WebSocket messages routed to it: progress 0-100, the node that
runs, its outputs, and how it ended. Pure: no I/O, time given by the caller.

Progress counts nodes: cached and finished ones are done, a running node counts by its
``value/max`` (``progress`` ticks, or ``progress_state``'s cumulative snapshot), over all the
workflow's nodes; it never goes back and stays below 100 until the prompt ends. The message names
the node: ``"KSampler 12/30"`` while a node ticks, ``"Invert Image (node 2/3)"`` otherwise.

The end is ``executing {node: null}`` (sent after history is written, COMFYUI.md pitfall 2), never
"every node was seen executing": cached nodes send no ``executing`` (pitfall 3), and
``progress.value`` may stop at ``max - 1`` (pitfall 9).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.comfyui.payload import ComfyJobSpec

MAX_EXECUTED = 1000  # `executed` messages kept per prompt (one per output node)


@dataclass(frozen=True)
class Snapshot:
    """What to hand to ``ctx.progress``."""

    percent: float
    message: str
    step: int | None = None
    total_steps: int | None = None
    eta_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class PromptTracker:
    """Feed it the prompt's messages (``feed``); read ``snapshot()``, ``done`` and the outcome."""

    def __init__(self, spec: ComfyJobSpec) -> None:
        self.spec = spec
        self.total = max(1, len(spec.workflow))
        self.cached: set[str] = set()
        self.finished: set[str] = set()
        self.ticks: dict[str, tuple[float, float]] = {}  # node -> (value, max)
        self.current: str | None = None
        self.executed: dict[str, dict[str, Any]] = {}  # node -> its `executed` output
        self.started = False
        self.succeeded = False
        self.done = False  # executing {node: null}
        self.error: dict[str, Any] | None = None
        self.interrupted: dict[str, Any] | None = None
        self._best = 0.0
        self._tick_started: dict[str, tuple[float, float]] = {}  # node -> (time, value) of its first tick

    # -- input ----------------------------------------------------------------------------------

    def feed(self, kind: str, data: Mapping[str, Any], now: float = 0.0) -> bool:
        """Take one message meant for this prompt; True when progress may have changed."""
        handler = _HANDLERS.get(kind)
        if handler is None:
            return False  # status, feature_flags, custom nodes' own types: not ours to read
        return handler(self, data, now)

    def _on_start(self, data: Mapping[str, Any], now: float) -> bool:
        self.started = True
        return True

    def _on_cached(self, data: Mapping[str, Any], now: float) -> bool:
        nodes = data.get("nodes")
        if isinstance(nodes, list):
            self.cached.update(str(n) for n in nodes[: self.total + 100])
        self.started = True
        return True

    def _on_executing(self, data: Mapping[str, Any], now: float) -> bool:
        node = data.get("node")
        if node is None:
            self.done = True
            return True
        if self.current is not None and self.current != str(node):
            self.finished.add(self.current)  # the previous node ended when the next one began
        self.current = str(node)
        self.started = True
        return True

    def _on_progress(self, data: Mapping[str, Any], now: float) -> bool:
        node, value, top = data.get("node"), _number(data.get("value")), _number(data.get("max"))
        if node is None or value is None or top is None or top <= 0:
            return False
        node = str(node)
        self._tick_started.setdefault(node, (now, value))
        self.ticks[node] = (min(value, top), top)
        self.current = node
        return True

    def _on_progress_state(self, data: Mapping[str, Any], now: float) -> bool:
        nodes = data.get("nodes")
        if not isinstance(nodes, Mapping):
            return False
        for key, entry in list(nodes.items())[: self.total + 100]:
            if not isinstance(entry, Mapping):
                continue
            node = str(entry.get("display_node_id") or entry.get("node_id") or key)
            value, top = _number(entry.get("value")), _number(entry.get("max"))
            if entry.get("state") == "finished":
                self.finished.add(node)
            elif entry.get("state") == "running":
                if value is not None and top is not None and top > 0:
                    self.ticks[node] = (min(value, top), top)
                self.current = node
        return True

    def _on_executed(self, data: Mapping[str, Any], now: float) -> bool:
        node, output = data.get("node"), data.get("output")
        if node is not None and isinstance(output, Mapping) and len(self.executed) < MAX_EXECUTED:
            self.executed[str(node)] = dict(output)
        return False

    def _on_success(self, data: Mapping[str, Any], now: float) -> bool:
        self.succeeded = True
        return False

    def _on_error(self, data: Mapping[str, Any], now: float) -> bool:
        self.error = dict(data)
        return False

    def _on_interrupted(self, data: Mapping[str, Any], now: float) -> bool:
        self.interrupted = dict(data)
        return False

    # -- output ---------------------------------------------------------------------------------

    def percent(self) -> float:
        done = self.cached | self.finished
        units = float(len(done & set(self.spec.workflow)) or len(done))
        for node, (value, top) in self.ticks.items():
            if node not in done:
                units += value / top
        raw = 100.0 * units / self.total
        self._best = max(self._best, min(99.0, raw))
        return self._best

    def snapshot(self, now: float = 0.0) -> Snapshot:
        percent = self.percent()
        node = self.current
        if node is None:
            return Snapshot(percent, "cached" if self.cached else ("running" if self.started else "queued"))
        title = self.spec.title_of(node)
        data = {"node": node, "class_type": self.spec.class_of(node)[:100]}
        tick = self.ticks.get(node)
        if tick is not None and tick[1] > 1 and node not in self.finished:
            value, top = int(tick[0]), int(tick[1])
            return Snapshot(percent, f"{title} {value}/{top}", value, top, self._eta(node, now), data)
        position = min(self.total, len((self.cached | self.finished) - {node}) + 1)
        return Snapshot(percent, f"{title} (node {position}/{self.total})", data=data)

    def _eta(self, node: str, now: float) -> float | None:
        """Seconds left in the ticking node, from its tick rate so far."""
        first = self._tick_started.get(node)
        tick = self.ticks.get(node)
        if first is None or tick is None or now <= first[0]:
            return None
        done = tick[0] - first[1]
        if done <= 0:
            return None
        return round((tick[1] - tick[0]) * (now - first[0]) / done, 1)


_HANDLERS = {
    "execution_start": PromptTracker._on_start,
    "execution_cached": PromptTracker._on_cached,
    "executing": PromptTracker._on_executing,
    "progress": PromptTracker._on_progress,
    "progress_state": PromptTracker._on_progress_state,
    "executed": PromptTracker._on_executed,
    "execution_success": PromptTracker._on_success,
    "execution_error": PromptTracker._on_error,
    "execution_interrupted": PromptTracker._on_interrupted,
}
