"""The generic REST connector: ``emp-worker run --connectors rest`` runs every service that
``EMP_REST_SERVICES`` configures (see connectors/rest/config.py), each reachable only under the
base URL the operator gave it (connectors/rest/urls.py).

- ``config``: the settings (EMP_REST_SERVICES as JSON or per-service variable blocks, credentials);
- ``urls``: where a job may send a request (the SSRF rules, pure);
- ``jobs``: what a payload asks for and what a service's answers say (pure);
- ``engine``: one service's HttpEngine and its status rules (Retry-After, redirects);
- ``connector``: the sync and async flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connectors.hookspecs import hookimpl
from connectors.rest.config import RestService, RestSettings
from connectors.rest.connector import RestConnector

__all__ = ["RestConnector", "RestService", "RestSettings", "emp_connectors"]


@hookimpl
def emp_connectors() -> Sequence[type[Any]]:
    return [RestConnector]
