"""A real HTTP service for the REST connector's tests: an aiohttp server on a loopback port whose
answers each test sets per route, recording every request it receives."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from connectors.rest import RestConnector
from connectors.testing import make_connector

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Received:
    method: str
    path: str  # with the query string
    headers: CIMultiDict[str]  # names case-insensitive, as HTTP has them
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeService:
    """``service.route("POST", "/v1/run", handler)``; unrouted requests answer 404."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.received: list[Received] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def reply(self, method: str, path: str, body: Any = None, *, status: int = 200,
              headers: Mapping[str, str] | None = None) -> None:
        """Always answer ``body`` (JSON) with ``status``."""

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(body, status=status, headers=headers)

        self.route(method, path, handler)

    def seen(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path.split("?")[0] == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, CIMultiDict(request.headers), body))
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.json_response({"error": f"no route {request.method} {request.path}"}, status=404)
        return await handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def service() -> AsyncIterator[FakeService]:
    fake = FakeService()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def other_service() -> AsyncIterator[FakeService]:
    """A second server on another port: what a redirect would send the worker to."""
    fake = FakeService()
    await fake.start()
    yield fake
    await fake.stop()


def services_env(**services: dict[str, Any]) -> dict[str, str]:
    return {"EMP_REST_SERVICES": json.dumps(services)}


ConnectorFactory = Callable[..., Awaitable[RestConnector]]


@pytest.fixture
async def rest_connector() -> AsyncIterator[ConnectorFactory]:
    """``await rest_connector(env)``: a started RestConnector with settings from `env`; stopped after."""
    started: list[RestConnector] = []

    async def factory(env: Mapping[str, str]) -> RestConnector:
        connector = make_connector(RestConnector, env=dict(env))
        await connector.start()
        started.append(connector)
        return connector

    yield factory
    for connector in started:
        await connector.stop()
