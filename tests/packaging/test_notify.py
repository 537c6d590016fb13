"""systemd's notify protocol: a real worker process with NOTIFY_SOCKET (a unix datagram socket
this test binds) sends READY=1 once registered, periodic WATCHDOG=1, STATUS= with its state and
job, and STOPPING=1 on drain, in that order; no WATCHDOG=1 while its event loop is stuck."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.procs import WorkerProcess
from worker.agent import WorkerState
from worker.client import Client
from worker.keys import Keys
from worker.notify import Notifier, SlotView, stale_limit_s, stalled_loops, status_line

BLOCKING_PLUGIN = '''
import time

from connectors import Connector, hookimpl


class Blocker(Connector):
    """Blocks the whole event loop for payload["block_s"] (what a buggy connector does)."""

    name = "blocker"
    service_types = ("blocker",)

    async def run(self, job, ctx):
        time.sleep(float(job.payload.get("block_s", 3)))
        return {}


@hookimpl
def emp_connectors():
    return [Blocker]
'''


class Listener:
    """The systemd side: every datagram on the socket, with the time it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[tuple[float, str]]:
        return [(at, line) for at, text in self.messages for line in text.splitlines()]

    def first(self, predicate: str) -> int:
        return next(i for i, (_, line) in enumerate(self.lines()) if line.startswith(predicate))

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for _, line in self.lines())


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[Listener]:
    found = Listener(tmp_path / "notify.sock")
    task = asyncio.create_task(found.run())
    yield found
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    found.sock.close()


async def test_ready_watchdog_status_and_stopping_in_order(
    listener: Listener, client: Client, redis_url: str, keys: Keys
) -> None:
    env: dict[str, Any] = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000", "EMP_GRACE_PERIOD_S": "0.5"}
    async with WorkerProcess(redis_url, keys.prefix, "notified", **env) as proc:
        await wait_until(lambda: listener.has("READY=1"), within_s=20)
        assert await client.redis.exists(keys.heartbeat("notified"))  # registered before READY=1
        assert listener.has("STATUS=idle; Redis ok")
        job_id = await client.submit("simulation", {"duration_s": 60, "steps": 600})
        await wait_until(lambda: listener.has(f"STATUS=busy job {job_id}; Redis ok"), within_s=20)
        await wait_until(lambda: sum(line == "WATCHDOG=1" for _, line in listener.lines()) >= 4, within_s=20)
        proc.signal(signal.SIGTERM)
        await wait_until(lambda: listener.has("STOPPING=1"), within_s=20)
        assert await proc.wait() == 0, proc.output()
    ready, busy, stopping = listener.first("READY=1"), listener.first("STATUS=busy"), listener.first("STOPPING=1")
    pings = [at for at, line in listener.lines() if line == "WATCHDOG=1"]
    first_ping = listener.first("WATCHDOG=1")
    assert ready < first_ping < stopping and ready < busy < stopping
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert gaps and all(0.3 < gap < 1.0 for gap in gaps), gaps  # every half WATCHDOG_USEC (0.5 s)
    job = await client.get(job_id)
    assert job["status"] == "pending" and job["retry_count"] == "0"  # drained: handed back


async def test_no_watchdog_ping_while_the_event_loop_is_stuck(
    listener: Listener, client: Client, redis_url: str, keys: Keys, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "blocker.py").write_text(BLOCKING_PLUGIN)
    env: dict[str, Any] = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "600000",
                           "EMP_PLUGINS_DIR": str(plugins), "EMP_LEASE_S": "10"}
    async with WorkerProcess(redis_url, keys.prefix, "stuck", connectors="blocker", **env):
        await wait_until(lambda: sum(line == "WATCHDOG=1" for _, line in listener.lines()) >= 2, within_s=20)
        job_id = await client.submit("blocker", {"block_s": 3})
        await wait_until(lambda: _status_is(client, job_id, "completed"), within_s=30)
        count = len(listener.lines())
        await wait_until(lambda: any(line == "WATCHDOG=1" for _, line in listener.lines()[count:]), within_s=10)
    pings = [at for at, line in listener.lines() if line == "WATCHDOG=1"]
    assert max(b - a for a, b in itertools.pairwise(pings)) > 2.5  # silent while blocked


async def _status_is(client: Client, job_id: str, status: str) -> bool:
    return (await client.get(job_id)).get("status") == status


def test_status_line() -> None:
    one = [SlotView("box-0", WorkerState.BUSY, "job-7", True)]
    assert status_line(one) == "busy job job-7; Redis ok"
    two = [SlotView("box-0", WorkerState.IDLE, "", True), SlotView("box-1", WorkerState.STARTING, "", False)]
    assert status_line(two) == "box-0: idle, box-1: starting; Redis unreachable, retrying"


@pytest.mark.parametrize(("turns", "claiming", "stalled"), [
    ({"heartbeat": 95.0, "refresh": 95.0, "claim": 95.0}, True, []),
    ({"heartbeat": 50.0, "refresh": 95.0, "claim": 95.0}, True, ["heartbeat"]),
    ({"heartbeat": 95.0, "refresh": 95.0}, True, []),                  # no claim turn yet: since registration
    ({"heartbeat": 95.0, "refresh": 95.0, "claim": 10.0}, False, []),  # draining: the claim loop ended
    ({}, True, []),
])
def test_stalled_loops(turns: dict[str, float], claiming: bool, stalled: list[str]) -> None:
    assert stalled_loops(turns, since=90.0, now=100.0, limit_s=20.0, claiming=claiming) == stalled


def test_stale_limit_covers_a_turn_and_the_redis_timeouts() -> None:
    assert stale_limit_s(2.0, 5.0, 5.0) == pytest.approx(7.2 + 15.0)


@pytest.mark.parametrize(("env", "address", "watchdog_s"), [
    ({}, None, None),
    ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify", None),
    ({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "30000000"}, "\0abstract", 30.0),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, "/n", None),  # not for us
    ({"NOTIFY_SOCKET": "relative"}, None, None),
])
def test_from_environ(env: dict[str, str], address: str | None, watchdog_s: float | None) -> None:
    environ = dict(env)
    found = Notifier.from_environ(environ)
    assert environ == {}  # read once, then gone: engines the worker starts cannot speak for the unit
    if address is None:
        assert found is None
        return
    assert found is not None
    assert found.address == address and found.watchdog_s == watchdog_s
    found.close()
