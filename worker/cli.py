"""The ``emp-worker`` command line.

Precedence of every setting: CLI option > environment (EMP_*, or emp-job-queue's names) > .env
file > default. Expected errors print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from worker import __version__
from worker.errors import ConfigError, EmpWorkerError, InvalidJob
from worker.protocol import printable
from worker.settings import Settings, load_settings, redact_url

# Plain click help (no rich panels): flags read as flags (`--follow`), not as taking a value.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="emp-worker: a GPU worker agent for the EmProps job queue.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

REDIS_URL_HELP = "Redis URL [env: EMP_REDIS_URL, HUB_REDIS_URL]"


def _version(value: bool) -> None:
    if value:
        out.print(f"emp-worker {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """emp-worker: claims jobs from Redis and runs them through connector plugins."""


def _fail_line(kind: str, message: str) -> None:
    """An expected error as one line: a JSON log line under EMP_LOG_FORMAT=json (or auto, off a
    terminal), else text; passwords in URLs masked either way."""
    from worker.logs import error_line, format_before_settings, redact, use_json

    if use_json(format_before_settings()):
        print(error_line("emp.cli", f"{kind}: {message}", error=kind.replace(" ", "_")), file=sys.stderr, flush=True)
    else:
        err.print(f"[red]{kind}:[/red] {escape(redact(message))}", highlight=False)


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        _fail_line("configuration error", str(exc))
        raise typer.Exit(2) from None
    except EmpWorkerError as exc:
        _fail_line("error", str(exc))
        raise typer.Exit(1) from None
    except (OSError, ConnectionError) as exc:
        _fail_line("error", f"cannot reach Redis: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    with _clean_errors():
        try:
            return asyncio.run(coro)
        except Exception as exc:
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import TimeoutError as RedisTimeoutError

            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                raise EmpWorkerError(f"cannot reach Redis: {exc}") from exc
            raise


def _settings(**overrides: Any) -> Settings:
    with _clean_errors():
        return load_settings(**overrides)


@app.command()
def run(
    connectors: str = typer.Option(None, "--connectors", "-c",
                                   help="Comma list of connectors [env: EMP_CONNECTORS, CONNECTORS]"),
    redis_url: str = typer.Option(None, "--redis-url", help=REDIS_URL_HELP),
    worker_id: str = typer.Option(None, "--worker-id", help="Worker id [env: EMP_WORKER_ID, WORKER_ID]"),
    machine_id: str = typer.Option(None, "--machine-id", help="[env: EMP_MACHINE_ID, MACHINE_ID]"),
    embedded: bool = typer.Option(False, "--embedded", help="Start a private Redis for a local trial."),
    gpu: int = typer.Option(None, "--gpu", min=0, help="Pin this worker to GPU I (one process per GPU)."),
    metrics_port: int = typer.Option(None, "--metrics-port", min=0, max=65535,
                                     help="Serve /metrics and /healthz on this port (with --gpu I: port + I); "
                                          "0: off [env: EMP_METRICS_PORT]"),
) -> None:
    """Start the worker daemon (until SIGTERM/SIGINT: then it drains and exits 0)."""
    from worker.daemon import run_daemon

    settings = _settings(connectors=connectors, redis_url=redis_url, worker_id=worker_id,
                         machine_id=machine_id, metrics_port=metrics_port)
    _run(run_daemon(settings, embedded=embedded, gpu_index=gpu))


@app.command()
def submit(
    service: str = typer.Option(..., "--service", "-s", help="service_required of the job"),
    payload: str = typer.Option("{}", "--payload", "-p", help="JSON object"),
    priority: int = typer.Option(50, "--priority", help="Higher runs first"),
    requirements: str = typer.Option("", "--requirements", help="JSON object"),
    customer_id: str = typer.Option("", "--customer-id"),
    max_retries: int = typer.Option(3, "--max-retries"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Show progress; exit 0/1 on completion/failure"),
    wait: bool = typer.Option(False, "--wait", help="With --follow: keep following even if no live worker can "
                                                     "run the job yet"),
    redis_url: str = typer.Option(None, "--redis-url", help=REDIS_URL_HELP),
) -> None:
    """Submit a job (exactly as the emp-job-queue API does)."""
    settings = _settings(redis_url=redis_url)
    with _clean_errors():
        body = _json_object("--payload", payload)
        reqs = _json_object("--requirements", requirements) if requirements else None
    ok = _run(_submit(settings, service, body, priority, reqs, customer_id, max_retries, follow, wait))
    raise typer.Exit(0 if ok else 1)


def _json_object(option: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidJob(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidJob(f"{option} must be a JSON object")
    return value


async def _submit(settings: Settings, service: str, payload: dict[str, Any], priority: int,
                  requirements: dict[str, Any] | None, customer_id: str, max_retries: int,
                  follow: bool, wait: bool = False) -> bool:
    from worker.client import Client
    from worker.matching import matches

    async with Client.from_settings(settings) as client:
        job_id = await client.submit(service, payload, priority=priority, requirements=requirements,
                                     customer_id=customer_id, max_retries=max_retries)
        out.print(job_id, highlight=False)
        if not follow:
            return True
        live = await client.live_capabilities()
        if not any(matches(caps, service, json.dumps(requirements) if requirements else "", customer_id)
                   for caps in live.values()):
            offering = sum(1 for caps in live.values() if service in (caps.get("services") or []))
            why = (f"{offering} live worker(s) run {service!r} but none meets the job's requirements" if offering
                   else f"no live worker runs {service!r}")
            if not wait:
                err.print(f"{why}: the job waits in the queue (follow it anyway with --wait)", highlight=False)
                return False
            err.print(f"{why} yet; waiting (--wait)", highlight=False)
        return await _follow(client, job_id)


async def _follow(client: Any, job_id: str) -> bool:
    status = "?"
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task("pending", total=100)
        async for event in client.follow(job_id):
            status = event.kind
            if event.kind == "progress":
                bar.update(task, completed=float(event.data.get("progress", 0)),
                           description=str(event.data.get("message", "running")))
            else:
                bar.update(task, description=event.kind)
            if not err.is_terminal:
                err.print(f"{event.kind} {json.dumps(event.data)[:200]}", highlight=False)
    job = await client.get(job_id)
    if job.get("status") == "completed":
        out.print(f"completed: {json.dumps(await client.result(job_id))[:2000]}", highlight=False)
        return True
    out.print(f"{job.get('status', status)}: {job.get('error', '')}", highlight=False)
    return False


@app.command()
def status(
    redis_url: str = typer.Option(None, "--redis-url", help=REDIS_URL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Queue depth by service, and the live workers with their state."""
    settings = _settings(redis_url=redis_url)
    depth, workers, stuck, waiting, quarantined = _run(_status(settings))
    if as_json or not out.is_terminal:
        out.print_json(json.dumps({"pending": depth, "workers": [w.__dict__ for w in workers],
                                   "unrunnable": [u.__dict__ for u in stuck],
                                   "waiting": [w.__dict__ for w in waiting],
                                   "quarantined": [{**q.__dict__, "job_id": printable(q.job_id, 256)}
                                                   for q in quarantined]}))
        return
    queue = Table(title=f"Pending jobs ({redact_url(settings.redis_url)})")
    queue.add_column("service")
    queue.add_column("pending", justify="right")
    for service, count in sorted(depth.items()):
        queue.add_row(service, str(count))
    out.print(queue)
    table = Table(title="Workers")
    for column in ("worker", "status", "alive", "job", "services", "done", "failed", "problems"):
        table.add_column(column)
    for w in workers:
        table.add_row(w.worker_id, w.status, "yes" if w.alive else "no", w.current_job_id,
                      ",".join(w.services), str(w.completed), str(w.failed), "; ".join(w.problems) or "-")
    out.print(table)
    if stuck:
        warn = Table(title="[red]Pending jobs no live worker can run[/red]")
        for column in ("service", "requirements", "customer", "pending", "oldest wait", "why"):
            warn.add_column(column)
        for u in stuck:
            warn.add_row(u.service, u.requirements[:80] or "-", u.customer_id or "-", str(u.pending),
                         f"{u.oldest_wait_s:.0f}s", u.reason)
        out.print(warn)
    if waiting:
        next_up = Table(title="Next in line, and why each is still waiting")
        for column in ("job", "service", "waited", "why"):
            next_up.add_column(column)
        for w in waiting:
            next_up.add_row(w.job_id, w.service, f"{w.waited_s:.0f}s", w.reason)
        out.print(next_up)
    _print_quarantined(quarantined)


def _print_quarantined(quarantined: list[Any]) -> None:
    if not quarantined:
        return
    parked = Table(title="[red]Quarantined: ids no worker could read or fail (emp:quarantine)[/red]")
    for column in ("job", "since", "where", "why"):
        parked.add_column(column)
    for q in quarantined:
        parked.add_row(escape(printable(q.job_id, 80)), q.at, q.where, escape(q.reason))
    out.print(parked)


async def _status(settings: Settings) -> tuple[dict[str, int], list[Any], list[Any], list[Any], list[Any]]:
    from worker.client import Client
    from worker.waiting import waiting_jobs

    async with Client.from_settings(settings) as client:
        return (await client.queue_depth(), await client.workers(), await client.unrunnable(),
                await waiting_jobs(client, settings.retry_exclusion_s, settings.model_affinity_s),
                await client.quarantined())


@app.command()
def cancel(
    job_id: str = typer.Argument(..., help="The job to cancel"),
    redis_url: str = typer.Option(None, "--redis-url", help=REDIS_URL_HELP),
) -> None:
    """Cancel a pending or running job."""
    settings = _settings(redis_url=redis_url)

    async def go() -> str:
        from worker.client import Client

        async with Client.from_settings(settings) as client:
            return await client.cancel(job_id)

    previous = _run(go())
    out.print(f"cancelled (was {previous})")


@app.command()
def hardware(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
    fake_gpus: str = typer.Option(None, "--fake-gpus", help="Pretend GPUs, e.g. 2x24GB [env: EMP_FAKE_GPUS]"),
) -> None:
    """What this machine has (NVML and psutil): a table on a terminal, JSON otherwise."""
    from worker.hardware import discover

    settings = _settings(fake_gpus=fake_gpus)
    with _clean_errors():
        found = discover(settings.fake_gpus)
    if as_json or not out.is_terminal:
        out.print_json(json.dumps(found.to_dict()))
        return
    source = {"nvml": "NVML", "fake": "EMP_FAKE_GPUS"}.get(found.gpu_source, "none")
    out.print(f"{found.os}, {found.cpu_cores} CPU cores, {found.ram_gb:g} GB RAM, "
              f"{found.disk_free_gb:g} GB disk free", highlight=False)
    if not found.gpus:
        out.print(f"no NVIDIA GPU: {found.gpu_error}", highlight=False)
        return
    table = Table(title=f"GPUs from {source} (driver {found.driver_version}, CUDA {found.cuda_version})")
    for column in ("#", "name", "memory GB", "free GB", "cc", "util %", "temp C", "power W", "health"):
        table.add_column(column)
    for g in found.gpus:
        health = "; ".join(g.problems + g.warnings) or "ok"
        table.add_row(str(g.index), g.name, f"{g.memory_total_gb:g}", f"{g.memory_free_gb:g}",
                      g.compute_capability, _maybe(g.utilization_pct), _maybe(g.temperature_c),
                      _maybe(g.power_w), health)
    out.print(table)


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@app.command()
def plugins(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """The connectors installed: name, services, plugin, package and version."""
    from connectors.manager import Plugins, plugins_path

    settings = _settings()
    with _clean_errors():
        found = Plugins(plugins_dir=plugins_path(settings.plugins_dir)).installed()
    rows = [{"name": i.name, "services": list(i.services), "plugin": i.plugin, "package": i.package,
             "version": i.version} for i in found]
    if as_json or not out.is_terminal:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="Installed connectors")
    for column in ("name", "services", "plugin", "package", "version"):
        table.add_column(column)
    for i in found:
        table.add_row(i.name, ",".join(i.services), i.plugin, i.package, i.version)
    out.print(table)


@app.command()
def check(
    redis_url: str = typer.Option(None, "--redis-url", help=REDIS_URL_HELP),
    machine_id: str = typer.Option(None, "--machine-id", help="[env: EMP_MACHINE_ID, MACHINE_ID]"),
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, max=60, help="Seconds for the whole check"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Exit 0 when this machine's workers are live and healthy, else 1 saying why (a probe)."""
    from worker.health import check_machine

    settings = _settings(redis_url=redis_url, machine_id=machine_id)
    reports, reasons = _run(check_machine(settings, timeout))
    if as_json:
        out.print_json(json.dumps({"healthy": not reasons, "machine_id": settings.machine_id,
                                   "workers": [r.to_dict() for r in reports], "problems": reasons}))
    elif not reasons:
        out.print(f"healthy: {', '.join(r.worker_id for r in reports)}", highlight=False)
    for reason in reasons if not as_json else []:
        print(f"unhealthy: {reason}", file=sys.stderr)
    raise typer.Exit(0 if not reasons else 1)


@app.command()
def doctor(
    redis_url: str = typer.Option(None, "--redis-url", help=REDIS_URL_HELP),
    connectors: str = typer.Option(None, "--connectors", "-c",
                                   help="Comma list of connectors [env: EMP_CONNECTORS, CONNECTORS]"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Check configuration, Redis, GPUs, engines, plugins and disk: one line each, with a fix hint."""
    from worker.doctor import run_doctor

    def show(found: Any) -> None:
        if not as_json:
            print(found.line(), flush=True)

    checks = asyncio.run(run_doctor({"redis_url": redis_url, "connectors": connectors}, show))
    failed = [c for c in checks if c.status == "fail"]
    if as_json:
        out.print_json(json.dumps({"ok": not failed, "checks": [c.to_dict() for c in checks]}))
    raise typer.Exit(1 if failed else 0)


@app.command()
def demo(
    jobs: int = typer.Option(24, "--jobs", min=1, max=10_000, help="How many jobs to submit"),
    workers: int = typer.Option(3, "--workers", min=1, max=64, help="Simulation workers to run"),
    duration: float = typer.Option(1.0, "--duration", min=0, max=60, help="Seconds per job"),
) -> None:
    """A local demo: private Redis, simulation workers, a batch of jobs, live progress, summary."""
    from worker.demo import run_demo

    ok = _run(run_demo(jobs=jobs, workers=workers, duration_s=duration, console=out))
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
