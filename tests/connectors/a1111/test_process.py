"""End to end through the ``emp-worker run`` process: a job written the emp-job-queue way runs on
the fake A1111, its images land in the output store, and no Redis record grows past 16 KiB."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from connectors.testing import WorkerProcess
from tests.connectors.a1111.conftest import small
from tests.fakes.a1111 import FakeA1111
from tests.fakes.a1111.wire import png_size
from worker.keys import Keys

pytestmark = pytest.mark.timeout(120)

RECORD_LIMIT = 16 * 1024


async def _record_sizes(redis: aioredis.Redis, prefix: str) -> dict[str, int]:
    """The size of every record under `prefix`: a hash's fields and values, a stream's largest
    entry, a string's length, a set's or sorted set's largest member."""
    sizes: dict[str, int] = {}
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        kind = await redis.type(key)
        if kind == "hash":
            sizes[key] = sum(len(k) + len(v) for k, v in (await redis.hgetall(key)).items())
        elif kind == "stream":
            entries = await redis.xrange(key)
            sizes[key] = max((sum(len(k) + len(v) for k, v in f.items()) for _, f in entries), default=0)
        elif kind == "string":
            sizes[key] = len(await redis.get(key) or "")
        elif kind == "zset":
            sizes[key] = max((len(m) for m in await redis.zrange(key, 0, -1)), default=0)
        elif kind == "set":
            sizes[key] = max((len(m) for m in await redis.smembers(key)), default=0)
        elif kind == "list":
            sizes[key] = max((len(m) for m in await redis.lrange(key, 0, -1)), default=0)
    return sizes


async def test_a_job_completes_through_the_worker_process_with_stored_images(
    redis_url: str, keys: Keys, redis: aioredis.Redis, output_dir: Path
) -> None:
    async with FakeA1111(step_s=0.005) as fake:
        worker = WorkerProcess(redis_url, keys.prefix, "a1111-proc", connectors="a1111", EMP_A1111_URL=fake.url,
                               EMP_A1111_PROGRESS_INTERVAL_S="0.05", EMP_OUTPUT_DIR=str(output_dir))
        async with worker:
            job = await worker.run_job("a1111", small(steps=60, batch_size=4, width=256, height=256, seed=11),
                                       within_s=60)
            assert job["status"] == "completed", worker.output()[-3000:]
            sizes = await _record_sizes(redis, keys.prefix)
    result = json.loads(job["result"])
    assert [o["name"] for o in result["outputs"]] == [f"image-{i:03d}.png" for i in range(4)]
    for output in result["outputs"]:
        data = await asyncio.to_thread(Path(urlsplit(output["url"]).path).read_bytes)
        assert png_size(data) == (256, 256) and output["size_bytes"] == len(data)
    assert result["metadata"]["seeds"] == [11, 12, 13, 14]
    [generation] = fake.engine.generations
    assert generation.images == 4  # and the fake's grid of them did not become an output
    assert sizes and max(sizes.values()) < RECORD_LIMIT, sizes
