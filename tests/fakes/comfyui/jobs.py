"""Newer servers' /api/jobs routes (COMFYUI.md §1.6), served only when Behaviour.jobs_api is on (404 otherwise).

§1.6 was read from newer source, not captured: it gives the routes, the 404 body and `{"cancelled": bool}`.
The job object below (`id`, `status`, `priority`, `outputs`, `error`) and the list's `pagination` are this
fake's reading of it; a connector should rely only on `status` and `cancelled`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from tests.fakes.comfyui.server import FakeComfyUI

STATUSES = ("pending", "in_progress", "completed", "failed")


class Jobs:
    def __init__(self, fake: FakeComfyUI) -> None:
        self.fake = fake

    def _jobs(self) -> list[dict[str, Any]]:
        engine = self.fake.engine
        jobs: list[dict[str, Any]] = []
        for prompt_id, entry in engine.history.items():
            status = entry["status"]
            failed = status["status_str"] != "success"
            final = status["messages"][-1] if status["messages"] else ["", {}]
            jobs.append({"id": prompt_id, "status": "failed" if failed else "completed", "priority": entry["prompt"][0],
                         "outputs": entry["outputs"], "error": final[1] if failed else None})
        if engine.running is not None:
            jobs.append({"id": engine.running.prompt_id, "status": "in_progress", "priority": engine.running.number,
                         "outputs": {}, "error": None})
        jobs.extend({"id": item.prompt_id, "status": "pending", "priority": item.number, "outputs": {}, "error": None}
                    for item in engine.pending_items())
        return jobs

    def _find(self, job_id: str) -> dict[str, Any] | None:
        return next((job for job in self._jobs() if job["id"] == job_id), None)

    def cancel(self, job_id: str) -> bool:
        """Atomic and idempotent: a pending job is removed, a running one interrupted; a finished one is not."""
        engine = self.fake.engine
        if engine.running is not None and engine.running.prompt_id == job_id:
            return engine.interrupt(job_id)
        if any(item.prompt_id == job_id for item in engine.pending_items()):
            engine.delete([job_id])
            return True
        return False

    async def list_jobs(self, request: web.Request) -> web.Response:
        if not self.fake.behaviour.jobs_api:
            raise web.HTTPNotFound()
        jobs = self._jobs()
        wanted = request.query.get("status")
        if wanted:
            jobs = [job for job in jobs if job["status"] in wanted.split(",")]
        offset, limit = int(request.query.get("offset", 0)), int(request.query.get("limit", 100))
        page = jobs[offset:offset + limit]
        return web.json_response({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": len(jobs),
                                                               "has_more": offset + len(page) < len(jobs)}})

    async def get_job(self, request: web.Request) -> web.Response:
        if not self.fake.behaviour.jobs_api:
            raise web.HTTPNotFound()
        job = self._find(request.match_info["job_id"])
        return web.json_response(job) if job else web.json_response({"error": "Job not found"}, status=404)

    async def cancel_one(self, request: web.Request) -> web.Response:
        if not self.fake.behaviour.jobs_api:
            raise web.HTTPNotFound()
        job_id = request.match_info["job_id"]
        self.fake.cancels.append(job_id)
        return web.json_response({"cancelled": self.cancel(job_id)})

    async def cancel_many(self, request: web.Request) -> web.Response:
        if not self.fake.behaviour.jobs_api:
            raise web.HTTPNotFound()
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return web.json_response({"error": "Invalid JSON"}, status=400)
        ids = [str(i) for i in body.get("job_ids") or []]
        self.fake.cancels.extend(ids)
        return web.json_response({"cancelled": [job_id for job_id in ids if self.cancel(job_id)]})
