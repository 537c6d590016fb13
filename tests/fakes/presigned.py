"""A presigned-URL upload server on a loopback port: what ``http-put`` outputs are PUT to.

It accepts ``PUT /<bucket>/<key>?sig=<signature>`` when the signature is the one it issued
for that key (``url_for``), stores the body, and can be told to answer the next PUTs of a key
with an error status (``fail_next``)."""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from types import TracebackType

from aiohttp import web

SECRET = b"presign-secret"


class PresignedServer:
    def __init__(self, bucket: str = "outputs") -> None:
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.puts: Counter[str] = Counter()
        self.content_types: dict[str, str] = {}
        self.failures: dict[str, list[int]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def signature(self, key: str) -> str:
        return hmac.new(SECRET, key.encode(), hashlib.sha256).hexdigest()

    def url_for(self, key: str) -> str:
        return f"{self.url}/{self.bucket}/{key}?sig={self.signature(key)}"

    def fail_next(self, key: str, *statuses: int) -> None:
        self.failures.setdefault(key, []).extend(statuses)

    async def _put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not hmac.compare_digest(request.query.get("sig", ""), self.signature(key)):
            return web.Response(status=403, text="SignatureDoesNotMatch")
        body = await request.read()
        self.puts[key] += 1
        if self.failures.get(key):
            return web.Response(status=self.failures[key].pop(0), text="injected failure")
        self.objects[key] = body
        self.content_types[key] = request.headers.get("Content-Type", "")
        return web.Response(status=200)

    async def __aenter__(self) -> PresignedServer:
        app = web.Application(client_max_size=1024 * 1024 * 1024)
        app.router.add_put(f"/{self.bucket}/{{key:.+}}", self._put)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
