"""``emp-worker doctor``: every check an operator needs before (or instead of) reading logs.

One ``Check`` per line, each with a fix hint when it does not pass: the configuration (settings,
connectors and their settings, output store), the plugins, Redis (reachable, credentials, version,
latency, the scripts load, clock skew against Redis ``TIME``, job ids set aside in quarantine),
NVML and each GPU's health, each configured connector's engine (a connector created for the
check: ``start()``, ``health()``, ``stop()``, each bounded; an engine the worker itself launches
is not launched), and the disk space for the local output store.

Every call is bounded (``REDIS_TIMEOUT_S``, ``ENGINE_TIMEOUT_S``); a check that cannot run because
an earlier one failed is ``skip``. Verdicts (version, latency, skew, quarantine, disk) are pure functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil

from connectors.base import ConnectorConfig, HealthState
from connectors.manager import Plugins, plugins_path
from worker.errors import ConfigError, refused_credentials
from worker.guard import PluginFailed, guard
from worker.settings import Settings, load_settings, redact_url

Status = Literal["ok", "warn", "fail", "skip"]
T = TypeVar("T")

REDIS_TIMEOUT_S = 3.0
ENGINE_TIMEOUT_S = 15.0
MIN_REDIS = (6, 2)
LATENCY_WARN_MS, LATENCY_FAIL_MS = 20.0, 500.0
SKEW_WARN_S, SKEW_FAIL_S = 1.0, 60.0
DISK_WARN_GB, DISK_FAIL_GB = 10.0, 1.0
GIB = 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        hint = f" -> {self.hint}" if self.hint and self.status in ("warn", "fail") else ""
        return f"{self.status.upper():<4}  {self.name}: {self.detail}{hint}"


# --- verdicts --------------------------------------------------------------------------------------


def version_check(version: str) -> Check:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return Check("redis version", "warn", f"{version!r} is not a version number", "use Redis 6.2+ or Valkey")
    if parts < MIN_REDIS:
        return Check("redis version", "fail", f"{version}: too old", "upgrade to Redis 6.2 or later (or Valkey)")
    return Check("redis version", "ok", version)


def latency_check(samples_ms: Sequence[float]) -> Check:
    median = statistics.median(samples_ms)
    detail = f"median {median:.1f} ms over {len(samples_ms)} PINGs"
    hint = "run the worker near its Redis (same region / network); every claim and heartbeat is a round trip"
    if median >= LATENCY_FAIL_MS:
        return Check("redis latency", "fail", detail, hint)
    if median >= LATENCY_WARN_MS:
        return Check("redis latency", "warn", detail, hint)
    return Check("redis latency", "ok", detail)


def skew_check(skew_s: float) -> Check:
    detail = f"this clock is {abs(skew_s):.2f}s {'ahead of' if skew_s > 0 else 'behind'} Redis TIME"
    hint = "sync the clock (timedatectl set-ntp true, or chrony); queue-wait times and client timestamps use it"
    if abs(skew_s) >= SKEW_FAIL_S:
        return Check("clock skew", "fail", detail, hint)
    if abs(skew_s) >= SKEW_WARN_S:
        return Check("clock skew", "warn", detail, hint)
    return Check("clock skew", "ok", detail)


def quarantine_check(count: int) -> Check:
    if count <= 0:
        return Check("quarantine", "ok", "no job id set aside")
    return Check("quarantine", "warn", f"{count} job id(s) that no worker could read or fail are set aside "
                 "in emp:quarantine", "emp-worker status lists them with the reason: fix or delete each job, "
                 "then remove its id from the quarantine hash (HDEL)")


def disk_check(directory: str, free_bytes: int | None, writable: bool) -> Check:
    hint = f"free space under {directory}, or point EMP_OUTPUT_DIR at a bigger disk"
    if free_bytes is None:
        return Check("output disk", "fail", f"{directory}: no such directory and none above it", hint)
    free = free_bytes / GIB
    detail = f"{directory}: {free:.1f} GB free"
    if not writable:
        return Check("output disk", "fail", f"{detail}, not writable by this user",
                     f"let this user write {directory} (or set EMP_OUTPUT_DIR)")
    if free < DISK_FAIL_GB:
        return Check("output disk", "fail", detail, hint)
    if free < DISK_WARN_GB:
        return Check("output disk", "warn", detail, hint)
    return Check("output disk", "ok", detail)


# --- configuration and plugins ---------------------------------------------------------------------


def configuration(overrides: dict[str, Any]) -> tuple[Settings | None, Plugins | None, list[Check]]:
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        return None, None, [Check("configuration", "fail", str(exc), "fix the variable it names (see .env.example)")]
    checks = [Check("configuration", "ok", f"connectors {settings.connectors}, Redis {redact_url(settings.redis_url)}, "
                                           f"machine {settings.machine_id}")]
    plugins: Plugins | None = Plugins(plugins_dir=plugins_path(settings.plugins_dir))
    assert plugins is not None
    try:
        classes = plugins.classes_for(settings.connector_names)
        checks.append(Check("connectors", "ok", ", ".join(f"{c.name} ({', '.join(c.service_types) or '-'})"
                                                          for c in classes)))
    except ConfigError as exc:
        checks.append(Check("connectors", "fail", str(exc), "fix EMP_CONNECTORS or the connector's EMP_<NAME>_* "
                                                            "setting it names"))
        plugins = None
    checks.append(_output_store(settings))
    return settings, plugins, checks


def _output_store(settings: Settings) -> Check:
    from worker.outputs import OutputPlacer

    try:
        OutputPlacer(settings, Plugins().store_classes()).check()
    except ConfigError as exc:
        return Check("output store", "fail", str(exc), "fix EMP_OUTPUT_STORE or its EMP_OUTPUT_* settings")
    return Check("output store", "ok", settings.output_store)


def plugin_checks(plugins: Plugins | None) -> list[Check]:
    if plugins is None:
        return [Check("plugins", "skip", "the connectors did not load")]
    installed = plugins.installed()
    checks = [Check("plugins", "ok", f"{len(installed)} connector(s) installed: "
                                     f"{', '.join(sorted({i.name for i in installed}))}")]
    checks.extend(Check("plugin", "fail", problem, "fix or remove the plugin it names (emp-worker plugins lists them)")
                  for problem in sorted(plugins.problems.values()))
    return checks


# --- Redis -----------------------------------------------------------------------------------------


async def _bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, REDIS_TIMEOUT_S)


async def redis_checks(settings: Settings) -> list[Check]:
    from worker import scripts
    from worker.redis_conn import RedisOptions, describe, open_redis

    options = RedisOptions.from_settings(settings)  # TLS, Sentinel or Cluster, as the worker connects
    shown = describe(settings.redis_url, options)
    client = open_redis(settings.redis_url, options)
    try:
        try:
            await _bounded(client.ping())  # type: ignore[arg-type]  # the sync client's union
        except Exception as exc:
            return _unreachable(shown, exc)
        checks = [Check("redis", "ok", f"reachable at {shown}"), Check("redis auth", "ok", "credentials accepted")]
        info = await _bounded(client.info("server"))
        checks.append(version_check(str(info.get("valkey_version") or info.get("redis_version", "?"))))
        samples = []
        for _ in range(5):
            began = time.perf_counter()
            await _bounded(client.ping())  # type: ignore[arg-type]
            samples.append((time.perf_counter() - began) * 1000)
        checks.append(latency_check(samples))
        checks.append(await _scripts_check(client, scripts.ALL))
        began = time.time()
        seconds, micros = await _bounded(client.time())
        local = (began + time.time()) / 2
        checks.append(skew_check(local - (seconds + micros / 1e6)))
        checks.append(await _quarantine(client, settings))
        return checks
    except Exception as exc:  # Redis went away mid-way, or refused a command
        return [Check("redis", "fail", f"{type(exc).__name__}: {str(exc)[:200]}", "check Redis and its ACL")]
    finally:
        await client.aclose()


def _unreachable(shown: str, exc: BaseException) -> list[Check]:
    from worker.redis_conn import refused

    config = refused(exc)  # refused credentials or permissions, or TLS set up wrong
    if config is not None and refused_credentials(exc) is not None:
        return [Check("redis", "ok", f"reachable at {shown}"),
                Check("redis auth", "fail", str(config).removeprefix("EMP_REDIS_URL: "),
                      "put the right user and password in EMP_REDIS_URL, e.g. redis://user:password@host:6379/0")]
    if config is not None:
        return [Check("redis", "fail", f"{shown}: {config}"[:400], "fix the TLS setting it names")]
    why = f"took over {REDIS_TIMEOUT_S:g}s" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
    return [Check("redis", "fail", f"cannot reach {shown}: {why}"[:400],
                  "check EMP_REDIS_URL's host and port, that Redis runs and a firewall lets this machine in "
                  "(redis-cli -u URL ping)"),
            Check("redis auth, version, latency, scripts, clock skew, quarantine", "skip", "need a reachable Redis")]


async def _quarantine(client: Any, settings: Settings) -> Check:
    from worker.keys import Keys

    try:
        return quarantine_check(int(await _bounded(client.hlen(Keys(settings.key_prefix).quarantine))))
    except Exception as exc:  # another type under that name: the scripts drop it at the next claim
        return Check("quarantine", "warn", f"cannot read it: {type(exc).__name__}: {str(exc)[:120]}",
                     "a worker's next claim replaces a key of the wrong type")


async def _scripts_check(client: Any, sources: dict[str, str]) -> Check:
    try:
        for source in sources.values():
            await _bounded(client.script_load(source))
    except Exception as exc:
        return Check("redis scripts", "fail", f"SCRIPT LOAD failed: {str(exc)[:200]}",
                     "the Redis user needs the scripting commands (EVALSHA, SCRIPT) and Lua must be enabled")
    return Check("redis scripts", "ok", f"{len(sources)} Lua scripts load")


# --- GPUs, engines, disk ---------------------------------------------------------------------------


def gpu_checks(settings: Settings) -> tuple[list[Check], Any]:
    """NVML and each GPU; also the Hardware read (for the engine checks' slots)."""
    from worker.hardware import discover_with, open_reader

    reader, error = open_reader(settings.fake_gpus)
    try:
        hardware = discover_with(reader, error)
    finally:
        if reader is not None:
            reader.close()
    if not hardware.gpus:
        return [Check("nvml", "warn", f"no NVIDIA GPU ({hardware.gpu_error}): the worker runs one CPU-only slot",
                      "if this machine has GPUs, install the NVIDIA driver (nvidia-smi must work)")], hardware
    source = "EMP_FAKE_GPUS" if hardware.gpu_source == "fake" else "NVML"
    checks = [Check("nvml", "ok", f"{source}: driver {hardware.driver_version}, CUDA {hardware.cuda_version}, "
                                  f"{len(hardware.gpus)} GPU(s)")]
    for g in hardware.gpus:
        detail = (f"{g.name}, {g.memory_total_gb:g} GB ({g.memory_free_gb:g} free)"
                  + (f", {g.temperature_c:g} C" if g.temperature_c is not None else "")
                  + (f", {g.utilization_pct:g}% busy" if g.utilization_pct is not None else ""))
        if g.problems:
            checks.append(Check(f"gpu {g.index}", "fail", f"{detail}: {'; '.join(g.problems)}",
                                "reset the GPU (nvidia-smi -r -i N) or replace it; its slot takes no jobs"))
        elif g.warnings:
            checks.append(Check(f"gpu {g.index}", "warn", f"{detail}: {'; '.join(g.warnings)}",
                                "watch it: cooling, power or memory errors"))
        else:
            checks.append(Check(f"gpu {g.index}", "ok", detail))
    return checks, hardware


async def engine_check(plugins: Plugins, settings: Settings, name: str, config: ConnectorConfig,
                       label: str) -> Check:
    """One connector's engine, through a connector made for the check (start, health, stop)."""
    try:
        (connector,) = plugins.create_connectors([name], config)
    except ConfigError as exc:
        return Check(label, "fail", str(exc), f"fix the EMP_{name.upper()}_* settings")
    if getattr(connector, "supervisor", None) is not None:
        return Check(label, "skip", "launched by the worker (supervised); doctor does not start it")
    timeout = min(ENGINE_TIMEOUT_S, settings.health_timeout_s + 10)
    hint = f"is the engine running and reachable at its EMP_{name.upper()}_URL? (connector {name})"
    try:
        await guard(name, "start()", connector.start(), timeout)
        health = await guard(name, "health()", connector.health(), settings.health_timeout_s)
    except PluginFailed as exc:
        return Check(label, "fail", f"{exc.call} {exc.detail}"[:400], hint)
    finally:
        with contextlib.suppress(PluginFailed):  # the verdict is start's and health's
            await guard(name, "stop()", connector.stop(), timeout)
    message = str(getattr(health, "message", ""))[:300] or "healthy"
    state = getattr(health, "state", None)
    if state is HealthState.OK:
        return Check(label, "ok", message)
    if state is HealthState.DEGRADED:
        return Check(label, "warn", message, hint)
    return Check(label, "fail", message, hint)


async def engine_checks(plugins: Plugins | None, settings: Settings, hardware: Any) -> list[Check]:
    if plugins is None:
        return [Check("engines", "skip", "the connectors did not load")]
    gpus = hardware.gpus or [None]
    configs = [ConnectorConfig(f"{settings.machine_id}-doctor", g.index if g else None, gpu_uuid=g.uuid if g else "")
               for g in gpus]
    found = await asyncio.gather(*(
        engine_check(plugins, settings, name, config,
                     f"engine {name}" + (f" (slot {config.slot_index})" if len(configs) > 1 else ""))
        for config in configs for name in settings.connector_names))
    return list(found)


def output_disk(settings: Settings) -> Check:
    if settings.output_store not in ("local", "file"):
        return Check("output disk", "ok", f"outputs go to the {settings.output_store} store: no local disk needed")
    from connectors.stores.local import LocalStore

    try:
        directory = str(getattr(LocalStore.load_settings(), "dir", "outputs"))
    except ConfigError as exc:
        return Check("output disk", "fail", str(exc), "fix EMP_OUTPUT_DIR")
    path = Path(directory).resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return disk_check(str(path), None, False)
    return disk_check(str(path), psutil.disk_usage(str(existing)).free, os.access(existing, os.W_OK))


# --- all of it -------------------------------------------------------------------------------------


async def run_doctor(overrides: dict[str, Any], progress: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order; `progress` sees each as it is made."""
    logging.getLogger().addHandler(logging.NullHandler())  # the checks' own log lines stay out of the report
    checks: list[Check] = []

    def add(found: Sequence[Check]) -> None:
        for check in found:
            checks.append(check)
            if progress is not None:
                progress(check)

    settings, plugins, config = configuration(overrides)
    add(config)
    if settings is None:
        add([Check("everything else", "skip", "needs the configuration")])
        return checks
    add(plugin_checks(plugins))
    add(await redis_checks(settings))
    gpus, hardware = await asyncio.to_thread(gpu_checks, settings)
    add(gpus)
    add(await engine_checks(plugins, settings, hardware))
    add([output_disk(settings)])
    return checks
