"""The shipped PM2 ecosystem file under a real PM2 (from npm: .ci/run installs it in .ci/node),
with only the environment changed: it registers, `pm2 stop` drains a running job (handed back, its
attempt unchanged, the worker's lines in the out log, no "failed to kill" spam), and `kill -9` of
the PID PM2 tracks leaves no orphan and never two processes under the worker id.

It runs the built one-file binary when EMP_WORKER_BINARY names one, else the venv's entry point.
PM2 gets a private PM2_HOME in the test's tmp dir, and its daemon is killed at the end."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.packaging.procs import ROOT, family, kill_all, marked, worker_executable
from worker.client import Client
from worker.keys import Keys

PM2 = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "pm2"
ECOSYSTEM = ROOT / "packaging" / "pm2" / "ecosystem.config.js"
APP = "emp-worker"  # the shipped file's app name on a box run by one agent
GRACE_S = 1

pytestmark = pytest.mark.skipif(not PM2.exists() or shutil.which("node") is None,
                                reason="no PM2: .ci/run installs it (npm install --prefix .ci/node pm2)")


@dataclass
class Pm2:
    home: Path
    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, timeout: float = 90) -> str:
        done = subprocess.run([str(PM2), *args], env=self.env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert done.returncode == 0, f"pm2 {' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def pid(self, app: str = APP) -> int:
        for entry in json.loads(self("jlist")):
            if entry["name"] == app:
                return int(entry.get("pid") or 0)
        return 0

    def daemon_pid(self) -> int:
        path = self.home / "pm2.pid"
        return int(path.read_text().strip()) if path.exists() else 0

    def log(self, kind: str) -> str:
        path = self.home / "logs" / f"{APP}-{kind}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def pm2(tmp_path: Path, redis_url: str, keys: Keys) -> Iterator[Pm2]:
    app_dir = tmp_path / "release"
    app_dir.mkdir()
    shutil.copy(ECOSYSTEM, app_dir / "ecosystem.config.js")  # as shipped
    home = tmp_path / "pm2"
    env = {**os.environ, "PM2_HOME": str(home), "EMP_WORKER_BIN": str(worker_executable()),
           "EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": keys.prefix, "WORKER_ID": f"pm2-{uuid.uuid4().hex[:6]}",
           "EMP_CONNECTORS": "simulation", "EMP_HEARTBEAT_INTERVAL_S": "0.5", "EMP_LEASE_S": "2",
           "EMP_POLL_INTERVAL_S": "1", "EMP_GRACE_PERIOD_S": str(GRACE_S), "EMP_RETRY_BACKOFF_S": "0",
           "EMP_RETRY_EXCLUSION_S": "0", "EMP_LOG_LEVEL": "INFO", "TMPDIR": str(tmp_path)}
    for name in ("HUB_REDIS_URL", "EMP_GPUS", "NUM_GPUS", "EMP_WORKER_ID", "EMP_PLUGINS_DIR"):
        env.pop(name, None)
    runner = Pm2(home, env, app_dir)
    try:
        yield runner
    finally:
        left = marked(keys.prefix)
        subprocess.run([str(PM2), "kill"], env=env, capture_output=True, timeout=60, check=False)
        kill_all(marked(keys.prefix) | left)


async def _registered(client: Client, keys: Keys, worker_id: str) -> bool:
    return bool(await client.redis.exists(keys.heartbeat(worker_id)))


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def test_shipped_ecosystem_registers_drains_on_stop_and_survives_kill_9(
    pm2: Pm2, client: Client, keys: Keys
) -> None:
    worker_id = pm2.env["WORKER_ID"]
    pm2("start", "ecosystem.config.js")
    await wait_until(lambda: _registered(client, keys, worker_id), within_s=60, interval=0.1)

    # pm2 stop drains: the running job goes back to the queue without spending an attempt.
    job_id = await client.submit("simulation", {"duration_s": 60, "steps": 600})
    await wait_until(lambda: _is(client, job_id, "in_progress"), within_s=30)
    attempt = (await client.get(job_id))["attempt"]
    await asyncio.to_thread(pm2, "stop", APP)
    job = await client.get(job_id)
    assert job["status"] == "pending" and job["retry_count"] == "0" and job["attempt"] == attempt, job
    assert await client.redis.hget(keys.worker(worker_id), "status") == "offline"
    out, err = pm2.log("out"), pm2.log("error")
    assert f"worker {worker_id} ready" in out and not err.strip(), err  # its lines in the out log
    assert all(json.loads(line)["msg"] for line in out.splitlines() if line.strip())  # JSON lines
    spam = (pm2.home / "pm2.log").read_text().count("failed to kill")
    assert spam <= GRACE_S + 2, spam

    # kill -9 of the PID PM2 tracks: nothing of it stays, PM2 starts one new process, which takes
    # the worker id over once the old token lapsed, and runs the job handed back above.
    pm2("start", APP)
    await wait_until(lambda: _registered(client, keys, worker_id), within_s=60, interval=0.1)
    old_pid = pm2.pid()
    old = family(old_pid)
    old_token = await client.redis.get(keys.instance(worker_id))
    assert old and old_token
    os.kill(old_pid, 9)
    await wait_until(lambda: not any(family(pid) for pid in old), within_s=5, interval=0.05)  # no orphan

    async def replaced() -> bool:
        token = await client.redis.get(keys.instance(worker_id))
        return bool(token) and token != old_token

    await wait_until(replaced, within_s=60, interval=0.1)
    new_pid = pm2.pid()
    assert new_pid and new_pid != old_pid
    ours = marked(keys.prefix) - {pm2.daemon_pid()}  # PM2's daemon has the environment it was started in
    assert ours <= family(new_pid), (ours, family(new_pid))  # every worker process is the new app's
    await wait_until(lambda: _is(client, job_id, "in_progress"), within_s=30)


async def _is(client: Client, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status
