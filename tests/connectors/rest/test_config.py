"""The REST connector's settings: EMP_REST_SERVICES as JSON or variable blocks, credentials from the
environment only, and one-line errors naming the variable."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from connectors.manager import Plugins
from connectors.rest import RestConnector, RestSettings
from connectors.rest.config import parse_services
from worker.errors import ConfigError

ENV_KEYS = ("EMP_REST_SERVICES",)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("EMP_REST_"):
            monkeypatch.delenv(key)


def _json(**services: Any) -> str:
    return json.dumps(services)


def test_json_services_with_defaults() -> None:
    services = parse_services(_json(upscale={"base_url": "http://10.0.0.7:9000/v1"},
                                    video={"base_url": "https://api.example.com", "mode": "async",
                                           "retryable_status": [429, 503], "submit_path": "/v2/jobs"}), {})
    assert list(services) == ["upscale", "video"]
    upscale, video = services["upscale"].spec, services["video"].spec
    assert upscale.base_url == "http://10.0.0.7:9000/v1/" and upscale.mode == "sync" and upscale.method == "POST"
    assert upscale.retryable_status == (429, 502, 503, 504) and upscale.timeout_s == 60
    assert video.mode == "async" and video.retryable_status == (429, 503) and video.path == "/v2/jobs"
    assert video.status_path == "/tasks/{task_id}"


def test_variable_blocks_configure_the_same_fields() -> None:
    env = {
        "EMP_REST_VIDEO_HD_BASE_URL": "https://api.example.com/v2",
        "EMP_REST_VIDEO_HD_MODE": "async",
        "EMP_REST_VIDEO_HD_METHOD": "put",
        "EMP_REST_VIDEO_HD_RETRYABLE_STATUS": "429, 503",
        "EMP_REST_VIDEO_HD_SUCCESS_VALUES": '["Ready"]',
        "EMP_REST_VIDEO_HD_HEADERS": '{"X-Client": "emp"}',
        "EMP_REST_VIDEO_HD_JOB_HEADERS": "X-Render-Hint, X-Seed",
        "EMP_REST_VIDEO_HD_PROGRESS_FIELD": "progress.fraction",
        "EMP_REST_VIDEO_HD_PROGRESS_SCALE": "1",
        "EMP_REST_VIDEO_HD_AUTH": "bearer",
        "EMP_REST_VIDEO_HD_TOKEN": "tok-123",
        "EMP_REST_UPSCALE_BASE_URL": "http://10.0.0.7:9000",
    }
    services = parse_services("video-hd, upscale", env)
    video = services["video-hd"]
    assert video.spec.mode == "async" and video.spec.method == "PUT" and video.spec.retryable_status == (429, 503)
    assert video.spec.success_values == ("ready",) and video.spec.headers == {"X-Client": "emp"}
    assert video.spec.progress_scale == 1 and video.token == "tok-123"
    assert video.spec.job_headers == ("x-render-hint", "x-seed")
    assert services["upscale"].spec.base_url == "http://10.0.0.7:9000/"


def test_credentials_come_from_the_named_variables_and_stay_out_of_repr() -> None:
    env = {"VIDEO_KEY": "s3cret-token", "UP_USER": "bob", "EMP_REST_UP_PASSWORD": "hunter2"}
    services = parse_services(_json(
        video={"base_url": "http://127.0.0.1:1", "auth": {"type": "bearer", "token_env": "VIDEO_KEY"}},
        up={"base_url": "http://127.0.0.1:2", "auth": {"type": "basic", "username_env": "UP_USER"}},
    ), env)
    assert services["video"].token == "s3cret-token" and services["up"].basic == ("bob", "hunter2")
    shown = repr(services)
    assert "s3cret-token" not in shown and "hunter2" not in shown


@pytest.mark.parametrize(("raw", "env", "expected"), [
    ("", {}, "EMP_REST_SERVICES is not set"),
    ("{bad", {}, "EMP_REST_SERVICES: not valid JSON"),
    ("[]", {}, "EMP_REST_SERVICES: must be a non-empty JSON object"),
    ("{}", {}, "EMP_REST_SERVICES: must be a non-empty JSON object"),
    (_json(x="http://a"), {}, "EMP_REST_SERVICES: service 'x': must be an object"),
    (_json(x={}), {}, "EMP_REST_SERVICES: service 'x': base_url: Field required"),
    (_json(x={"base_url": "ftp://files.example/"}), {}, "EMP_REST_SERVICES: service 'x': base_url='ftp://files"),
    (_json(x={"base_url": "http://u:hunter2@h/"}), {}, "base_url='http://u:***@h/': must not carry credentials"),
    (_json(x={"base_url": "http://h", "mode": "stream"}), {}, "service 'x': mode='stream'"),
    (_json(x={"base_url": "http://h", "tiemout_s": 5}), {}, "service 'x': tiemout_s=5: Extra inputs"),
    (_json(x={"base_url": "http://h", "timeout_s": 0}), {}, "service 'x': timeout_s=0"),
    (_json(x={"base_url": "http://h", "status_path": "/t/"}), {}, "status_path='/t/': must contain {task_id}"),
    (_json(x={"base_url": "http://h", "path": "//evil/x"}), {}, "path='//evil/x'"),
    (_json(x={"base_url": "http://h", "headers": {"Authorization": "Bearer leaked"}}), {},
     "service 'x': headers: 'Authorization' cannot be configured"),
    (_json(x={"base_url": "http://h", "job_headers": ["X-Original-URL"]}), {},
     "service 'x': job_headers: 'X-Original-URL' can never be set by a job"),
    ("a", {"EMP_REST_A_BASE_URL": "http://h", "EMP_REST_A_JOB_HEADERS": "X-Rewrite-URL"},
     "EMP_REST_A_JOB_HEADERS"),
    (_json(x={"base_url": "http://h", "auth": "bearer"}), {}, "service 'x': auth: the token is read from "
     "EMP_REST_X_TOKEN, which is not set"),
    (_json(**{"bad name": {"base_url": "http://h"}}), {}, "service name 'bad name'"),
    (_json(**{"a-b": {"base_url": "http://h"}, "a_b": {"base_url": "http://h"}}), {}, "would share the variables"),
    ("a", {}, "EMP_REST_A_BASE_URL: Field required"),
    ("a", {"EMP_REST_A_BASE_URL": "gopher://h"}, "EMP_REST_A_BASE_URL='gopher://h'"),
    ("a", {"EMP_REST_A_BASE_URL": "http://h", "EMP_REST_A_RETRYABLE_STATUS": "soon"}, "EMP_REST_A_RETRYABLE_STATUS"),
    ("a", {"EMP_REST_A_BASE_URL": "http://h", "EMP_REST_A_HEADERS": "{x"}, "EMP_REST_A_HEADERS: not valid JSON"),
    ("a", {"EMP_REST_A_BASE_URL": "http://h", "EMP_REST_A_AUTH": "basic", "EMP_REST_A_USERNAME": "u"},
     "EMP_REST_A_AUTH: the password is read from EMP_REST_A_PASSWORD, which is not set"),
])
def test_bad_settings_are_one_line_naming_the_variable(raw: str, env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_services(raw, env)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert "hunter2" not in message and "leaked" not in message


def test_settings_load_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_REST_SERVICES", _json(a={"base_url": "http://127.0.0.1:1"}))
    monkeypatch.setenv("EMP_REST_MAX_RESULT_BYTES", "1000")
    settings = RestSettings.load("EMP_REST_")
    assert list(settings.configured) == ["a"] and settings.max_result_bytes == 1000
    assert RestConnector.services_for(settings) == ("a",)


def test_the_connector_runs_the_configured_services_and_the_manager_checks_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_REST_SERVICES", _json(upscale={"base_url": "http://127.0.0.1:1"},
                                                  caption={"base_url": "http://127.0.0.1:2"}))
    plugins = Plugins()
    (cls,) = plugins.classes_for(["rest"])
    assert cls is RestConnector
    monkeypatch.setenv("EMP_REST_SERVICES", _json(simulation={"base_url": "http://127.0.0.1:1"}))
    with pytest.raises(ConfigError, match="connectors 'simulation' and 'rest' both run service 'simulation'"):
        Plugins().classes_for(["simulation", "rest"])


async def test_a_bad_setting_stops_the_worker_with_one_line() -> None:
    env = {**os.environ, "EMP_CONNECTORS": "rest",
           "EMP_REST_SERVICES": _json(x={"base_url": "http://u:hunter2@h/", "headers": {"X-Key": "k"}})}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", "run", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "EMP_REST_SERVICES: service 'x': base_url=" in lines[0] and "hunter2" not in lines[0]
