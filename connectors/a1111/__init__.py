"""The A1111 (Stable Diffusion WebUI) connector: service ``a1111``, settings ``EMP_A1111_*``.

See connector.py for how a job runs, request.py for what a payload may hold, api.py for
A1111's wire format and settings.py for the configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connectors.a1111.connector import A1111Connector
from connectors.a1111.settings import A1111Settings
from connectors.hookspecs import hookimpl

__all__ = ["A1111Connector", "A1111Settings", "emp_connectors"]


@hookimpl
def emp_connectors() -> Sequence[type[Any]]:
    return [A1111Connector]
