"""systemd's notify protocol (``sd_notify``) for ``Type=notify`` units, without libsystemd.

systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket; ``@name`` is in the abstract namespace)
and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the main PID: under the
one-file binary that is the bootloader, our parent, so the unit sets ``NotifyAccess=all``). Each
message is one datagram of ``KEY=value`` lines. The agent sends:

* ``READY=1`` once every slot registered in Redis (the unit is "activating" until then, with a
  ``STATUS=`` that says why, e.g. Redis unreachable);
* ``STATUS=...`` on each change: each slot's state and job, and whether Redis answers;
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, only while every slot's loops make progress: each
  loop (lease/heartbeat, refresh and, until the drain, claim) must have finished a turn within
  ``stale_s`` (the longest a healthy turn takes: its period plus the Redis timeouts). A blocked
  event loop sends nothing at all, so systemd restarts a worker that hangs either way;
* ``STOPPING=1`` when the drain starts.

Without ``NOTIFY_SOCKET`` (PM2, a terminal) nothing is sent. The variables are removed from the
environment once read, so engines the worker starts cannot speak for the unit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from worker.agent import Worker, WorkerState

log = logging.getLogger("emp.notify")

TICK_S = 0.25  # how often states are looked at (a STATUS= change goes out within this)
REDIS_TIMEOUTS_S = 15.0  # worker.client.connect: socket timeout 10 s + connect timeout 5 s
LOOPS = ("heartbeat", "refresh", "claim")


@dataclass(frozen=True)
class SlotView:
    """What the notifier reads of one slot."""

    worker_id: str
    state: WorkerState
    job_id: str
    redis_ok: bool


def status_line(slots: Sequence[SlotView]) -> str:
    """The unit's STATUS=: e.g. ``busy job 42 (box-worker-comfyui-0); Redis ok``."""
    parts = []
    for slot in slots:
        what = slot.state.value + (f" job {slot.job_id}" if slot.job_id else "")
        parts.append(what if len(slots) == 1 else f"{slot.worker_id}: {what}")
    redis = "ok" if all(s.redis_ok for s in slots) else "unreachable, retrying"
    return f"{', '.join(parts)}; Redis {redis}"[:512]


def stale_limit_s(heartbeat_s: float, poll_s: float, health_timeout_s: float) -> float:
    """The longest a healthy loop turn takes: its period (jittered) plus the Redis timeouts."""
    return max(heartbeat_s * 1.1, poll_s * 1.2, health_timeout_s + heartbeat_s * 1.1) + REDIS_TIMEOUTS_S


def stalled_loops(turns: dict[str, float], since: float, now: float, limit_s: float, claiming: bool) -> list[str]:
    """The loops whose last turn (or, before the first, `since`) is older than `limit_s`."""
    wanted = LOOPS if claiming else tuple(n for n in LOOPS if n != "claim")
    return [name for name in wanted if now - turns.get(name, since) > limit_s]


def _view(worker: Worker) -> SlotView:
    return SlotView(worker.worker_id, worker.state, next(iter(worker.running), ""), worker.redis_ok)


class Notifier:
    """One notify socket; sends never block or raise (a lost datagram is logged once)."""

    def __init__(self, address: str, watchdog_s: float | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier | None:
        """The notifier systemd asked for (None without NOTIFY_SOCKET); the variables are removed."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        usec, pid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        if not address or not address.startswith(("/", "@")):
            return None
        watchdog_s = None
        if usec.isdigit() and int(usec) > 0 and (not pid.isdigit() or int(pid) in (os.getpid(), os.getppid())):
            watchdog_s = int(usec) / 1_000_000
        return cls(address, watchdog_s)

    def send(self, *lines: str) -> None:
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
            self._failed = True

    def close(self) -> None:
        self.sock.close()

    async def supervise(self, workers: Sequence[Worker], stopped: asyncio.Event) -> None:
        """READY, STATUS, WATCHDOG and STOPPING for these slots until `stopped` is set."""
        turn = _Turns(self, workers)
        try:
            while not stopped.is_set():
                turn.once(time.monotonic())
                await asyncio.sleep(TICK_S)  # the notifier's period
        finally:
            self.close()


class _Turns:
    """The notifier's state between ticks."""

    def __init__(self, notifier: Notifier, workers: Sequence[Worker]) -> None:
        settings = workers[0].settings
        self.notifier, self.workers = notifier, workers
        self.limit_s = stale_limit_s(settings.heartbeat_interval_s, settings.poll_interval_s,
                                     settings.health_timeout_s)
        self.ready_at: float | None = None
        self.status, self.stopping, self.next_ping = "", False, 0.0

    def once(self, now: float) -> None:
        views = [_view(w) for w in self.workers]
        send = self.notifier.send
        if self.ready_at is None and all(v.state in (WorkerState.IDLE, WorkerState.BUSY) for v in views):
            self.ready_at, self.status = now, status_line(views)
            send("READY=1", f"STATUS={self.status}")
        if not self.stopping and any(w.stopping.is_set() for w in self.workers):
            self.stopping = True
            send("STOPPING=1", "STATUS=draining: finishing or handing back the running jobs")
        if not self.stopping and status_line(views) != self.status:
            self.status = status_line(views)
            send(f"STATUS={self.status}")
        if self.ready_at is not None and self.notifier.watchdog_s and now >= self.next_ping:
            self.next_ping = now + self.notifier.watchdog_s / 2
            self._ping(now, self.ready_at)

    def _ping(self, now: float, since: float) -> None:
        stalled = [f"{w.worker_id} {name}" for w in self.workers
                   for name in stalled_loops(w.turns, since, now, self.limit_s, not w.stopping.is_set())]
        if stalled:
            log.error("no watchdog ping: loop(s) without a turn for over %.0fs: %s", self.limit_s, ", ".join(stalled))
        else:
            self.notifier.send("WATCHDOG=1")
