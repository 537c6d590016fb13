"""Plugin code is foreign code: a slow engine check, a raising hook or a raising start() costs
neither a running job nor the other connectors and slots, and `emp-worker status` says why."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from typing import Any

import pytest

from connectors import Connector, ConnectorConfig, Health, HealthState, Job, JobContext, JobResult, hookimpl
from connectors.manager import Plugins
from tests.conftest import WorkerFactory, wait_until
from worker.client import Client
from worker.errors import ConfigError


class SlowChecks(Connector):
    """An engine whose health() and models() each take 4.9 s (both under the 5 s timeout)."""

    name = "slowcheck"
    service_types = ("slowcheck",)

    async def health(self) -> Health:
        await asyncio.sleep(4.9)  # the slow engine itself
        return Health(HealthState.OK)

    async def models(self) -> dict[str, list[str]]:
        await asyncio.sleep(4.9)  # the slow engine itself
        return {"slowcheck": ["m1"]}

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        await asyncio.sleep(float(job.payload["duration_s"]))  # the job's work
        return {"ok": True}


class BrokenStart(Connector):
    name = "brokenstart"
    service_types = ("brokenstart",)
    fixed = False  # flipped by the test: the engine "comes up"

    async def start(self) -> None:
        if not BrokenStart.fixed:
            raise RuntimeError("engine binary not found")

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {"ran": "brokenstart"}


class TestPlugin:
    """Registers the connectors above, and capability hooks: one raising, one contributing."""

    @hookimpl
    def emp_connectors(self) -> Sequence[type[Any]]:
        return [SlowChecks, BrokenStart]


class RaisingCapabilities:
    @hookimpl
    def emp_capabilities(self, worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any] | None:
        raise ValueError("capability probe crashed")


class GoodCapabilities:
    @hookimpl
    def emp_capabilities(self, worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any] | None:
        return {"has_nvenc": True}


async def _job(client: Client, job_id: str) -> dict[str, str]:
    return await client.get(job_id)


async def _final(client: Client, job_id: str) -> bool:
    return (await _job(client, job_id)).get("status") in ("completed", "failed")


@pytest.mark.timeout(90)
async def test_slow_health_and_models_never_cost_a_running_job(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("peer")  # a peer whose reaper would requeue the job if its lease lapsed
    await start_worker("slow", connectors="slowcheck", plugins=[TestPlugin()], lease_s=3.0)
    job_id = await client.submit("slowcheck", {"duration_s": 10})  # over three leases long
    await wait_until(lambda: _final(client, job_id), within_s=60)
    job = await _job(client, job_id)
    assert job["status"] == "completed", job
    assert job["attempt"] == "1" and job["retry_count"] == "0" and job["worker_id"] == "slow"


async def test_a_raising_hook_is_skipped_and_reported(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("hooked", plugins=[RaisingCapabilities(), GoodCapabilities()])
    job_id = await client.submit("simulation", {"duration_s": 0})
    await wait_until(lambda: _final(client, job_id), within_s=15)
    assert (await _job(client, job_id))["status"] == "completed"
    record = json.loads(await client.redis.hget(client.keys.worker("hooked"), "capabilities"))
    assert record["has_nvenc"] is True  # the good hook still counts
    [info] = [w for w in await client.workers() if w.worker_id == "hooked"]
    assert any("emp_capabilities failed: ValueError: capability probe crashed" in p for p in info.problems)


@pytest.mark.timeout(60)
async def test_a_raising_start_downs_only_that_connector_until_it_starts(
    client: Client, start_worker: WorkerFactory
) -> None:
    BrokenStart.fixed = False
    await start_worker("other-slot")  # another slot, plain simulation
    await start_worker("mixed", connectors="simulation,brokenstart", plugins=[TestPlugin()])
    broken = await client.submit("brokenstart", {}, priority=90)
    sims = [await client.submit("simulation", {"duration_s": 0}) for _ in range(4)]
    for job_id in sims:
        await wait_until(functools.partial(_final, client, job_id), within_s=15)
    assert (await _job(client, broken))["status"] == "pending"
    workers = {w.worker_id: w for w in await client.workers()}
    assert workers["mixed"].status in ("idle", "busy") and workers["other-slot"].problems == []
    assert any("connector brokenstart is down: start() failed: RuntimeError: engine binary not found" in p
               for p in workers["mixed"].problems), workers["mixed"].problems

    BrokenStart.fixed = True  # retried with backoff: the connector comes up and takes its job
    await wait_until(lambda: _final(client, broken), within_s=30)
    job = await _job(client, broken)
    assert job["status"] == "completed" and job["worker_id"] == "mixed"
    await wait_until(lambda: _no_problems(client, "mixed"), within_s=10)


async def _no_problems(client: Client, worker_id: str) -> bool:
    return [w.problems for w in await client.workers() if w.worker_id == worker_id] == [[]]


class Twin(Connector):
    name = "twin"
    service_types = ("simulation",)

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {}


class TwinPlugin:
    @hookimpl
    def emp_connectors(self) -> Sequence[type[Any]]:
        return [Twin]


def test_a_service_two_connectors_run_is_a_configuration_error() -> None:
    plugins = Plugins()
    plugins.pm.register(TwinPlugin())
    with pytest.raises(ConfigError) as caught:
        plugins.classes_for(["simulation", "twin"])
    assert "connectors 'simulation' and 'twin' both run service 'simulation'" in str(caught.value)
    assert plugins.classes_for(["twin"]) == [Twin]  # alone it is fine


def test_a_connector_name_two_plugins_provide_is_a_configuration_error() -> None:
    class Imposter(Twin):
        name = "simulation"
        service_types = ("imposter",)

    class ImposterPlugin:
        @hookimpl
        def emp_connectors(self) -> Sequence[type[Any]]:
            return [Imposter]

    plugins = Plugins()
    plugins.pm.register(ImposterPlugin())
    with pytest.raises(ConfigError) as caught:
        plugins.classes_for(["simulation"])
    assert "connector 'simulation' is provided twice" in str(caught.value) and "\n" not in str(caught.value)


def test_a_connector_declares_its_concurrency() -> None:
    from worker.guard import PluggedConnector

    class One(Twin):
        max_concurrent_jobs = 1

    assert PluggedConnector(One(ConnectorConfig("w")), slot_limit=4).limit == 1
    assert PluggedConnector(Twin(ConnectorConfig("w")), slot_limit=4).limit == 4


class Flaky(Connector):
    """health() and models() fail on command, separately."""

    name = "flaky"
    service_types = ("flaky",)
    health_fails = False
    models_fail = False
    models_failures = 0

    async def health(self) -> Health:
        if Flaky.health_fails:
            raise ConnectionError("engine socket closed")
        return Health(HealthState.OK)

    async def models(self) -> dict[str, list[str]]:
        if Flaky.models_fail:
            Flaky.models_failures += 1
            raise RuntimeError("object_info timed out")
        return {"flaky": ["sdxl"]}

    async def run(self, job: Job, ctx: JobContext) -> JobResult:
        return {"ok": True}


class FlakyPlugin:
    @hookimpl
    def emp_connectors(self) -> Sequence[type[Any]]:
        return [Flaky]


async def test_health_and_models_fail_separately(client: Client, start_worker: WorkerFactory) -> None:
    Flaky.health_fails, Flaky.models_fail = False, False
    worker = await start_worker("flaky", connectors="flaky", plugins=[FlakyPlugin()], models_ttl_s=1)
    [engine] = worker.engines
    assert engine.models == {"flaky": ["sdxl"]}
    Flaky.models_fail = True  # models() fails: the last list is kept, jobs still run
    Flaky.models_failures = 0
    await wait_until(lambda: Flaky.models_failures >= 1, within_s=10)  # listed again (TTL 1 s): failed
    first = await client.submit("flaky", {}, requirements={"models": ["sdxl"]})
    await wait_until(lambda: _final(client, first), within_s=10)
    assert (await _job(client, first))["status"] == "completed" and engine.models == {"flaky": ["sdxl"]}

    Flaky.health_fails = True  # health() fails: DOWN, said in status, nothing claimed
    await wait_until(lambda: not engine.can_claim, within_s=10)
    second = await client.submit("flaky", {})
    await wait_until(lambda: _has_problem(client, "flaky", "health() failed: ConnectionError: engine socket closed"))
    assert (await _job(client, second))["status"] == "pending"
    Flaky.health_fails = False
    await wait_until(lambda: _final(client, second), within_s=10)


async def _has_problem(client: Client, worker_id: str, text: str) -> bool:
    return any(text in p for w in await client.workers() if w.worker_id == worker_id for p in w.problems)


async def test_models_come_back_when_the_worker_record_is_deleted(
    client: Client, start_worker: WorkerFactory
) -> None:
    Flaky.health_fails, Flaky.models_fail = False, False
    await start_worker("wiped", connectors="flaky", plugins=[FlakyPlugin()])
    key = client.keys.worker("wiped")
    assert json.loads(await client.redis.hget(key, "emp_models")) == {"flaky": ["sdxl"]}
    await client.redis.delete(key)  # e.g. emp-job-queue's API cleaning worker records at start-up
    await wait_until(lambda: client.redis.hexists(key, "emp_models"), within_s=10)
    job_id = await client.submit("flaky", {}, requirements={"models": ["sdxl"]})
    await wait_until(lambda: _final(client, job_id), within_s=10)
    assert (await _job(client, job_id))["status"] == "completed"
