"""The ``azure`` output store (alias ``azure-blob``): Azure Blob Storage through azure-storage-blob,
which is optional (``pip install 'emp-worker[azure]'``). It stores what emp-job-queue's jobs
describe in ``ctx.storage`` (``{provider: "azure", bucket: "<container>", cdnUrl}``).

Settings, from the operator's environment only (``EMP_AZURE_*``)::

    EMP_AZURE_CONNECTION_STRING=DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...
    # or: EMP_AZURE_ACCOUNT_URL=https://<account>.blob.core.windows.net
    #     with EMP_AZURE_ACCOUNT_KEY=... or EMP_AZURE_SAS_TOKEN=...
    EMP_AZURE_CONTAINER=renders                     # required
    EMP_AZURE_PUBLIC_BASE_URL=https://cdn.example.com  # else the blob's own URL
    EMP_AZURE_ALLOWED_CONTAINERS=a,b                # containers a job's ctx.storage.bucket may name

Files are streamed in blocks above ``EMP_AZURE_SINGLE_PUT_MB`` (``EMP_AZURE_MAX_CONCURRENCY`` at a
time), and the stored size is read back. Throttling, 5xx, timeouts, connection trouble, lease
conflicts and refused credentials are retryable (credentials are this worker's configuration,
not the job's fault); a missing container or a request the service rejects is permanent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, field_validator

from connectors.settings import ConnectorSettings
from connectors.stores import OutputStore, Stored, StoreError, Upload
from connectors.stores.cloud import cdn_base, chosen_bucket, http_url, joined, names, redacted, require
from worker.errors import ConfigError

MB = 1024 * 1024
PERMANENT_CODES = frozenset({"ContainerNotFound", "ContainerBeingDeleted", "ContainerDisabled", "InvalidResourceName",
                             "RequestBodyTooLarge", "InvalidBlobOrBlock", "AccountIsDisabled"})
TRANSIENT_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError", "LeaseIdMissing",
                             "LeaseAlreadyPresent", "BlobBeingRehydrated"})


class AzureSettings(ConnectorSettings):
    """EMP_AZURE_*."""

    connection_string: str = ""
    account_url: str = Field("", max_length=2048)
    account_name: str = Field("", max_length=64)  # with ACCOUNT_KEY, when ACCOUNT_URL does not show it
    account_key: str = ""
    sas_token: str = ""
    container: str = Field("", max_length=63)
    public_base_url: str = Field("", max_length=2048)
    allowed_containers: str = Field("", max_length=8192)
    single_put_mb: int = Field(64, ge=1, le=5000)  # above this a blob goes up in blocks
    block_mb: int = Field(8, ge=1, le=4000)
    max_concurrency: int = Field(4, ge=1, le=64)
    connect_timeout_s: float = Field(10.0, gt=0, le=300)
    read_timeout_s: float = Field(60.0, gt=0, le=3600)
    retries: int = Field(2, ge=0, le=10)  # per request, inside the SDK; the worker tries a put 3 times

    @field_validator("account_url", "public_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return http_url(value)


def _connection_parts(connection_string: str) -> dict[str, str]:
    parts = (item.partition("=") for item in connection_string.split(";") if "=" in item)
    return {key.strip().lower(): value.strip() for key, _, value in parts}


def account_name_of(url: str) -> str:
    """The account in a blob endpoint URL: its first host label, or (an IP or localhost, as the
    emulator's ``http://127.0.0.1:10000/devstoreaccount1``) its first path segment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = host == "localhost"
    return parts.path.strip("/").split("/")[0] if is_ip else host.split(".")[0]


class AzureStore(OutputStore):
    name = "azure"
    aliases = ("azure-blob",)
    settings_class = AzureSettings
    settings: AzureSettings

    def __init__(self, settings: ConnectorSettings) -> None:
        super().__init__(settings)
        self._service: Any = None
        self._lock = asyncio.Lock()
        self.allowed = names(self.settings.allowed_containers)

    @classmethod
    def load_settings(cls) -> AzureSettings:
        require("azure", "azure.storage.blob", "azure-storage-blob")
        s = AzureSettings.load(cls.env_prefix())
        if not s.container:
            raise ConfigError("EMP_AZURE_CONTAINER is not set: name the container outputs are stored in")
        if not s.connection_string and not (s.account_url and (s.account_key or s.sas_token)):
            raise ConfigError("set EMP_AZURE_CONNECTION_STRING, or EMP_AZURE_ACCOUNT_URL with EMP_AZURE_ACCOUNT_KEY "
                              "or EMP_AZURE_SAS_TOKEN")
        if s.account_key and not s.connection_string and not (s.account_name or account_name_of(s.account_url)):
            raise ConfigError("EMP_AZURE_ACCOUNT_URL does not show the account name: set EMP_AZURE_ACCOUNT_NAME")
        return s

    def secrets(self) -> Sequence[str]:
        s = self.settings
        found = [s.connection_string, s.account_key, s.sas_token]
        parts = _connection_parts(s.connection_string)
        found += [parts.get("accountkey", ""), parts.get("sharedaccesssignature", "")]
        for sas in (s.sas_token, parts.get("sharedaccesssignature", "")):
            signatures = re.findall(r"(?:^|&)sig=([^&]+)", sas.lstrip("?"))  # as sent, and as decoded
            found += signatures + [unquote(sig) for sig in signatures]
        return sorted({v for v in found if v}, key=len, reverse=True)  # longest first: whole before parts

    async def put(self, upload: Upload) -> Stored:
        container = chosen_bucket(upload.storage, ("bucket", "container"), self.settings.container, self.allowed,
                                  ("EMP_AZURE_CONTAINER", "EMP_AZURE_ALLOWED_CONTAINERS"))
        base = cdn_base(upload.storage)
        service = await self._connected()
        blob = service.get_blob_client(container, upload.key)
        try:
            size = await asyncio.to_thread(self._upload, blob, upload)
        except Exception as exc:
            raise self._translated(exc, container) from exc
        if base:
            url = joined(base, upload.key)
        elif self.settings.public_base_url:
            url = joined(self.settings.public_base_url, upload.key)
        else:  # the blob's own URL, without a SAS query
            url = urlunsplit(urlsplit(str(blob.url))._replace(query="", fragment=""))
        return Stored(url, size)

    async def _connected(self) -> Any:
        async with self._lock:
            if self._service is None:
                self._service = await asyncio.to_thread(self._make_service)
            return self._service

    def _make_service(self) -> Any:
        blob = require("azure", "azure.storage.blob", "azure-storage-blob")
        s = self.settings
        options: dict[str, Any] = {
            "connection_timeout": s.connect_timeout_s, "read_timeout": s.read_timeout_s, "retry_total": s.retries,
            "max_single_put_size": s.single_put_mb * MB, "max_block_size": s.block_mb * MB}
        if s.connection_string:
            return blob.BlobServiceClient.from_connection_string(s.connection_string, **options)
        credential: Any = s.sas_token
        if s.account_key:
            from azure.core.credentials import AzureNamedKeyCredential

            credential = AzureNamedKeyCredential(s.account_name or account_name_of(s.account_url), s.account_key)
        return blob.BlobServiceClient(s.account_url, credential=credential, **options)

    def _upload(self, blob: Any, upload: Upload) -> int:
        """Stream the output up (in blocks when large), then read back the size the service holds."""
        from azure.storage.blob import ContentSettings

        with upload.open() as source:
            blob.upload_blob(source, length=upload.size_bytes, overwrite=True,
                             max_concurrency=self.settings.max_concurrency,
                             content_settings=ContentSettings(content_type=upload.content_type))
        return int(blob.get_blob_properties().size)

    def _translated(self, exc: Exception, container: str) -> StoreError:
        """An azure-core error as a StoreError with a readable message and no secret."""
        from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError

        retryable = True  # connection trouble, timeouts
        if isinstance(exc, HttpResponseError):
            status = int(exc.status_code or 0)
            found = getattr(exc, "error_code", None) or exc.reason or "?"
            code = str(getattr(found, "value", found))  # the SDK gives a StorageErrorCode enum when it knows it
            first = str(exc.message or "").strip().splitlines()[:1]
            message = f"Azure answered {status} {code}" + (f": {first[0]}" if first else "")
            hint, retryable = verdict(401 if isinstance(exc, ClientAuthenticationError) else status, code)
            message += f" (container {container!r}){hint}"
        elif isinstance(exc, AzureError):
            message = f"{type(exc).__name__}: {str(exc.message or exc).splitlines()[0]}"
        else:
            message = f"{type(exc).__name__}: {exc}"
        return StoreError(redacted(message, self.secrets())[:500], retryable=retryable)

    async def close(self) -> None:
        if self._service is not None:
            service, self._service = self._service, None
            await asyncio.to_thread(service.close)


def verdict(status: int, code: str) -> tuple[str, bool]:
    """What a Blob Storage error answer means: a hint for the message, and whether a later try may succeed."""
    if status in (401, 403):
        return "; check EMP_AZURE_CONNECTION_STRING / EMP_AZURE_ACCOUNT_KEY / EMP_AZURE_SAS_TOKEN", True
    if code == "ContainerNotFound":
        return "; create the container or fix EMP_AZURE_CONTAINER / ctx.storage.bucket", False
    if code in PERMANENT_CODES:
        return "", False
    return "", code in TRANSIENT_CODES or status >= 500 or status in (408, 409, 412, 429) or status == 0
