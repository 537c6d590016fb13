"""Assemble and run the daemon: settings -> hardware -> one worker slot per GPU -> run them all.

On a box with N GPUs, one agent runs N slots by default; each has its own worker id
(``{machine}-worker-{connector}-{gpu index}``), its own capability record with its own GPU's
memory, and its own connector instances (told their GPU index, e.g. to pick a per-GPU port).
``--gpu I`` runs only slot I, for one-process-per-GPU set-ups (PM2, systemd templates). A machine
without a GPU runs one CPU-only slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from connectors.base import ConnectorConfig
from connectors.manager import Plugins, plugins_path
from worker.agent import Worker
from worker.client import connect
from worker.embedded import EmbeddedRedis
from worker.errors import ConfigError
from worker.hardware import Gpu, GpuReader, Hardware, discover_with, hardware_capabilities, open_reader
from worker.keys import Keys
from worker.logs import setup_logging
from worker.machine import MachineStatus
from worker.notify import Notifier
from worker.outputs import OutputPlacer
from worker.redis_conn import RedisOptions, describe, refused
from worker.settings import Settings

log = logging.getLogger("emp.daemon")


@dataclass(frozen=True)
class Slot:
    index: int
    worker_id: str
    gpu: Gpu | None


def default_worker_id(settings: Settings, index: int = 0) -> str:
    """emp-job-queue's convention: {machine}-worker-{type}-{index}."""
    return settings.worker_id or f"{settings.machine_id}-worker-{settings.connector_names[0]}-{index}"


def plan_slots(settings: Settings, hardware: Hardware, gpu_index: int | None) -> list[Slot]:
    """The worker slots to run: every GPU, only GPU `gpu_index`, or one CPU-only slot."""
    gpus = hardware.gpus
    if gpu_index is not None:
        if gpu_index >= len(gpus):
            why = f" ({hardware.gpu_error})" if hardware.gpu_error else ""
            raise ConfigError(f"--gpu {gpu_index}: this machine has {len(gpus)} NVIDIA GPU(s){why}")
        return [Slot(gpu_index, default_worker_id(settings, gpu_index), gpus[gpu_index])]
    if not gpus:
        return [Slot(0, default_worker_id(settings, 0), None)]
    if settings.worker_id and len(gpus) > 1:  # a set id names the agent; each slot gets -{index}
        return [Slot(g.index, f"{settings.worker_id}-{g.index}", g) for g in gpus]
    return [Slot(g.index, default_worker_id(settings, g.index), g) for g in gpus]


@contextlib.contextmanager
def _redis_url(settings: Settings, embedded: bool) -> Iterator[str]:
    if not embedded:
        yield settings.redis_url
        return
    with EmbeddedRedis() as server:
        log.info("embedded redis-server started at %s", server.url)
        yield server.url


class StopSignals:
    """SIGTERM/SIGINT -> request_stop() on every slot. The same stop arriving twice at once is one
    request: a signal sent to a one-file binary's process group (a terminal's Ctrl-C, systemd's
    KillMode=control-group, PM2's treekill) reaches the worker directly *and* through the
    bootloader, which forwards it. Only a signal ECHO_S after the first skips the drain."""

    ECHO_S = 1.0

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.first: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first < self.ECHO_S:
            return
        self.first = self.first or now
        for worker in self.workers:
            worker.request_stop()


async def run_slots(workers: list[Worker]) -> None:
    """Run every slot until a stop signal; a slot that crashes drains the others, then re-raises."""
    loop = asyncio.get_running_loop()
    stop_all = StopSignals(workers)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    tasks = [asyncio.create_task(w.run(), name=w.worker_id) for w in workers]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if t.exception() is not None]
    if failed:
        if not isinstance(failed[0].exception(), ConfigError):  # a refusal is its own one line
            log.error("worker slot %s crashed; stopping the other slots", failed[0].get_name())
        stop_all()
    await asyncio.gather(*tasks, return_exceptions=True)
    crash = failed[0].exception() if failed else None
    if crash is not None:
        raise crash


async def run_daemon(settings: Settings, *, embedded: bool = False, gpu_index: int | None = None) -> None:
    setup_logging(settings.log_level, settings.log_format)
    plugins = Plugins(plugins_dir=plugins_path(settings.plugins_dir))
    plugins.classes_for(settings.connector_names)  # unknown, doubled or misconfigured: stop before anything else
    OutputPlacer(settings, plugins.store_classes()).check()
    reader, error = open_reader(settings.fake_gpus)
    try:
        hardware = discover_with(reader, error)
        slots = plan_slots(settings, hardware, gpu_index)
        await _run(settings, embedded, hardware, slots, reader, plugins)
    finally:
        if reader is not None:
            reader.close()


def slot_worker(settings: Settings, client: aioredis.Redis, plugins: Plugins, hardware: Hardware,
                reader: GpuReader | None, slot: Slot) -> Worker:
    """The Worker of one slot: its connectors, its GPU's capability block and GPU re-reads."""
    gpu = slot.gpu
    config = ConnectorConfig(slot.worker_id, gpu.index if gpu else None, gpu_uuid=gpu.uuid if gpu else "")
    return Worker(settings, client, plugins.create_connectors(settings.connector_names, config),
                  worker_id=slot.worker_id, hardware=hardware_capabilities(hardware, gpu), plugins=plugins,
                  gpu=gpu, gpu_probe=functools.partial(reader.read, gpu.index) if reader and gpu else None,
                  host=hardware.host())


CHECK_TRIES = 3
CHECK_PAUSE_S = 0.3


async def check_credentials(client: aioredis.Redis) -> None:
    """Stop start-up with one line when Redis refuses our credentials or our TLS set-up; an
    unreachable Redis is an outage the slots ride out (they retry, and check again when it answers)."""
    for attempt in range(CHECK_TRIES):
        try:
            await client.ping()  # type: ignore[misc]  # redis-py types it with the sync client's union
            return
        except (RedisError, RedisClusterException, OSError) as exc:
            refusal = refused(exc)
            if refusal is not None:
                raise refusal from None
            if attempt == CHECK_TRIES - 1:
                log.warning("Redis does not answer yet (%s); the worker keeps trying", type(exc).__name__)
            else:  # a TLS refusal can read as a dropped connection when its alert loses the race
                await asyncio.sleep(CHECK_PAUSE_S)


async def _run(settings: Settings, embedded: bool, hardware: Hardware, slots: list[Slot],
               reader: GpuReader | None, plugins: Plugins) -> None:
    with _redis_url(settings, embedded) as url:
        options = RedisOptions() if embedded else RedisOptions.from_settings(settings)
        log.info("connecting to %s: %d slot(s): %s", describe(url, options), len(slots),
                 ", ".join(f"{s.worker_id} ({s.gpu.name}, {s.gpu.memory_total_gb:g} GB)" if s.gpu
                           else f"{s.worker_id} (CPU only)" for s in slots))
        client = connect(url, options)
        try:
            await check_credentials(client)
            workers = [slot_worker(settings, client, plugins, hardware, reader, slot) for slot in slots]
            served = None
            if settings.metrics_port:  # prometheus-client is imported only then
                from worker.metrics import serve_metrics

                served = await serve_metrics(settings, workers, port_offset=slots[0].index)
            machine = MachineStatus(client, Keys(settings.key_prefix), settings.machine_id, workers)
            stopped = asyncio.Event()
            publisher = asyncio.create_task(machine.run(stopped))
            notifier = Notifier.from_environ()  # systemd Type=notify: READY, STATUS, WATCHDOG, STOPPING
            tasks = {publisher} | ({asyncio.create_task(notifier.supervise(workers, stopped))} if notifier else set())
            try:
                await run_slots(workers)
            finally:
                stopped.set()
                await asyncio.wait(tasks, timeout=5.0)
                if served is not None:
                    await served.close()
        finally:
            await client.aclose()
