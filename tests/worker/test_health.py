"""`emp-worker check` as a probe, through real processes; the health verdicts as tables."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

import pytest

from connectors.testing import WorkerProcess
from tests.conftest import wait_until
from tests.worker.test_metrics import free_port
from worker.client import connect
from worker.health import record_problems, slot_problems
from worker.keys import Keys


async def check(redis_url: str, keys: Keys, machine: str, *args: str, **env: str) -> tuple[int, str, str, float]:
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "check", *args,
        env={**os.environ, "EMP_REDIS_URL": redis_url, "EMP_KEY_PREFIX": keys.prefix, "EMP_MACHINE_ID": machine,
             **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - began


async def registered(redis_url: str, keys: Keys, worker_id: str, field: str = "status") -> str:
    client = connect(redis_url)
    try:
        return str(await client.hget(keys.worker(worker_id), field) or "")
    finally:
        await client.aclose()


async def test_check_passes_with_a_live_worker_and_fails_after_it_stops(redis_url: str, keys: Keys) -> None:
    machine = f"box-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(redis_url, keys.prefix, f"{machine}-w0", EMP_MACHINE_ID=machine)
    async with worker:
        await wait_until(lambda: registered(redis_url, keys, f"{machine}-w0"), within_s=30, interval=0.05)
        code, out, err, took = await check(redis_url, keys, machine)
        assert code == 0, err
        assert f"{machine}-w0" in out and took < 10  # a probe: the interpreter's start-up and two round trips
        code, out, _, _ = await check(redis_url, keys, machine, "--json")
        report = json.loads(out)
        assert code == 0 and report["healthy"] is True
        assert report["workers"][0]["connectors"]["simulation"]["state"] == "ok"
        code, _, err, _ = await check(redis_url, keys, "another-machine")
        assert code == 1 and "no worker of machine 'another-machine'" in err  # only this machine's count
    assert await worker.wait() == 0
    code, _, err, _ = await check(redis_url, keys, machine)
    assert code == 1 and "no worker of machine" in err
    code, _, err, _ = await check(redis_url, keys, machine, EMP_WORKER_ID=f"{machine}-w0")
    assert code == 1 and f"worker {machine}-w0 is not live: stopped" in err


async def test_check_fails_naming_a_connector_that_is_down(redis_url: str, keys: Keys) -> None:
    machine = f"box-{uuid.uuid4().hex[:6]}"
    async with WorkerProcess(redis_url, keys.prefix, f"{machine}-w0", connectors="simulation,a1111",
                             EMP_MACHINE_ID=machine, EMP_A1111_URL=f"http://127.0.0.1:{free_port()}",
                             EMP_HEALTH_TIMEOUT_S="1"):
        async def down() -> bool:
            return "a1111" in await registered(redis_url, keys, f"{machine}-w0", "emp_problems")

        await wait_until(down, within_s=30, interval=0.05)
        code, _, err, _ = await check(redis_url, keys, machine)
    assert code == 1 and f"worker {machine}-w0: connector a1111 is down" in err


async def test_check_is_bounded_when_redis_does_not_answer(keys: Keys) -> None:
    with_nothing = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, _, err, took = await check(with_nothing, keys, "box", "--timeout", "2")
    assert code == 1 and "cannot read Redis" in err and "hunter2" not in err
    assert took < 15


async def test_check_gives_up_on_a_redis_that_never_answers(keys: Keys) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, _, err, took = await check(f"redis://127.0.0.1:{port}/0", keys, "box", "--timeout", "2")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert code == 1 and "did not answer within 2s" in err, err
    assert 2 <= took < 15  # the 2 s bound and the interpreter's start-up, nothing like a hang


@pytest.mark.parametrize(("state", "age", "problems", "expected"), [
    ("idle", 1.0, [], []),
    ("busy", 5.9, [], []),
    ("starting", 0.0, [], ["worker w is starting"]),
    ("draining", 0.0, [], ["worker w is draining"]),
    ("idle", 7.0, [], ["worker w: no heartbeat got through for 7s (its record expires after 6s)"]),
    ("idle", 0.0, ["connector a is down: refused"], ["worker w: connector a is down: refused"]),
])
def test_slot_problems(state: str, age: float, problems: list[str], expected: list[str]) -> None:
    assert slot_problems("w", state, age, 6, problems) == expected


CONNECTORS_OK = json.dumps({"sim": {"state": "ok"}})


@pytest.mark.parametrize(("alive", "record", "expected"), [
    (True, {"status": "idle", "emp_problems": "[]", "emp_connectors": CONNECTORS_OK}, []),
    (True, {"status": "busy"}, []),  # a record without our fields: judged by its heartbeat and status
    (False, {}, ["worker w has no record in Redis"]),
    (False, {"status": "offline", "last_heartbeat": "T"}, ["worker w is not live: stopped (last heartbeat T)"]),
    (False, {"status": "idle"}, ["worker w is not live: its heartbeat expired (last heartbeat never)"]),
    (True, {"status": "draining"}, ["worker w is draining"]),
    (True, {"status": "idle", "emp_problems": '["GPU unhealthy: hot"]'}, ["worker w: GPU unhealthy: hot"]),
    (True, {"status": "idle", "emp_problems": '["connector sim is down: x"]',
            "emp_connectors": json.dumps({"sim": {"state": "down"}})}, ["worker w: connector sim is down: x"]),
    (True, {"status": "idle", "emp_connectors": json.dumps({"sim": {"state": "down"}})},
     ["worker w: connector sim is down"]),
    (True, {"status": "idle", "emp_problems": "{not json", "emp_connectors": "[1]"}, []),
])
def test_record_problems(alive: bool, record: dict[str, str], expected: list[str]) -> None:
    assert record_problems("w", alive, record) == expected
