"""An echo connector, as a plugin author outside the project writes one: it imports only from
``connectors`` (the public API) and is found through its ``emp_worker`` entry point."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from connectors import Connector, ConnectorSettings, Job, JobContext, JobResult, PermanentJobError, hookimpl


class EchoSettings(ConnectorSettings):
    greeting: str = "hello"  # EMP_ECHO_GREETING
    delay_s: float = Field(0.0, ge=0, le=60)  # EMP_ECHO_DELAY_S


class EchoConnector(Connector):
    name = "echo"
    service_types = ("echo",)
    max_concurrent_jobs = 1
    settings_class = EchoSettings
    settings: EchoSettings

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        text = job.payload.get("text")
        if not isinstance(text, str):
            raise PermanentJobError("echo payload needs a 'text' string")
        ctx.progress(50, "echoing", eta_s=self.settings.delay_s)
        await asyncio.sleep(self.settings.delay_s)  # the engine's work
        ctx.raise_if_cancelled()
        ctx.add_output("echo.txt", text.encode(), content_type="text/plain")
        return {"text": text, "greeting": self.settings.greeting}


class EchoTwin(EchoConnector):
    """Runs the same service as EchoConnector, on purpose: selecting both is a configuration error."""

    name = "echo-twin"


@hookimpl
def emp_connectors() -> Sequence[type[Any]]:
    return [EchoConnector, EchoTwin]
