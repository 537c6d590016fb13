"""The exceptions emp-worker raises, one tree.

    EmpWorkerError
    ├── ConfigError            bad configuration: stops start-up with one line
    ├── RedisUnavailable       Redis could not be reached (retried with backoff by the daemon)
    ├── ConnectorError         a connector plugin is unknown, misbehaves or its engine is down
    ├── StaleJob               a fenced call was refused: the job moved on without this caller
    └── JobError               one job cannot run; the job fails, the worker goes on
        ├── InvalidJob         the job itself is malformed (permanent: retrying cannot help)
        ├── PermanentJobError  a connector's verdict that the input is bad (permanent)
        └── RetryableJobError  engine crash, timeout, out of memory... (retried with backoff)

Messages say what happened and what to do next; they never contain secrets.
"""

from __future__ import annotations


class EmpWorkerError(Exception):
    """Base of every error emp-worker raises on purpose."""


class ConfigError(EmpWorkerError):
    """A setting has a value that is not allowed."""


class RedisUnavailable(EmpWorkerError):
    """Redis refused or dropped the connection, or timed out."""


class ConnectorError(EmpWorkerError):
    """A connector could not be loaded or its engine is unusable."""


class StaleJob(EmpWorkerError):
    """A progress/complete/fail/hand-back was refused: another attempt now holds the job."""


class JobError(EmpWorkerError):
    """A job failed. `retryable` says whether another attempt may succeed."""

    retryable: bool = True


class InvalidJob(JobError):
    """The job hash or payload is malformed."""

    retryable = False


class PermanentJobError(JobError):
    """The connector judged the input bad; retrying cannot help."""

    retryable = False


class RetryableJobError(JobError):
    """A transient failure: another attempt, maybe on another worker, may succeed."""

    retryable = True
