"""A plugin written only against `connectors` and the test kit, in a package of its own
(tests/plugins/echo), installed with pip and run through `emp-worker run --connectors echo`."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.testing import WorkerProcess
from worker.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tests" / "plugins" / "echo"


def _pip_install(target: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    source = scratch / "emp-echo-plugin"  # a copy: the build leaves nothing in the checkout
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", ".mypy_cache"))
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    done = subprocess.run([*base, "--no-build-isolation", str(source)], capture_output=True, text=True,
                          timeout=300, check=False)
    if done.returncode != 0:  # no setuptools in this venv: let pip fetch it for the build
        done = subprocess.run([*base, str(source)], capture_output=True, text=True, timeout=300, check=False)
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The plugin, pip-installed into a directory of its own (a site-packages for the workers)."""
    target = tmp_path_factory.mktemp("site")
    done = _pip_install(target, tmp_path_factory.mktemp("src"))
    if done.returncode != 0:
        pytest.skip(f"pip could not install the example plugin: {done.stderr.strip()[-300:]}")
    assert list(target.glob("emp_echo_plugin-0.1.0.dist-info"))
    yield target


def _env(site: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "EMP_LOG_FORMAT": "text", **extra}


def _cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], env=_env(site, **env), capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)


def test_the_plugin_imports_nothing_but_the_public_api() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m == "worker" or m.startswith("worker.") for m in imported), path


def test_plugins_lists_it_with_its_package(site: Path) -> None:
    done = _cli(site, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["echo"]["services"] == ["echo"]
    assert (rows["echo"]["package"], rows["echo"]["version"]) == ("emp-echo-plugin", "0.1.0")
    assert rows["simulation"]["package"] == "emp-worker (built-in)"


@pytest.mark.timeout(120)
async def test_it_runs_jobs_through_emp_worker_run(site: Path, redis_url: str, keys: Keys) -> None:
    async with WorkerProcess(redis_url, keys.prefix, "echo-w", connectors="echo", PYTHONPATH=str(site),
                             EMP_ECHO_GREETING="hey") as proc:
        good = await proc.run_job("echo", {"text": "ping"})
        bad = await proc.run_job("echo", {"no_text": 1})
    result = json.loads(good["result"])
    assert good["status"] == "completed" and result["text"] == "ping" and result["greeting"] == "hey"
    assert result["outputs"] == [{"name": "echo.txt", "size_bytes": 4, "content_type": "text/plain", "text": "ping"}]
    assert bad["status"] == "failed" and "'text'" in bad["error"] and bad["attempt"] == "1"


def test_two_connectors_for_one_service_stop_start_up_with_one_line(site: Path) -> None:
    done = _cli(site, "run", "--connectors", "echo,echo-twin", EMP_REDIS_URL="redis://127.0.0.1:1/0")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "'echo'" in lines[0] and "'echo-twin'" in lines[0] and "service 'echo'" in lines[0]


def test_a_bad_connector_setting_stops_start_up_with_one_line(site: Path) -> None:
    done = _cli(site, "run", "--connectors", "echo", EMP_ECHO_DELAY_S="-1", EMP_REDIS_URL="redis://127.0.0.1:1/0")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("configuration error:") and "EMP_ECHO_DELAY_S=-1" in lines[0].replace("'", "")


@pytest.mark.timeout(180)
def test_the_plugins_own_tests_pass_with_the_kit(site: Path, redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(PACKAGE / "pyproject.toml"),
         "--rootdir", str(PACKAGE), "--confcutdir", str(PACKAGE), str(PACKAGE / "tests")],
        env=_env(site, REDIS_URL=redis_url), capture_output=True, text=True, timeout=170, check=False,
        stdin=subprocess.DEVNULL, cwd=str(PACKAGE))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout
