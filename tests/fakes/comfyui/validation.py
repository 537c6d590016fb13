"""POST /prompt validation with 0.3.64's error types and messages (pinned against invalid_prompt.json).

`validate(graph, ...)` raises `Rejected(body)` for a 400, or returns the output node ids to run plus the
node_errors of outputs that failed (a 200 with non-empty node_errors: pitfall 10).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.comfyui.nodes import NodeContext, NodeSpec

TRACEBACK = ['  File "/opt/ComfyUI/execution.py", line 808, in validate_inputs\n']


class Rejected(Exception):
    """The 400 body of a refused prompt."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["type"])
        self.body = body


class _MissingLink(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


def error_body(kind: str, message: str, details: str = "", node_errors: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {}}


def check_prompt_id(prompt_id: Any, require_uuid: bool) -> None:
    """Newer servers (§1.6) accept only a canonical lowercase UUID; 0.3.64 accepts any string."""
    if not require_uuid:
        return
    try:
        canonical = str(uuid.UUID(str(prompt_id)))
    except ValueError:
        canonical = ""
    if canonical != prompt_id:
        raise Rejected(error_body("invalid_prompt_id", "Invalid prompt_id", f"prompt_id must be a UUID: {prompt_id}"))


@dataclass
class _Validator:
    graph: dict[str, Any]
    specs: dict[str, NodeSpec]
    ctx: NodeContext
    results: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def spec(self, node_id: str) -> NodeSpec:
        return self.specs[self.graph[node_id]["class_type"]]

    def add(self, node_id: str, kind: str, message: str, details: str, extra: dict[str, Any]) -> None:
        self.errors.setdefault(node_id, []).append(
            {"type": kind, "message": message, "details": details, "extra_info": extra})

    def node(self, node_id: str) -> bool:
        """Validate one node and (through its links) its ancestors; errors are kept per node id."""
        if node_id in self.results:
            return self.results[node_id]
        spec = self.spec(node_id)
        dynamic = spec.choices(self.ctx) if spec.choices else {}
        inputs = self.graph[node_id].get("inputs") or {}
        valid = True
        for name, config in spec.required.items():
            # errors echo the config as [type, options], options {} when the definition has none
            config = [dynamic.get(name, config[0]), config[1] if len(config) > 1 else {}]
            if name not in inputs:
                self.add(node_id, "required_input_missing", "Required input is missing", name, {"input_name": name})
                valid = False
            elif isinstance(inputs[name], list):
                valid = self.link(node_id, name, config, inputs[name]) and valid
            else:
                valid = self.literal(node_id, spec, name, config, inputs[name]) and valid
        self.results[node_id] = valid
        return valid

    def link(self, node_id: str, name: str, config: list[Any], value: list[Any]) -> bool:
        if len(value) != 2:
            self.add(node_id, "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                     name, {"input_name": name, "input_config": config, "received_value": value})
            return False
        source, slot = str(value[0]), value[1]
        if source not in self.graph:
            raise _MissingLink(source)
        outputs = self.spec(source).outputs
        received = outputs[slot] if isinstance(slot, int) and 0 <= slot < len(outputs) else "*"
        wanted = config[0]
        if isinstance(wanted, str) and "*" not in (wanted, received) and received != wanted:
            self.add(node_id, "return_type_mismatch", "Return type mismatch between linked nodes",
                     f"{name}, received_type({received}) mismatch input_type({wanted})",
                     {"input_name": name, "input_config": config, "received_type": received, "linked_node": value})
            return False
        try:
            return self.node(source)
        except _MissingLink as exc:
            self.results[source] = False
            self.add(source, "exception_during_inner_validation", "Exception when validating inner node",
                     repr(exc.node_id), {"input_name": name, "input_config": config,
                                         "exception_message": repr(exc.node_id), "exception_type": "KeyError",
                                         "traceback": TRACEBACK, "linked_node": value})
            return False

    def literal(self, node_id: str, spec: NodeSpec, name: str, config: list[Any], value: Any) -> bool:
        kind, options = config[0], (config[1] if len(config) > 1 else {})
        base = {"input_name": name, "input_config": config, "received_value": value}
        if kind in ("INT", "FLOAT"):
            try:
                number = int(value) if kind == "INT" else float(value)
            except (TypeError, ValueError) as exc:
                self.add(node_id, "invalid_input_type", f"Failed to convert an input value to a {kind} value",
                         f"{name}, {value}, {exc}", {**base, "exception_message": str(exc)})
                return False
            if "min" in options and number < options["min"]:
                self.add(node_id, "value_smaller_than_min", f"Value {number} smaller than min of {options['min']}",
                         name, base)
                return False
            if "max" in options and number > options["max"]:
                self.add(node_id, "value_bigger_than_max", f"Value {number} bigger than max of {options['max']}",
                         name, base)
                return False
        if name in spec.custom_inputs and spec.custom_validation is not None:
            problem = spec.custom_validation(self.ctx, name, value)
            if problem is not None:
                self.add(node_id, "custom_validation_failed", "Custom validation failed for node",
                         f"{name} - {problem}", {"input_name": name})
                return False
        elif isinstance(kind, list) and value not in kind:
            self.add(node_id, "value_not_in_list", "Value not in list", f"{name}: '{value}' not in {kind}", base)
            return False
        return True

    def output(self, node_id: str) -> bool:
        try:
            return self.node(node_id)
        except _MissingLink as exc:
            self.add(node_id, "exception_during_validation", "Exception when validating node", repr(exc.node_id),
                     {"exception_type": "KeyError", "traceback": TRACEBACK})
            return False


def _check_classes(graph: dict[str, Any], specs: dict[str, NodeSpec]) -> None:
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise Rejected(error_body("invalid_prompt", "Cannot execute because a node is missing the class_type "
                                      "property.", f"Node ID '#{node_id}'"))
        if node["class_type"] not in specs:
            raise Rejected(error_body("invalid_prompt", f"Cannot execute because node {node['class_type']} does "
                                      "not exist.", f"Node ID '#{node_id}'"))


def _ancestors(graph: dict[str, Any], node_id: str) -> set[str]:
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        current = todo.pop()
        if current in seen or current not in graph:
            continue
        seen.add(current)
        todo.extend(str(v[0]) for v in (graph[current].get("inputs") or {}).values() if isinstance(v, list) and v)
    return seen


def validate(graph: Any, specs: dict[str, NodeSpec], ctx: NodeContext,
             targets: list[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """(output ids to execute, node_errors) or Rejected."""
    if not isinstance(graph, dict):
        raise Rejected(error_body("invalid_prompt", "Prompt is not a dict", ""))
    _check_classes(graph, specs)
    outputs = [n for n, node in graph.items() if specs[node["class_type"]].output_node]
    if targets is not None:
        outputs = [n for n in outputs if n in targets]
    if not outputs:
        raise Rejected(error_body("prompt_no_outputs", "Prompt has no outputs"))
    checker = _Validator(graph, specs, ctx)
    good: list[str] = []
    node_errors: dict[str, Any] = {}
    for output in outputs:
        if checker.output(output):
            good.append(output)
            continue
        upstream = _ancestors(graph, output)
        for node_id in [n for n in checker.errors if n in upstream]:
            entry = node_errors.setdefault(node_id, {"errors": checker.errors[node_id], "dependent_outputs": [],
                                                     "class_type": graph[node_id]["class_type"]})
            entry["dependent_outputs"].append(output)
    if not good:
        raise Rejected(error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation", "",
                                  node_errors))
    return good, node_errors
