"""EMP_COMFYUI_COMMAND: the connector starts its slot's ComfyUI (here the fake, as a process),
pinned to the slot's GPU, follows it until it answers, restarts it when it dies, and stops it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connectors.comfyui import ComfyUIConnector
from connectors.testing import make_connector, make_job, run_job
from tests.conftest import WorkerFactory, wait_until
from tests.connectors.comfyui.conftest import FAST, blur_chain, graph
from worker.client import Client
from worker.errors import RetryableJobError

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def supervised_env(tmp_path: Path, port: int, node_delay_s: float = 0.0) -> dict[str, str]:
    command = f"{sys.executable} -m tests.connectors.comfyui.serve_fake --port {{port}} --node-delay {node_delay_s}"
    return {**FAST, "EMP_COMFYUI_URL": f"http://127.0.0.1:{port}", "EMP_COMFYUI_COMMAND": command,
            "EMP_COMFYUI_DIR": str(ROOT), "EMP_COMFYUI_LOG_DIR": str(tmp_path), "EMP_COMFYUI_RESTART_MAX_S": "1"}


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[ComfyUIConnector]:
    port = free_port()
    connector = make_connector(ComfyUIConnector, gpu_uuid="GPU-1234-abcd",
                               env=supervised_env(tmp_path, port, node_delay_s=0.3))
    try:
        await asyncio.wait_for(connector.start(), 60)
        yield connector
    finally:
        await asyncio.wait_for(connector.stop(), 30)


async def test_supervised_comfyui_is_pinned_restarted_and_stopped(supervised: ComfyUIConnector,
                                                                  tmp_path: Path) -> None:
    supervisor = supervised.supervisor
    assert supervisor is not None and supervisor.proc is not None
    port = supervisor.port
    log_text = (tmp_path / f"emp-comfyui-{port}.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=GPU-1234-abcd" in log_text  # pinned to the slot's GPU, its output captured
    assert (await supervised.health()).state.value == "ok"

    job = asyncio.create_task(run_job(supervised, make_job("comfyui", blur_chain("sup"))))
    await wait_until(lambda: supervised.runs and any(r.tracker.current == "10" for r in supervised.runs.values()),
                     within_s=20)
    first_pid = supervisor.proc.pid
    os.kill(first_pid, signal.SIGKILL)  # ComfyUI dies mid-job
    with pytest.raises(RetryableJobError):
        await asyncio.wait_for(job, 15)
    await wait_until(lambda: supervisor.ready.is_set() and supervisor.proc is not None
                     and supervisor.proc.pid != first_pid, within_s=30)
    assert (await supervised.health()).state.value in ("ok", "degraded")
    await wait_until(lambda: supervised.engine is not None and supervised.engine.socket.connected.is_set(), 15)
    result, _ = await run_job(supervised, make_job("comfyui", graph("sup-after")))
    assert result["files"][0]["filename"] == "sup-after_00001_.png"
    proc = supervisor.proc
    await supervised.stop()
    assert proc.returncode is not None  # stopped at shutdown, and not restarted
    assert not supervisor.ready.is_set()


async def test_supervised_comfyui_through_the_worker_retried_job_completes(
        start_worker: WorkerFactory, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in supervised_env(tmp_path, free_port(), node_delay_s=0.4).items():
        monkeypatch.setenv(key, value)
    worker = await start_worker("sup", connectors="comfyui")
    engine = worker.engines[0]
    await wait_until(lambda: engine.started and engine.health.can_claim, within_s=60)
    job_id = await client.submit("comfyui", blur_chain("sup-worker"), max_retries=5)
    connector = engine.connector
    assert isinstance(connector, ComfyUIConnector) and connector.supervisor is not None
    supervisor = connector.supervisor
    await wait_until(lambda: any(r.tracker.current == "10" for r in connector.runs.values()), within_s=30)
    assert supervisor.proc is not None
    os.kill(supervisor.proc.pid, signal.SIGKILL)
    await wait_until(lambda: _status(client, job_id, "completed"), within_s=60, interval=0.1)
    job = await client.get(job_id)
    assert int(job.get("retry_count", "0")) >= 1 and supervisor.exits >= 1
    assert json.loads(job["result"])["files"][0]["filename"] == "sup-worker_00001_.png"


async def _status(client: Client, job_id: str, status: str) -> bool:
    return (await client.get(job_id)).get("status") == status
