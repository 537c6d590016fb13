"""The built-in output stores, registered like any plugin's (s3 and azure import their client
library only when used, so a worker without boto3 or azure-storage-blob still starts)."""

from __future__ import annotations

from collections.abc import Sequence

from connectors.hookspecs import hookimpl
from connectors.stores import OutputStore
from connectors.stores.azure import AzureStore
from connectors.stores.http_put import HttpPutStore
from connectors.stores.local import LocalStore
from connectors.stores.s3 import S3Store


@hookimpl
def emp_output_stores() -> Sequence[type[OutputStore]]:
    return [LocalStore, HttpPutStore, S3Store, AzureStore]


def by_name() -> dict[str, type[OutputStore]]:
    """The built-in stores by name and alias (for a worker made without the plugin manager)."""
    return {name: cls for cls in emp_output_stores() for name in (cls.name, *cls.aliases)}
