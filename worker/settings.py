"""One validated, frozen settings object.

Precedence: CLI options > environment > .env file > defaults. Every variable is ``EMP_<NAME>``;
the emp-job-queue worker's own names (``HUB_REDIS_URL``, ``WORKER_ID``, ``MACHINE_ID``,
``CONNECTORS``) are accepted as aliases so our binary drops into their PM2 set-up.
A bad value raises ConfigError naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.hardware import parse_fake_gpus
from worker.keys import hash_tag_of

MAX_CAPABILITIES_BYTES = 8192
LEASE_HEARTBEATS = 3  # a lease must outlast this many heartbeat intervals
RESERVED_CAPABILITY_KEYS = frozenset({"services", "hardware", "models", "customer_access", "gpus", "worker_id",
                                      "job_service_required_map", "loaded_models", "workflow_id"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, safe for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _env(name: str, default: Any, *aliases: str, **constraints: Any) -> Any:
    """A field read from EMP_<NAME> (and any alias); load_settings passes CLI values as EMP_<NAME>."""
    choices = AliasChoices(f"EMP_{name.upper()}", *aliases)
    if "default_factory" in constraints:
        return Field(validation_alias=choices, **constraints)
    return Field(default, validation_alias=choices, **constraints)


class Settings(BaseSettings):
    """Everything the daemon reads from its environment. See .env.example for each meaning."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
    )

    redis_url: str = _env("redis_url", "redis://127.0.0.1:6379/0", "HUB_REDIS_URL")
    redis_ca_cert: str = _env("redis_ca_cert", "")  # PEM files for rediss:// (worker/redis_conn.py)
    redis_client_cert: str = _env("redis_client_cert", "")
    redis_client_key: str = _env("redis_client_key", "")
    redis_tls_verify: bool = _env("redis_tls_verify", True)
    redis_sentinels: str = _env("redis_sentinels", "")
    redis_master_name: str = _env("redis_master_name", "", pattern=r"^[A-Za-z0-9._-]{0,128}$")
    redis_sentinel_username: str = _env("redis_sentinel_username", "")
    redis_sentinel_password: SecretStr = _env("redis_sentinel_password", SecretStr(""))
    redis_cluster: bool = _env("redis_cluster", False)
    key_prefix: str = _env("key_prefix", "")
    worker_id: str = _env("worker_id", "", "WORKER_ID")
    machine_id: str = _env("machine_id", None, "MACHINE_ID", default_factory=socket.gethostname)
    connectors: str = _env("connectors", "simulation", "CONNECTORS")
    heartbeat_interval_s: float = _env("heartbeat_interval_s", 2.0, gt=0, le=60)
    lease_s: float = _env("lease_s", 8.0, gt=0, le=3600)
    poll_interval_s: float = _env("poll_interval_s", 5.0, gt=0, le=300)
    # how many workers turn emp-job-queue's job_submitted into wake tokens (worker/wake.py); 0: none
    wake_relays: int = _env("wake_relays", 2, ge=0, le=16)
    max_concurrent_jobs: int = _env("max_concurrent_jobs", 1, ge=1, le=64)
    job_timeout_s: float = _env("job_timeout_s", 3600.0, gt=0)
    grace_period_s: float = _env("grace_period_s", 30.0, ge=0)
    retention_s: int = _env("retention_s", 86400, ge=60)
    stream_maxlen: int = _env("stream_maxlen", 1000, ge=10, le=1_000_000)
    progress_rate_hz: float = _env("progress_rate_hz", 10.0, gt=0, le=1000)
    max_payload_bytes: int = _env("max_payload_bytes", 8 * 1024 * 1024, ge=1024)
    max_result_bytes: int = _env("max_result_bytes", 4 * 1024 * 1024, ge=1024)
    retry_backoff_s: float = _env("retry_backoff_s", 2.0, ge=0)
    retry_backoff_max_s: float = _env("retry_backoff_max_s", 300.0, ge=0)
    retry_exclusion_s: float = _env("retry_exclusion_s", 30.0, ge=0)
    fake_gpus: str = _env("fake_gpus", "")
    customer_isolation: Literal["none", "loose", "strict"] = _env("customer_isolation", "none")
    allowed_customers: str = _env("allowed_customers", "")
    denied_customers: str = _env("denied_customers", "")
    workflow_id: str = _env("workflow_id", "")
    capabilities: str = _env("capabilities", "")
    model_affinity_s: float = _env("model_affinity_s", 3.0, ge=0, le=60)
    health_timeout_s: float = _env("health_timeout_s", 5.0, gt=0, le=300)
    models_ttl_s: float = _env("models_ttl_s", 60.0, ge=1, le=86400)
    progress_previews: bool = _env("progress_previews", False)
    preview_max_bytes: int = _env("preview_max_bytes", 256 * 1024, ge=1024, le=8 * 1024 * 1024)
    output_inline_bytes: int = _env("output_inline_bytes", 64 * 1024, ge=0, le=1024 * 1024)
    output_store: str = _env("output_store", "local", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    output_stores: str = _env("output_stores", "", pattern=r"^[a-z0-9_, -]{0,512}$")
    output_upload_timeout_s: float = _env("output_upload_timeout_s", 600.0, gt=0, le=24 * 3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _env("log_level", "INFO")
    log_format: Literal["auto", "text", "json"] = _env("log_format", "auto")
    # Prometheus /metrics and /healthz (worker/metrics.py); 0: off. With --gpu I the port is this + I.
    metrics_port: int = _env("metrics_port", 0, ge=0, le=65535)
    metrics_host: str = _env("metrics_host", "0.0.0.0", min_length=1, max_length=255)
    # plugins/ beside a frozen binary when unset; "off": none (connectors/manager.py plugins_path)
    plugins_dir: str = _env("plugins_dir", "")

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        try:
            parts = urlsplit(value)
            port = parts.port  # raises for a port that is no number or out of range
        except ValueError as exc:
            raise ValueError(f"is not a valid URL ({exc}); e.g. redis://:password@host:6379/0") from None
        if scheme != "unix" and not parts.hostname:
            raise ValueError("names no host; e.g. redis://:password@host:6379/0")
        if port == 0:
            raise ValueError("port 0 is not a port; e.g. redis://:password@host:6379/0")
        database = parts.path.strip("/")
        if scheme != "unix" and database and not database.isdigit():
            raise ValueError(f"database {database[:20]!r} must be a number, e.g. redis://host:6379/0")
        return value

    @field_validator("redis_ca_cert", "redis_client_cert", "redis_client_key")
    @classmethod
    def _check_pem_file(cls, value: str) -> str:
        if value and not os.path.isfile(value):
            raise ValueError("no such file (a PEM file's path is expected)")
        if value and not os.access(value, os.R_OK):
            raise ValueError("the worker may not read this file")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str) -> str:
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parse_sentinels(value))

    @field_validator("worker_id", "machine_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if value and not _ID.match(value):
            raise ValueError("must be 1-128 characters of letters, digits and . _ : - ")
        return value

    @field_validator("fake_gpus")
    @classmethod
    def _check_fake_gpus(cls, value: str) -> str:
        if value:
            parse_fake_gpus(value)  # its ValueError says what is allowed
        return value

    @field_validator("allowed_customers", "denied_customers")
    @classmethod
    def _check_customers(cls, value: str) -> str:
        names = _split(value)
        if any(len(n) > 256 for n in names):
            raise ValueError("customer ids are at most 256 characters")
        return ",".join(names)

    @field_validator("capabilities")
    @classmethod
    def _check_capabilities(cls, value: str) -> str:
        if not value:
            return value
        if len(value) > MAX_CAPABILITIES_BYTES:
            raise ValueError(f"must be at most {MAX_CAPABILITIES_BYTES} bytes")
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError('must be a JSON object, e.g. {"region": "eu", "features": ["nvenc"]}') from None
        if not isinstance(parsed, dict):
            raise ValueError('must be a JSON object, e.g. {"region": "eu", "features": ["nvenc"]}')
        reserved = sorted(set(parsed) & RESERVED_CAPABILITY_KEYS)
        if reserved:
            raise ValueError(f"{reserved[0]!r} is not a custom capability (it is set from hardware or settings)")
        return value

    @field_validator("connectors")
    @classmethod
    def _check_connectors(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            raise ValueError("must name at least one connector, e.g. simulation or comfyui,a1111")
        return ",".join(names)

    @property
    def connector_names(self) -> list[str]:
        return self.connectors.split(",")

    @property
    def customer_access(self) -> dict[str, Any]:
        """emp-job-queue's customer_access capability."""
        return {"isolation": self.customer_isolation, "allowed_customers": _split(self.allowed_customers),
                "denied_customers": _split(self.denied_customers)}

    @property
    def custom_capabilities(self) -> dict[str, Any]:
        """EMP_CAPABILITIES: the operator's custom capability keys."""
        parsed: dict[str, Any] = json.loads(self.capabilities) if self.capabilities else {}
        return parsed


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` (``[v6 address]:port`` too) -> [(host, port), ...]; a ValueError
    saying what is allowed."""
    found = []
    for item in _split(value):
        host, sep, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item[:80]!r} is not host:port; e.g. 10.0.0.5:26379,10.0.0.6:26379")
        found.append((host, int(port)))
    if len(found) > 64:
        raise ValueError("names more than 64 sentinels")
    return found


def _check_tls(settings: Settings) -> None:
    """The TLS files belong to rediss:// and must load: a bad PEM or a key that is not the
    certificate's is one line at start-up, not a handshake failing later."""
    files = [("EMP_REDIS_CA_CERT", settings.redis_ca_cert), ("EMP_REDIS_CLIENT_CERT", settings.redis_client_cert),
             ("EMP_REDIS_CLIENT_KEY", settings.redis_client_key)]
    given = [name for name, path in files if path]
    if given and urlsplit(settings.redis_url).scheme != "rediss":
        raise ConfigError(f"{given[0]} is set but EMP_REDIS_URL={_shown(settings.redis_url)} is not TLS: use "
                          "rediss://")
    if settings.redis_client_key and not settings.redis_client_cert:
        raise ConfigError("EMP_REDIS_CLIENT_KEY is set without EMP_REDIS_CLIENT_CERT: set both")
    if not given:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if settings.redis_ca_cert:
            context.load_verify_locations(cafile=settings.redis_ca_cert)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"EMP_REDIS_CA_CERT={settings.redis_ca_cert!r}: not a PEM certificate ({exc})") from None
    try:
        if settings.redis_client_cert:
            context.load_cert_chain(settings.redis_client_cert, settings.redis_client_key or None)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"EMP_REDIS_CLIENT_CERT={settings.redis_client_cert!r}: the certificate and "
                          f"EMP_REDIS_CLIENT_KEY do not load as a PEM pair ({exc})") from None


def _check_redis_mode(settings: Settings) -> None:
    """Sentinel and Cluster are each a mode with needs of its own; they do not mix."""
    if settings.redis_sentinels and not settings.redis_master_name:
        raise ConfigError("EMP_REDIS_SENTINELS is set: needs EMP_REDIS_MASTER_NAME (the master name the "
                          "sentinels monitor, e.g. mymaster)")
    if not settings.redis_cluster:
        return
    if settings.redis_sentinels:
        raise ConfigError("EMP_REDIS_CLUSTER=true and EMP_REDIS_SENTINELS are two modes: set one")
    parts = urlsplit(settings.redis_url)
    if parts.scheme == "unix" or parts.path.strip("/") not in ("", "0"):
        raise ConfigError(f"EMP_REDIS_URL={_shown(settings.redis_url)}: Redis Cluster needs a host URL of "
                          "database 0, e.g. redis://node1:6379/0")
    if hash_tag_of(settings.key_prefix) is None:
        raise ConfigError(f"EMP_KEY_PREFIX={settings.key_prefix!r}: Redis Cluster mode needs a hash tag in the "
                          "prefix so that every key is in one slot, e.g. EMP_KEY_PREFIX={emp}:")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _field_of(location: str) -> str:
    """The field a validation error's location (a field name or one of its variables) is about."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else []
        if location == name or location in choices:
            return name
    return location


def _variable_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str) and c.isupper()]
        return " / ".join(names) if names else field
    return field


def _shown(value: Any) -> str:
    """A value for an error message, with any URL password masked."""
    if isinstance(value, str) and "://" in value:
        return repr(redact_url(value))
    return repr(value)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings (CLI overrides win); raise ConfigError with one readable line."""
    clean = {f"EMP_{k.upper()}": v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**clean)
        if settings.lease_s < LEASE_HEARTBEATS * settings.heartbeat_interval_s:
            raise ConfigError(f"EMP_LEASE_S={settings.lease_s:g}: must be at least {LEASE_HEARTBEATS} heartbeats "
                              f"({LEASE_HEARTBEATS} x EMP_HEARTBEAT_INTERVAL_S={settings.heartbeat_interval_s:g} = "
                              f"{LEASE_HEARTBEATS * settings.heartbeat_interval_s:g}s), or healthy jobs lose their "
                              "lease between two renewals")
        if settings.customer_isolation == "strict" and not settings.allowed_customers:
            raise ConfigError("EMP_CUSTOMER_ISOLATION='strict': needs EMP_ALLOWED_CUSTOMERS (a comma list of "
                              "the customer ids this worker serves)")
        _check_tls(settings)
        _check_redis_mode(settings)
        return settings
    except ValidationError as exc:
        error = exc.errors()[0]
        field = _field_of(str(error["loc"][0])) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{_variable_name(field)}={_shown(error.get('input'))}: {message}") from None
