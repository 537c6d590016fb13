"""The HTTP side of the fake: ComfyUI 0.3.64's routes, each also served under /api (COMFYUI.md §1.2)."""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import sys
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import BodyPartReader, web

from tests.fakes.comfyui import media
from tests.fakes.comfyui.behaviour import InterruptCall, Submitted, Upload
from tests.fakes.comfyui.execution import NodeContextImpl, QueueItem
from tests.fakes.comfyui.files import FOLDERS
from tests.fakes.comfyui.validation import Rejected, check_prompt_id, error_body, validate

if TYPE_CHECKING:
    from tests.fakes.comfyui.server import FakeComfyUI

MAX_UPLOAD = 100 * 1024 * 1024
FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD}
TINY_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////////////////////////////////////////////"
    "////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/aAAgBAQABPxA=")


def empty(status: int = 200) -> web.Response:
    return web.Response(status=status)


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    raw = await request.read()
    return json.loads(raw) if raw.strip() else None


class Api:
    def __init__(self, fake: FakeComfyUI) -> None:
        self.fake = fake

    def add_routes(self, app: web.Application) -> None:
        table = [
            ("GET", "/ws", self.fake.websocket), ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.queue_info),
            ("GET", "/history", self.history_list), ("POST", "/history", self.history_post),
            ("GET", "/history/{prompt_id}", self.history_one), ("GET", "/queue", self.queue_get),
            ("POST", "/queue", self.queue_post), ("POST", "/interrupt", self.interrupt), ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload), ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.features), ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_one), ("GET", "/models", self.models),
            ("GET", "/models/{folder}", self.models_folder), ("GET", "/embeddings", self.embeddings),
            ("POST", "/free", self.free),
        ]
        for prefix in ("", "/api"):
            for method, path, handler in table:
                app.router.add_route(method, prefix + path, handler)
        jobs = self.fake.jobs
        app.router.add_get("/api/jobs", jobs.list_jobs)
        app.router.add_post("/api/jobs/cancel", jobs.cancel_many)
        app.router.add_get("/api/jobs/{job_id}", jobs.get_job)
        app.router.add_post("/api/jobs/{job_id}/cancel", jobs.cancel_one)

    @web.middleware
    async def origin_check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """0.3.64 refuses a browser-style request whose Origin host differs from Host (403, empty body)."""
        self.fake.track(request)
        origin = request.headers.get("Origin")
        if self.fake.behaviour.check_origin and origin and urlsplit(origin).netloc != request.host:
            return empty(403)
        response: web.StreamResponse = await handler(request)
        return response

    def context(self) -> NodeContextImpl:
        fake = self.fake
        return NodeContextImpl("", {}, {}, fake.behaviour.sampler_previews, fake.files, fake.behaviour)

    # ---- prompts ----------------------------------------------------------------------------------------------
    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
        except ValueError:
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        if not isinstance(body, dict) or "prompt" not in body:
            return web.json_response(error_body("no_prompt", "No prompt provided", "No prompt provided"), status=400)
        try:
            if "prompt_id" in body:
                check_prompt_id(body["prompt_id"], self.fake.behaviour.require_uuid_prompt_id)
            targets = body.get("partial_execution_targets")
            outputs, node_errors = validate(body["prompt"], self.fake.specs, self.context(),
                                            [str(t) for t in targets] if isinstance(targets, list) else None)
        except Rejected as rejected:
            return web.json_response(rejected.body, status=400)
        prompt_id, number = self.fake.enqueue(body, outputs)
        if delay := self.fake.behaviour.prompt_response_delay_s:
            await asyncio.sleep(delay)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def queue_info(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.fake.engine.queue_remaining()}})

    async def queue_get(self, request: web.Request) -> web.Response:
        engine = self.fake.engine
        running = [engine.running.wire()] if engine.running else []
        return web.json_response({"queue_running": running,
                                  "queue_pending": [item.wire() for item in engine.pending_items()]})

    async def queue_post(self, request: web.Request) -> web.Response:
        body = await _json_body(request) or {}
        self.fake.queue_deletes.append(body)
        if body.get("clear"):
            self.fake.engine.clear()
        if isinstance(body.get("delete"), list):
            self.fake.engine.delete([str(i) for i in body["delete"]])
        return empty()

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        engine = self.fake.engine
        running = engine.running.prompt_id if engine.running else None
        hit = engine.interrupt(None if prompt_id is None else str(prompt_id))
        self.fake.interrupts.append(InterruptCall(body if isinstance(body, dict) else None, running, hit))
        return empty()

    # ---- history ----------------------------------------------------------------------------------------------
    async def history_one(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.fake.engine.history_entry(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def history_list(self, request: web.Request) -> web.Response:
        history = self.fake.engine.history
        max_items = request.query.get("max_items")
        if max_items is None:
            return web.json_response(history)
        limit, offset = int(max_items), int(request.query.get("offset", -1))
        if offset < 0:
            offset = max(0, len(history) - limit)
        keys = list(history)[offset:offset + limit]
        return web.json_response({key: history[key] for key in keys})

    async def history_post(self, request: web.Request) -> web.Response:
        body = await _json_body(request) or {}
        if body.get("clear"):
            self.fake.engine.history.clear()
        for prompt_id in body.get("delete") or []:
            self.fake.engine.history.pop(str(prompt_id), None)
        return empty()

    # ---- files ------------------------------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.Response:
        query = request.query
        filename, subfolder = query.get("filename", ""), query.get("subfolder", "")
        folder = query.get("type", "output")
        if not filename:
            return empty(404)
        if filename.startswith("/") or ".." in filename or folder not in FOLDERS:
            return empty(400)
        if subfolder.startswith("/") or ".." in subfolder.split("/"):
            return empty(403)
        data = self.fake.files.get(folder, subfolder, filename)
        if data is None:
            return empty(404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        preview = query.get("preview", "")
        if preview.startswith("webp"):
            data, content_type = media.TINY_WEBP, "image/webp"
        elif preview.startswith("jpeg"):
            data, content_type = TINY_JPEG, "image/jpeg"
        return web.Response(body=data, content_type=content_type,
                            headers={"Content-Disposition": f'filename="{filename}"'})

    async def upload(self, request: web.Request) -> web.Response:
        fields: dict[str, str] = {}
        image: tuple[str, bytes] | None = None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            data = bytes(await part.read())
            if part.name == "image":
                image = (part.filename or "upload.png", data)
            elif part.name:
                fields[part.name] = data.decode()
        if image is None:
            return empty(400)
        folder, subfolder = fields.get("type", "input") or "input", fields.get("subfolder", "")
        if folder not in FOLDERS or subfolder.startswith("/") or ".." in subfolder.split("/"):
            return empty(400)
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        name = self.fake.files.upload(folder, subfolder, image[0], image[1], overwrite)
        self.fake.uploads.append(Upload(name, subfolder, folder, image[0], len(image[1]), overwrite))
        return web.json_response({"name": name, "subfolder": subfolder, "type": folder})

    # ---- simple GETs ------------------------------------------------------------------------------------------
    async def system_stats(self, request: web.Request) -> web.Response:
        b = self.fake.behaviour
        system = {"os": "posix", "ram_total": b.ram_total, "ram_free": b.ram_free, "comfyui_version": b.comfyui_version,
                  "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.95",
                  "required_templates_version": "0.1.95", "python_version": sys.version,
                  "pytorch_version": "2.8.0+cu128", "embedded_python": False,
                  "argv": ["main.py", "--listen", "127.0.0.1", "--port", str(self.fake.port)]}
        return web.json_response({"system": system, "devices": b.devices})

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response(FEATURES)

    async def object_info(self, request: web.Request) -> web.Response:
        ctx = self.context()
        return web.json_response({name: spec.object_info(spec.choices(ctx) if spec.choices else None)
                                  for name, spec in self.fake.specs.items()})

    async def object_info_one(self, request: web.Request) -> web.Response:
        spec = self.fake.specs.get(request.match_info["node_class"])
        if spec is None:
            return web.json_response({})
        return web.json_response({spec.name: spec.object_info(spec.choices(self.context()) if spec.choices else None)})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.fake.behaviour.models))

    async def models_folder(self, request: web.Request) -> web.Response:
        names = self.fake.behaviour.models.get(request.match_info["folder"])
        return empty(404) if names is None else web.json_response(names)

    async def embeddings(self, request: web.Request) -> web.Response:
        return web.json_response([n.rsplit(".", 1)[0] for n in self.fake.behaviour.models.get("embeddings", [])])

    async def free(self, request: web.Request) -> web.Response:
        body = await _json_body(request) or {}
        self.fake.frees.append(body)
        if body.get("free_memory") or body.get("unload_models"):
            self.fake.engine.cache.clear()
        return empty()


def new_item(fake: FakeComfyUI, body: dict[str, Any], outputs: list[str]) -> tuple[QueueItem, Submitted]:
    """The queue item for an accepted prompt, and its record in fake.prompts."""
    extra = dict(body.get("extra_data") or {})
    if "client_id" in body:
        extra["client_id"] = body["client_id"]
    prompt_id = str(body["prompt_id"]) if body.get("prompt_id") is not None else str(uuid.uuid4())
    number = fake.engine.next_number(body)
    item = QueueItem(number, prompt_id, body["prompt"], extra, outputs, 0)
    client = body.get("client_id")
    record = Submitted(prompt_id, number, None if client is None else str(client), body["prompt"], extra, outputs, body)
    return item, record
