"""Waking idle workers without a herd: the worker half of the wake tokens (the Redis half is
worker/lua/lib/wake.lua).

A submitted job pushes one token ``"{hops}:{job id}"`` on its service's list
(``Keys.wake_list``); every idle worker waits on its services' lists with BLPOP, and Redis hands
each token to exactly one of them (the one blocked longest). So a job costs O(1) Redis work
however many workers are idle:

* ``Waiter``: the BLPOP, on a connection of its own (a blocking command must not hold one of the
  pool's connections, and its socket timeout must outlast the BLPOP's). The claim loop asks it to
  wait (``listen``) and then waits on its own wake event, which a token, the BLPOP's timeout (the
  slow poll) and every local event set alike. A BLPOP still in flight when the loop moves on
  stays in flight; when the worker has no free place any more, ``stand_down`` unblocks it
  (``CLIENT UNBLOCK``), and a token popped meanwhile is passed on, never dropped.
* ``Relays``: emp-job-queue's API submits with HSET + ZADD + PUBLISH ``job_submitted`` and pushes
  no token. Up to ``EMP_WAKE_RELAYS`` workers hold a relay lock ``Keys.relay(n)``; they subscribe
  to ``job_submitted`` and turn each message into a token (``Queue.wake``) or, with a free place
  themselves, into a claim of that job. A lock's holder is a relay while its heartbeat key lives:
  its own heartbeats keep the lock, so holding it costs nothing per beat; every worker tries the
  election now and then (``Relays.period_s``), which is how a dead relay is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from worker.errors import RedisUnavailable
from worker.keys import HEARTBEAT_SUFFIX, RELAY, WORKER, Keys
from worker.queue import Queue, parse_wake_token
from worker.redis_conn import FollowingPool
from worker.retry import Backoff

log = logging.getLogger("emp.wake")

READ_MARGIN_S = 5.0  # the BLPOP connection's socket timeout is the BLPOP's timeout plus this
UNBLOCK_WAIT_S = 2.0  # at stop: how long an unblocked BLPOP may take to answer
READY_MAX = 64  # tokens popped and not yet used (a worker holds at most a few)
_ERRORS = (RedisError, OSError, RedisUnavailable)

Token = tuple[int, str]  # (hops, job id)


class Waiter:
    """One worker's BLPOP on the wake lists of the services it has room for."""

    def __init__(self, client: aioredis.Redis, keys: Keys, queue: Queue, wake: asyncio.Event) -> None:
        self.client = client
        self.keys = keys
        self.queue = queue
        self.wake = wake
        self.ready: deque[Token] = deque(maxlen=READY_MAX)  # popped, for the next claim (or to pass on)
        self.popped = 0  # tokens popped in all
        self.garbage = 0  # list entries that were no token
        self._conn: AbstractConnection | None = None
        self._node: Any = None  # Cluster: the node the connection is on
        self._client_id: int | None = None  # CLIENT ID of the connection (for CLIENT UNBLOCK)
        self._lists: tuple[str, ...] = ()
        self._gen = 0  # bumped by every listen that starts a BLPOP and by stand_down
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one BLPOP at a time on the connection
        self._backoff = Backoff()
        self._closed = False

    @property
    def in_flight(self) -> bool:
        return self._task is not None and not self._task.done()

    def take(self) -> Token | None:
        """The oldest token popped and not used yet, if any."""
        return self.ready.popleft() if self.ready else None

    def listen(self, services: Sequence[str], timeout_s: float) -> None:
        """Have a BLPOP on `services`' wake lists in flight, for up to `timeout_s` (the slow poll):
        a token, or the timeout, sets the wake event. One already in flight on the same lists is
        kept; one on other lists is unblocked and replaced."""
        lists = tuple(self.keys.wake_list(s) for s in sorted(set(services)))
        if self._closed or not lists:
            return
        if self.in_flight:
            if lists == self._lists:
                return
            self._unblock_soon()
        self._gen += 1
        self._lists = lists
        self._task = asyncio.create_task(self._pop(self._gen, lists, timeout_s), name="wake-blpop")

    async def stand_down(self) -> None:
        """No free place: unblock a BLPOP in flight (the next token goes to a worker that can use
        it) and pass on every token popped and not used."""
        if self.in_flight:
            self._gen += 1
            self._lists = ()
            await self._unblock()
        await self.pass_on_ready()

    async def pass_on_ready(self) -> None:
        while self.ready:
            hops, job_id = self.ready.popleft()
            try:
                await self.queue.pass_on(hops, job_id)
            except _ERRORS as exc:  # Redis is away: the job is still found by a claim (the slow poll)
                log.warning("could not pass on the wake token of job %s: %s", job_id, type(exc).__name__)

    async def close(self) -> None:
        """At stop: unblock the BLPOP, pass on what it popped, close the connection."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            self._gen += 1
            await self._unblock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), UNBLOCK_WAIT_S)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.pass_on_ready()
        await self._drop()

    # --- the BLPOP ---------------------------------------------------------------------------------

    async def _pop(self, gen: int, lists: tuple[str, ...], timeout_s: float) -> None:
        async with self._lock:  # after the BLPOP this one replaces has answered
            if gen != self._gen or self._closed:
                return
            try:
                raw = await self._blpop(gen, lists, timeout_s)
                self._backoff.reset()
            except _ERRORS as exc:
                await self._drop()
                delay = self._backoff.next_delay()
                if self._backoff.failures == 1:
                    log.warning("waiting for wake tokens failed (%s: %s); polling meanwhile",
                                type(exc).__name__, str(exc)[:120])
                await asyncio.sleep(delay)  # back off before the claim loop asks again
                raw = None
        if raw is not None:
            self.popped += 1
            token = parse_wake_token(raw)
            if token is None:
                self.garbage += 1
                if self.garbage == 1:
                    log.warning("ignoring an entry on a wake list that is no token; later ones are counted")
            else:
                self.ready.append(token)
                self.wake.set()
                return
        if gen == self._gen:  # the slow poll (or garbage: look anyway), unless stood down or replaced
            self.wake.set()

    async def _blpop(self, gen: int, lists: tuple[str, ...], timeout_s: float) -> str | None:
        """One BLPOP; the popped entry, or None at the timeout (or when unblocked)."""
        conn = await self._connection(lists[0])
        if gen != self._gen:  # stood down or replaced while connecting (an unblock found nothing)
            return None
        conn.socket_timeout = timeout_s + READ_MARGIN_S
        await conn.send_command("BLPOP", *lists, f"{timeout_s:.3f}")
        reply = await conn.read_response()
        if isinstance(reply, list) and len(reply) == 2:
            value = reply[1]
            return value if isinstance(value, str) else bytes(value).decode("utf-8", "surrogateescape")
        return None

    async def _connection(self, key: str) -> AbstractConnection:
        conn = self._conn
        pool = getattr(self.client, "connection_pool", None)
        if conn is not None and isinstance(pool, FollowingPool):  # Sentinel: follow the master
            await pool.recheck()
            if conn.is_connected and pool.master_address is not None and (
                    (getattr(conn, "host", None), getattr(conn, "port", None)) != tuple(pool.master_address)):
                await self._drop()
                conn = None
        if conn is not None and conn.is_connected and self._client_id is not None:
            return conn
        await self._drop()
        fresh: AbstractConnection
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
            self._node = self.client.get_node_from_key(key)
            fresh = self._node.connection_class(**self._node.connection_kwargs)
        elif pool is not None:
            fresh = pool.make_connection()  # ours alone: never handed to another caller
        else:
            raise RedisUnavailable("this Redis client has no connection pool to wait on")
        self._conn = conn = fresh
        await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        await conn.send_command("CLIENT", "ID")
        self._client_id = int(await conn.read_response())
        return conn

    def _unblock_soon(self) -> None:
        task = asyncio.create_task(self._unblock(), name="wake-unblock")
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _unblock(self) -> None:
        """Make the BLPOP in flight answer now (as if timed out; a token it popped first still
        comes back). Where CLIENT UNBLOCK is refused (an ACL), the connection is closed instead."""
        client_id = self._client_id
        if client_id is None:
            return
        try:
            if isinstance(self.client, RedisCluster) and self._node is not None:
                await self.client.execute_command("CLIENT", "UNBLOCK", client_id, target_nodes=self._node)
            else:
                await self.client.execute_command("CLIENT", "UNBLOCK", client_id)  # type: ignore[no-untyped-call]
        except _ERRORS:
            task = self._task
            if task is not None and not task.done():
                task.cancel()  # redis-py closes a connection whose read was cancelled
                await asyncio.gather(task, return_exceptions=True)
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn, self._client_id = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()


_background: set[asyncio.Task[Any]] = set()  # fire-and-forget calls, kept from the garbage collector


# --- relays ------------------------------------------------------------------------------------------

# The election, one call: the relay number this worker holds (it keeps it while its heartbeat key
# lives), else the first lock that is free or whose holder's heartbeat is gone, else -1.
# KEYS: the routing keys (Keys.routing_keys; names are built from ARGV[1] as every script does).
# ARGV: 1 prefix, 2 relay lock name, 3 worker hash name, 4 heartbeat suffix, 5 number of relays,
#       6 this worker's id, 7 the lock's TTL in ms (a backstop: a holder renews it when it runs this).
ELECT = """
local prefix, n, me, ttl = ARGV[1], tonumber(ARGV[5]), ARGV[6], ARGV[7]
local free = nil
for i = 0, n - 1 do
  local lk = prefix .. ARGV[2] .. i
  local holder = redis.pcall('GET', lk)
  if holder == me then
    redis.call('PEXPIRE', lk, ttl)
    return i
  end
  if not free and (type(holder) ~= 'string' or #holder > 512
      or redis.call('EXISTS', prefix .. ARGV[3] .. holder .. ARGV[4]) == 0) then
    free = i
  end
end
if free then
  local lk = prefix .. ARGV[2] .. free
  redis.call('DEL', lk)
  redis.call('SET', lk, me, 'PX', ttl)
  return free
end
return -1
"""


class Relays:
    """This worker's part in the relay election, and what a relay does with job_submitted."""

    def __init__(self, client: aioredis.Redis, keys: Keys, queue: Queue, worker_id: str, count: int,
                 beat_ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.queue = queue
        self.worker_id = worker_id
        self.count = count
        self.beat_ttl_s = beat_ttl_s
        self.index: int | None = None  # the relay lock this worker holds
        self.changed: Callable[[], None] | None = None  # called when `index` changes
        self.forwarded = 0  # job_submitted messages turned into Queue.wake calls
        self._elect = client.register_script(ELECT)
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def is_relay(self) -> bool:
        return self.index is not None

    def period_s(self) -> float:
        """How long until this worker runs the election again, jittered so that a fleet spreads
        its tries: a few heartbeat TTLs for a worker that is no relay (how soon a dead relay's
        place is taken), far longer for a relay (its heartbeats keep its lock; this only finds out
        that another took it over after its own beats failed for a heartbeat TTL)."""
        return self.beat_ttl_s * (random.uniform(10.0, 20.0) if self.is_relay else random.uniform(2.0, 4.0))

    async def elect(self) -> int | None:
        """Run the election once; the relay number this worker holds now, or None."""
        if self.count <= 0:
            return None
        got = int(await self._elect(keys=list(self.keys.routing_keys), args=[
            self.keys.prefix, RELAY, WORKER, HEARTBEAT_SUFFIX, self.count, self.worker_id,
            int(self.beat_ttl_s * 40 * 1000)]))  # past the holder's next election
        index = got if got >= 0 else None
        if index != self.index:
            if index is not None:
                log.info("worker %s is wake relay %d now (job_submitted -> wake tokens)", self.worker_id, index)
            else:
                log.info("worker %s is no wake relay any more", self.worker_id)
            self.index = index
            if self.changed is not None:
                self.changed()
        return index

    async def run(self, stopping: asyncio.Event) -> None:
        """The election now and then, for ever; a failure is logged and the relay state kept."""
        while not stopping.is_set():
            try:
                await self.elect()
            except _ERRORS as exc:
                log.warning("relay election failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.period_s())

    def channels(self) -> set[str]:
        """What the slot's listener subscribes to: cancel_job, and job_submitted while a relay."""
        if self.is_relay:
            return {self.keys.ch_cancel, self.keys.ch_job_submitted}
        return {self.keys.ch_cancel}

    async def follow(self, pubsub: PubSub, channels: set[str]) -> set[str]:
        """Subscribe `pubsub` (now on `channels`) to what this worker's relay state wants."""
        wanted = self.channels()
        if wanted - channels:
            await pubsub.subscribe(*(wanted - channels))
        if channels - wanted:
            await pubsub.unsubscribe(*(channels - wanted))
        return wanted

    def forward_all(self, job_ids: deque[str]) -> None:
        while job_ids:
            self.forward(job_ids.popleft())

    def forward(self, job_id: str) -> None:
        """Turn a job_submitted into a wake token (in the background: the listener never waits)."""
        if len(self._tasks) >= 1000:  # Redis is that slow: the slow poll finds these jobs
            return
        self.forwarded += 1
        task = asyncio.create_task(self._wake(job_id), name="relay-wake")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake(self, job_id: str) -> None:
        try:
            await self.queue.wake(job_id)
        except _ERRORS as exc:
            log.warning("relay could not wake a worker for job %s: %s", job_id, type(exc).__name__)

    async def close(self) -> None:
        """At stop: let the wake calls under way finish (briefly)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=UNBLOCK_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
