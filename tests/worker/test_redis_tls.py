"""rediss:// with a CA, a client certificate and an ACL user, against a real TLS-only redis-server
started here with certificates made here (skipped, saying why, where redis-server has no TLS)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_servers import (
    Certs,
    Server,
    Unavailable,
    client_for,
    make_certs,
    running_worker,
    start_tls,
    wait_final,
    workdir,
)
from worker.client import connect
from worker.daemon import check_credentials
from worker.errors import ConfigError
from worker.redis_conn import RedisOptions
from worker.settings import Settings, load_settings

PASSWORD = "tls-acl-secret-7731"
PREFIX = "tls-test:"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[Server, Certs]]:
    with workdir() as where:
        certs = make_certs(where)
        try:
            server = start_tls(where, certs, [f"emp on >{PASSWORD} ~* &* +@all"])
        except Unavailable as exc:
            pytest.skip(f"cannot start a TLS redis-server here: {exc}")
        try:
            yield server, certs
        finally:
            server.stop()


def _url(server: Server, password: str = PASSWORD) -> str:
    return f"rediss://emp:{password}@127.0.0.1:{server.port}/0"


def _settings(server: Server, certs: Certs, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": _url(server), "redis_ca_cert": str(certs.ca), "redis_client_cert": str(certs.client_cert),
        "redis_client_key": str(certs.client_key), "key_prefix": PREFIX, "heartbeat_interval_s": 0.5,
        "lease_s": 3.0, "poll_interval_s": 2.0, "grace_period_s": 5.0, "retry_backoff_s": 0.0,
        "machine_id": "tls-machine",
    }
    values.update(overrides)
    return load_settings(**values)


async def test_a_job_runs_end_to_end_over_tls_with_an_acl_user(
        tls_server: tuple[Server, Certs], caplog: pytest.LogCaptureFixture) -> None:
    server, certs = tls_server
    caplog.set_level(logging.DEBUG)
    settings = _settings(server, certs)
    async with running_worker(settings, "tls-w1"), client_for(settings) as client:
        job_id = await client.submit("simulation", {"steps": 3, "duration_s": 0.2})
        jobs = await wait_final(client, [job_id], within_s=30)
        assert jobs[job_id]["status"] == "completed"
        assert [e.kind for e in await client.events(job_id)][-1] == "completed"
        who = await client.redis.acl_whoami()
        assert who == "emp"  # the URL's ACL user, not the (disabled) default one
    assert PASSWORD not in caplog.text


async def _refusal(settings: Settings) -> ConfigError:
    client = connect(settings.redis_url, RedisOptions.from_settings(settings))
    try:
        with pytest.raises(ConfigError) as caught:
            await asyncio.wait_for(check_credentials(client), 30)
    finally:
        await client.aclose()
        # asyncio (3.11) leaves the socket of a failed TLS handshake to the garbage collector, with a
        # ResourceWarning that would surface in whichever later test collects it: collect it here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    assert PASSWORD not in str(caught.value)
    return caught.value


async def test_the_servers_certificate_is_verified_by_default(tls_server: tuple[Server, Certs]) -> None:
    server, certs = tls_server
    without_ca = _settings(server, certs, redis_ca_cert=None)  # the system's CAs do not know ours
    assert without_ca.redis_tls_verify is True
    assert str(await _refusal(without_ca)).startswith("EMP_REDIS_CA_CERT: the Redis server's TLS certificate")
    other_ca = _settings(server, certs, redis_ca_cert=str(certs.other_ca))
    assert "was not verified" in str(await _refusal(other_ca))


async def test_verification_can_be_turned_off(tls_server: tuple[Server, Certs]) -> None:
    server, certs = tls_server
    settings = _settings(server, certs, redis_ca_cert=None, redis_tls_verify=False)
    async with client_for(settings) as client:
        assert await client.redis.ping() is True


async def test_a_server_asking_for_a_client_certificate_says_so(tls_server: tuple[Server, Certs]) -> None:
    server, certs = tls_server
    refusal = await _refusal(_settings(server, certs, redis_client_cert=None, redis_client_key=None))
    assert str(refusal).startswith("EMP_REDIS_CLIENT_CERT:")


async def test_a_wrong_password_over_tls_is_refused_without_showing_it(tls_server: tuple[Server, Certs]) -> None:
    server, certs = tls_server
    refusal = await _refusal(_settings(server, certs, redis_url=_url(server, "not-the-" + PASSWORD)))
    assert "credentials" in str(refusal)


async def _cli(*args: str, env: dict[str, str], within_s: float = 60) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EMP_", "HUB_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env={**clean, "EMP_LOG_FORMAT": "text", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), within_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _env(server: Server, certs: Certs, **extra: str) -> dict[str, str]:
    return {"EMP_REDIS_URL": _url(server), "EMP_REDIS_CA_CERT": str(certs.ca),
            "EMP_REDIS_CLIENT_CERT": str(certs.client_cert), "EMP_REDIS_CLIENT_KEY": str(certs.client_key),
            "EMP_KEY_PREFIX": PREFIX, **extra}


async def test_the_cli_reaches_a_tls_redis_and_a_wrong_ca_is_one_line(tls_server: tuple[Server, Certs]) -> None:
    server, certs = tls_server
    code, out = await _cli("submit", "--service", "simulation", "--payload", "{}", env=_env(server, certs))
    assert code == 0, out
    code, out = await _cli("run", env=_env(server, certs, EMP_REDIS_CA_CERT=str(certs.other_ca),
                                           EMP_LOG_LEVEL="WARNING"), within_s=30)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, out
    assert lines[0].startswith("configuration error: EMP_REDIS_CA_CERT") and PASSWORD not in out


def test_tls_files_are_checked_at_start_up(tmp_path: Path) -> None:
    with workdir() as where:
        certs = make_certs(where)
        url = "rediss://emp:pw@127.0.0.1:6390/0"
        cases: list[tuple[dict[str, Any], str]] = [
            ({"redis_ca_cert": str(tmp_path / "missing.pem")}, "EMP_REDIS_CA_CERT="),
            ({"redis_url": "redis://:pw@127.0.0.1:6390/0", "redis_ca_cert": str(certs.ca)},
             "EMP_REDIS_CA_CERT is set but EMP_REDIS_URL='redis://:***@127.0.0.1:6390/0' is not TLS"),
            ({"redis_client_key": str(certs.client_key)}, "EMP_REDIS_CLIENT_KEY is set without"),
            ({"redis_ca_cert": str(certs.client_key)}, "EMP_REDIS_CA_CERT="),
            ({"redis_client_cert": str(certs.client_cert), "redis_client_key": str(certs.server_key)},
             "EMP_REDIS_CLIENT_CERT="),
        ]
        for overrides, expected in cases:
            with pytest.raises(ConfigError) as caught:
                load_settings(**{"redis_url": url, **overrides})
            assert str(caught.value).startswith(expected), (overrides, caught.value)
            assert ":pw@" not in str(caught.value)
        good = load_settings(redis_url=url, redis_ca_cert=str(certs.ca), redis_client_cert=str(certs.client_cert),
                             redis_client_key=str(certs.client_key))
        assert good.redis_ca_cert == str(certs.ca)
