"""The ComfyUI connector (``--connectors comfyui``): API-format workflows on each slot's own ComfyUI.

Modules: ``connector`` (the Connector: lifecycle, health, models), ``runner`` (one job: submit,
follow, reconcile, outputs, cancel), ``client`` (HTTP API), ``ws`` (the /ws socket and binary
frames), ``progress`` (messages -> 0-100 and "KSampler 12/30"), ``outputs`` (what history lists,
fetched through /view), ``errors`` (ComfyUI's failures -> permanent or retryable), ``payload``
and ``inputs`` (the job's workflow and input images), ``supervisor`` (an optional ComfyUI
process per slot), ``settings`` (``EMP_COMFYUI_*``). COMFYUI.md in the project docs describes
the protocol and the pitfalls each part handles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connectors.comfyui.connector import ComfyUIConnector
from connectors.comfyui.settings import ComfyUISettings
from connectors.hookspecs import hookimpl

__all__ = ["ComfyUIConnector", "ComfyUISettings", "emp_connectors"]


@hookimpl
def emp_connectors() -> Sequence[type[Any]]:
    return [ComfyUIConnector]
