"""The ``s3`` and ``azure`` output stores against real servers of those protocols, started here:
moto's S3 server and Azure's own emulator, Azurite (skipped, with the reason, where not installed).

Each store: a 5 MB simulation output end to end through a real worker (streamed in parts/blocks),
its bytes read back from the server, the URL in the result; a job naming its bucket and CDN as
emp-job-queue's do; a retried job overwriting its objects; a bucket the operator did not allow
refused permanently; bad credentials failing the job with a message that does not show them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.conftest import WorkerFactory, wait_until
from tests.fakes.storage import (
    AZURITE_ACCOUNT,
    AZURITE_HINT,
    FlakyProxy,
    azurite_binary,
    azurite_server,
    connection_string,
    moto_server,
)
from worker.client import Client

MB5 = 5_000_000
PNG = b"\x89PNG\r\n\x1a\n"
S3_SECRET = "s3-secret-Xq7vW2pLk9"
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="
HAS_MOTO = all(importlib.util.find_spec(m) for m in ("moto", "boto3", "flask"))
HAS_AZURE_SDK = importlib.util.find_spec("azure.storage.blob") is not None


# --- the servers -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server (a real HTTP server) in its own process, on a free port."""
    if not HAS_MOTO:
        pytest.skip("moto not installed: pip install 'moto[server]' boto3")
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture(scope="session")
def azurite_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service on a free port, its data in a temporary folder."""
    binary = azurite_binary()
    if binary is None:
        pytest.skip(AZURITE_HINT)
    if not HAS_AZURE_SDK:
        pytest.skip("azure-storage-blob not installed: pip install 'emp-worker[azure]'")
    with azurite_server(binary, tmp_path_factory.mktemp("azurite")) as url:
        yield url


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
    monkeypatch.setenv("EMP_AZURE_CONNECTION_STRING", connection_string(azurite_url))
    monkeypatch.setenv("EMP_AZURE_CONTAINER", container)
    service = BlobServiceClient.from_connection_string(connection_string(azurite_url))
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
    with ContainerClient.from_connection_string(connection_string(azurite_url), other) as container:
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
        monkeypatch.setenv("EMP_AZURE_CONNECTION_STRING", connection_string(proxy.url))
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
    monkeypatch.setenv("EMP_AZURE_CONNECTION_STRING", connection_string(azurite_url, WRONG_KEY))
    await start_worker("azure-badkey", connectors="simulation")
    job_id = await client.submit("simulation", _outputs(10), max_retries=0)
    job = await _final(client, job_id)
    assert job["status"] == "failed" and "403 AuthorizationFailure: Server failed to authenticate" in job["error"], job
    assert WRONG_KEY not in job["error"] and "AccountKey" not in job["error"] and _blobs(azure) == []


@pytest.mark.skipif(not HAS_MOTO, reason="boto3 not installed: pip install 'emp-worker[s3]'")
async def test_an_s3_endpoint_that_cannot_be_reached_fails_the_job_as_retryable(
    client: Client, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for name, value in {"OUTPUT_STORE": "s3", "S3_BUCKET": "b", "S3_ENDPOINT_URL": closed, "S3_MAX_ATTEMPTS": "1",
                        "S3_ACCESS_KEY_ID": "AKIATEST", "S3_SECRET_ACCESS_KEY": S3_SECRET}.items():
        monkeypatch.setenv(f"EMP_{name}", value)
    await start_worker("s3-down", connectors="simulation")
    job = await _final(client, await client.submit("simulation", _outputs(10), max_retries=0))
    assert job["status"] == "failed" and "s3 store failed 3 times: EndpointConnectionError" in job["error"], job
    assert S3_SECRET not in job["error"]
