"""Retry policy, in one place: when a failed job runs again, and how the daemon backs off.

The decision *whether* a failed job gets another attempt is made atomically inside Redis
(worker/lua: a retryable failure or an expired lease goes back to the queue while attempts are
left, else fails for good); this module decides *when*, and classifies connector errors.
"""

from __future__ import annotations

import asyncio
import random

from worker.errors import JobError


def retry_backoff_ms(retry_count: int, base_s: float, max_s: float, jitter: float) -> int:
    """Exponential backoff with jitter for the `retry_count`-th retry (0-based).

    ``jitter`` in [0, 1) comes from the caller's random source: the delay is drawn from
    [half, full] of ``min(max_s, base_s * 2**retry_count)``, so retries of many jobs spread out.
    """
    full = min(max_s, base_s * (2 ** min(retry_count, 30)))
    return int(1000 * full * (0.5 + 0.5 * jitter))


def is_retryable(error: BaseException) -> bool:
    """A JobError says so itself; anything else a connector raises counts as engine trouble."""
    return error.retryable if isinstance(error, JobError) else True


class Backoff:
    """Exponential backoff with jitter for reconnecting or restarting; `reset` after a success."""

    def __init__(self, base_s: float = 0.2, max_s: float = 10.0) -> None:
        self.base_s, self.max_s, self.failures = base_s, max_s, 0

    def next_delay(self) -> float:
        self.failures += 1
        return retry_backoff_ms(self.failures - 1, self.base_s, self.max_s, random.random()) / 1000

    def reset(self) -> None:
        self.failures = 0


async def wait_for_event(event: asyncio.Event, within_s: float) -> bool:
    """True if the event was set within `within_s` seconds."""
    try:
        await asyncio.wait_for(event.wait(), within_s)
    except TimeoutError:
        return False
    return True
