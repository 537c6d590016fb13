"""claims/s of the real claim script (matching capabilities) from 1, 4 and 16 claimers, against a
same-run bare claim (one Lua ZPOPMAX + HSET), on a redis-server of our own."""

from __future__ import annotations

import asyncio

from bench.claimers import run_claimers
from bench.common import Figure, bare_fill, submit_many
from worker.client import Client, connect
from worker.keys import Keys


async def _fill_real(url: str, prefix: str, jobs: int) -> None:
    client = Client(connect(url), Keys(prefix))
    await submit_many(client, jobs)
    await client.redis.aclose()


async def _fill_bare(url: str, prefix: str, jobs: int) -> None:
    redis = connect(url)
    await bare_fill(redis, prefix, jobs)
    await redis.aclose()


def run(url: str, jobs: int, levels: tuple[int, ...] = (1, 4, 16)) -> list[Figure]:
    figures = []
    for n in levels:
        asyncio.run(_fill_bare(url, f"bare{n}:", jobs))
        _, bare = run_claimers(url, f"bare{n}:", "bare", n)
        asyncio.run(_fill_real(url, f"real{n}:", jobs))
        claimed, real = run_claimers(url, f"real{n}:", "real", n)
        assert claimed == jobs, f"real claim took {claimed} of {jobs}"
        figures.append(Figure("claim", f"real claim, {n} claimer(s)", real, "claims/s", bare,
                              "bare ZPOPMAX+HSET", note=f"{jobs} jobs"))
    return figures
