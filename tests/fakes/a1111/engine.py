"""The fake A1111's generation: shared state, one job at a time behind a FIFO lock, steps that
take time, interrupt and skip, per-request checkpoint overrides, and the reply A1111 builds."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.a1111 import wire

SAMPLERS = ("DPM++ 2M", "Euler a", "Euler", "DPM++ SDE", "DDIM", "UniPC")
SCHEDULERS = ("Automatic", "Karras", "Exponential", "Uniform")


@dataclass
class Checkpoint:
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: None = None

    def listing(self) -> dict[str, Any]:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.filename, "config": self.config}

    def aliases(self) -> set[str]:
        base = self.filename.rsplit("/", 1)[-1]
        return {a for a in (self.title, self.model_name, base, self.hash, self.sha256) if a}


def default_checkpoints() -> list[Checkpoint]:
    listed = wire.fixture("control_endpoints")["endpoints"]["GET /sdapi/v1/sd-models"]["response"]["json"]
    found = [Checkpoint(**m) for m in listed]
    found.append(Checkpoint("sd_xl_base_1.0.safetensors [31e35c80fc]", "sd_xl_base_1.0", "31e35c80fc",
                            "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
                            "/sd/models/Stable-diffusion/sd_xl_base_1.0.safetensors"))
    return found


@dataclass
class State:
    """modules/shared_state.State: global, for whatever job holds the lock."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    current_image: str | None = None

    def begin(self, job: str) -> None:
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job, self.job_count, self.job_no = job, -1, 0
        self.sampling_step = self.sampling_steps = 0
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.time_start, self.current_image = time.time(), None

    def end(self) -> None:  # the interrupted flag stays until the next begin()
        self.job, self.job_count, self.sampling_step, self.sampling_steps, self.current_image = "", 0, 0, 0, None

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """GET /sdapi/v1/progress (modules/api/api.py progressapi)."""
        flags = {k: getattr(self, k) for k in ("skipped", "interrupted", "stopping_generation", "job", "job_count",
                                               "job_timestamp", "job_no", "sampling_step", "sampling_steps")}
        reply: dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": flags, "current_image": None,
                                 "textinfo": None}
        if self.job_count == 0:
            return reply
        progress = 0.01
        if self.job_count > 0:
            progress += self.job_no / self.job_count
        if self.sampling_steps > 0 and self.job_count > 0:
            progress += 1 / self.job_count * self.sampling_step / self.sampling_steps
        progress = min(progress, 1)
        elapsed = time.time() - self.time_start
        reply["progress"] = progress
        reply["eta_relative"] = elapsed / progress - elapsed
        if not skip_current_image:
            reply["current_image"] = self.current_image
        return reply


@dataclass
class Generation:
    """What the fake saw of one generation request (for tests to inspect)."""

    endpoint: str
    body: dict[str, Any]
    checkpoint: str = ""
    steps_done: int = 0
    interrupted: bool = False
    images: int = 0
    done: bool = False


@dataclass
class Engine:
    checkpoints: list[Checkpoint] = field(default_factory=default_checkpoints)
    step_s: float = 0.01
    switch_s: float = 0.0  # seconds a checkpoint switch takes
    options: dict[str, Any] = field(default_factory=dict)
    state: State = field(default_factory=State)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO, like A1111's queue_lock
    generations: list[Generation] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)  # every checkpoint load, in order
    #: one-shot faults: "oom" raises CUDA out-of-memory at step ``fault_step``
    faults: list[str] = field(default_factory=list)
    fault_step: int = 1
    killed: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def __post_init__(self) -> None:
        shown = wire.fixture("control_endpoints")["endpoints"]["GET /sdapi/v1/options"]["response"]["json"]
        defaults = {k: v for k, v in shown.items() if k != "..."}
        self.options = {**defaults, "sd_model_checkpoint": self.checkpoints[0].title, **self.options}

    def find(self, name: Any) -> Checkpoint | None:
        return next((c for c in self.checkpoints if isinstance(name, str) and name in c.aliases()), None)

    async def load(self, name: str) -> Checkpoint:
        """Switch the loaded checkpoint; an unknown one falls back to the first (select_checkpoint)."""
        checkpoint = self.find(name) or self.checkpoints[0]
        if checkpoint.title != self.options["sd_model_checkpoint"]:
            await asyncio.sleep(self.switch_s)  # loading weights
            self.loads.append(checkpoint.title)
        self.options["sd_model_checkpoint"] = checkpoint.title
        return checkpoint

    async def generate(self, endpoint: str, params: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        record = Generation(endpoint, raw)
        self.generations.append(record)
        async with self.lock:
            self.state.begin(f"scripts_{endpoint}")
            before = self.options["sd_model_checkpoint"]
            try:
                return await self._process(endpoint, params, record)
            finally:
                if params.get("override_settings_restore_afterwards") and "sd_model_checkpoint" in (
                        params.get("override_settings") or {}):
                    await self.load(before)
                record.interrupted, record.done = self.state.interrupted, True
                self.state.end()

    async def _process(self, endpoint: str, params: dict[str, Any], record: Generation) -> dict[str, Any]:
        overrides = params.get("override_settings") or {}
        if "sd_model_checkpoint" in overrides:
            await self.load(overrides["sd_model_checkpoint"])
        checkpoint = self.find(self.options["sd_model_checkpoint"]) or self.checkpoints[0]
        record.checkpoint = checkpoint.title
        seed = params["seed"] if params["seed"] not in (None, -1) else self.rng.randrange(2**32)
        n_iter, batch, steps = max(1, params["n_iter"] or 1), max(1, params["batch_size"] or 1), params["steps"]
        self.state.job_count = n_iter
        images: list[bytes] = []
        seeds: list[int] = []
        for n in range(n_iter):
            if self.state.interrupted:
                break
            self.state.job_no, self.state.sampling_step, self.state.sampling_steps = n, 0, steps
            await self._sample(steps, record)
            for i in range(batch):
                seeds.append(seed + n * batch + i)
                images.append(wire.png(params["width"], params["height"], wire.colour(seeds[-1]),
                                       self.infotext(params, seeds[-1], checkpoint)))
            self.state.skipped = False
            self.state.job_no = n + 1
        record.images = len(images)
        return self.reply(endpoint, params, images, seeds, seed, checkpoint)

    async def _sample(self, steps: int, record: Generation) -> None:
        every = int(self.options.get("show_progress_every_n_steps") or 0)
        for step in range(steps):
            if self.state.interrupted or self.state.skipped or self.killed:
                return
            if step == self.fault_step and self.faults and self.faults[0] == "oom":
                self.faults.pop(0)
                raise wire.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB "
                                            "total capacity; 20.11 GiB already allocated)")
            await asyncio.sleep(self.step_s)  # one sampling step of the "GPU"
            self.state.sampling_step = record.steps_done = step + 1
            if self.options.get("live_previews_enable") and every and (step + 1) % every == 0:
                self.state.current_image = wire.b64(wire.png(8, 8, wire.colour(step)))

    def infotext(self, params: dict[str, Any], seed: int, checkpoint: Checkpoint) -> str:
        sampler = self.sampler(params)
        text = params["prompt"] or ""
        if params["negative_prompt"]:
            text += f"\nNegative prompt: {params['negative_prompt']}"
        return (f"{text}\nSteps: {params['steps']}, Sampler: {sampler}, Schedule type: "
                f"{params['scheduler'] or 'Automatic'}, CFG scale: {params['cfg_scale']:g}, Seed: {seed}, Size: "
                f"{params['width']}x{params['height']}, Model hash: {checkpoint.hash}, Model: {checkpoint.model_name}, "
                f"Version: {wire.VERSION}")

    @staticmethod
    def sampler(params: dict[str, Any]) -> str:
        name = params["sampler_name"] or params["sampler_index"] or SAMPLERS[0]
        for scheduler in SCHEDULERS:
            name = name.removesuffix(f" {scheduler}")
        return name if name in SAMPLERS else SAMPLERS[0]  # an unknown sampler silently falls back

    def reply(self, endpoint: str, params: dict[str, Any], images: list[bytes], seeds: list[int], seed: int,
              checkpoint: Checkpoint) -> dict[str, Any]:
        first = 1 if len(images) > 1 and self.options.get("return_grid", True) else 0
        if first:
            images = [wire.png(params["width"] * len(images), params["height"], (255, 255, 255)), *images]
        values = {
            "prompt": params["prompt"], "all_prompts": [params["prompt"]] * len(seeds),
            "negative_prompt": params["negative_prompt"],
            "all_negative_prompts": [params["negative_prompt"]] * len(seeds),
            "seed": seed, "all_seeds": seeds, "subseed": 3051871513, "all_subseeds": [3051871513] * len(seeds),
            "subseed_strength": params["subseed_strength"], "width": params["width"], "height": params["height"],
            "sampler_name": self.sampler(params), "cfg_scale": params["cfg_scale"], "steps": params["steps"],
            "batch_size": params["batch_size"], "restore_faces": bool(params["restore_faces"]),
            "face_restoration_model": None, "sd_model_name": checkpoint.model_name, "sd_model_hash": checkpoint.hash,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": params["seed_resize_from_w"],
            "seed_resize_from_h": params["seed_resize_from_h"], "denoising_strength": params["denoising_strength"],
            "extra_generation_params": {"Schedule type": params["scheduler"] or "Automatic"},
            "index_of_first_image": first,
            "infotexts": [self.infotext(params, s, checkpoint) for s in seeds], "styles": params["styles"] or [],
            "job_timestamp": self.state.job_timestamp, "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "version": wire.VERSION,
        }
        info = {key: values.get(key) for key in wire.info_keys()}
        echo = {k: v for k, v in params.items() if k != "include_init_images"}
        if endpoint == "img2img" and not params.get("include_init_images"):
            echo["init_images"] = echo["mask"] = None
        return {"images": [wire.b64(i) for i in images] if params["send_images"] else [], "parameters": echo,
                "info": json.dumps(info)}
