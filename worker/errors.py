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


def refused_credentials(exc: BaseException) -> ConfigError | None:
    """A ConfigError when Redis refused this worker's credentials or permissions (a wrong or
    missing password, an ACL without a needed command or key): configuration, not an outage,
    so it stops start-up instead of being retried forever. None for any other error."""
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    text = str(exc)
    if isinstance(exc, NoPermissionError) or text.startswith("NOPERM"):
        return ConfigError(f"EMP_REDIS_URL: the Redis user lacks a permission this worker needs ({text[:200]}); "
                           "grant it the scripting, hash, sorted-set, stream and pub/sub commands on the keys "
                           "and channels of its key prefix")
    if isinstance(exc, AuthenticationError) or (isinstance(exc, ResponseError) and
                                                text.startswith(("NOAUTH", "WRONGPASS"))):
        return ConfigError(f"EMP_REDIS_URL: Redis refused this worker's credentials ({text[:200]}); "
                           "put the right user and password in the URL, e.g. redis://user:password@host:6379/0")
    return None
