"""Every Redis key and pub/sub channel name emp-worker uses, in one place.

The names without the ``emp:`` part are emp-job-queue's own (see PROTOCOL.md) and must not change:
their API server and monitor read them. The ``emp:`` names are ours; an old reader ignores them.

An optional prefix is put in front of every name. Production uses the empty prefix (their layout);
tests use a unique prefix each so that they never touch keys they did not create.

Redis Cluster (opt-in, EMP_REDIS_CLUSTER): the prefix carries a hash tag, e.g. ``{emp}:``, so that
every key, per-job keys included, hashes to the tag's one slot and every script runs on one node.
That layout is not emp-job-queue's (their keys have no tag): their API and monitor do not see it.

Lua scripts derive per-job keys (``job:{id}``...) from the prefix passed in ARGV, with the same
suffixes as below: ``JOB``, ``PROGRESS_HASH``, ``PROGRESS_STREAM``, ``ACTIVE``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Suffix templates shared with worker/scripts.py, which builds per-job keys inside Lua.
JOB = "job:"
PROGRESS_STREAM = "progress:"
PROGRESS_HASH_SUFFIX = ":progress"
ACTIVE = "jobs:active:"
WORKER = "worker:"
HEARTBEAT_SUFFIX = ":heartbeat"
# + on worker:{id}: the token of the one process writing under that id (set by its heartbeat with the
# heartbeat's TTL; a second process with the id waits for it to lapse or refuses to start)
INSTANCE_SUFFIX = ":instance"
CLASS_QUEUE = "emp:q:"
PENDING = "jobs:pending"
COMPLETED = "jobs:completed"
FAILED = "jobs:failed"
WORKERS_ACTIVE = "workers:active"
SEQ = "emp:seq"
INDEXED = "emp:indexed"
CLASSES = "emp:classes"
WF_QUEUE = "emp:qw:"
LOADED = "emp:loaded:"
LEASES = "emp:leases"
DELAYED = "emp:delayed"
REAPER_LOCK = "emp:reaper:lock"
TOTALS = "emp:totals:"  # + worker id: its job counters, copied into worker:{id} by each heartbeat
RECONCILE_LOCK = "emp:reconcile:lock"
RECONCILE_CURSOR = "emp:reconcile:cursor"
QUARANTINE = "emp:quarantine"
OUTAGE = "emp:outage"
# Wake-up without a herd: per-service lists of tokens "{hops}:{job id}" that idle workers BLPOP
# (Redis hands each token to one blocked worker), the per-job mark that dedupes relays' pushes,
# and the relays' locks (the few workers that turn job_submitted into tokens)
WAKE_LIST = "emp:wakeup:"  # + service
WOKEN = "emp:woken:"  # + job id
RELAY = "emp:relay:"  # + relay number
CLASSES_OF = "emp:classes:"  # + service: that service's classes (class id -> meta JSON)

# A field of the worker hash (not a key): the worker's models as JSON {service: [model names]},
# written by Queue.set_models and read by the claim script when claim capabilities carry none.
MODELS_FIELD = "emp_models"

# Pub/sub channels: emp-job-queue's names.
CH_JOB_SUBMITTED = "job_submitted"
CH_JOB_CLAIMED = "job_claimed"
CH_PROGRESS = "update_job_progress"
CH_COMPLETE = "complete_job"
CH_FAILED = "job_failed"
CH_WORKER_STATUS = "worker_status"
CH_CANCEL = "cancel_job"
CH_MACHINE_STATUS = "machine:status:"  # + machine id

# Every suffix above, by name: worker/scripts.py substitutes these into the Lua sources.
LUA_NAMES: dict[str, str] = {
    name: value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str)
}


def hash_tag_of(prefix: str) -> str | None:
    """The hash tag every key under `prefix` shares in Redis Cluster: the text between the first
    ``{`` and the next ``}`` (None when there is none or it is empty: Redis then hashes whole keys)."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return prefix[start + 1 : end] if end > start + 1 else None


@dataclass(frozen=True)
class Keys:
    """Key and channel names under one prefix."""

    prefix: str = ""

    @property
    def routing_keys(self) -> tuple[str, ...]:
        """What a script declares as its KEYS: with a hash-tagged prefix, the prefix itself (a name
        in the tag's slot, so that a cluster client sends the script to that slot's node; the
        scripts ignore it and derive their keys from ARGV[1]); none otherwise."""
        return (self.prefix,) if hash_tag_of(self.prefix) is not None else ()

    # --- emp-job-queue keys -------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self.prefix}{JOB}{job_id}"

    def job_progress(self, job_id: str) -> str:
        return f"{self.prefix}{JOB}{job_id}{PROGRESS_HASH_SUFFIX}"

    @property
    def pending(self) -> str:
        return f"{self.prefix}{PENDING}"

    def active(self, worker_id: str) -> str:
        return f"{self.prefix}{ACTIVE}{worker_id}"

    @property
    def completed(self) -> str:
        return f"{self.prefix}{COMPLETED}"

    @property
    def failed(self) -> str:
        return f"{self.prefix}{FAILED}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}{WORKER}{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}{WORKER}{worker_id}{HEARTBEAT_SUFFIX}"

    def instance(self, worker_id: str) -> str:
        """The token (``host:pid:random``) of the process that writes under `worker_id` now."""
        return f"{self.prefix}{WORKER}{worker_id}{INSTANCE_SUFFIX}"

    @property
    def workers_active(self) -> str:
        return f"{self.prefix}{WORKERS_ACTIVE}"

    # --- emp-worker additions -------------------------------------------------------------------
    def progress_stream(self, job_id: str) -> str:
        """Redis Stream of every progress/lifecycle event of a job, replayable by clients."""
        return f"{self.prefix}{PROGRESS_STREAM}{job_id}"

    @property
    def seq(self) -> str:
        """Counter giving every indexed job a strictly increasing sequence number."""
        return f"{self.prefix}{SEQ}"

    @property
    def indexed(self) -> str:
        """Set of job ids present in a class queue (compared with jobs:pending to reconcile)."""
        return f"{self.prefix}{INDEXED}"

    @property
    def classes(self) -> str:
        """Hash: class id -> its service (every registered class; reconcile and status walk it)."""
        return f"{self.prefix}{CLASSES}"

    def classes_of(self, service: str) -> str:
        """Hash: class id -> JSON {service, requirements, customer_id} of one service's classes (a
        claim reads only the services its worker serves)."""
        return f"{self.prefix}{CLASSES_OF}{service}"

    def wake_list(self, service: str) -> str:
        """List of wake tokens ``"{hops}:{job id}"`` for idle workers of `service` (BLPOP)."""
        return f"{self.prefix}{WAKE_LIST}{service}"

    def relay(self, n: int) -> str:
        """Lock of relay `n`: its holder turns job_submitted messages into wake tokens."""
        return f"{self.prefix}{RELAY}{n}"

    def class_queue(self, class_id: str) -> str:
        """Sorted set of the pending jobs of one (service, requirements, customer) class."""
        return f"{self.prefix}{CLASS_QUEUE}{class_id}"

    def workflow_queue(self, workflow_id: str) -> str:
        """Sorted set of the pending jobs of one workflow (for workers restricted to it)."""
        return f"{self.prefix}{WF_QUEUE}{workflow_id}"

    def loaded(self, model: str) -> str:
        """Set of the workers that have `model` loaded in GPU memory (for model affinity)."""
        return f"{self.prefix}{LOADED}{model}"

    @property
    def leases(self) -> str:
        """Sorted set: job id -> lease deadline (ms); expired entries are reaped."""
        return f"{self.prefix}{LEASES}"

    @property
    def delayed(self) -> str:
        """Sorted set: job id -> time (ms) a retried job becomes claimable again."""
        return f"{self.prefix}{DELAYED}"

    @property
    def reconcile_lock(self) -> str:
        return f"{self.prefix}{RECONCILE_LOCK}"

    def totals(self, worker_id: str) -> str:
        """A worker's ``total_jobs_completed`` / ``total_jobs_failed``, kept apart from its record
        (their API's start-up clean-up deletes ``worker:{id}``); the heartbeat copies them back."""
        return f"{self.prefix}{TOTALS}{worker_id}"

    @property
    def reaper_lock(self) -> str:
        return f"{self.prefix}{REAPER_LOCK}"

    @property
    def reconcile_cursor(self) -> str:
        """Hash: where reconcile's membership sweeps of jobs:pending and emp:indexed go on."""
        return f"{self.prefix}{RECONCILE_CURSOR}"

    @property
    def quarantine(self) -> str:
        """Hash: job id -> JSON {reason, where, at} of what no script could read or fail readably
        (a job key of another type, an id with control or non-ASCII bytes); shown by status."""
        return f"{self.prefix}{QUARANTINE}"

    @property
    def outage(self) -> str:
        """Hash the reaper keeps: Redis's run_id, its last run and the end of an outage's grace
        period (no lease is reaped before it), and how many outages it saw."""
        return f"{self.prefix}{OUTAGE}"

    # --- pub/sub channels (emp-job-queue names) -------------------------------------------------
    @property
    def ch_job_submitted(self) -> str:
        return f"{self.prefix}{CH_JOB_SUBMITTED}"

    @property
    def ch_job_claimed(self) -> str:
        return f"{self.prefix}{CH_JOB_CLAIMED}"

    @property
    def ch_progress(self) -> str:
        return f"{self.prefix}{CH_PROGRESS}"

    @property
    def ch_complete(self) -> str:
        return f"{self.prefix}{CH_COMPLETE}"

    @property
    def ch_failed(self) -> str:
        return f"{self.prefix}{CH_FAILED}"

    @property
    def ch_worker_status(self) -> str:
        return f"{self.prefix}{CH_WORKER_STATUS}"

    @property
    def ch_cancel(self) -> str:
        return f"{self.prefix}{CH_CANCEL}"

    def machine_status(self, machine_id: str) -> str:
        """Their monitor's machine channel (worker/machine.py)."""
        return f"{self.prefix}{CH_MACHINE_STATUS}{machine_id}"
