"""The REST connector's settings: the services the operator configured, and their credentials.

``EMP_REST_SERVICES`` is either a JSON object, one entry per service::

    EMP_REST_SERVICES={"upscale": {"base_url": "http://10.0.0.7:9000/v1", "mode": "sync"},
                       "video": {"base_url": "https://api.example.com/v2", "mode": "async",
                                 "auth": {"type": "bearer", "token_env": "VIDEO_API_TOKEN"}}}

or a comma list of service names, each configured by a block of ``EMP_REST_<SERVICE>_<FIELD>``
variables (the service name upper-cased, other characters than letters and digits as ``_``)::

    EMP_REST_SERVICES=upscale,video
    EMP_REST_UPSCALE_BASE_URL=http://10.0.0.7:9000/v1
    EMP_REST_VIDEO_BASE_URL=https://api.example.com/v2
    EMP_REST_VIDEO_MODE=async
    EMP_REST_VIDEO_AUTH=bearer
    EMP_REST_VIDEO_TOKEN=...            # the default place of the bearer token

Lists are JSON or comma lists, ``HEADERS`` is JSON. Credentials are only ever read from the
environment (or .env): a bearer token from ``token_env`` (default ``EMP_REST_<SERVICE>_TOKEN``), a
basic password from ``password_env`` (default ``EMP_REST_<SERVICE>_PASSWORD``). A bad setting stops
start-up with one line naming the variable (and the service).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from connectors.rest.urls import TASK_ID_PLACEHOLDER, ForbiddenTarget, fill_task_id, join_url, normalize_base
from connectors.settings import ConnectorSettings
from worker.errors import ConfigError
from worker.settings import redact_url

PREFIX = "EMP_REST_"
SERVICES_VAR = PREFIX + "SERVICES"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
MAX_SERVICES = 64
MAX_STATIC_HEADERS = 32
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~\-]{1,100}")  # an HTTP token
_RESERVED_HEADERS = frozenset({"host", "authorization", "proxy-authorization", "content-length",
                               "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive"})
#: headers a job may send to any service: content negotiation, conditional requests, idempotency, tracing
SAFE_JOB_HEADERS = frozenset({
    "accept", "accept-language", "content-type", "content-language", "if-match", "if-none-match",
    "if-modified-since", "if-unmodified-since", "prefer", "idempotency-key", "x-idempotency-key",
    "x-request-id", "x-correlation-id", "traceparent", "tracestate",
})
#: never from a job, even when the operator lists them in job_headers: they carry credentials, frame the
#: request, or make a proxy or framework re-route it (method override, original URL, forwarded client)
NEVER_JOB_HEADERS = _RESERVED_HEADERS | frozenset({
    "cookie", "expect", "proxy-connection", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "x-forwarded-path",
    "x-forwarded-uri", "x-real-ip", "x-client-ip", "x-original-url", "x-rewrite-url", "x-original-uri",
    "x-http-method-override", "x-http-method", "x-method-override", "x-host", "x-forwarded-scheme",
})
_NEVER_JOB_PREFIXES = ("proxy-", "x-forwarded-")
_LIST_FIELDS = frozenset({"allowed_methods", "retryable_status", "success_values", "failure_values",
                          "job_headers"})
_DICT_FIELDS = frozenset({"headers"})
_CHECK_BASE = "http://check.invalid/"
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


class Auth(BaseModel):
    """How the worker authenticates to a service; the secrets themselves live in the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bearer", "basic"]
    token_env: str = ""  # bearer: the variable holding the token (default EMP_REST_<SERVICE>_TOKEN)
    username: str = ""  # basic: the user name, or the variable holding it:
    username_env: str = ""  # (default EMP_REST_<SERVICE>_USERNAME)
    password_env: str = ""  # basic: the variable holding the password (default EMP_REST_<SERVICE>_PASSWORD)


class RestService(BaseModel):
    """One service's configuration (an entry of EMP_REST_SERVICES)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    mode: Literal["sync", "async"] = "sync"
    method: Method = "POST"  # a job that names no method
    path: str = Field("", validation_alias=AliasChoices("path", "submit_path"))  # a job that names no endpoint
    allowed_methods: tuple[Method, ...] = ("GET", "POST")  # what a job's "method" may be (besides `method`)
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every request; no secrets here
    job_headers: tuple[str, ...] = ()  # header names a job may send besides SAFE_JOB_HEADERS
    auth: Auth | None = None
    timeout_s: float = Field(60.0, gt=0, le=3600)  # one request, the answer's whole body included
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    retryable_status: tuple[int, ...] = (429, 502, 503, 504)  # other 4xx/5xx fail for good (401/403 excepted)
    max_retry_after_s: float = Field(30.0, ge=0, le=600)  # a Retry-After up to this is waited out here
    request_retries: int = Field(2, ge=0, le=10)  # how many times a Retry-After is waited out per request
    health_path: str = ""  # GET here answers 2xx while the service is up ("": not checked)
    verify_tls: bool = True
    # -- async mode --
    task_id_field: str = "id"  # dotted path into the submit answer
    status_path: str = "/tasks/{task_id}"
    status_field: str = "status"
    success_values: tuple[str, ...] = ("succeeded", "success", "successful", "completed", "complete",
                                       "finished", "done")
    failure_values: tuple[str, ...] = ("failed", "failure", "error", "errored", "cancelled", "canceled",
                                       "aborted", "timeout", "expired")
    progress_field: str = ""  # dotted path to a number ("": no progress)
    progress_scale: float = Field(100.0, gt=0)  # the progress field's value when done: 1 or 100
    result_field: str = ""  # dotted path to the result ("": the whole status answer)
    error_field: str = "error"  # dotted path to the reason of a failure
    poll_interval_s: float = Field(1.0, gt=0, le=300)
    max_wait_s: float = Field(3600.0, gt=0, le=7 * 86400)  # a task running longer fails (retryable)
    max_poll_errors: int = Field(3, ge=0, le=100)  # transient errors in a row tolerated while polling
    failure_retryable: bool = False  # whether a task the service reports failed may be retried
    cancel_path: str = ""  # called when the job is cancelled or stopped ("": none)
    cancel_method: Method = "POST"

    @field_validator("method", "cancel_method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("allowed_methods", mode="before")
    @classmethod
    def _upper_all(cls, value: Any) -> Any:
        return [v.upper() if isinstance(v, str) else v for v in value] if isinstance(value, list | tuple) else value

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        return normalize_base(value)

    @field_validator("path", "health_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value:
            _joinable(value)
        return value

    @field_validator("status_path", "cancel_path")
    @classmethod
    def _template(cls, value: str) -> str:
        if value:
            if value.count(TASK_ID_PLACEHOLDER) != 1:
                raise ValueError(f"must contain {TASK_ID_PLACEHOLDER} once")
            _joinable(fill_task_id(value, "task-1"))
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_STATIC_HEADERS:
            raise ValueError(f"at most {MAX_STATIC_HEADERS} headers")
        for name, text in value.items():
            if not HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name[:100]!r} cannot be configured (credentials go in auth)")
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
                raise ValueError(f"the value of {name!r} has a control character")
        return value

    @field_validator("job_headers")
    @classmethod
    def _job_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_STATIC_HEADERS:
            raise ValueError(f"at most {MAX_STATIC_HEADERS} names")
        for name in value:
            if not HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name[:100]!r} is not an HTTP header name")
            if never_from_job(name):
                raise ValueError(f"{name!r} can never be set by a job (credentials, framing or re-routing)")
        return tuple(name.lower() for name in value)

    @field_validator("retryable_status")
    @classmethod
    def _statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 400 <= s <= 599 for s in value):
            raise ValueError("must be HTTP error statuses (400-599)")
        return value

    @field_validator("success_values", "failure_values")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.lower() for v in value)

    @model_validator(mode="after")
    def _async_needs(self) -> RestService:
        if self.mode == "async" and not self.status_path:
            raise ValueError("status_path: an async service needs one (with {task_id})")
        if set(self.success_values) & set(self.failure_values):
            raise ValueError("success_values and failure_values overlap")
        if set(self.job_headers) & {name.lower() for name in self.headers}:
            raise ValueError("job_headers: a header configured in headers cannot also be set by a job")
        return self


def never_from_job(name: str) -> bool:
    """Whether header ``name`` is one no job may send, whatever the configuration."""
    lowered = name.lower()
    return lowered in NEVER_JOB_HEADERS or lowered.startswith(_NEVER_JOB_PREFIXES)


def _joinable(path: str) -> None:
    try:
        join_url(_CHECK_BASE, path)
    except ForbiddenTarget as exc:
        raise ValueError(f"{path[:100]!r}: {exc}") from None


@dataclass(frozen=True)
class Service:
    """A configured service with its credentials (kept out of repr)."""

    name: str
    spec: RestService
    token: str | None = field(default=None, repr=False)
    basic: tuple[str, str] | None = field(default=None, repr=False)


class RestSettings(ConnectorSettings):
    """EMP_REST_*: the services, and the limits every service shares."""

    services: str = ""  # EMP_REST_SERVICES: JSON object, or a comma list of EMP_REST_<SERVICE>_* blocks
    max_response_bytes: int = Field(16 * 1024 * 1024, gt=0, le=1024**3)  # a bigger answer fails the job
    max_result_bytes: int = Field(64 * 1024, gt=0, le=16 * 1024 * 1024)  # bigger JSON becomes an output
    _configured: dict[str, Service] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _parse(self) -> RestSettings:
        self._configured = parse_services(self.services, environment())  # ConfigError passes through
        return self

    @property
    def configured(self) -> Mapping[str, Service]:
        return self._configured


def environment() -> dict[str, str]:
    """The process environment over the .env file (the precedence of every EMP_ setting)."""
    found: dict[str, str] = {}
    if Path(".env").is_file():
        found.update({k: v for k, v in dotenv_values(".env").items() if v})
    found.update({k: v for k, v in os.environ.items() if v})
    return found


def env_key(service: str) -> str:
    """The variable segment of a service name: ``video-hd`` -> ``VIDEO_HD``."""
    return re.sub(r"[^A-Za-z0-9]", "_", service).upper()


def parse_services(raw: str, env: Mapping[str, str]) -> dict[str, Service]:
    """The services EMP_REST_SERVICES configures; ConfigError (one line) naming the variable."""
    text = raw.strip()
    if not text:
        raise ConfigError(f"{SERVICES_VAR} is not set: configure at least one service, e.g. "
                          f'{SERVICES_VAR}=\'{{"my-service": {{"base_url": "http://127.0.0.1:9000"}}}}\'')
    if text.startswith(("{", "[")):
        entries = _json_entries(text)
        labels: dict[str, Callable[[str], str]] = {name: _json_label(name) for name in entries}
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        entries = {name: _env_entry(name, env) for name in _checked_names(names)}
        labels = {name: _env_label(name) for name in entries}
    return {name: _service(name, data, labels[name], env) for name, data in entries.items()}


def _checked_names(names: list[str]) -> list[str]:
    if len(names) > MAX_SERVICES:
        raise ConfigError(f"{SERVICES_VAR}: {len(names)} services; at most {MAX_SERVICES}")
    keys: dict[str, str] = {}
    for name in names:
        if not _SERVICE_NAME.fullmatch(name):
            raise ConfigError(f"{SERVICES_VAR}: service name {name[:80]!r}: use 1-64 letters, digits, '_', '.' "
                              "or '-', starting with a letter or digit")
        key = env_key(name)
        if key in keys:
            raise ConfigError(f"{SERVICES_VAR}: services {keys[key]!r} and {name!r} would share the variables "
                              f"{PREFIX}{key}_*; rename one")
        keys[key] = name
    return names


def _json_entries(text: str) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{SERVICES_VAR}: not valid JSON ({exc.msg} at character {exc.pos}); give an object "
                          '{"<service>": {"base_url": ...}} or a comma list of service names') from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{SERVICES_VAR}: must be a non-empty JSON object of services")
    _checked_names(list(data))
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{SERVICES_VAR}: service {name!r}: must be an object with at least base_url")
    return data


def _env_entry(name: str, env: Mapping[str, str]) -> dict[str, Any]:
    """A service's fields from its EMP_REST_<SERVICE>_* block (strings; lists and objects decoded)."""
    prefix = f"{PREFIX}{env_key(name)}_"
    entry: dict[str, Any] = {}
    for field_name in (*RestService.model_fields, "submit_path"):
        value = env.get(prefix + field_name.upper())
        if value is None:
            continue
        entry[field_name] = _decoded(field_name, value, prefix)
    return entry


def _decoded(field_name: str, value: str, prefix: str) -> Any:
    stripped = value.strip()
    if field_name in _LIST_FIELDS | _DICT_FIELDS | {"auth"} and stripped.startswith(("[", "{")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{prefix}{field_name.upper()}: not valid JSON ({exc.msg} at character "
                              f"{exc.pos})") from None
    if field_name in _LIST_FIELDS:
        return [part.strip() for part in stripped.split(",") if part.strip()]
    return stripped


def _json_label(name: str) -> Callable[[str], str]:
    return lambda where: f"{SERVICES_VAR}: service {name!r}: {where}" if where else f"{SERVICES_VAR}: service {name!r}"


def _env_label(name: str) -> Callable[[str], str]:
    prefix = f"{PREFIX}{env_key(name)}_"
    return lambda where: f"{prefix}{where.split('.')[0].upper()}" if where else f"{prefix}*"


def _service(name: str, data: dict[str, Any], label: Callable[[str], str], env: Mapping[str, str]) -> Service:
    try:
        spec = RestService.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        shown = _shown(where, error.get("input"))
        raise ConfigError(f"{label(where)}{shown}: {message}") from None
    return _with_credentials(name, spec, label, env)


def _shown(where: str, value: Any) -> str:
    """The offending value, when it is a plain one and cannot be a secret (headers never shown)."""
    if where.startswith("headers") or not isinstance(value, str | int | float | bool):
        return ""
    if isinstance(value, str):
        return f"={(redact_url(value) if '://' in value else value)[:100]!r}"
    return f"={value!r}"


def _with_credentials(name: str, spec: RestService, label: Callable[[str], str], env: Mapping[str, str]) -> Service:
    auth = spec.auth
    if auth is None:
        return Service(name, spec)
    prefix = f"{PREFIX}{env_key(name)}_"
    if auth.type == "bearer":
        return Service(name, spec, token=_secret(auth.token_env or prefix + "TOKEN", "token", label, env))
    username = auth.username or _secret(auth.username_env or prefix + "USERNAME", "user name", label, env)
    password = _secret(auth.password_env or prefix + "PASSWORD", "password", label, env)
    return Service(name, spec, basic=(username, password))


def _secret(variable: str, what: str, label: Callable[[str], str], env: Mapping[str, str]) -> str:
    value = env.get(variable)
    if not value:
        raise ConfigError(f"{label('auth')}: the {what} is read from {variable}, which is not set")
    return value
