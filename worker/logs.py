"""Logging: readable lines on a terminal, one JSON object a line under systemd/PM2.

Every line says which slot and job it is about without each call passing them: a slot binds its
worker id (``bind(worker_id=...)``) when it starts and each job binds its id and attempt in its
own task; asyncio tasks and ``to_thread`` copy the context, so a connector's own log lines carry
them too. The JSON lines have them as fields (``worker_id``, ``job_id``, ``attempt``).

Secrets never reach a line: a URL's password is masked in every message and traceback
(``redact``), whatever logged it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

WORKER_ID: ContextVar[str] = ContextVar("emp_worker_id", default="")
JOB_ID: ContextVar[str] = ContextVar("emp_job_id", default="")
ATTEMPT: ContextVar[int] = ContextVar("emp_attempt", default=0)
_PASSWORD_IN_URL = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@")


def bind(*, worker_id: str | None = None, job_id: str | None = None, attempt: int | None = None) -> None:
    """Tag every later log line of this task (and the tasks it starts) with these."""
    if worker_id is not None:
        WORKER_ID.set(worker_id)
    if job_id is not None:
        JOB_ID.set(job_id)
    if attempt is not None:
        ATTEMPT.set(attempt)


def redact(text: str) -> str:
    """`text` with the password of any URL in it replaced by ***."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text) if "://" in text else text


def _context(record: logging.LogRecord) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, var in (("worker_id", WORKER_ID), ("job_id", JOB_ID), ("attempt", ATTEMPT)):
        value = getattr(record, name, None) or var.get()
        if value:
            found[name] = value
    return found


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            **_context(record),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def use_json(fmt: str = "auto") -> bool:
    """Whether lines are JSON: EMP_LOG_FORMAT=json, or auto and stderr is not a terminal."""
    return fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())


def format_before_settings() -> str:
    """EMP_LOG_FORMAT as far as it can be known without the settings (which may be what failed):
    the environment, else the .env file, else auto."""
    value = os.environ.get("EMP_LOG_FORMAT", "")
    if not value:
        try:
            from dotenv import dotenv_values

            value = dotenv_values(".env").get("EMP_LOG_FORMAT") or ""
        except (OSError, ValueError):
            value = ""
    value = value.strip().lower()
    return value if value in ("text", "json") else "auto"


def error_line(logger: str, message: str, **fields: Any) -> str:
    """One JSON log line for an error printed outside logging (the CLI's one-line errors)."""
    entry = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": "error", "logger": logger,
             "msg": redact(message), **fields}
    return json.dumps(entry)


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json(fmt) else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: an engine's health check every beat would drown the log
    logging.getLogger("httpx").setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
