"""Why a pending job is still waiting: what `emp-worker status` says of the jobs next in line.

The answer is read from what the claim script itself looks at: the delayed-retry set (a retry
waiting out its backoff), the job's last failing worker (kept from it for
``EMP_RETRY_EXCLUSION_S`` while another capable worker is free), the models other workers have
loaded (a job left for them up to ``EMP_MODEL_AFFINITY_S``), and the live workers' claim
capabilities (none can run it, or all that can are busy).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.client import Client
from worker.matching import matches, required_models
from worker.protocol import parse_time, utc_iso

MAX_SHOWN = 20


@dataclass(frozen=True)
class Waiting:
    job_id: str
    service: str
    waited_s: float
    reason: str


def _iso(ms: float) -> str:
    return utc_iso(datetime.fromtimestamp(ms / 1000, UTC))


def _models(requirements: str) -> set[str]:
    try:
        parsed = json.loads(requirements or "{}")
    except ValueError:
        return set()
    return set(required_models(parsed)) if isinstance(parsed, dict) else set()


def _ms(raw: str | None) -> float:
    try:
        return float(raw or 0)
    except ValueError:
        return 0.0


def reason(job: dict[str, str], now_ms: float, delayed_until_ms: float | None, live: dict[str, dict[str, Any]],
           busy: set[str], exclusion_s: float, affinity_s: float) -> str:
    """Why `job` (its hash) is still pending, from the facts the claim script weighs."""
    if delayed_until_ms is not None and delayed_until_ms > now_ms:
        return f"retry delayed until {_iso(delayed_until_ms)} (its backoff)"
    service = job.get("service_required", "")
    capable = [w for w, caps in live.items()
               if matches(caps, service, job.get("requirements", ""), job.get("customer_id", ""))]
    if not capable:
        offering = [w for w, caps in live.items() if service in (caps.get("services") or [])]
        return (f"no live worker can run it: {len(offering)} run {service!r} but none meets its requirements"
                if offering else f"no live worker runs {service!r}")
    failed_on, failed_ms = job.get("last_failed_worker", ""), _ms(job.get("emp_last_failed_ms"))
    free = [w for w in capable if w not in busy]
    if failed_on in capable and now_ms - failed_ms < exclusion_s * 1000:
        until = _iso(failed_ms + exclusion_s * 1000)
        others = [w for w in free if w != failed_on]
        return (f"kept from {failed_on}, where its last attempt failed, until {until} (EMP_RETRY_EXCLUSION_S); "
                f"{len(others)} other capable worker(s) free")
    wanted = _models(job.get("requirements", ""))
    holders = [w for w in capable if wanted and wanted <= set(live[w].get("loaded") or [])]
    if holders and set(holders) <= busy:
        return f"left for {', '.join(holders[:3])}, which has its models loaded (EMP_MODEL_AFFINITY_S={affinity_s:g})"
    if not free:
        return f"every capable worker is busy ({len(capable)}: {', '.join(capable[:3])}...)"
    return f"{len(free)} capable worker(s) free: it is claimed on their next wake-up"


async def waiting_jobs(client: Client, exclusion_s: float, affinity_s: float, limit: int = MAX_SHOWN) -> list[Waiting]:
    """The next `limit` pending jobs in claim order, each with why it has not been claimed yet."""
    ids = await client.redis.zrevrange(client.keys.pending, 0, limit - 1)
    if not ids:
        return []
    live = await client.live_capabilities()
    busy = {w.worker_id for w in await client.workers() if w.current_job_id or w.status == "busy"}
    now_ms = time.time() * 1000
    found = []
    for job_id in ids:
        job = await client.get(job_id)
        if not job:
            continue
        delayed = await client.redis.zscore(client.keys.delayed, job_id)
        created = parse_time(job.get("created_at"))
        waited = time.time() - created.timestamp() if created else 0.0
        found.append(Waiting(job_id, job.get("service_required", ""), max(0.0, waited),
                             reason(job, now_ms, delayed, live, busy, exclusion_s, affinity_s)))
    return found
