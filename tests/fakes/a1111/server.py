"""The fake A1111: a real HTTP server on a loopback port with A1111 v1.10.1's routes, status codes
and JSON bodies (see the fixtures), in its ``--api`` (with the UI's routes) or ``--nowebui`` form::

    async with FakeA1111(auth="user:pass", step_s=0.01) as fake:
        ...  # fake.url; fake.engine.generations / .state / .faults; fake.interrupts
        await fake.kill()      # the process dies: connections reset, the port refuses
        await fake.restart()   # a fresh process on the same port

A1111 is FastAPI; this is aiohttp answering the same wire shapes: HTTPExceptions through A1111's
handler as {error, detail, body, errors}, FastAPI's own 422 list for bad bodies, Starlette's
{"detail": "Not Found"} / {"detail": "Method Not Allowed"}, Basic auth on every /sdapi/v1/*
route, GZip for bodies of 1000 bytes or more, X-Process-Time on every answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from tests.fakes.a1111 import wire
from tests.fakes.a1111.engine import Checkpoint, Engine

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOCAL_HOSTS = ("127.", "localhost", "[::1]", "0.0.0.0")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


class FakeA1111:
    def __init__(self, *, nowebui: bool = False, auth: str = "", step_s: float = 0.01, switch_s: float = 0.0,
                 checkpoints: list[Checkpoint] | None = None, scripts: tuple[str, ...] = ("x/y/z plot",),
                 alwayson_scripts: tuple[str, ...] = ("controlnet",)) -> None:
        self.nowebui = nowebui
        self.users = dict(pair.split(":", 1) for pair in auth.split(",") if pair)
        self.scripts, self.alwayson_scripts = scripts, alwayson_scripts
        self._engine_args: dict[str, Any] = {"step_s": step_s, "switch_s": switch_s}
        if checkpoints is not None:
            self._engine_args["checkpoints"] = checkpoints
        self.engine = Engine(**self._engine_args)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.interrupts = 0
        self.option_posts: list[dict[str, Any]] = []
        self.progress_answers = asyncio.Event()  # cleared: a hung engine, /sdapi/v1/progress answers nothing
        self.progress_answers.set()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life -----------------------------------------------------------------------------------

    async def start(self) -> FakeA1111:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        assert self._runner.server is not None
        self._server = await asyncio.get_running_loop().create_server(self._runner.server, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.engine.killed = True  # running generations end at their next step
        self.progress_answers.set()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
        self._server = self._runner = None

    async def kill(self) -> None:
        """Like SIGKILL: the port refuses at once, every open connection is reset mid-answer."""
        self.engine.killed = True
        if self._server is not None:
            self._server.close()
        for handler in self._runner.server.connections if self._runner and self._runner.server else []:
            if handler.transport is not None:
                handler.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await self.close()

    async def restart(self) -> None:
        """A fresh A1111 on the same port: new state, the first checkpoint loaded."""
        self.engine = Engine(**self._engine_args)
        await self.start()

    async def __aenter__(self) -> FakeA1111:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        api = "/sdapi/v1"
        app.router.add_post(f"{api}/txt2img", self._txt2img)
        app.router.add_post(f"{api}/img2img", self._img2img)
        app.router.add_get(f"{api}/progress", self._progress)
        app.router.add_post(f"{api}/interrupt", self._interrupt)
        app.router.add_post(f"{api}/skip", self._skip)
        app.router.add_get(f"{api}/sd-models", self._sd_models)
        app.router.add_get(f"{api}/options", self._get_options)
        app.router.add_post(f"{api}/options", self._set_options)
        app.router.add_post(f"{api}/refresh-checkpoints", self._null)
        for name in ("memory", "samplers", "schedulers", "cmd-flags"):
            app.router.add_get(f"{api}/{name}", self._canned)
        if not self.nowebui:  # the Gradio UI's routes exist only with it
            app.router.add_get("/", self._ui)
            app.router.add_post("/internal/progress", self._internal_progress)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        self.requests.append((request.method, request.path))
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            response = await self._answer(request, handler)
        finally:
            if task is not None:
                self._tasks.discard(task)
        response.headers["X-Process-Time"] = f"{time.perf_counter() - started:.4f}"
        body = getattr(response, "body", None)
        if isinstance(body, bytes) and len(body) >= 1000 and "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        routing = request.match_info.http_exception
        if isinstance(routing, web.HTTPMethodNotAllowed):
            return _json(405, {"detail": "Method Not Allowed"})
        if routing is not None:
            return _json(404, {"detail": "Not Found"})
        try:
            if request.path.startswith("/sdapi/v1/"):
                self._check_auth(request)
            return await handler(request)
        except wire.ValidationFailed as exc:
            return _json(422, {"detail": exc.errors})
        except wire.ApiError as exc:
            status, body = wire.handler_body(exc)
            return _json(status, body, exc.headers)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # what reaches A1111's handler
            status, body = wire.handler_body(exc)
            return _json(status, body)

    def _check_auth(self, request: web.Request) -> None:
        if not self.users:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            raise wire.ApiError(401, "Not authenticated", {"WWW-Authenticate": "Basic"})
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise wire.ApiError(401, "Invalid authentication credentials", {"WWW-Authenticate": "Basic"}) from None
        if self.users.get(user) != password:
            raise wire.ApiError(401, "Incorrect username or password", {"WWW-Authenticate": "Basic"})

    @staticmethod
    async def _body(request: web.Request) -> Any:
        text = await request.text()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise wire.json_error(text) from None

    # -- generation -----------------------------------------------------------------------------

    async def _txt2img(self, request: web.Request) -> web.Response:
        raw = await self._body(request)
        params = wire.validate("txt2img", raw)
        self._check_scripts(params)
        return _json(200, await self.engine.generate("txt2img", params, raw))

    async def _img2img(self, request: web.Request) -> web.Response:
        raw = await self._body(request)
        params = wire.validate("img2img", raw)
        if params["init_images"] is None:
            raise wire.ApiError(404, "Init image not found")
        for image in [*params["init_images"], *([params["mask"]] if params["mask"] else [])]:
            self._input_image(image)
        self._check_scripts(params)
        return _json(200, await self.engine.generate("img2img", params, raw))

    def _check_scripts(self, params: dict[str, Any]) -> None:
        if params["script_name"] is not None and params["script_name"] not in self.scripts:
            raise wire.ApiError(422, f"Script '{params['script_name']}' not found")
        for name in params["alwayson_scripts"] or {}:
            if name.lower() not in self.alwayson_scripts:
                raise wire.ApiError(422, f"always on script {name} not found")

    @staticmethod
    def _input_image(image: Any) -> None:
        if not isinstance(image, str):
            raise wire.ApiError(500, "Invalid encoded image")
        if image.startswith(("http://", "https://")):
            host = image.split("://", 1)[1]
            raise wire.ApiError(500, "Request to local resource not allowed" if host.startswith(LOCAL_HOSTS)
                                else "Requests not allowed")
        wire.decode_image(image)

    # -- progress and control -------------------------------------------------------------------

    async def _progress(self, request: web.Request) -> web.Response:
        await self.progress_answers.wait()
        skip = request.query.get("skip_current_image", "false").lower() in ("true", "1", "yes", "on")
        return _json(200, self.engine.state.progress(skip))

    async def _interrupt(self, request: web.Request) -> web.Response:
        self.interrupts += 1
        self.engine.state.interrupted = True
        return _json(200, {})

    async def _skip(self, request: web.Request) -> web.Response:
        self.engine.state.skipped = True
        return _json(200, None)

    async def _sd_models(self, request: web.Request) -> web.Response:
        return _json(200, [c.listing() for c in self.engine.checkpoints])

    async def _get_options(self, request: web.Request) -> web.Response:
        return _json(200, self.engine.options)

    async def _set_options(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise wire.ValidationFailed([{"loc": ["body"], "msg": "value is not a valid dict",
                                          "type": "type_error.dict"}])
        self.option_posts.append(body)
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                if self.engine.find(value) is None:
                    raise RuntimeError(f"model {value!r} not found")
                async with self.engine.lock:
                    await self.engine.load(value)
            else:
                self.engine.options[key] = value
        return _json(200, None)

    async def _null(self, request: web.Request) -> web.Response:
        return _json(200, None)

    async def _canned(self, request: web.Request) -> web.Response:
        endpoints = wire.fixture("control_endpoints")["endpoints"]
        reply = endpoints[f"GET {request.path}"]["response" if request.path != "/sdapi/v1/memory" else "response_cuda"]
        body = reply["json"]
        if request.path.endswith("cmd-flags"):
            body = {"api": not self.nowebui, "nowebui": self.nowebui, "api_auth": None}
        return _json(200, body)

    # -- the UI's routes (--api only) -----------------------------------------------------------

    async def _ui(self, request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><html><body>Stable Diffusion (Gradio)</body></html>",
                            content_type="text/html")

    async def _internal_progress(self, request: web.Request) -> web.Response:
        body = await request.json()
        task_id = body.get("id_task") if isinstance(body, dict) else None
        running = [g for g in self.engine.generations if not g.done]
        active = bool(running) and running[0].body.get("force_task_id") == task_id
        queued = any(g.body.get("force_task_id") == task_id for g in running[1:])
        state = self.engine.state.progress(True)
        return _json(200, {"active": active, "queued": queued, "completed": not (active or queued),
                           "progress": state["progress"] if active else None,
                           "eta": state["eta_relative"] if active else None, "live_preview": None,
                           "id_live_preview": -1, "textinfo": "In queue..." if queued else None})
