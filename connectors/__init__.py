"""Connector plugins: this package is the whole public API a plugin author needs::

    from connectors import Connector, Job, JobContext, JobResult, PermanentJobError, hookimpl

Everything a connector touches is re-exported here (a test keeps ``__all__`` exact, and another
checks the README's example imports nothing else); ``connectors.testing`` is the test kit.
"""

from connectors.base import (
    Connector,
    ConnectorConfig,
    Health,
    HealthState,
    JobCancelled,
    JobContext,
    JobResult,
    Outcome,
    Output,
    StopReason,
)
from connectors.hookspecs import hookimpl
from connectors.http import HttpEngine, StreamedResponse, error_for_status
from connectors.settings import ConnectorSettings, EngineSettings, slot_url
from connectors.stores import OutputStore, Stored, StoreError, Upload
from worker.errors import ConfigError, JobError, PermanentJobError, RetryableJobError
from worker.protocol import Job

__all__ = [
    "ConfigError",
    "Connector",
    "ConnectorConfig",
    "ConnectorSettings",
    "EngineSettings",
    "Health",
    "HealthState",
    "HttpEngine",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobResult",
    "Outcome",
    "Output",
    "OutputStore",
    "PermanentJobError",
    "RetryableJobError",
    "StopReason",
    "StoreError",
    "Stored",
    "StreamedResponse",
    "Upload",
    "error_for_status",
    "hookimpl",
    "slot_url",
]
