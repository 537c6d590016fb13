"""EMP_PLUGINS_DIR: each .py file and package there is a plugin, loaded at start; a broken one is
named in one ERROR line and the others load. Run through the real command line and worker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from connectors.manager import plugins_path
from tests.procs import WorkerProcess
from worker.keys import Keys

HELLO = '''
from connectors import Connector, hookimpl

__version__ = "1.2"


class HelloConnector(Connector):
    name = "hello"
    service_types = ("hello",)

    async def run(self, job, ctx):
        return {"hello": job.payload.get("name", "world")}


@hookimpl
def emp_connectors():
    return [HelloConnector]
'''

PACKAGE_INIT = '''
from connectors import hookimpl

from .impl import PackagedConnector


@hookimpl
def emp_connectors():
    return [PackagedConnector]
'''

PACKAGE_IMPL = '''
from connectors import Connector


class PackagedConnector(Connector):
    name = "packaged"
    service_types = ("packaged",)

    async def run(self, job, ctx):
        return {"from": "a package"}
'''


def write_plugins(directory: Path) -> Path:
    """A good file, a good package, a file that is not Python, one with a misspelled hook, and
    files that are no plugins (a private module, a README)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hello.py").write_text(HELLO)
    (directory / "packaged").mkdir(exist_ok=True)
    (directory / "packaged" / "__init__.py").write_text(PACKAGE_INIT)
    (directory / "packaged" / "impl.py").write_text(PACKAGE_IMPL)
    (directory / "broken.py").write_text("this is not python\n")
    (directory / "misspelled.py").write_text("from connectors import hookimpl\n\n\n@hookimpl\n"
                                             "def emp_connector():\n    return []\n")
    (directory / "_private.py").write_text("raise RuntimeError('never imported')\n")
    (directory / "README.md").write_text("not a plugin\n")
    return directory


async def _plugins_json(env: dict[str, str]) -> tuple[int, list[dict[str, str]], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "plugins", "--json", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out), err.decode()


async def test_plugins_lists_the_directory_and_names_each_broken_file_once(tmp_path: Path) -> None:
    directory = write_plugins(tmp_path / "plugins")
    code, rows, err = await _plugins_json({"EMP_PLUGINS_DIR": str(directory)})
    assert code == 0, err
    by_name = {row["name"]: row for row in rows}
    assert by_name["hello"]["plugin"] == "hello" and by_name["hello"]["version"] == "1.2"
    assert by_name["hello"]["package"] == str(directory / "hello.py")
    assert by_name["packaged"]["package"] == str(directory / "packaged")
    assert {"simulation", "comfyui", "a1111", "rest"} <= set(by_name)  # the built-ins still there
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 2, err
    assert "plugin broken" in errors[0] and "could not be loaded" in errors[0] and "skipped" in errors[0]
    assert "plugin misspelled" in errors[1] and "emp_connector" in errors[1]
    assert "_private" not in err


async def test_without_the_setting_a_pip_install_loads_no_directory(tmp_path: Path) -> None:
    write_plugins(tmp_path / "plugins")
    env = {k: v for k, v in os.environ.items() if k != "EMP_PLUGINS_DIR"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "plugins", "--json", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert "hello" not in {row["name"] for row in json.loads(out)}


async def test_a_job_runs_through_a_connector_from_the_directory(tmp_path: Path, redis_url: str, keys: Keys) -> None:
    directory = write_plugins(tmp_path / "plugins")
    async with WorkerProcess(redis_url, keys.prefix, "dir-plugins", connectors="hello,packaged",
                             EMP_PLUGINS_DIR=str(directory)) as proc:
        job = await proc.run_job("hello", {"name": "plugins"})
        assert job["status"] == "completed", proc.output()
        assert json.loads(job["result"])["hello"] == "plugins"
        packaged = await proc.run_job("packaged", {})
        assert packaged["status"] == "completed" and json.loads(packaged["result"])["from"] == "a package"


@pytest.mark.parametrize(("setting", "frozen", "expected"), [
    ("", False, None),                      # pip install: entry points, no directory
    ("off", True, None),                    # turned off, even in the binary
    ("/srv/plugins", False, "/srv/plugins"),
    ("", True, "BINARY_DIR/plugins"),       # the binary: plugins/ beside it
])
def test_plugins_path(setting: str, frozen: bool, expected: str | None, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    if frozen:
        monkeypatch.setattr(sys, "frozen", True, raising=False)
        monkeypatch.setattr(sys, "executable", str(tmp_path / "emp-worker"))
    found = plugins_path(setting)
    want = None if expected is None else Path(expected.replace("BINARY_DIR", str(tmp_path.resolve())))
    assert found == want
