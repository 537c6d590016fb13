"""The ``s3`` and ``azure`` output stores against real servers of those protocols, started here:
moto's S3 server and Azure's own emulator, Azurite (skipped, with the reason, where not installed).

Each store: a 5 MB simulation output end to end through a real worker (streamed in parts/blocks),
its bytes read back from the server, the URL in the result; a retried job overwriting its objects;
a bucket the operator did not allow refused permanently; bad credentials failing the job with a
message that does not show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import WorkerFactory, wait_until
from worker.client import Client

MB5 = 5_000_000
PNG = b"\x89PNG\r\n\x1a\n"
S3_SECRET = "s3-secret-Xq7vW2pLk9"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # emulator's
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="
ROOT = Path(__file__).resolve().parents[2]
AZURITE_HINT = "azurite not installed: npm install --prefix .ci/node azurite"
HAS_MOTO = all(importlib.util.find_spec(m) for m in ("moto", "boto3", "flask"))
HAS_AZURE_SDK = importlib.util.find_spec("azure.storage.blob") is not None


# --- the servers -------------------------------------------------------------------------------

def _listening(log: Path, pattern: str, proc: subprocess.Popen[bytes], name: str, within_s: float) -> str:
    """The URL a server prints once it listens (read from its log, with a deadline)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)  # polling the log for the server's own "listening" line
    raise RuntimeError(f"{name} did not start within {within_s}s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def _server(args: list[str], workdir: Path, pattern: str) -> Iterator[str]:
    log = workdir / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        yield _listening(log, pattern, proc, Path(args[0]).name, within_s=60)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server (a real HTTP server) in its own process, on a free port."""
    if not HAS_MOTO:
        pytest.skip("moto not installed: pip install 'moto[server]' boto3")
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
    with _server(args, tmp_path_factory.mktemp("moto"), r"Running on (http://127\.0\.0\.1:\d+)") as url:
        yield url


def _azurite_binary() -> str | None:
    local = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


@pytest.fixture(scope="session")
def azurite_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service on a free port, its data in a temporary folder."""
    binary = _azurite_binary()
    if binary is None:
        pytest.skip(AZURITE_HINT)
    if not HAS_AZURE_SDK:
        pytest.skip("azure-storage-blob not installed: pip install 'emp-worker[azure]'")
    data = tmp_path_factory.mktemp("azurite")
    args = [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(data), "--silent", "--loose",
            "--skipApiVersionCheck", "--disableTelemetry"]
    with _server(args, data, r"listens on (http://127\.0\.0\.1:\d+)") as url:
        yield url


def _connection_string(blob_url: str, key: str = AZURITE_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={blob_url}/{AZURITE_ACCOUNT};")


class FlakyProxy:
    """A reverse proxy in front of a real storage server: it answers 503 to the next PUTs of a
    path it was told to fail, and forwards everything else as it came (recording PUT bodies)."""

    _DROPPED: ClassVar[set[str]] = {"content-length", "transfer-encoding", "connection", "expect", "keep-alive"}

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.failing: Counter[str] = Counter()
        self.bodies: dict[str, list[bytes]] = {}
        self.url = ""

    def fail_next(self, suffix: str, times: int) -> None:
        self.failing[suffix] += times

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.raw_path.split("?")[0]
        if request.method == "PUT":
            for suffix in self.failing:
                if path.endswith(suffix):
                    self.bodies.setdefault(suffix, []).append(body)
                    if self.failing[suffix] > 0:
                        self.failing[suffix] -= 1
                        return web.Response(status=503, text="injected failure")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._DROPPED}
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(request.method, url, headers=headers, data=body or None,
                                         skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),
                                         allow_redirects=False) as answer:
            data = await answer.read()
            head = request.method == "HEAD"  # its Content-Length is the object's size: kept
            out = {k: v for k, v in answer.headers.items()
                   if k.lower() not in self._DROPPED or (head and k.lower() == "content-length")}
            return web.Response(status=answer.status, body=None if head else data, headers=out)

    async def __aenter__(self) -> FlakyProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()


# --- helpers -------------------------------------------------------------------------------------

def _name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


async def _final(client: Client, job_id: str, within_s: float = 60) -> dict[str, str]:
    async def done() -> bool:
        return (await client.get(job_id)).get("status") in ("completed", "failed")
    await wait_until(done, within_s=within_s)
    return await client.get(job_id)


def _outputs(*sizes: int) -> dict[str, Any]:
    return {"duration_s": 0, "steps": 1, "outputs": [{"bytes": n, "content_type": "image/png"} for n in sizes]}


def _check_big_png(data: bytes) -> None:
    assert len(data) == MB5 and data.startswith(PNG) and data[8:] != bytes(MB5 - 8)


# --- S3 ----------------------------------------------------------------------------------------------

@dataclass
class S3View:
    """The test's own view of the moto server: a boto3 client and the bucket the worker is given."""

    client: Any
    bucket: str

    def keys(self, bucket: str | None = None) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=bucket or self.bucket).get("Contents", [])
        return sorted(item["Key"] for item in listed)

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())


@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3View]:
    """A fresh bucket on the moto server, and the worker's env pointing at it."""
    import boto3

    for isolate in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(isolate, os.devnull)
    bucket = _name("out")
    monkeypatch.setenv("EMP_OUTPUT_STORE", "s3")
    env = {"BUCKET": bucket, "ENDPOINT_URL": moto_url, "REGION": "us-east-1", "ACCESS_KEY_ID": "AKIATESTWORKER",
           "SECRET_ACCESS_KEY": S3_SECRET}
    for name, value in env.items():
        monkeypatch.setenv(f"EMP_S3_{name}", value)
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    yield S3View(client, bucket)
    client.close()


async def test_s3_five_megabytes_streamed_in_parts_end_to_end(
    s3: S3View, moto_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMP_S3_MULTIPART_THRESHOLD_MB", "1")  # 5 MB goes up as a multipart upload
    await start_worker("s3-worker", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(MB5), job_id=_name("job"), ctx={"prefix": "renders"})
    job = await _final(client, job_id)
    assert job["status"] == "completed", job.get("error")

    key = f"renders/{job_id}/000-output-0.png"
    stored = s3.client.get_object(Bucket=s3.bucket, Key=key)
    _check_big_png(stored["Body"].read())
    assert stored["ContentType"] == "image/png" and stored["ETag"].endswith('-1"')  # a multipart upload
    result = json.loads(job["result"])
    url = f"{moto_url}/{s3.bucket}/{key}"
    assert result["outputs"] == [{"name": "output-0.png", "size_bytes": MB5, "content_type": "image/png", "url": url}]
    assert result["image_url"] == url and "data_base64" not in job["result"]


async def test_s3_a_job_names_an_allowed_bucket_and_its_cdn(
    s3: S3View, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = _name("other")
    s3.client.create_bucket(Bucket=other)
    monkeypatch.setenv("EMP_S3_ALLOWED_BUCKETS", f"unrelated, {other}")
    await start_worker("s3-cdn", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(100_000), job_id=_name("job"), ctx={
        "storage": {"provider": "aws", "bucket": other, "cdnUrl": "cdn.example.com"}, "prefix": "path/"})
    job = await _final(client, job_id)
    assert job["status"] == "completed", job.get("error")
    key = f"path/{job_id}/000-output-0.png"
    assert s3.keys(other) == [key] and s3.keys() == []
    assert json.loads(job["result"])["outputs"][0]["url"] == f"https://cdn.example.com/{key}"


async def test_s3_a_retried_job_overwrites_its_objects(
    s3: S3View, moto_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with FlakyProxy(moto_url) as proxy:
        monkeypatch.setenv("EMP_S3_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("EMP_S3_MAX_ATTEMPTS", "1")  # one request per put try: the proxy counts them
        monkeypatch.setenv("EMP_S3_PUBLIC_BASE_URL", "https://files.example")
        job_id = _name("again")
        proxy.fail_next(f"{job_id}/000-output-0.png", 0)  # recorded, never failed
        proxy.fail_next(f"{job_id}/001-output-1.png", 3)  # attempt 1: output 1 fails every try
        await start_worker("s3-retry", connectors="simulation")
        await client.submit("simulation", _outputs(300_000, 300_000), job_id=job_id)
        job = await _final(client, job_id)
    assert job["status"] == "completed" and job["retry_count"] == "1", job.get("error")
    assert s3.keys() == [f"{job_id}/000-output-0.png", f"{job_id}/001-output-1.png"]
    first, second = proxy.bodies[f"{job_id}/000-output-0.png"]
    assert first != second  # each attempt wrote output 0 once, to the same object: the retry's bytes stay
    assert s3.read(f"{job_id}/000-output-0.png") == second
    assert json.loads(job["result"])["outputs"][1]["url"] == f"https://files.example/{job_id}/001-output-1.png"


async def test_s3_a_bucket_the_operator_did_not_allow_is_refused(
    s3: S3View, client: Client, start_worker: WorkerFactory,
) -> None:
    elsewhere = _name("elsewhere")
    s3.client.create_bucket(Bucket=elsewhere)
    await start_worker("s3-refuse", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(10), ctx={"storage": {"provider": "s3", "bucket": elsewhere}})
    job = await _final(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == "1"  # permanent: not retried
    assert "EMP_S3_ALLOWED_BUCKETS" in job["error"] and s3.keys(elsewhere) == []


async def test_s3_bad_credentials_fail_the_job_without_showing_them(
    s3: S3View, moto_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    user = _name("worker")
    iam.create_user(UserName=user)
    key_id = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]  # its real secret is not used
    iam.close()
    monkeypatch.setenv("EMP_S3_ACCESS_KEY_ID", key_id)
    async with aiohttp.ClientSession() as http:
        await (await http.post(f"{moto_url}/moto-api/reset-auth", data=b"0")).read()  # moto now checks signatures
        try:
            await start_worker("s3-badkey", connectors="simulation")
            job_id = await client.submit("simulation", _outputs(10), max_retries=0)
            job = await _final(client, job_id)
        finally:
            await (await http.post(f"{moto_url}/moto-api/reset-auth", data=b"inf")).read()
    assert job["status"] == "failed" and "SignatureDoesNotMatch" in job["error"], job.get("error")
    assert "EMP_S3_SECRET_ACCESS_KEY" in job["error"]
    assert S3_SECRET not in job["error"] and key_id not in job["error"] and s3.keys() == []


# --- Azure ----------------------------------------------------------------------------------------

@pytest.fixture
def azure(azurite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A container client of Azurite (the test's own view), and the worker's env."""
    from azure.storage.blob import BlobServiceClient

    container = _name("out")
    monkeypatch.setenv("EMP_OUTPUT_STORE", "azure")
    monkeypatch.setenv("EMP_AZURE_CONNECTION_STRING", _connection_string(azurite_url))
    monkeypatch.setenv("EMP_AZURE_CONTAINER", container)
    service = BlobServiceClient.from_connection_string(_connection_string(azurite_url))
    service.create_container(container)
    yield service.get_container_client(container)
    service.close()


def _blobs(container: Any) -> list[str]:
    return sorted(blob.name for blob in container.list_blobs())


async def test_azure_five_megabytes_streamed_in_blocks_end_to_end(
    azure: Any, azurite_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMP_AZURE_SINGLE_PUT_MB", "1")
    monkeypatch.setenv("EMP_AZURE_BLOCK_MB", "1")
    await start_worker("azure-worker", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(MB5), job_id=_name("job"), ctx={"prefix": "renders"})
    job = await _final(client, job_id)
    assert job["status"] == "completed", job.get("error")

    key = f"renders/{job_id}/000-output-0.png"
    blob = azure.get_blob_client(key)
    _check_big_png(blob.download_blob().readall())
    assert blob.get_blob_properties().content_settings.content_type == "image/png"
    assert len(blob.get_block_list("committed")[0]) == 5  # streamed as 1 MiB blocks
    url = f"{azurite_url}/{AZURITE_ACCOUNT}/{azure.container_name}/{key}"
    assert json.loads(job["result"])["outputs"] == [
        {"name": "output-0.png", "size_bytes": MB5, "content_type": "image/png", "url": url}]


async def test_azure_takes_emp_job_queue_storage_ctx(
    azure: Any, azurite_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from azure.storage.blob import ContainerClient

    other = _name("other")
    monkeypatch.setenv("EMP_AZURE_ALLOWED_CONTAINERS", other)
    with ContainerClient.from_connection_string(_connection_string(azurite_url), other) as container:
        container.create_container()
        await start_worker("azure-ctx", connectors="simulation")
        job_id = await client.submit("simulation", _outputs(100_000), job_id=_name("job"), ctx={
            "storage": {"provider": "azure", "bucket": other, "cdnUrl": "https://cdn.example.com"},
            "prefix": "path/", "filename": "ignored.png"})
        job = await _final(client, job_id)
        assert job["status"] == "completed", job.get("error")
        key = f"path/{job_id}/000-output-0.png"
        assert _blobs(container) == [key] and _blobs(azure) == []
    assert json.loads(job["result"])["image_url"] == f"https://cdn.example.com/{key}"


async def test_azure_a_retried_job_overwrites_its_blobs(
    azure: Any, azurite_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with FlakyProxy(azurite_url) as proxy:
        monkeypatch.setenv("EMP_AZURE_CONNECTION_STRING", _connection_string(proxy.url))
        monkeypatch.setenv("EMP_AZURE_RETRIES", "0")  # one request per put try: the proxy counts them
        job_id = _name("again")
        proxy.fail_next(f"{job_id}/000-output-0.png", 0)
        proxy.fail_next(f"{job_id}/001-output-1.png", 3)
        await start_worker("azure-retry", connectors="simulation")
        await client.submit("simulation", _outputs(300_000, 300_000), job_id=job_id)
        job = await _final(client, job_id)
    assert job["status"] == "completed" and job["retry_count"] == "1", job.get("error")
    assert _blobs(azure) == [f"{job_id}/000-output-0.png", f"{job_id}/001-output-1.png"]
    first, second = proxy.bodies[f"{job_id}/000-output-0.png"]
    assert first != second
    assert azure.get_blob_client(f"{job_id}/000-output-0.png").download_blob().readall() == second


async def test_azure_a_container_the_operator_did_not_allow_is_refused(
    azure: Any, client: Client, start_worker: WorkerFactory,
) -> None:
    await start_worker("azure-refuse", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(10), ctx={"storage": {"provider": "azure-blob",
                                                                              "bucket": "someone-elses"}})
    job = await _final(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == "1"
    assert "EMP_AZURE_ALLOWED_CONTAINERS" in job["error"] and _blobs(azure) == []


async def test_azure_bad_credentials_fail_the_job_without_showing_them(
    azure: Any, azurite_url: str, client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMP_AZURE_CONNECTION_STRING", _connection_string(azurite_url, WRONG_KEY))
    await start_worker("azure-badkey", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(10), max_retries=0)
    job = await _final(client, job_id)
    assert job["status"] == "failed" and "403 AuthorizationFailure: Server failed to authenticate" in job["error"], job
    assert WRONG_KEY not in job["error"] and "AccountKey" not in job["error"] and _blobs(azure) == []


# --- configuration, through a real process ----------------------------------------------------------

async def _run_worker(tmp_path: Path, *, block_libraries: bool, **env: str) -> tuple[int, str]:
    """`emp-worker run` in a child process (start-up stops before Redis is reached)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(exist_ok=True)
    for module in ("boto3", "azure") if block_libraries else ():  # the child's import fails, as if not installed
        (blocked / f"{module}.py").write_text("raise ImportError('not installed (test)')\n")
    child_env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "REDIS_URL": "redis://127.0.0.1:1/0",
                 **env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=child_env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(("store", "expected"), [
    ("s3", "EMP_OUTPUT_STORE=s3 needs boto3: pip install 'emp-worker[s3]'"),
    ("azure", "EMP_OUTPUT_STORE=azure needs azure-storage-blob: pip install 'emp-worker[azure]'"),
])
async def test_a_store_whose_library_is_missing_stops_start_up_with_one_line(
    tmp_path: Path, store: str, expected: str,
) -> None:
    code, err = await _run_worker(tmp_path, block_libraries=True, EMP_OUTPUT_STORE=store)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


@pytest.mark.skipif(not HAS_MOTO, reason="boto3 not installed: pip install 'emp-worker[s3]'")
async def test_s3_without_a_bucket_stops_start_up_with_one_line(tmp_path: Path) -> None:
    code, err = await _run_worker(tmp_path, block_libraries=False, EMP_OUTPUT_STORE="s3",
                                  EMP_S3_SECRET_ACCESS_KEY=S3_SECRET)
    assert code == 2 and "EMP_S3_BUCKET is not set" in err and S3_SECRET not in err, err
