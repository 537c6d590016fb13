"""The decisions of the cloud output stores as tables (which bucket, which CDN URL, which errors are
retried, which values are secrets), and their start-up checks through a real process."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from connectors.stores import StoreError
from connectors.stores.azure import AzureSettings, AzureStore, account_name_of
from connectors.stores.azure import verdict as azure_verdict
from connectors.stores.cloud import cdn_base, chosen_bucket, redacted
from connectors.stores.s3 import verdict as s3_verdict
from tests.fakes.storage import AZURITE_KEY, ROOT

S3_SECRET = "s3-secret-Xq7vW2pLk9"
HAS_BOTO3 = importlib.util.find_spec("boto3") is not None


@pytest.mark.parametrize(("cdn", "expected"), [
    (None, None),
    ("", None),
    ("cdn.example.com", "https://cdn.example.com"),
    ("http://cdn.example.com:8080/", "http://cdn.example.com:8080"),
    ("https://cdn.example.com/renders", "https://cdn.example.com/renders"),
    ("https://user:pw@cdn.example.com", "error"),
    ("https://cdn.example.com/?x=1", "error"),
    ("javascript:alert(1)", "error"),
    ("ftp://cdn.example.com", "error"),
    ("cdn.example.com/../x", "error"),
    ("cdn example.com", "error"),
    (["cdn.example.com"], "error"),
])
def test_a_jobs_cdn_url_is_checked(cdn: Any, expected: str | None) -> None:
    if expected == "error":
        with pytest.raises(StoreError) as caught:
            cdn_base({"cdnUrl": cdn})
        assert not caught.value.retryable
    else:
        assert cdn_base({"cdnUrl": cdn}) == expected


@pytest.mark.parametrize(("storage", "expected"), [
    ({}, "main"),
    ({"bucket": ""}, "main"),
    ({"bucket": "main"}, "main"),
    ({"bucket": "extra"}, "extra"),
    ({"container": "extra"}, "extra"),
    ({"bucket": "other"}, "error"),
    ({"bucket": "Extra"}, "error"),
    ({"bucket": "extra "}, "error"),
    ({"bucket": ["extra"]}, "error"),
    ({"bucket": "x" * 300}, "error"),
])
def test_a_job_names_only_a_bucket_the_operator_allows(storage: dict[str, Any], expected: str) -> None:
    def choose() -> str:
        return chosen_bucket(storage, ("bucket", "container"), "main", {"extra"}, ("EMP_X_BUCKET", "EMP_X_ALLOWED"))
    if expected == "error":
        with pytest.raises(StoreError, match=r"EMP_X_ALLOWED|at most") as caught:
            choose()
        assert not caught.value.retryable and "main" not in str(caught.value)
    else:
        assert choose() == expected


@pytest.mark.parametrize(("status", "code", "retryable"), [
    (503, "SlowDown", True), (500, "InternalError", True), (400, "RequestTimeout", True), (429, "?", True),
    (403, "AccessDenied", True), (403, "InvalidAccessKeyId", True), (403, "SignatureDoesNotMatch", True),
    (400, "ExpiredToken", True), (0, "?", True),
    (404, "NoSuchBucket", False), (400, "InvalidArgument", False), (400, "EntityTooLarge", False),
])
def test_which_s3_answers_are_retried(status: int, code: str, retryable: bool) -> None:
    assert s3_verdict(status, code)[1] is retryable


@pytest.mark.parametrize(("status", "code", "retryable"), [
    (503, "ServerBusy", True), (500, "OperationTimedOut", True), (412, "LeaseIdMissing", True), (429, "?", True),
    (403, "AuthenticationFailed", True), (403, "AuthorizationFailure", True), (0, "?", True),
    (404, "ContainerNotFound", False), (400, "InvalidResourceName", False), (413, "RequestBodyTooLarge", False),
    (400, "InvalidHeaderValue", False),
])
def test_which_azure_answers_are_retried(status: int, code: str, retryable: bool) -> None:
    assert azure_verdict(status, code)[1] is retryable


@pytest.mark.parametrize(("url", "account"), [
    ("https://myacct.blob.core.windows.net", "myacct"),
    ("http://127.0.0.1:10000/devstoreaccount1", "devstoreaccount1"),
    ("http://localhost:10000/devstoreaccount1/", "devstoreaccount1"),
])
def test_the_account_name_is_read_from_the_account_url(url: str, account: str) -> None:
    assert account_name_of(url) == account


def test_azure_secrets_cover_the_connection_string_and_any_sas_signature() -> None:
    sas = "sv=2024-01-01&ss=b&sig=SiGnAtUrE%2Bxyz"
    store = AzureStore(AzureSettings(connection_string=f"AccountName=a;AccountKey={AZURITE_KEY};"
                                                        f"SharedAccessSignature={sas}", container="c"))
    assert {AZURITE_KEY, sas, "SiGnAtUrE%2Bxyz"} <= set(store.secrets())
    message = f"GET https://a.blob.core.windows.net/c/k?{sas} failed (key {AZURITE_KEY})"
    assert redacted(message, store.secrets()) == "GET https://a.blob.core.windows.net/c/k?*** failed (key ***)"
    assert redacted("PUT /k?sv=1&sig=abc&se=2", ()) == "PUT /k?sv=1&sig=***&se=2"  # even a SAS not configured



# --- configuration, through a real process ----------------------------------------------------------

def _pythonpath(tmp_path: Path, *, block_libraries: bool) -> str:
    """A PYTHONPATH for a child process, in which importing boto3 or azure fails (as if not installed)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(exist_ok=True)
    for module in ("boto3", "azure") if block_libraries else ():
        (blocked / f"{module}.py").write_text("raise ImportError('not installed (test)')\n")
    return f"{blocked}{os.pathsep}{ROOT}"


async def _run_worker(tmp_path: Path, *, block_libraries: bool, **env: str) -> tuple[int, str]:
    """`emp-worker run` in a child process (start-up stops before Redis is reached)."""
    child_env = {**os.environ, "PYTHONPATH": _pythonpath(tmp_path, block_libraries=block_libraries),
                 "REDIS_URL": "redis://127.0.0.1:1/0", **env}
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


@pytest.mark.skipif(not HAS_BOTO3, reason="boto3 not installed: pip install 'emp-worker[s3]'")
async def test_s3_without_a_bucket_stops_start_up_with_one_line(tmp_path: Path) -> None:
    code, err = await _run_worker(tmp_path, block_libraries=False, EMP_OUTPUT_STORE="s3",
                                  EMP_S3_SECRET_ACCESS_KEY=S3_SECRET)
    assert code == 2 and "EMP_S3_BUCKET is not set" in err and S3_SECRET not in err, err


async def test_a_worker_without_the_libraries_still_lists_every_store(tmp_path: Path) -> None:
    listing = "import json; from connectors.manager import Plugins; print(json.dumps(list(Plugins().store_classes())))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", listing, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": _pythonpath(tmp_path, block_libraries=True)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert {"s3", "aws", "azure", "azure-blob", "local", "http-put"} <= set(json.loads(out))
