"""The simulation connector: a stand-in engine for tests, demos and load runs.

Each job sleeps through ``steps`` steps over ``duration_s`` seconds, reporting progress, and then
returns ``output_bytes`` of deterministic output, or fails with probability ``failure_rate``.
Defaults come from the environment (``EMP_SIM_DURATION_S``, ``EMP_SIM_STEPS``,
``EMP_SIM_FAILURE_RATE``, ``EMP_SIM_OUTPUT_BYTES``, ``EMP_SIM_SEED``); a job's payload overrides
each (``duration_s``, ``steps``, ``failure_rate``, ``output_bytes``, ``seed``), may force a
failure with ``"fail": "permanent" | "retryable"``, and may ask for output files of a chosen
size and type (``"outputs": [{"bytes": 5000000, "content_type": "image/png"}]``), handed to the
worker's output handling like an engine's. The same seed and job id give the same run.

``EMP_SIM_MODELS`` lists the models it has; the models a job requires stay "loaded" afterwards
(the ``EMP_SIM_MAX_LOADED`` most recent), which is what model affinity sees.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.base import Connector, ConnectorConfig, JobContext, JobResult
from connectors.hookspecs import hookimpl
from connectors.settings import ConnectorSettings
from worker.errors import PermanentJobError, RetryableJobError
from worker.matching import required_models
from worker.protocol import Job

MAX_DURATION_S = 3600.0
MAX_STEPS = 10_000
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
MAX_OUTPUTS = 16
MAX_FILE_BYTES = 256 * 1024 * 1024
IN_MEMORY_BYTES = 1024 * 1024  # larger simulated files are written to disk and handed over by path
_SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff\xe0", "image/gif": b"GIF89a"}


class SimulationSettings(ConnectorSettings):
    """EMP_SIM_*: the defaults a job's payload may override."""

    duration_s: float = Field(2.0, ge=0, le=MAX_DURATION_S)
    steps: int = Field(10, ge=1, le=MAX_STEPS)
    failure_rate: float = Field(0.0, ge=0, le=1)
    output_bytes: int = Field(256, ge=0, le=MAX_OUTPUT_BYTES)
    seed: int | None = None
    models: str = Field("", max_length=4096)  # comma list of the models it "has"
    max_loaded: int = Field(1, ge=0, le=64)  # how many stay "loaded" (least recently used go first)


class SimulatedOutput(BaseModel):
    """An output file to produce: ``{"bytes": 5000000, "content_type": "image/png"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bytes: int = Field(ge=0, le=MAX_FILE_BYTES)
    content_type: str = Field("application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$", max_length=100)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SimulationPayload(BaseModel):
    """A simulation job's payload; an unknown key fails the job (a typo such as duration_ms would
    otherwise run the default silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration_s: float | None = Field(None, ge=0, le=MAX_DURATION_S)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    failure_rate: float | None = Field(None, ge=0, le=1)
    output_bytes: int | None = Field(None, ge=0, le=MAX_OUTPUT_BYTES)
    seed: int | None = None
    fail: str | None = Field(None, pattern="^(permanent|retryable)$")
    outputs: list[SimulatedOutput] = Field(default_factory=list, max_length=MAX_OUTPUTS)


def _output(rng: random.Random, size: int) -> str:
    return rng.randbytes(size // 2 + 1).hex()[:size]


class SimulationConnector(Connector):
    name = "simulation"
    service_types = ("simulation",)
    settings_class = SimulationSettings
    settings_prefix = "EMP_SIM_"
    settings: SimulationSettings

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self.defaults = self.settings
        self.available = [m.strip() for m in self.defaults.models.split(",") if m.strip()]
        self.loaded: list[str] = []  # least recently used first

    async def models(self) -> dict[str, list[str]]:
        return {"simulation": list(self.available)} if self.available else {}

    async def loaded_models(self) -> list[str]:
        return list(self.loaded)

    def _load(self, models: list[str]) -> None:
        """Models a job used stay loaded, up to EMP_SIM_MAX_LOADED."""
        for model in models:
            if model in self.loaded:
                self.loaded.remove(model)
            self.loaded.append(model)
        del self.loaded[: max(0, len(self.loaded) - self.defaults.max_loaded)]

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        try:
            spec = SimulationPayload.model_validate(job.payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
                known = ", ".join(SimulationPayload.model_fields)
                raise PermanentJobError(f"invalid simulation payload: unknown field {where!r} "
                                        f"(known: {known})") from None
            raise PermanentJobError(f"invalid simulation payload: {where}: {first['msg']}") from None
        d = self.defaults
        duration = spec.duration_s if spec.duration_s is not None else d.duration_s
        steps = spec.steps or d.steps
        failure_rate = spec.failure_rate if spec.failure_rate is not None else d.failure_rate
        size = spec.output_bytes if spec.output_bytes is not None else d.output_bytes
        seed = spec.seed if spec.seed is not None else d.seed
        seed_material = f"{seed}:{job.id}" if seed is not None else f"{job.id}:{job.attempt}"
        rng = random.Random(hashlib.sha256(seed_material.encode()).digest())
        fail_at = rng.randrange(steps) if rng.random() < failure_rate else None
        self._load(required_models(job.requirements))

        for step in range(steps):
            ctx.raise_if_cancelled()
            if spec.fail == "permanent":
                raise PermanentJobError("simulated permanent failure (payload fail=permanent)")
            if spec.fail == "retryable" or step == fail_at:
                raise RetryableJobError(f"simulated engine failure at step {step + 1}/{steps}")
            await asyncio.sleep(duration / steps)  # the simulated work itself
            ctx.progress((step + 1) * 100.0 / steps, f"step {step + 1}/{steps}",
                         step=step + 1, total_steps=steps)
        for index, wanted in enumerate(spec.outputs):
            await _emit(ctx, index, wanted, rng)
        return {"output": _output(rng, size), "steps": steps, "seed": seed}


async def _emit(ctx: JobContext, index: int, wanted: SimulatedOutput, rng: random.Random) -> None:
    """Produce one simulated output file: the type's signature, then deterministic bytes."""
    head = _SIGNATURES.get(wanted.content_type, b"")[: wanted.bytes]
    name = wanted.name or f"output-{index}{mimetypes.guess_extension(wanted.content_type) or '.bin'}"
    if wanted.bytes <= IN_MEMORY_BYTES:
        body = (_output(rng, wanted.bytes).encode() if wanted.content_type.startswith("text/")
                else head + rng.randbytes(wanted.bytes - len(head)))
        ctx.add_output(name, body, content_type=wanted.content_type)
        return
    path = ctx.temp_dir() / name
    seed = rng.getrandbits(64)
    await asyncio.to_thread(_write_file, path, head, wanted.bytes, seed)
    ctx.add_output(name, path=path, content_type=wanted.content_type)


def _write_file(path: Path, head: bytes, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("wb") as sink:
        sink.write(head)
        left = size - len(head)
        while left > 0:
            chunk = min(left, IN_MEMORY_BYTES)
            sink.write(rng.randbytes(chunk))
            left -= chunk


@hookimpl
def emp_connectors() -> Sequence[type[Any]]:
    return [SimulationConnector]
