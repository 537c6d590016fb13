"""A fake A1111 per test and a connector pointed at it (settings read as the daemon reads them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from connectors.a1111 import A1111Connector
from connectors.testing import make_connector
from tests.fakes.a1111 import FakeA1111

ConnectorFactory = Callable[..., Awaitable[A1111Connector]]

FAST = {"EMP_A1111_PROGRESS_INTERVAL_S": "0.05"}


def small(**fields: Any) -> dict[str, Any]:
    """An A1111 request body that runs fast on the fake."""
    return {"prompt": "a red cube", "steps": 10, "width": 16, "height": 16, **fields}


@pytest.fixture
async def fake() -> AsyncIterator[FakeA1111]:
    async with FakeA1111(step_s=0.005) as server:
        yield server


@pytest.fixture
async def connector_for() -> AsyncIterator[ConnectorFactory]:
    """``await connector_for(fake, **EMP_A1111_* without the prefix)``; stopped afterwards."""
    made: list[A1111Connector] = []

    async def factory(fake: FakeA1111 | None = None, **settings: str) -> A1111Connector:
        env = {**FAST, **({"EMP_A1111_URL": fake.url} if fake else {}),
               **{f"EMP_A1111_{k.upper()}": v for k, v in settings.items()}}
        connector = make_connector(A1111Connector, env=env)
        await connector.start()
        made.append(connector)
        return connector

    yield factory
    for connector in made:
        await connector.stop()


@pytest.fixture
async def connector(fake: FakeA1111, connector_for: ConnectorFactory) -> A1111Connector:
    return await connector_for(fake)
