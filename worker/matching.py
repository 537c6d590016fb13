"""Does a worker's capability set satisfy a job's requirements? One pure function.

The claim script carries a Lua mirror of this module (worker/lua/lib/match.lua); the test
table in tests/worker/test_matching.py runs every case through both.

Capabilities (what a worker sends with each claim)::

    {"services": [...], "hardware": {"gpu_memory_gb", "gpu_model", "ram_gb", "cpu_cores"},
     "models": {service: [...]}, "customer_access": {"isolation", "allowed_customers",
     "denied_customers"}, "custom": {key: value}, "workflow_id": "" | id, "loaded": [...]}

A worker may leave ``models`` out of what it sends and store it once in Redis instead
(``Queue.set_models``, the worker hash's ``emp_models``); the claim script then reads it there, and
``Client.live_capabilities`` puts it back, so this function always sees ``models``.

Requirements (emp-job-queue's format): ``{"hardware": {...}, "models": [...] | "all",
"customer_isolation": "strict"|"loose"|"none", "service_type": ..., <custom key>: value}``, or
``{"positive_requirements": {...}, "negative_requirements": {...}}``.

Rules:
* the job's service is one of the worker's services;
* hardware numbers are minimums; ``gpu_model`` is a case-insensitive equality;
* every listed model is present (the job's service's models first, then any); ``"all"`` asks for
  nothing specific;
* customers: a denied customer never matches; a strict worker takes only its allowed customers;
  a job asking for strict isolation needs a strict worker that allows its customer;
* any other key is a custom capability: a list must be contained, a number is a minimum,
  anything else equal; keys that describe the job (``JOB_ONLY_KEYS``) are ignored;
* negative requirements: the worker must not have any listed model or custom value;
* a worker restricted to a workflow (``"workflow_id"`` in its capabilities) takes only that
  workflow's jobs.

Capabilities may also carry ``"loaded"`` (models in GPU memory now): not a rule, but the claim
script prefers, among jobs of equal priority, those whose models are all loaded (model affinity).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

JOB_ONLY_KEYS = frozenset(
    {
        "timeout_minutes",
        "quality_level",
        "priority",
        "max_retries",
        "estimated_duration",
        "description",
        "timeout",
        "timeout_seconds",
        "retries",
        "tags",
    }
)
HARDWARE_MIN = ("gpu_memory_gb", "cpu_cores", "ram_gb")
_STRUCTURAL = frozenset({"hardware", "models", "customer_isolation", "service_type"})


_DECIMAL = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)\s*$")


def _number(value: Any) -> float | None:
    """A number, or a string of decimal digits (no hex, no exponent: the Lua reads the same)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _DECIMAL.match(value):
        return float(value)
    return None


def _same(a: Any, b: Any) -> bool:
    """Equality of JSON scalars; objects and arrays never compare equal, true is not 1."""
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return False
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _has_model(caps: Mapping[str, Any], service: str, model: Any) -> bool:
    models = caps.get("models")
    if not isinstance(models, dict):
        return False
    own = models.get(service)
    if isinstance(own, list) and _in(model, own):
        return True
    return any(isinstance(names, list) and _in(model, names) for names in models.values())


def _in(value: Any, items: list[Any]) -> bool:
    return any(_same(item, value) for item in items)


def custom_ok(have: Any, want: Any) -> bool:
    """list contains / number >= / equality, as emp-job-queue's matcher reads custom keys.
    An object on either side never matches (the Lua cannot compare objects)."""
    if have is None or (isinstance(have, dict) and have) or (isinstance(want, dict) and want):
        return False
    if isinstance(want, list | dict):  # ({} reads as [] in Lua: it asks for nothing)
        if isinstance(have, list):
            return all(_in(w, have) for w in want)
        return all(_same(have, w) for w in want)
    if isinstance(have, list):
        return _in(want, have)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (have, want))
    if numbers:
        return bool(have >= want)
    return _same(have, want)


def _customer_ok(caps: Mapping[str, Any], isolation: Any, customer: str) -> bool:
    access = caps.get("customer_access")
    if not isinstance(access, dict):
        access = {}
    allowed = access.get("allowed_customers") or []
    denied = access.get("denied_customers") or []
    if customer and isinstance(denied, list) and customer in denied:
        return False
    worker_isolation = access.get("isolation") or "none"
    allowed_here = isinstance(allowed, list) and customer in allowed
    if worker_isolation == "strict" and not allowed_here:
        return False
    if isolation == "strict":
        return worker_isolation == "strict" and allowed_here
    return True


def _positive_ok(caps: Mapping[str, Any], service: str, pos: Mapping[str, Any]) -> bool:
    hardware = pos.get("hardware")
    if isinstance(hardware, dict):
        have = caps.get("hardware") or {}
        for key in HARDWARE_MIN:
            want = _number(hardware.get(key))
            if want is not None and want > (_number(have.get(key)) or 0.0):
                return False
        model = hardware.get("gpu_model")
        if isinstance(model, str) and model and model.lower() != str(have.get("gpu_model") or "").lower():
            return False
    models = pos.get("models")
    if isinstance(models, list) and not all(_has_model(caps, service, m) for m in models):
        return False
    service_type = pos.get("service_type")
    if isinstance(service_type, str) and service_type not in (caps.get("services") or []):
        return False
    custom = caps.get("custom") or {}
    for key, want in pos.items():
        if key in _STRUCTURAL or key in JOB_ONLY_KEYS or want is None:
            continue
        if not custom_ok(custom.get(key), want):
            return False
    return True


def _negative_ok(caps: Mapping[str, Any], service: str, neg: Mapping[str, Any]) -> bool:
    models = neg.get("models")
    if isinstance(models, list) and any(_has_model(caps, service, m) for m in models):
        return False
    custom = caps.get("custom") or {}
    for key, unwanted in neg.items():
        if key in ("models", "hardware") or key in JOB_ONLY_KEYS:
            continue
        if custom.get(key) is not None and custom_ok(custom[key], unwanted):
            return False
    return True


def matches(
    caps: Mapping[str, Any], service: str, requirements: str, customer_id: str, workflow_id: str = ""
) -> bool:
    """True when a worker with `caps` may run a job of `service` with these requirements."""
    if service not in (caps.get("services") or []):
        return False
    only = caps.get("workflow_id")
    if isinstance(only, str) and only and workflow_id != only:
        return False
    try:
        req = json.loads(requirements) if requirements else {}
    except ValueError:
        return False
    if not isinstance(req, dict):
        return False
    pos: Mapping[str, Any] = req
    neg: Mapping[str, Any] = {}
    if "positive_requirements" in req or "negative_requirements" in req:
        raw_pos, raw_neg = req.get("positive_requirements"), req.get("negative_requirements")
        pos = raw_pos if isinstance(raw_pos, dict) else {}
        neg = raw_neg if isinstance(raw_neg, dict) else {}
    isolation = pos.get("customer_isolation") or req.get("customer_isolation") or "none"
    if not _customer_ok(caps, isolation, customer_id):
        return False
    return _positive_ok(caps, service, pos) and _negative_ok(caps, service, neg)


def required_models(requirements: Mapping[str, Any]) -> list[str]:
    """The model names a job's requirements ask for (what model affinity looks at)."""
    pos: Any = requirements
    if "positive_requirements" in requirements or "negative_requirements" in requirements:
        pos = requirements.get("positive_requirements")
    models = pos.get("models") if isinstance(pos, dict) else None
    return [m for m in models if isinstance(m, str)] if isinstance(models, list) else []
