"""The knobs a test turns (`fake.behaviour.<knob> = ...`, read at the moment they matter) and what the fake records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODELS: dict[str, list[str]] = {
    "checkpoints": ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"], "configs": [], "loras": [],
    "vae": [], "text_encoders": [], "diffusion_models": [], "clip_vision": [], "style_models": [], "embeddings": [],
    "diffusers": [], "vae_approx": [], "controlnet": [], "gligen": [], "upscale_models": [], "custom_nodes": [],
    "hypernetworks": [], "photomaker": [], "classifiers": [], "model_patches": [], "audio_encoders": [],
}

GIB = 1024**3


def default_devices() -> list[dict[str, Any]]:
    return [{"name": "cuda:0 NVIDIA H200 : cudaMallocAsync", "type": "cuda", "index": 0, "vram_total": 140 * GIB,
             "vram_free": 139 * GIB, "torch_vram_total": 0, "torch_vram_free": 0}]


@dataclass
class Failure:
    """Make a node raise at execution time (execution_error). Matches by node id and/or class_type."""

    node: str | None = None
    class_type: str | None = None
    exception_type: str = "torch.OutOfMemoryError"
    exception_message: str = "Allocation on device "
    at_tick: int | None = None  # raise on this progress tick instead of before the node's work

    def matches(self, node_id: str, class_type: str) -> bool:
        return (self.node is None or self.node == node_id) and (self.class_type in (None, class_type))


@dataclass
class Behaviour:
    # time: each progress tick waits step_delay_s; every node waits node_delay_s (or node_delays[class_type])
    step_delay_s: float = 0.001
    node_delay_s: float = 0.0
    node_delays: dict[str, float] = field(default_factory=dict)
    # between a prompt being queued on an idle server and the worker taking it (real: a few ms)
    pickup_delay_s: float = 0.0
    # between execution_start and execution_cached (the real server checks its caches there; ~10 ms on CPU)
    start_delay_s: float = 0.0
    # pitfall 1: the POST /prompt response is held this long after the prompt was queued (WS messages come first)
    prompt_response_delay_s: float = 0.0
    # pitfall 2: the history entry is written this long after execution_success/error/interrupted was sent
    history_delay_s: float = 0.0
    # beyond 0.3.64: this many GET /history/{id} reads after the write still answer {} (a lost/slow write)
    history_empty_reads: int = 0
    fail: Failure | None = None  # execution_error
    # sampler latent previews (a server started with --preview-method other than none); SaveImageWebsocket always
    sampler_previews: bool = False
    cache: bool = True  # False: like --cache-none, nothing is ever cached
    silent_ws: bool = False  # keep sockets open but send nothing at all
    jobs_api: bool = False  # newer servers' /api/jobs routes (§1.6)
    require_uuid_prompt_id: bool = False  # newer servers: 400 invalid_prompt_id unless a canonical UUID
    check_origin: bool = True  # 403 when an Origin header's host differs from Host
    models: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_MODELS.items()})
    devices: list[dict[str, Any]] = field(default_factory=default_devices)
    ram_total: int = 128 * GIB
    ram_free: int = 120 * GIB
    comfyui_version: str = "0.3.64"

    def node_delay(self, class_type: str) -> float:
        return self.node_delays.get(class_type, self.node_delay_s)


@dataclass(frozen=True)
class Submitted:
    """One accepted POST /prompt (or FakeComfyUI.submit)."""

    prompt_id: str
    number: float
    client_id: str | None
    graph: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    body: dict[str, Any]


@dataclass(frozen=True)
class InterruptCall:
    """One POST /interrupt: body is None (no body), {} (global) or {"prompt_id": ...} (targeted)."""

    body: dict[str, Any] | None
    running: str | None  # the prompt running when it arrived
    hit: bool  # whether the interrupt flag was set

    @property
    def prompt_id(self) -> str | None:
        value = (self.body or {}).get("prompt_id")
        return None if value is None else str(value)


@dataclass(frozen=True)
class Upload:
    name: str
    subfolder: str
    type: str
    original_name: str
    size: int
    overwrite: bool
