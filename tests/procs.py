"""Worker processes for fault tests: real `python -m worker run` daemons (the test kit's)."""

from connectors.testing import WorkerProcess

__all__ = ["WorkerProcess"]
