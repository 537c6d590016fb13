"""Redis Cluster (opt-in): three masters started here (skipped, saying why, where they cannot
start). Every key shares the prefix's hash tag, so each script runs on the node of that slot; a
job runs end to end, and SCRIPT FLUSH on every node mid-run is met by loading the scripts again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from tests.conftest import wait_until
from tests.redis_servers import (
    Server,
    Unavailable,
    client_for,
    running_worker,
    start_cluster,
    stop_all,
    wait_final,
    workdir,
)
from worker.errors import ConfigError
from worker.settings import Settings, load_settings


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Server]]:
    with workdir() as where:
        try:
            nodes = start_cluster(where)
        except Unavailable as exc:
            pytest.skip(f"cannot start a three-master Redis Cluster here: {exc}")
        try:
            yield nodes
        finally:
            stop_all(nodes)


def _prefix_off_the_seed() -> str:
    """A tagged prefix whose slot is not the seed node's (the first third of the slots): a script
    sent anywhere but the tag's node would fail there."""
    while True:
        prefix = f"{{emp-{uuid.uuid4().hex[:8]}}}:"
        if key_slot(prefix.encode()) >= 16384 // 3:
            return prefix


def _settings(nodes: list[Server], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{nodes[0].port}/0", "redis_cluster": True,
        "key_prefix": _prefix_off_the_seed(), "heartbeat_interval_s": 0.5, "lease_s": 3.0,
        "poll_interval_s": 2.0, "grace_period_s": 5.0, "retry_backoff_s": 0.0, "machine_id": "cluster-machine",
    }
    values.update(overrides)
    return load_settings(**values)


async def test_a_job_runs_end_to_end_with_a_hash_tagged_prefix(cluster: list[Server]) -> None:
    settings = _settings(cluster, poll_interval_s=60.0)  # picked up by its wake token, not a poll
    async with running_worker(settings, "cluster-w1"), client_for(settings) as client:
        job_id = await client.submit("simulation", {"steps": 3, "duration_s": 0.2})
        jobs = await wait_final(client, [job_id], within_s=15)
        assert jobs[job_id]["status"] == "completed"
        assert [e.kind for e in await client.events(job_id)][-1] == "completed"
        # every key the worker wrote is in the tag's slot
        slot = key_slot(settings.key_prefix.encode())
        node = client.redis.get_node_from_key(settings.key_prefix)  # type: ignore[attr-defined]
        assert node.port != cluster[0].port
        written = [k async for k in client.redis.scan_iter(match=f"{settings.key_prefix}*",
                                                            target_nodes=node)]
        assert written and {key_slot(k.encode()) for k in written} == {slot}


async def test_scripts_come_back_after_script_flush_mid_run(cluster: list[Server]) -> None:
    settings = _settings(cluster)
    async with running_worker(settings, "cluster-w2") as worker, client_for(settings) as client:
        first = await client.submit("simulation", {"steps": 10, "duration_s": 2.0})

        async def running() -> bool:
            return (await client.get(first)).get("status") == "in_progress"

        await wait_until(running, within_s=15)
        await client.redis.script_flush()  # every primary forgets every script
        used = [worker.queue._scripts[name].sha for name in ("progress", "heartbeat")]
        assert not any(await client.redis.script_exists(*used))
        second = await client.submit("simulation", {"steps": 2, "duration_s": 0.1})
        jobs = await wait_final(client, [first, second], within_s=30)
        assert {jobs[first]["status"], jobs[second]["status"]} == {"completed"}
        assert all(await client.redis.script_exists(*used))  # loaded again on NOSCRIPT
        assert sum(e.kind == "completed" for e in await client.events(first)) == 1


@pytest.mark.parametrize("prefix", ["", "emp:", "{}:emp:", "{emp:"])
def test_cluster_mode_refuses_a_prefix_without_a_hash_tag(prefix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(redis_url="redis://127.0.0.1:7000/0", redis_cluster=True, key_prefix=prefix)
    assert str(caught.value) == (f"EMP_KEY_PREFIX={prefix!r}: Redis Cluster mode needs a hash tag in the prefix "
                                 "so that every key is in one slot, e.g. EMP_KEY_PREFIX={emp}:")


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"redis_url": "redis://127.0.0.1:7000/3"}, "EMP_REDIS_URL='redis://127.0.0.1:7000/3': Redis Cluster needs"),
    ({"redis_sentinels": "127.0.0.1:26379", "redis_master_name": "m"}, "EMP_REDIS_CLUSTER=true and EMP_REDIS_"),
])
def test_cluster_mode_refuses_what_a_cluster_cannot_do(overrides: dict[str, Any], expected: str) -> None:
    values = {"redis_url": "redis://127.0.0.1:7000/0", "redis_cluster": True, "key_prefix": "{emp}:", **overrides}
    with pytest.raises(ConfigError) as caught:
        load_settings(**values)
    assert str(caught.value).startswith(expected)
