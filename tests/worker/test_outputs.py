"""Outputs: inline when small, otherwise stored (local, http-put), and never base64 in Redis."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from connectors import hookimpl
from connectors.base import Output
from connectors.stores import OutputStore, Stored, StoreError, Upload, builtin, prefix_of
from connectors.stores.http_put import HttpPutSettings, HttpPutStore
from connectors.testing import make_job
from tests.conftest import WorkerFactory, wait_until
from tests.fakes.presigned import PresignedServer
from worker.client import Client
from worker.errors import ConfigError, PermanentJobError
from worker.keys import Keys
from worker.outputs import OutputPlacer, _fill, extract_embedded, sniff
from worker.settings import load_settings

MB5 = 5_000_000
RECORD_LIMIT = 16 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + bytes(2000)


@pytest.mark.parametrize(("head", "expected"), [
    (b"\x89PNG\r\n\x1a\n....", "image/png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
    (b"GIF89a", "image/gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"\x00\x00\x00\x18ftypmp42", "video/mp4"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav"),
    (b"hello world", None),
    (b"", None),
])
def test_media_is_recognised_by_its_first_bytes(head: bytes, expected: str | None) -> None:
    assert sniff(head) == expected


def test_large_base64_in_a_result_becomes_an_output() -> None:
    as_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    bare = base64.b64encode(PNG).decode()
    found: list[Output] = []
    result = extract_embedded({"images": [bare], "preview": as_uri, "seed": 1, "note": "short text",
                               "word": "A" * 10}, found)
    assert _fill(result, ["u0", "u1"]) == {"images": ["u0"], "preview": "u1", "seed": 1, "note": "short text",
                                           "word": "A" * 10}
    assert [(o.name, o.content_type, o.data) for o in found] == [
        ("result.images.0.png", "image/png", PNG), ("result.preview.png", "image/png", PNG)]


def test_text_and_base64_that_is_no_file_stay() -> None:
    found: list[Output] = []
    text = "this is a long sentence, not base64. " * 100
    digest = "0123456789abcdef" * 256  # valid base64 too, but no media file
    assert extract_embedded({"log": text, "digest": digest}, found) == {"log": text, "digest": digest}
    assert found == []


def test_every_embedded_file_leaves_the_result_or_the_job_fails() -> None:
    zipped = b"PK\x03\x04" + bytes(range(256)) * 400  # 100 KB, no media type, over the inline limit
    found: list[Output] = []
    result = extract_embedded({"safe": base64.urlsafe_b64encode(PNG * 3 + b"\xfb\xff").decode(),
                               "typed": "data:;base64," + base64.b64encode(b"plain bytes").decode(),
                               "archive": base64.b64encode(zipped).decode()}, found, large_bytes=64 * 1024)
    assert _fill(result, ["a", "b", "c"]) == {"safe": "a", "typed": "b", "archive": "c"}
    assert [o.content_type for o in found] == ["image/png", "application/octet-stream", "application/octet-stream"]
    with pytest.raises(PermanentJobError, match="more than 32 files"):
        extract_embedded({"images": [base64.b64encode(PNG).decode()] * 33}, [])


def test_a_result_that_looks_like_a_placeholder_or_nests_deep_is_handled() -> None:
    lookalike = {"data": {"$output": 0}, "flag": {"$output": True}}
    assert _fill(extract_embedded(lookalike, []), []) == lookalike  # a value of the result, kept as it is
    deep: Any = "leaf"
    for _ in range(600):
        deep = [deep]
    with pytest.raises(PermanentJobError, match="deeper than 64 levels"):
        extract_embedded({"answer": deep}, [])


@pytest.mark.parametrize(("ctx", "expected"), [
    ({}, ""),
    ({"prefix": "renders/2026"}, "renders/2026/"),
    ({"prefix": "/a//b/"}, "a/b/"),
    ({"storage": {"prefix": "x"}}, "x/"),
    ({"prefix": "../escape"}, None),
    ({"prefix": "a/../b"}, None),
    ({"prefix": "a/%2e%2e"}, None),
    ({"prefix": "a\\b"}, None),
    ({"prefix": ["a"]}, None),
])
def test_a_jobs_prefix_is_checked(ctx: dict[str, Any], expected: str | None) -> None:
    if expected is None:
        with pytest.raises(StoreError) as caught:
            prefix_of(ctx)
        assert not caught.value.retryable
    else:
        assert prefix_of(ctx) == expected


@pytest.mark.parametrize(("url", "problem"), [
    ("https://uploads.example/b/k?sig=1", ""),
    ("http://127.0.0.1:9000/b/k", ""),
    ("https://evil.example/b/k", "not allowed"),
    ("https://uploads.example:8443/b/k", "not allowed"),
    ("https://user:pw@uploads.example/b/k", "user:password@"),
    ("file:///etc/passwd", "http:// or https://"),
    ("http://[::1]:9000/b/k", "not allowed"),
    ("http://[::1]:9001/b/k", ""),
    ("http://2130706433/b/k", "not allowed"),
])
async def test_http_put_reaches_only_the_hosts_the_operator_lists(url: str, problem: str) -> None:
    store = HttpPutStore(HttpPutSettings(hosts="uploads.example, 127.0.0.1:9000, [::1]:9001"))
    upload = Upload(make_job("x", ctx={"storage": {"provider": "http-put", "urls": [url]}}), 0,
                    Output("a.png", "image/png", b"x"), "j/000-a.png", 1)
    try:
        if problem:
            with pytest.raises(StoreError, match=problem) as caught:
                store.target(upload)
            assert not caught.value.retryable and "sig=" not in str(caught.value)
        else:
            target, public = store.target(upload)
            assert str(target) == url and "sig" not in public
    finally:
        await store.close()


@pytest.fixture
async def presigned() -> AsyncIterator[PresignedServer]:
    async with PresignedServer() as server:
        yield server


async def _collect(redis: aioredis.Redis, channel: str, into: list[str], ready: asyncio.Event) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    ready.set()
    try:
        async for message in pubsub.listen():
            if message["type"] == "message":
                into.append(message["data"] if isinstance(message["data"], str) else message["data"].decode())
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _final(client: Client, job_id: str) -> dict[str, str]:
    await wait_until(lambda: _status(client, job_id, "completed", "failed"), within_s=60)
    return await client.get(job_id)


async def _status(client: Client, job_id: str, *wanted: str) -> bool:
    return (await client.get(job_id)).get("status") in wanted


async def _stream_bytes(redis: aioredis.Redis, keys: Keys, job_id: str) -> int:
    entries = await redis.xrange(keys.progress_stream(job_id))
    return sum(len(json.dumps(fields)) for _, fields in entries)


async def test_five_megabyte_outputs_are_stored_and_redis_stays_small(
    client: Client, redis: aioredis.Redis, keys: Keys, start_worker: WorkerFactory, presigned: PresignedServer,
    output_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMP_HTTP_PUT_HOSTS", presigned.url.removeprefix("http://"))
    completions: list[str] = []
    ready = asyncio.Event()
    listener = asyncio.create_task(_collect(redis, keys.ch_complete, completions, ready))
    await ready.wait()
    await start_worker("outputs", connectors="simulation")
    outputs = [{"bytes": MB5, "content_type": "image/png"}]
    key = "put-job/000-output-0.png"
    put_id = await client.submit("simulation", {"duration_s": 0, "steps": 2, "outputs": outputs}, job_id="put-job",
                                 ctx={"storage": {"provider": "http-put", "urls": [presigned.url_for(key)]}})
    local_id = await client.submit("simulation", {"duration_s": 0, "steps": 2, "outputs": outputs},
                                   job_id="local-job", ctx={"prefix": "renders"})
    put_job, local_job = await _final(client, put_id), await _final(client, local_id)
    await wait_until(lambda: len(completions) >= 2, within_s=10)
    listener.cancel()

    assert put_job["status"] == local_job["status"] == "completed", (put_job.get("error"), local_job.get("error"))
    stored = presigned.objects[key]
    assert len(stored) == MB5 and stored.startswith(b"\x89PNG") and presigned.content_types[key] == "image/png"
    put_result = json.loads(put_job["result"])
    assert put_result["outputs"] == [{"name": "output-0.png", "size_bytes": MB5, "content_type": "image/png",
                                      "url": f"{presigned.url}/outputs/{key}"}]
    assert put_result["image_url"] == f"{presigned.url}/outputs/{key}" and put_result["mime_type"] == "image/png"
    assert put_result["output_files"] == [{"filename": "output-0.png", "url": f"{presigned.url}/outputs/{key}",
                                           "mime_type": "image/png", "filesize": MB5}]
    local_file = output_dir / "renders" / "local-job" / "000-output-0.png"
    assert local_file.stat().st_size == MB5 and local_file.stat().st_mode & 0o777 == 0o644  # readable when served
    assert json.loads(local_job["result"])["outputs"][0]["url"] == local_file.resolve().as_uri()
    for job_id, record in ((put_id, put_job), (local_id, local_job)):
        assert sum(len(k) + len(v) for k, v in record.items()) < RECORD_LIMIT
        assert await _stream_bytes(redis, keys, job_id) < RECORD_LIMIT
    assert all(len(message) < RECORD_LIMIT for message in completions)
    assert {json.loads(m)["job_id"] for m in completions} == {put_id, local_id}


async def test_a_retried_job_leaves_one_object_per_output(
    client: Client, start_worker: WorkerFactory, presigned: PresignedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMP_HTTP_PUT_HOSTS", presigned.url.removeprefix("http://"))
    await start_worker("retry-outputs", connectors="simulation")
    # the first attempt stores output 0, then output 1 fails every try: the job is retried
    presigned.fail_next("again/001-output-1.png", 503, 503, 503)
    urls = [presigned.url_for(f"again/00{i}-output-{i}.png") for i in range(2)]
    job_id = await client.submit(
        "simulation", {"duration_s": 0, "steps": 1, "outputs": [{"bytes": 300_000, "content_type": "image/png"}] * 2},
        job_id="again", ctx={"storage": {"provider": "http-put", "urls": urls}})
    job = await _final(client, job_id)
    assert job["status"] == "completed" and job["retry_count"] == "1", job.get("error")
    assert sorted(k for k in presigned.objects if k.startswith("again/")) == [
        "again/000-output-0.png", "again/001-output-1.png"]
    assert presigned.puts["again/000-output-0.png"] == 2  # the retry overwrote attempt 1's object
    assert presigned.puts["again/001-output-1.png"] == 4  # three failed tries, then the retry's


async def test_an_upload_to_a_host_the_operator_did_not_list_fails_permanently(
    client: Client, start_worker: WorkerFactory, presigned: PresignedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMP_HTTP_PUT_HOSTS", "uploads.example")
    await start_worker("ssrf-outputs", connectors="simulation")
    job_id = await client.submit(
        "simulation", {"duration_s": 0, "steps": 1, "outputs": [{"bytes": 10, "content_type": "image/png"}]},
        ctx={"storage": {"provider": "http-put", "urls": [presigned.url_for("x")]}})
    job = await _final(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == "1"
    assert "EMP_HTTP_PUT_HOSTS does not list it" in job["error"] and "sig=" not in job["error"]
    assert presigned.puts == {}


async def test_a_small_image_is_never_inlined(client: Client, start_worker: WorkerFactory, output_dir: Path) -> None:
    await start_worker("small-image", connectors="simulation")
    job_id = await client.submit(
        "simulation", {"duration_s": 0, "steps": 1, "outputs": [
            {"bytes": 100, "content_type": "image/png"},
            {"bytes": 100, "content_type": "application/octet-stream", "name": "raw.bin"},
            {"bytes": 50, "content_type": "text/plain", "name": "note.txt"}]}, job_id="small-image")
    job = await _final(client, job_id)
    image, raw, note = json.loads(job["result"])["outputs"]
    assert image["url"].endswith("small-image/000-output-0.png") and "data_base64" not in image
    assert "data_base64" in raw and "url" not in raw  # small and not media: inline
    assert "text" in note and (output_dir / "small-image" / "000-output-0.png").stat().st_size == 100


class MemoryStore(OutputStore):
    """A plugin's store: keeps objects in memory and fails the way a broken store would."""

    name = "memory"
    objects: ClassVar[dict[str, bytes]] = {}

    def secrets(self) -> Sequence[str]:
        return ["hunter2"]

    async def put(self, upload: Upload) -> Stored:
        if upload.storage.get("break") == "short":
            return Stored("mem://short", upload.size_bytes - 1)
        if upload.storage.get("break") == "hang":
            await asyncio.Event().wait()  # a store that never answers
        if upload.storage.get("break") == "raise":
            raise StoreError("connection to memory://admin:hunter2@store reset")
        data = b"".join([chunk async for chunk in upload.chunks(4096)])
        MemoryStore.objects[upload.key] = data
        return Stored(f"mem://{upload.key}", len(data), {"etag": "e1"})


class StorePlugin:
    @hookimpl
    def emp_output_stores(self) -> list[type[OutputStore]]:
        return [MemoryStore]


async def test_a_plugin_store_is_chosen_by_the_jobs_provider_and_its_failures_are_clear(
    client: Client, start_worker: WorkerFactory,
) -> None:
    await start_worker("plugin-store", connectors="simulation", plugins=[StorePlugin()], output_stores="local,memory")
    outputs = [{"bytes": 200_000, "content_type": "video/mp4", "name": "clip.mp4"}]
    ok = await client.submit("simulation", {"duration_s": 0, "steps": 1, "outputs": outputs}, job_id="mem-ok",
                             ctx={"storage": {"provider": "memory"}})
    short = await client.submit("simulation", {"duration_s": 0, "steps": 1, "outputs": outputs}, max_retries=1,
                                ctx={"storage": {"provider": "memory", "break": "short"}})
    broken = await client.submit("simulation", {"duration_s": 0, "steps": 1, "outputs": outputs}, max_retries=1,
                                 ctx={"storage": {"provider": "memory", "break": "raise"}})
    ok_job, short_job, broken_job = [await _final(client, j) for j in (ok, short, broken)]
    assert ok_job["status"] == "completed", ok_job.get("error")
    assert json.loads(ok_job["result"])["outputs"] == [{"name": "clip.mp4", "size_bytes": 200_000,
                                                        "content_type": "video/mp4", "url": "mem://mem-ok/000-clip.mp4",
                                                        "etag": "e1"}]
    assert len(MemoryStore.objects["mem-ok/000-clip.mp4"]) == 200_000
    assert short_job["status"] == "failed" and "holds 199999 of its 200000 bytes" in short_job["error"]
    assert broken_job["status"] == "failed" and "memory store failed 3 times" in broken_job["error"]
    assert "hunter2" not in broken_job["error"] and "***" in broken_job["error"]


async def test_a_job_may_pick_only_the_stores_the_operator_allows(
    client: Client, start_worker: WorkerFactory, output_dir: Path,
) -> None:
    await start_worker("allow-list", connectors="simulation", plugins=[StorePlugin()])  # default: local, http-put
    job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1,
                                                "outputs": [{"bytes": 10, "content_type": "image/png"}]},
                                 ctx={"storage": {"provider": "memory"}})
    job = await _final(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == "1"
    assert "'memory' is not allowed on this worker: it takes local, http-put (EMP_OUTPUT_STORES)" in job["error"]


async def test_an_upload_that_never_ends_is_cut_at_its_deadline(client: Client, start_worker: WorkerFactory) -> None:
    await start_worker("hang-store", connectors="simulation", plugins=[StorePlugin()], output_stores="memory",
                       output_upload_timeout_s=0.2)
    job_id = await client.submit("simulation", {"duration_s": 0, "steps": 1, "outputs": [
        {"bytes": 10, "content_type": "image/png"}]}, max_retries=1, ctx={"storage": {"provider": "memory",
                                                                                       "break": "hang"}})
    job = await _final(client, job_id)
    assert job["status"] == "failed" and "took over 0.2s (EMP_OUTPUT_UPLOAD_TIMEOUT_S)" in job["error"]


def test_a_bad_upload_host_list_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_HTTP_PUT_HOSTS", "uploads.example:abc")
    placer = OutputPlacer(load_settings(), builtin.by_name())
    with pytest.raises(ConfigError, match=r"EMP_HTTP_PUT_HOSTS='uploads\.example:abc'"):
        placer.check()
