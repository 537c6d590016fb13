"""One table of matching cases, run through the pure function and through the claim script's Lua."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.keys import Keys
from worker.matching import matches
from worker.queue import Queue, QueueConfig

BASE: dict[str, Any] = {
    "services": ["comfyui", "simulation"],
    "hardware": {"gpu_memory_gb": 24, "gpu_model": "RTX 4090", "ram_gb": 64, "cpu_cores": 16},
    "models": {"comfyui": ["sdxl", "flux-dev"], "simulation": ["sim-model"]},
    "customer_access": {"isolation": "none", "allowed_customers": [], "denied_customers": ["banned"]},
    "custom": {"features": ["nvenc", "fp8"], "vram_class": 3, "region": "eu", "debug": True},
}
STRICT = {**BASE, "customer_access": {"isolation": "strict", "allowed_customers": ["acme"], "denied_customers": []}}

# (name, capabilities, service, requirements, customer, expected)
CASES: list[tuple[str, dict[str, Any], str, Any, str, bool]] = [
    ("no requirements", BASE, "comfyui", "", "", True),
    ("empty object", BASE, "comfyui", {}, "", True),
    ("unknown service", BASE, "a1111", {}, "", False),
    ("second service", BASE, "simulation", {}, "", True),
    ("vram fits", BASE, "comfyui", {"hardware": {"gpu_memory_gb": 24}}, "", True),
    ("vram too much", BASE, "comfyui", {"hardware": {"gpu_memory_gb": 40}}, "", False),
    ("vram as string", BASE, "comfyui", {"hardware": {"gpu_memory_gb": "16"}}, "", True),
    ("vram non-numeric ignored", BASE, "comfyui", {"hardware": {"gpu_memory_gb": "all"}}, "", True),
    ("ram fits", BASE, "comfyui", {"hardware": {"ram_gb": 32}}, "", True),
    ("ram too much", BASE, "comfyui", {"hardware": {"ram_gb": 128}}, "", False),
    ("cpu fits", BASE, "comfyui", {"hardware": {"cpu_cores": 16}}, "", True),
    ("cpu too much", BASE, "comfyui", {"hardware": {"cpu_cores": 17}}, "", False),
    ("gpu model equal, any case", BASE, "comfyui", {"hardware": {"gpu_model": "rtx 4090"}}, "", True),
    ("gpu model differs", BASE, "comfyui", {"hardware": {"gpu_model": "A100"}}, "", False),
    ("hardware not an object", BASE, "comfyui", {"hardware": 5}, "", True),
    ("model present", BASE, "comfyui", {"models": ["sdxl"]}, "", True),
    ("all models present", BASE, "comfyui", {"models": ["sdxl", "flux-dev"]}, "", True),
    ("one model missing", BASE, "comfyui", {"models": ["sdxl", "sd3"]}, "", False),
    ("model of another service", BASE, "comfyui", {"models": ["sim-model"]}, "", True),
    ("models 'all'", BASE, "comfyui", {"models": "all"}, "", True),
    ("models empty list", BASE, "comfyui", {"models": []}, "", True),
    ("customer denied", BASE, "comfyui", {}, "banned", False),
    ("customer fine", BASE, "comfyui", {}, "acme", True),
    ("job strict, worker not strict", BASE, "comfyui", {"customer_isolation": "strict"}, "acme", False),
    ("job strict, worker strict allows", STRICT, "comfyui", {"customer_isolation": "strict"}, "acme", True),
    ("job strict, worker strict other", STRICT, "comfyui", {"customer_isolation": "strict"}, "other", False),
    ("strict worker, unlisted customer", STRICT, "comfyui", {}, "other", False),
    ("strict worker, no customer", STRICT, "comfyui", {}, "", False),
    ("loose job", BASE, "comfyui", {"customer_isolation": "loose"}, "acme", True),
    ("custom list contains", BASE, "comfyui", {"features": ["nvenc"]}, "", True),
    ("custom list missing one", BASE, "comfyui", {"features": ["nvenc", "av1"]}, "", False),
    ("custom scalar in list", BASE, "comfyui", {"features": "fp8"}, "", True),
    ("custom number minimum met", BASE, "comfyui", {"vram_class": 2}, "", True),
    ("custom number minimum missed", BASE, "comfyui", {"vram_class": 4}, "", False),
    ("custom string equal", BASE, "comfyui", {"region": "eu"}, "", True),
    ("custom string differs", BASE, "comfyui", {"region": "us"}, "", False),
    ("custom bool equal", BASE, "comfyui", {"debug": True}, "", True),
    ("custom bool is not a number", BASE, "comfyui", {"vram_class": True}, "", False),
    ("custom key absent on worker", BASE, "comfyui", {"has_tpu": True}, "", False),
    ("custom null ignored", BASE, "comfyui", {"region": None}, "", True),
    ("job-only key ignored", BASE, "comfyui", {"timeout_minutes": 30, "quality_level": "high"}, "", True),
    ("service_type matches", BASE, "comfyui", {"service_type": "simulation"}, "", True),
    ("service_type unknown", BASE, "comfyui", {"service_type": "a1111"}, "", False),
    ("positive wrapper", BASE, "comfyui", {"positive_requirements": {"hardware": {"gpu_memory_gb": 16}}}, "", True),
    ("positive wrapper too big", BASE, "comfyui", {"positive_requirements": {"hardware": {"gpu_memory_gb": 48}}},
     "", False),
    ("only negative: model absent", BASE, "comfyui", {"negative_requirements": {"models": ["sd15"]}}, "", True),
    ("negative model present", BASE, "comfyui", {"negative_requirements": {"models": ["sdxl"]}}, "", False),
    ("negative custom matched", BASE, "comfyui", {"negative_requirements": {"region": "eu"}}, "", False),
    ("negative custom not matched", BASE, "comfyui", {"negative_requirements": {"region": "us"}}, "", True),
    ("negative key absent on worker", BASE, "comfyui", {"negative_requirements": {"has_tpu": True}}, "", True),
    ("positive not an object", BASE, "comfyui", {"positive_requirements": 3}, "", True),
    ("requirements not JSON", BASE, "comfyui", "{oops", "", False),
    ("requirements a list", BASE, "comfyui", [1, 2], "", False),
    ("worker without hardware", {**BASE, "hardware": {}}, "comfyui", {"hardware": {"gpu_memory_gb": 1}}, "", False),
    ("worker without models", {**BASE, "models": {}}, "comfyui", {"models": ["sdxl"]}, "", False),
    ("loaded models are not a rule", {**BASE, "loaded": []}, "comfyui", {"models": ["sdxl"]}, "", True),
    ("customer_access not an object", {**BASE, "customer_access": "strict"}, "comfyui", {}, "acme", True),
    ("denied list wins over allowed", {**STRICT, "customer_access": {
        "isolation": "strict", "allowed_customers": ["acme"], "denied_customers": ["acme"]}},
     "comfyui", {}, "acme", False),
    ("custom object never matches", BASE, "comfyui", {"region": {"x": 1}}, "", False),
    ("custom empty object asks nothing", BASE, "comfyui", {"region": {}}, "", True),
    ("negative object excludes nobody", BASE, "comfyui", {"negative_requirements": {"region": {"x": 1}}}, "", True),
    ("true is not 1 in a list", {**BASE, "custom": {"flags": [1]}}, "comfyui", {"flags": [True]}, "", False),
    ("objects in lists never equal", {**BASE, "custom": {"objs": [{"a": 1}]}}, "comfyui", {"objs": [{"a": 1}]},
     "", False),
    ("worker object value never matches", {**BASE, "custom": {"o": {"a": 1}}}, "comfyui", {"o": {"a": 1}}, "", False),
    ("null worker value, negative", {**BASE, "custom": {"x": None}}, "comfyui",
     {"negative_requirements": {"x": None}}, "", True),
    ("null worker value, positive", {**BASE, "custom": {"x": None}}, "comfyui", {"x": 1}, "", False),
    ("hex vram is no minimum", BASE, "comfyui", {"hardware": {"gpu_memory_gb": "0x30"}}, "", True),
    ("exponent vram is no minimum", BASE, "comfyui", {"hardware": {"gpu_memory_gb": "1e3"}}, "", True),
    ("decimal string vram with spaces", BASE, "comfyui", {"hardware": {"gpu_memory_gb": " 24.5 "}}, "", False),
    ("model list with a number", BASE, "comfyui", {"models": [1]}, "", False),
]

WORKFLOW = {**BASE, "workflow_id": "wf-1"}
# (name, capabilities, service, requirements, customer, workflow id, expected)
WORKFLOW_CASES: list[tuple[str, dict[str, Any], str, Any, str, str, bool]] = [
    ("restricted worker, its workflow", WORKFLOW, "comfyui", {}, "", "wf-1", True),
    ("restricted worker, other workflow", WORKFLOW, "comfyui", {}, "", "wf-2", False),
    ("restricted worker, no workflow", WORKFLOW, "comfyui", {}, "", "", False),
    ("restricted worker, its workflow, too big", WORKFLOW, "comfyui", {"hardware": {"gpu_memory_gb": 80}},
     "", "wf-1", False),
    ("unrestricted worker, any workflow", BASE, "comfyui", {}, "", "wf-2", True),
    ("empty restriction is none", {**BASE, "workflow_id": ""}, "comfyui", {}, "", "wf-2", True),
    ("non-string restriction ignored", {**BASE, "workflow_id": 7}, "comfyui", {}, "", "wf-2", True),
]
ALL_CASES = [(n, c, s, r, cu, "", e) for n, c, s, r, cu, e in CASES] + WORKFLOW_CASES


def _requirements(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


@pytest.mark.parametrize(("name", "caps", "service", "requirements", "customer", "workflow", "expected"),
                         ALL_CASES, ids=[c[0] for c in ALL_CASES])
async def test_matching_table_python_and_lua_agree(
    redis: aioredis.Redis, keys: Keys, name: str, caps: dict[str, Any], service: str, requirements: Any,
    customer: str, workflow: str, expected: bool,
) -> None:
    reqs = _requirements(requirements)
    assert matches(caps, service, reqs, customer, workflow) is expected, f"python: {name}"
    queue = Queue(redis, keys, QueueConfig())
    lua = await queue._scripts["match_probe"](
        keys=[], args=[keys.prefix, json.dumps(caps), service, reqs, customer, workflow])
    assert bool(lua) is expected, f"lua: {name}"


def test_the_table_is_large_enough() -> None:
    assert len(ALL_CASES) >= 40
