"""Settings of a connector: a validated pydantic model read from ``EMP_<CONNECTOR>_*``.

A connector declares its settings as a subclass and names it in ``settings_class``::

    class EchoSettings(ConnectorSettings):
        greeting: str = "hello"            # EMP_ECHO_GREETING
        timeout_s: float = Field(30, gt=0)  # EMP_ECHO_TIMEOUT_S

    class EchoConnector(Connector):
        name = "echo"
        settings_class = EchoSettings
        settings: EchoSettings             # typed for the connector's own code

The daemon loads every selected connector's settings before it connects to Redis, so a bad
value stops start-up with one line naming the variable, like the core's settings.

Engines reached over HTTP take their URL per worker slot from :class:`EngineSettings`: one base
URL plus a port step (slot I uses port + I * step), or an explicit comma list (slot I uses the
I-th entry).
"""

from __future__ import annotations

from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.settings import redact_url


class ConnectorSettings(BaseSettings):
    """Base of every connector's settings (empty: a connector without settings uses it as is)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True, env_ignore_empty=True
    )

    @classmethod
    def load(cls, env_prefix: str) -> Self:
        """Read the settings from ``{env_prefix}<FIELD>``; ConfigError with one line otherwise."""
        try:
            return cls(_env_prefix=env_prefix)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"{env_prefix}{field.upper()}={_shown(error.get('input'))}: {message}") from None


def _shown(value: Any) -> str:
    if isinstance(value, str) and "://" in value:
        return repr(redact_url(value))
    return repr(value)


def slot_url(base_url: str, slot: int, *, port_step: int = 1, urls: str = "") -> str:
    """The engine URL of worker slot `slot`: the slot-th entry of `urls` when given, else
    `base_url` with its port moved by ``slot * port_step``.

    >>> slot_url("http://127.0.0.1:8188", 2)
    'http://127.0.0.1:8190'
    >>> slot_url("", 1, urls="http://a:1,http://b:2")
    'http://b:2'
    """
    listed = [u.strip() for u in urls.split(",") if u.strip()]
    if listed:
        if slot >= len(listed):
            raise ConfigError(f"slot {slot} has no engine URL: the list names {len(listed)}")
        return listed[slot]
    parts = urlsplit(base_url)
    if parts.port is None:
        default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
        if slot * port_step == 0 or default is None:
            return base_url
        port = default
    else:
        port = parts.port
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port + slot * port_step}"))


def _check_http_url(value: str) -> str:
    if value and urlsplit(value).scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    return value


class EngineSettings(ConnectorSettings):
    """Where an HTTP engine listens, per slot: ``URL`` + ``PORT_STEP``, or ``URLS``; ``AUTH`` is
    ``user:password`` for HTTP basic auth (never logged, never shown)."""

    url: str = "http://127.0.0.1:8080"
    port_step: int = Field(1, ge=0, le=1000)
    urls: str = ""
    auth: SecretStr = SecretStr("")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: str) -> str:
        for url in value.split(","):
            _check_http_url(url.strip())
        return value

    def url_for(self, slot: int) -> str:
        return slot_url(self.url, slot, port_step=self.port_step, urls=self.urls)

    def basic_auth(self, variable: str) -> tuple[str, str] | None:
        """``(user, password)`` from ``AUTH`` (``variable``, e.g. ``EMP_A1111_AUTH``, for the
        message); None when unset. Checked here rather than by a validator, whose message would
        show the value: ConfigError, never showing it, when it is not ``user:password``."""
        value = self.auth.get_secret_value()
        if not value:
            return None
        user, colon, password = value.partition(":")
        if not colon or not user:
            raise ConfigError(f"{variable} must be user:password; the value set is not (it is not shown)")
        return user, password
