"""``EMP_COMFYUI_*``: where each slot's ComfyUI listens, how to reach it, and how patient to be."""

from __future__ import annotations

import ssl

from pydantic import Field, SecretStr, field_validator

from connectors.inputs import InputSettings
from connectors.settings import EngineSettings
from worker.errors import ConfigError

DEFAULT_MODEL_FOLDERS = "checkpoints,diffusion_models,unet,loras,vae,text_encoders,clip,controlnet,upscale_models"


class ComfyUISettings(EngineSettings, InputSettings):
    """Slot I talks to ``URL`` with its port + I * ``PORT_STEP``, or to the I-th of ``URLS``;
    ``INPUT_HOSTS`` and ``INPUT_TIMEOUT_S`` (:class:`connectors.inputs.InputSettings`) for image URLs."""

    url: str = "http://127.0.0.1:8188"
    #: AUTH (EngineSettings): user:password for a ComfyUI behind a proxy with basic auth
    #: bearer token for a ComfyUI behind an authenticating proxy (never logged)
    token: SecretStr = SecretStr("")
    #: verify TLS certificates of an https:// URL (false only for a self-signed test proxy)
    tls_verify: bool = True
    #: CA bundle file for an https:// URL signed by a private CA (then verified against it, whatever TLS_VERIFY)
    ca_bundle: str = ""
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    #: longest a single HTTP answer may take (a busy ComfyUI answers slowly: pitfall 8)
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: no message about a running prompt for this long: check /queue and /history (never hang)
    stall_s: float = Field(30.0, gt=0, le=86400)
    #: while the socket is down (or the prompt was submitted on an earlier socket): poll this often
    poll_s: float = Field(1.0, gt=0, le=600)
    #: ComfyUI unreachable this long during a job: the job fails, retryable
    unreachable_s: float = Field(5.0, gt=0, le=3600)
    #: an empty /history after the prompt ended is asked again this many times (pitfall 2)
    history_retries: int = Field(6, ge=0, le=100)
    #: run the valid part of a workflow ComfyUI accepted with node_errors (pitfall 10)
    allow_partial: bool = False
    #: ask ComfyUI for previews with their prompt id (PREVIEW_IMAGE_WITH_METADATA)
    preview_metadata: bool = True
    max_input_image_bytes: int = Field(50 * 1024 * 1024, gt=0, le=1024 * 1024 * 1024)
    max_output_bytes: int = Field(4 * 1024 * 1024 * 1024, gt=0)
    #: folders listed by models() (GET /models/<folder>)
    model_folders: str = DEFAULT_MODEL_FOLDERS
    #: supervise ComfyUI: the command that starts it ({port} is the slot's port), in DIR
    command: str = ""
    dir: str = ""
    #: where the supervised ComfyUI's log goes (default: DIR/emp-comfyui-<port>.log)
    log_dir: str = ""
    #: longest wait between restarts of a supervised ComfyUI that keeps dying
    restart_max_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str) -> str:
        if value and "{port}" not in value:
            raise ValueError("must contain {port}, replaced by each slot's port (e.g. python main.py --port {port})")
        return value

    def basic_auth(self, variable: str = "EMP_COMFYUI_AUTH") -> tuple[str, str] | None:
        pair = super().basic_auth(variable)
        if pair and self.bearer():
            raise ConfigError("EMP_COMFYUI_AUTH and EMP_COMFYUI_TOKEN are both set: configure one of them")
        return pair

    def ssl_context(self) -> ssl.SSLContext:
        """The one TLS configuration of both the HTTP calls and the /ws socket: verified against
        ``CA_BUNDLE`` when set, else the system's CAs, unless ``TLS_VERIFY`` is false (and no bundle)."""
        try:
            context = ssl.create_default_context(cafile=self.ca_bundle or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"EMP_COMFYUI_CA_BUNDLE={self.ca_bundle!r} cannot be used: {exc}") from None
        if not self.tls_verify and not self.ca_bundle:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def bearer(self) -> str | None:
        return self.token.get_secret_value() or None

    def folders(self) -> list[str]:
        return [f.strip() for f in self.model_folders.split(",") if f.strip()]
