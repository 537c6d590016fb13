"""The ComfyUI connector: one instance per worker slot, talking to that slot's own ComfyUI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from connectors.base import Connector, ConnectorConfig, Health, HealthState, JobContext, JobResult, StopReason
from connectors.comfyui.client import ComfyClient, ComfyHttp
from connectors.comfyui.payload import parse_payload
from connectors.comfyui.runner import Engine, PromptRun
from connectors.comfyui.settings import ComfyUISettings
from connectors.comfyui.supervisor import Supervisor
from connectors.comfyui.ws import ComfySocket
from worker.errors import ConnectorError, JobError
from worker.protocol import Job

LOADER_INPUTS = ("ckpt_name", "unet_name", "lora_name", "vae_name", "clip_name", "control_net_name", "model_name")
MAX_LOADED = 16


class ComfyUIConnector(Connector):
    """Runs ``comfyui`` jobs (API-format workflows) on this slot's ComfyUI."""

    name = "comfyui"
    service_types = ("comfyui",)
    max_concurrent_jobs = 1  # ComfyUI runs one prompt at a time
    settings_class = ComfyUISettings
    settings: ComfyUISettings

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        s = self.settings
        self.url = s.url_for(config.slot_index)
        self._auth = s.basic_auth()  # ConfigError now (at start-up) when malformed
        self._tls = s.ssl_context()  # one TLS context: the socket must trust what the HTTP calls trust
        self.engine: Engine | None = None
        self.supervisor: Supervisor | None = None
        if s.command:
            port = urlsplit(self.url).port or 8188
            log_dir = Path(s.log_dir or s.dir or tempfile.gettempdir())
            self.supervisor = Supervisor(s.command, s.dir, port, gpu_uuid=config.gpu_uuid,
                                         log_path=log_dir / f"emp-comfyui-{port}.log", probe=self._answers,
                                         restart_max_s=s.restart_max_s)
        #: by (job id, attempt): a timed-out attempt whose task outlives the worker's wait shares the
        #: job id with its retry, which may already run here
        self.runs: dict[tuple[str, int], PromptRun] = {}
        self._loaded: list[str] = []

    # -- lifecycle -----------------------------------------------------------------------------------

    def _build(self) -> Engine:
        s = self.settings
        http = ComfyHttp(self.url, name="ComfyUI", auth=self._auth, token=s.bearer(), verify=self._tls,
                         timeout=httpx.Timeout(s.request_timeout_s, connect=s.connect_timeout_s),
                         connect_retries=2, retry_backoff_s=0.2, max_response_bytes=s.max_output_bytes)
        headers = {}  # the socket gets the same credentials as the HTTP calls (never logged)
        if self._auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self._auth).encode()).decode()
        elif s.bearer():
            headers["Authorization"] = f"Bearer {s.bearer()}"
        socket = ComfySocket(self.url, headers=headers, open_timeout_s=s.connect_timeout_s,
                             preview_metadata=s.preview_metadata, ssl_context=self._tls)
        return Engine(ComfyClient(http, poll_timeout_s=min(s.request_timeout_s, 10.0)), socket, s)

    async def start(self) -> None:
        """Connect (starting ComfyUI first when supervised, and waiting while its process lives)."""
        if self.engine is None:
            self.engine = self._build()
        if self.supervisor is not None:
            await self.supervisor.wait_ready()
        else:
            await self.engine.client.system_stats(self.settings.connect_timeout_s + 5)  # JobError: unreachable
        if not await self.engine.socket.wait_connected(self.settings.connect_timeout_s + 5):
            raise ConnectorError(f"ComfyUI at {self.engine.client.engine.base_url} answers HTTP but its /ws "
                                 f"socket does not connect: {self.engine.socket.last_error or 'no status message'}")

    async def stop(self) -> None:
        for run in list(self.runs.values()):
            with contextlib.suppress(Exception):
                await run.stop(StopReason.DRAIN)
        if self.engine is not None:
            await self.engine.socket.close()
            await self.engine.client.aclose()
            self.engine = None
        if self.supervisor is not None:
            await self.supervisor.stop()

    async def _answers(self) -> bool:
        if self.engine is None:
            return False
        try:
            await self.engine.client.system_stats(2.0)
        except JobError:
            return False
        return True

    # -- jobs ------------------------------------------------------------------------------------------

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        spec = parse_payload(job.payload, max_image_bytes=self.settings.max_input_image_bytes)
        engine = self.engine
        if engine is None:
            raise ConnectorError("the ComfyUI connector is not started")
        if self.supervisor is not None and not self.supervisor.ready.is_set():
            await self.supervisor.wait_ready()  # a restart under way: follow it (the job's timeout bounds this)
        # outputs are fetched into the job's own directory, which the worker deletes once it placed them
        run = PromptRun(engine, spec, ctx, ctx.temp_dir())
        key = (job.id, job.attempt)
        self.runs[key] = run
        try:
            result = await run.execute()
        finally:
            if self.runs.get(key) is run:
                del self.runs[key]
        self._remember_loaded(spec.workflow)
        return result

    async def interrupt(self, job: Job, reason: StopReason) -> None:
        run = self.runs.get((job.id, job.attempt))
        if run is not None:
            await run.stop(reason)

    # -- health and models -----------------------------------------------------------------------------

    async def health(self) -> Health:
        if self.supervisor is not None and not self.supervisor.ready.is_set():
            return Health(HealthState.DOWN, f"ComfyUI (supervised) {self.supervisor.message}")
        if self.engine is None:
            return Health(HealthState.DOWN, "not started")
        try:
            stats = await self.engine.client.system_stats(self.settings.connect_timeout_s)
        except JobError as exc:
            self._loaded.clear()  # a ComfyUI that went away lost its loaded models
            self.engine.client.forget_features()
            return Health(HealthState.DOWN, str(exc)[:300])
        system = stats.get("system")
        version = system.get("comfyui_version", "?") if isinstance(system, dict) else "?"
        if not self.engine.socket.connected.is_set():
            return Health(HealthState.DEGRADED, f"ComfyUI {version}: its /ws socket is down (reconnecting); "
                                                "jobs are followed by polling")
        return Health(HealthState.OK, f"ComfyUI {version} at {self.engine.client.engine.base_url}")

    async def models(self) -> dict[str, list[str]]:
        if self.engine is None:
            return {}
        client = self.engine.client
        names: set[str] = set()
        folders = await client.model_folders()
        if folders is None:  # an old server without /models: the checkpoint loader's choices
            names.update(await client.node_choices("CheckpointLoaderSimple", "ckpt_name"))
        else:
            wanted = [f for f in self.settings.folders() if f in folders]
            for listed in await asyncio.gather(*(client.models_in(f) for f in wanted)):
                names.update(listed)
        return {"comfyui": sorted(names)}

    async def loaded_models(self) -> list[str]:
        """ComfyUI keeps the models of its last prompt loaded (it does not say so; this is inferred
        from the loaders of the last successful workflow, and forgotten when it goes away)."""
        return list(self._loaded)

    def _remember_loaded(self, workflow: dict[str, dict[str, object]]) -> None:
        used: list[str] = []
        for node in workflow.values():
            node_inputs = node.get("inputs")
            if not isinstance(node_inputs, dict):
                continue
            for key in LOADER_INPUTS:
                value = node_inputs.get(key)
                if isinstance(value, str) and value and value not in used:
                    used.append(value)
        if used:
            self._loaded = used[:MAX_LOADED]
