"""The one-file binary built from worker.spec, run under `env -i` (nothing from the build machine:
no PATH, no PYTHONPATH, no venv) from a directory of its own with a plugins/ folder beside it.

The binary: EMP_WORKER_BINARY (.ci/run builds it with packaging/release.sh before pytest), or,
with EMP_BUILD_BINARY=1, one built here once per session with the venv's PyInstaller (~2 min);
otherwise these tests skip, saying so. The size and the time from exec to "registered" are
printed (pytest -s) and recorded as properties (--junitxml)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import wait_until
from tests.packaging.procs import ROOT, built_binary, family
from tests.worker.test_plugins_dir import HELLO
from worker import __version__
from worker.client import Client
from worker.embedded import free_port
from worker.keys import Keys

pytestmark = [pytest.mark.binary, pytest.mark.timeout(900)]  # the first test may build it

BUILTIN_CONNECTORS = {"simulation", "comfyui", "a1111", "rest"}
STDLIB_AND_STORES = """
import csv, sqlite3, decimal, zoneinfo, xml.etree.ElementTree, email.mime.text, concurrent.futures
import boto3, azure.storage.blob
boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
"""


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = built_binary()
    if built is not None:
        return built
    if os.environ.get("EMP_BUILD_BINARY") != "1":
        pytest.skip("no one-file binary: set EMP_WORKER_BINARY=dist/emp-worker (bash packaging/build.sh), "
                    "or EMP_BUILD_BINARY=1 to build one for this session (~2 min)")
    pyinstaller = Path(sys.executable).parent / "pyinstaller"
    if not pyinstaller.exists():
        pytest.skip("PyInstaller is not installed in this venv (pip install -e '.[build]')")
    out = tmp_path_factory.mktemp("binary")
    subprocess.run([str(pyinstaller), "--noconfirm", "--log-level", "WARN", "--workpath", str(out / "work"),
                    "--distpath", str(out / "dist"), str(ROOT / "worker.spec")], cwd=ROOT, check=True,
                   capture_output=True, timeout=900)
    return out / "dist" / "emp-worker"


@pytest.fixture
def release(binary: Path, tmp_path: Path) -> Path:
    """A directory as an operator would have it: the binary, and plugins/ beside it."""
    home = tmp_path / "release"
    (home / "plugins").mkdir(parents=True)
    shutil.copy2(binary, home / "emp-worker")
    (home / "plugins" / "hello.py").write_text(HELLO)
    (home / "plugins" / "stdlib_and_stores.py").write_text(STDLIB_AND_STORES)
    return home


def _run(release: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    variables = [f"{k}={v}" for k, v in {**(env or {}), "TMPDIR": _unpack_dir(release)}.items()]
    return subprocess.run(["env", "-i", *variables, "./emp-worker", *args], cwd=release, capture_output=True,
                          text=True, timeout=120, check=False)


def test_version_under_env_i(release: Path, record_property: Callable[[str, object], None]) -> None:
    done = _run(release, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"emp-worker {__version__}", done.stderr
    size = (release / "emp-worker").stat().st_size
    record_property("binary_bytes", size)
    print(f"\nbinary size: {size} bytes ({size / 2**20:.1f} MiB)")
    assert size < 200 * 2**20


def test_plugins_lists_the_builtins_and_the_plugins_folder(release: Path) -> None:
    (release / "plugins" / "broken.py").write_text("import no_such_module_anywhere\n")
    done = _run(release, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert set(rows) >= BUILTIN_CONNECTORS
    assert rows["hello"]["package"] == str((release / "plugins" / "hello.py").resolve())
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "plugin broken" in errors[0], done.stderr  # stdlib_and_stores loaded


@pytest.mark.skipif(not (ROOT / "worker" / "doctor.py").exists(), reason="emp-worker doctor does not exist yet")
def test_doctor_under_env_i(release: Path, redis_url: str) -> None:
    done = _run(release, "doctor", env={"EMP_REDIS_URL": redis_url})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and all(line.split()[0] in ("OK", "WARN", "SKIP") for line in lines), done.stdout
    assert "Traceback" not in done.stderr


def _unpack_dir(release: Path) -> str:
    """Where the bootloader unpacks (what a kill -9 leaves behind stays in the test's tmp dir)."""
    path = release / "tmp"
    path.mkdir(exist_ok=True)
    return str(path)


class Running:
    """`env -i ... ./emp-worker run` in the release directory (stderr kept in a file)."""

    def __init__(self, release: Path, redis_url: str, keys: Keys, worker_id: str, **extra: str) -> None:
        self.log, self.worker_id = release / f"{worker_id}.log", worker_id
        env = {"EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": keys.prefix, "EMP_WORKER_ID": worker_id,
               "EMP_CONNECTORS": "simulation,hello", "EMP_HEARTBEAT_INTERVAL_S": "0.5", "EMP_LEASE_S": "2",
               "EMP_POLL_INTERVAL_S": "1", "EMP_LOG_LEVEL": "INFO", "EMP_LOG_FORMAT": "json",
               "EMP_OUTPUT_DIR": str(release / "outputs"), "TMPDIR": _unpack_dir(release), **extra}
        self.started = time.monotonic()
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(["env", "-i", *(f"{k}={v}" for k, v in env.items()), "./emp-worker", "run"],
                                         cwd=release, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        return f"worker {self.worker_id} ready: services " in self.output()

    def worker_pid(self) -> int:
        """The Python worker: the bootloader's one child."""
        children = psutil.Process(self.proc.pid).children()
        assert len(children) == 1, children
        return children[0].pid

    async def wait(self, within_s: float = 30) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), within_s)

    def stop(self) -> None:
        for pid in family(self.proc.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        self.proc.wait(10)


@pytest.fixture
def start(release: Path, redis_url: str, keys: Keys) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def factory(worker_id: str, **extra: str) -> Running:
        started.append(Running(release, redis_url, keys, worker_id, **extra))
        return started[-1]

    yield factory
    for running in started:
        if running.proc.poll() is None:
            running.stop()


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def test_a_simulation_job_end_to_end_and_the_time_to_registered(
    start: Callable[..., Running], client: Client, keys: Keys, record_property: Callable[[str, object], None]
) -> None:
    port = free_port()
    worker = start("bin-e2e", EMP_METRICS_PORT=str(port))
    await wait_until(worker.ready, within_s=60, interval=0.02)
    took = time.monotonic() - worker.started
    assert await client.redis.exists(keys.heartbeat("bin-e2e"))
    record_property("exec_to_registered_s", round(took, 2))
    print(f"\nexec to registered: {took:.2f} s")
    job_id = await client.submit("simulation", {"duration_s": 0.2, "steps": 4})
    hello = await client.submit("hello", {"name": "binary"})
    await wait_until(lambda: _done(client, job_id, hello), within_s=60)
    job = await client.get(job_id)
    assert job["status"] == "completed" and job["worker_id"] == "bin-e2e"
    assert json.loads((await client.get(hello))["result"])["hello"] == "binary"  # the plugins/ connector
    async with httpx.AsyncClient(timeout=10) as http:  # prometheus-client inside the binary
        metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    assert "emp_jobs_total{" in metrics and 'service="simulation"' in metrics and 'service="hello"' in metrics
    os.kill(worker.proc.pid, signal.SIGTERM)  # the bootloader's PID only: it forwards the signal
    assert await worker.wait() == 0, worker.output()
    assert await client.redis.hget(keys.worker("bin-e2e"), "status") == "offline"


async def _done(client: Client, *job_ids: str) -> bool:
    return all([await _status(client, j) == "completed" for j in job_ids])


async def test_a_group_signal_is_one_stop_and_the_drain_lets_the_job_finish(
    start: Callable[..., Running], client: Client
) -> None:
    worker = start("bin-group", EMP_GRACE_PERIOD_S="20")
    await wait_until(worker.ready, within_s=60, interval=0.02)
    job_id = await client.submit("simulation", {"duration_s": 2, "steps": 10})
    await wait_until(lambda: _is(client, job_id, "in_progress"), within_s=20)
    os.killpg(worker.proc.pid, signal.SIGTERM)  # both processes get it, and the bootloader forwards it
    assert await worker.wait() == 0, worker.output()
    assert await _status(client, job_id) == "completed", worker.output()  # a drain, not a second-signal stop
    assert "second stop signal" not in worker.output()


async def test_kill_9_of_the_bootloader_leaves_no_orphan(start: Callable[..., Running], client: Client) -> None:
    worker = start("bin-orphan")
    await wait_until(worker.ready, within_s=60, interval=0.02)
    child = worker.worker_pid()
    os.kill(worker.proc.pid, signal.SIGKILL)
    await worker.wait()
    await wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
                     within_s=5, interval=0.02)


async def _is(client: Client, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status
