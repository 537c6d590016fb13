"""Progress coalescing: a connector may report thousands of times a second; Redis gets at most
`rate_hz` updates per job per second, and always the last one. A job's first report is held for
up to `first_hold_s`: a job that ends sooner (a no-op, a cached result) has its last report folded
into its outcome's write (`close(keep_last=True)`) instead of a round trip of its own; a second
report ends the hold, and the first goes out as it always did."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from worker.errors import StaleJob
from worker.queue import ProgressUpdate

log = logging.getLogger(__name__)


class Throttle:
    """Pure rate decision: how long to wait before the next send."""

    def __init__(self, rate_hz: float) -> None:
        self.interval = 1.0 / rate_hz
        self.last_sent = -math.inf

    def delay(self, now: float) -> float:
        return max(0.0, self.last_sent + self.interval - now)

    def sent(self, now: float) -> None:
        self.last_sent = now


class ProgressReporter:
    """Keeps only the latest update and sends it when the throttle allows."""

    def __init__(
        self,
        send: Callable[[ProgressUpdate], Awaitable[None]],
        rate_hz: float,
        on_stale: Callable[[str], None],
        first_hold_s: float = 0.0,
    ) -> None:
        self._send = send
        self._first_hold_s = first_hold_s
        self._keep_last = False
        self._throttle = Throttle(rate_hz)
        self._latest: ProgressUpdate | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._on_stale = on_stale
        self._task: asyncio.Task[None] | None = None
        self.sent_count = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="progress")

    def report(self, update: ProgressUpdate) -> None:
        self._latest = update
        self._wake.set()

    async def _flush(self) -> None:
        update, self._latest = self._latest, None
        await self._send_one(update)

    async def _send_one(self, update: ProgressUpdate | None) -> None:
        if update is None:
            return
        try:
            await self._send(update)
            self.sent_count += 1
        except StaleJob as exc:
            self._on_stale(str(exc))
        except Exception as exc:  # Redis trouble, a refused value: progress is best effort, completion is not
            log.warning("progress update not recorded: %s: %s", type(exc).__name__, exc)
        self._throttle.sent(time.monotonic())

    async def _loop(self) -> None:
        first = self._first_hold_s > 0
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if first:
                first = False
                await self._hold_first()
                continue
            delay = self._throttle.delay(time.monotonic())
            if delay > 0 and not self._closing:
                with contextlib.suppress(TimeoutError):
                    # the rate limit itself; closing cuts it short
                    await asyncio.wait_for(self._closed_event(), timeout=delay)
            if self._closing and self._keep_last:
                return  # close() takes the pending update
            await self._flush()

    async def _hold_first(self) -> None:
        """Hold the first report until a second one, the close, or first_hold_s."""
        held = self._latest
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=self._first_hold_s)
        if self._closing and self._keep_last:
            return  # close() takes the pending update
        if self._latest is held:
            await self._flush()
            return
        if held is not None:  # a newer report came: the first goes now, the newer after the rate limit
            await self._send_one(held)
        self._wake.set()

    async def _closed_event(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()

    async def close(self, keep_last: bool = False) -> ProgressUpdate | None:
        """Stop; the last pending update is never dropped: it is sent, or with `keep_last`
        returned for the caller to write with the job's outcome (None when none is pending)."""
        self._keep_last = keep_last
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if keep_last:
            update, self._latest = self._latest, None
            return update
        await self._flush()
        return None
