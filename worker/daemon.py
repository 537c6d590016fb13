"""Assemble and run the daemon: settings -> plugins -> connectors -> hardware -> worker slot."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from connectors.base import ConnectorConfig
from connectors.manager import Plugins
from worker.agent import Worker
from worker.client import connect
from worker.embedded import EmbeddedRedis
from worker.errors import ConfigError
from worker.hardware import discover, hardware_capabilities
from worker.logs import setup_logging
from worker.settings import Settings, redact_url

log = logging.getLogger("emp.daemon")


def default_worker_id(settings: Settings, index: int = 0) -> str:
    """emp-job-queue's convention: {machine}-worker-{type}-{index}."""
    return settings.worker_id or f"{settings.machine_id}-worker-{settings.connector_names[0]}-{index}"


@contextlib.contextmanager
def _redis_url(settings: Settings, embedded: bool) -> Iterator[str]:
    if not embedded:
        yield settings.redis_url
        return
    with EmbeddedRedis() as server:
        log.info("embedded redis-server started at %s", server.url)
        yield server.url


async def run_daemon(settings: Settings, *, embedded: bool = False, gpu_index: int | None = None) -> None:
    setup_logging(settings.log_level, settings.log_format)
    hardware = discover()
    if gpu_index is not None and gpu_index >= len(hardware.gpus):
        raise ConfigError(f"--gpu {gpu_index}: this machine has {len(hardware.gpus)} NVIDIA GPU(s)"
                          f"{' (' + hardware.gpu_error + ')' if hardware.gpu_error else ''}")
    index = gpu_index or 0
    gpu = hardware.gpus[index] if hardware.gpus else None
    plugins = Plugins()
    worker_id = default_worker_id(settings, index)
    connectors = plugins.create_connectors(settings.connector_names, ConnectorConfig(worker_id, gpu_index))
    with _redis_url(settings, embedded) as url:
        log.info("connecting to %s as %s", redact_url(url), worker_id)
        client = connect(url)
        try:
            worker = Worker(settings, client, connectors, worker_id=worker_id,
                            hardware=hardware_capabilities(hardware, gpu), plugins=plugins)
            worker.install_signal_handlers()
            await worker.run()
        finally:
            await client.aclose()
