"""Connector plugins. Plugin authors need only this module::

    from connectors import Connector, JobContext, hookimpl
"""

from connectors.base import (
    Connector,
    ConnectorConfig,
    Health,
    HealthState,
    JobCancelled,
    JobContext,
    JobResult,
)
from connectors.hookspecs import hookimpl

__all__ = [
    "Connector",
    "ConnectorConfig",
    "Health",
    "HealthState",
    "JobCancelled",
    "JobContext",
    "JobResult",
    "hookimpl",
]
