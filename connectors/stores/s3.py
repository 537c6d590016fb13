"""The ``s3`` output store (alias ``aws``): any S3-compatible service (AWS, MinIO, R2, ...) through
boto3, which is optional (``pip install 'emp-worker[s3]'``).

Settings, from the operator's environment only (``EMP_S3_*``)::

    EMP_S3_BUCKET=renders                   # required
    EMP_S3_ENDPOINT_URL=http://minio:9000   # not AWS: MinIO, R2, ... (path-style addressing then)
    EMP_S3_REGION=us-east-1
    EMP_S3_ACCESS_KEY_ID=... / EMP_S3_SECRET_ACCESS_KEY=...   # else boto3's chain (AWS_*, role)
    EMP_S3_PUBLIC_BASE_URL=https://cdn.example.com            # else the object's URL at the endpoint
    EMP_S3_ALLOWED_BUCKETS=a,b              # buckets a job's ctx.storage.bucket may name

Files are streamed (multipart above ``EMP_S3_MULTIPART_THRESHOLD_MB``), the stored size is read
back with HEAD, and the listed URL is the job's ``ctx.storage.cdnUrl``, else the public base URL,
else the endpoint's. Errors are translated here: throttling, 5xx, timeouts and connection trouble
are retryable; so are refused credentials (AccessDenied, InvalidAccessKeyId...): they are this
worker's configuration, not the job's fault, so the job is left to a worker (or a fixed
configuration) that can store it. A missing bucket or a request S3 rejects is permanent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from connectors.settings import ConnectorSettings
from connectors.stores import OutputStore, Stored, StoreError, Upload
from connectors.stores.cloud import cdn_base, chosen_bucket, http_url, joined, names, redacted, require
from worker.errors import ConfigError

MB = 1024 * 1024
# refused credentials: retryable (see the module docstring), with a hint for the operator
CREDENTIAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                              "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "InvalidSecurity"})
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                             "InternalError", "ServiceUnavailable", "OperationAborted"})


class S3Settings(ConnectorSettings):
    """EMP_S3_*."""

    bucket: str = Field("", max_length=255)
    endpoint_url: str = Field("", max_length=2048)
    region: str = Field("", max_length=64)
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    public_base_url: str = Field("", max_length=2048)
    allowed_buckets: str = Field("", max_length=8192)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    multipart_threshold_mb: int = Field(16, ge=1, le=5 * 1024)
    multipart_chunk_mb: int = Field(16, ge=5, le=5 * 1024)  # S3's smallest part is 5 MiB
    max_concurrency: int = Field(4, ge=1, le=64)
    connect_timeout_s: float = Field(10.0, gt=0, le=300)
    read_timeout_s: float = Field(60.0, gt=0, le=3600)
    max_attempts: int = Field(3, ge=1, le=10)  # per request, inside boto3; the worker tries a put 3 times

    @field_validator("endpoint_url", "public_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return http_url(value)


class S3Store(OutputStore):
    name = "s3"
    aliases = ("aws",)
    settings_class = S3Settings
    settings: S3Settings

    def __init__(self, settings: ConnectorSettings) -> None:
        super().__init__(settings)
        self._client: Any = None
        self._lock = asyncio.Lock()
        self.allowed = names(self.settings.allowed_buckets)

    @classmethod
    def load_settings(cls) -> S3Settings:
        require("s3", "boto3", "boto3")
        settings = S3Settings.load(cls.env_prefix())
        if not settings.bucket:
            raise ConfigError("EMP_S3_BUCKET is not set: name the bucket outputs are stored in")
        if bool(settings.access_key_id) != bool(settings.secret_access_key):
            raise ConfigError("EMP_S3_ACCESS_KEY_ID and EMP_S3_SECRET_ACCESS_KEY go together: set both, or "
                              "neither to use boto3's own credentials (AWS_* variables, instance role)")
        return settings

    def secrets(self) -> Sequence[str]:
        s = self.settings
        return [v for v in (s.secret_access_key, s.session_token, s.access_key_id) if v]

    async def put(self, upload: Upload) -> Stored:
        bucket = chosen_bucket(upload.storage, ("bucket",), self.settings.bucket, self.allowed,
                               ("EMP_S3_BUCKET", "EMP_S3_ALLOWED_BUCKETS"))
        base = cdn_base(upload.storage)
        client = await self._connected()
        try:
            size = await asyncio.to_thread(self._upload, client, bucket, upload)
        except Exception as exc:
            raise self._translated(exc, bucket) from exc
        return Stored(joined(base, upload.key) if base else self.object_url(bucket, upload.key), size)

    def object_url(self, bucket: str, key: str) -> str:
        """The URL the result lists when the job gives no cdnUrl."""
        s = self.settings
        if s.public_base_url:
            return joined(s.public_base_url, key)
        if s.endpoint_url:
            if s.addressing_style == "virtual":
                scheme, _, host = s.endpoint_url.partition("://")
                return joined(f"{scheme}://{bucket}.{host.rstrip('/')}", key)
            return joined(f"{s.endpoint_url.rstrip('/')}/{bucket}", key)
        region = s.region or (self._client.meta.region_name if self._client else "") or "us-east-1"
        return joined(f"https://{bucket}.s3.{region}.amazonaws.com", key)

    async def _connected(self) -> Any:
        async with self._lock:
            if self._client is None:  # boto3 reads its service model from disk: off the event loop
                self._client = await asyncio.to_thread(self._make_client)
            return self._client

    def _make_client(self) -> Any:
        boto3 = require("s3", "boto3", "boto3")
        from botocore.config import Config

        s = self.settings
        style = "path" if s.addressing_style == "auto" and s.endpoint_url else s.addressing_style
        config = Config(connect_timeout=s.connect_timeout_s, read_timeout=s.read_timeout_s,
                        retries={"mode": "standard", "total_max_attempts": s.max_attempts},
                        s3={"addressing_style": style}, max_pool_connections=max(10, s.max_concurrency))
        session = boto3.session.Session(aws_access_key_id=s.access_key_id or None,
                                        aws_secret_access_key=s.secret_access_key or None,
                                        aws_session_token=s.session_token or None, region_name=s.region or None)
        return session.client("s3", endpoint_url=s.endpoint_url or None, config=config)

    def _upload(self, client: Any, bucket: str, upload: Upload) -> int:
        """Stream the output up (multipart when large), then read back the size S3 holds."""
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        transfer = TransferConfig(multipart_threshold=s.multipart_threshold_mb * MB,
                                  multipart_chunksize=s.multipart_chunk_mb * MB, max_concurrency=s.max_concurrency)
        with upload.open() as source:
            client.upload_fileobj(source, bucket, upload.key, ExtraArgs={"ContentType": upload.content_type},
                                  Config=transfer)
        head = client.head_object(Bucket=bucket, Key=upload.key)
        return int(head["ContentLength"])

    def _translated(self, exc: Exception, bucket: str) -> StoreError:
        """A boto3/botocore error as a StoreError with a readable message and no secret."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        cause: BaseException = exc
        while not isinstance(cause, ClientError | BotoCoreError) and cause.__context__ is not None:
            cause = cause.__context__  # boto3's S3UploadFailedError wraps the ClientError
        if isinstance(cause, ClientError):
            message, retryable = _client_error(cause, bucket)
        elif isinstance(cause, NoCredentialsError | PartialCredentialsError):
            message, retryable = (f"{cause}: set EMP_S3_ACCESS_KEY_ID and EMP_S3_SECRET_ACCESS_KEY, or give the "
                                  "worker AWS credentials"), True
        elif isinstance(cause, BotoCoreError):
            message, retryable = f"{type(cause).__name__}: {cause}", True
        else:
            message, retryable = f"{type(exc).__name__}: {exc}", True
        return StoreError(redacted(message, self.secrets())[:500], retryable=retryable)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)


def _client_error(exc: Any, bucket: str) -> tuple[str, bool]:
    """The message and retryability of a botocore ClientError."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "?"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    text = str(error.get("Message") or "").splitlines()[0:1]
    message = f"S3 answered {status} {code}" + (f": {text[0]}" if text else "") + f" (bucket {bucket!r})"
    hint, retryable = verdict(status, code)
    return message + hint, retryable


def verdict(status: int, code: str) -> tuple[str, bool]:
    """What an S3 error answer means: a hint for the message, and whether a later try may succeed."""
    if code in CREDENTIAL_CODES or status in (401, 403):
        return "; check EMP_S3_ACCESS_KEY_ID / EMP_S3_SECRET_ACCESS_KEY and the key's permissions", True
    if code == "NoSuchBucket":
        return "; create the bucket or fix EMP_S3_BUCKET / ctx.storage.bucket", False
    return "", code in TRANSIENT_CODES or status >= 500 or status in (408, 429) or status == 0
