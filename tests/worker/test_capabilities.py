"""Operator-set capabilities: customer isolation, custom keys, and their configuration errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import WorkerFactory, wait_until
from tests.worker.test_cli import _cli
from worker.client import Client
from worker.errors import ConfigError
from worker.settings import load_settings


async def _status(client: Client, job_id: str) -> str:
    return (await client.get(job_id)).get("status", "")


async def test_strict_worker_serves_only_its_customers(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("acme-only", customer_isolation="strict", allowed_customers="acme, beta")
    other = await client.submit("simulation", {"duration_s": 0}, customer_id="other", priority=90)
    strict_job = await client.submit("simulation", {"duration_s": 0}, customer_id="acme",
                                     requirements={"customer_isolation": "strict"})
    await wait_until(lambda: _is(client, strict_job, "completed"), within_s=10)
    assert await _status(client, other) == "pending"
    stuck = await client.unrunnable()
    assert [(u.customer_id, u.pending) for u in stuck] == [("other", 1)]
    record = json.loads((await client.redis.hgetall(client.keys.worker("acme-only")))["capabilities"])
    assert record["customer_access"] == {"isolation": "strict", "allowed_customers": ["acme", "beta"],
                                         "denied_customers": []}


async def test_denied_customer_and_custom_capabilities(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("eu", denied_customers="banned", capabilities='{"region": "eu", "features": ["nvenc"]}')
    banned = await client.submit("simulation", {"duration_s": 0}, customer_id="banned", priority=99)
    us = await client.submit("simulation", {"duration_s": 0}, requirements={"region": "us"}, priority=98)
    eu = await client.submit("simulation", {"duration_s": 0}, requirements={"region": "eu", "features": ["nvenc"]})
    await wait_until(lambda: _is(client, eu, "completed"), within_s=10)
    assert await _status(client, banned) == "pending" and await _status(client, us) == "pending"
    record = json.loads((await client.redis.hgetall(client.keys.worker("eu")))["capabilities"])
    assert record["region"] == "eu" and record["features"] == ["nvenc"]  # flat, as their matcher reads


async def _is(client: Client, job_id: str, status: str) -> bool:
    return await _status(client, job_id) == status


@pytest.mark.parametrize(("overrides", "message"), [
    ({"customer_isolation": "strict"}, "EMP_CUSTOMER_ISOLATION='strict': needs EMP_ALLOWED_CUSTOMERS"),
    ({"customer_isolation": "paranoid"}, "EMP_CUSTOMER_ISOLATION='paranoid'"),
    ({"capabilities": "[1]"}, "EMP_CAPABILITIES='[1]': must be a JSON object"),
    ({"capabilities": '{"hardware": 1}'}, "'hardware' is not a custom capability"),
    ({"fake_gpus": "24TB"}, "EMP_FAKE_GPUS='24TB'"),
])
def test_bad_capability_settings_name_the_variable(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


async def test_bad_isolation_stops_start_up_with_one_line() -> None:
    code, _, err = await _cli("run", EMP_CUSTOMER_ISOLATION="strict")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "EMP_ALLOWED_CUSTOMERS" in err
