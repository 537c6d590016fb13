"""EMP_A1111_*: where each slot's A1111 listens, its credentials, timeouts and input rules."""

from __future__ import annotations

from pydantic import Field

from connectors.inputs import InputSettings
from connectors.settings import EngineSettings

MIB = 1024 * 1024


class A1111Settings(EngineSettings, InputSettings):
    """Per slot: ``URL`` + ``PORT_STEP`` (slot I uses port + I * step) or ``URLS`` (slot I uses
    the I-th entry); ``AUTH`` is A1111's ``--api-auth`` pair ``user:pass``; ``INPUT_HOSTS`` and
    ``INPUT_TIMEOUT_S`` (:class:`connectors.inputs.InputSettings`) for input URLs."""

    url: str = "http://127.0.0.1:7860"  # --api with the UI; a --nowebui server listens on 7861
    #: one generation request: A1111 answers when the whole job is done (after any queued ones)
    timeout_s: float = Field(3600.0, gt=0, le=7 * 86400)
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    #: progress, interrupt, models and options calls
    request_timeout_s: float = Field(10.0, gt=0, le=300)
    connect_retries: int = Field(3, ge=0, le=20)
    progress_interval_s: float = Field(0.5, ge=0.05, le=60)
    #: progress unanswered this long while a generation runs: the engine is gone (retryable)
    stall_s: float = Field(30.0, gt=0, le=3600)
    max_response_bytes: int = Field(512 * MIB, gt=0)
    max_input_bytes: int = Field(32 * MIB, gt=0, le=1024 * MIB)
    #: true: A1111 reloads its own checkpoint after a job that asked for another one
    restore_checkpoint: bool = False
