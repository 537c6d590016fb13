"""The REST connector against a real HTTP service on a loopback port: sync and async jobs, status
mapping with Retry-After, timeouts, outputs, cancel, and SSRF attempts that send nothing."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web

from connectors import HealthState, JobCancelled, PermanentJobError, RetryableJobError
from connectors.rest import RestConnector
from connectors.rest.engine import ServiceBusy
from connectors.testing import make_job, run_job
from tests.connectors.rest.conftest import ConnectorFactory, FakeService, services_env

pytestmark = pytest.mark.timeout(60)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def sync_env(service: FakeService, **fields: Any) -> dict[str, str]:
    return services_env(api={"base_url": f"{service.url}/api", **fields})


async def _run(connector: RestConnector, payload: dict[str, Any], service: str = "api") -> Any:
    return await run_job(connector, make_job(service, payload))


# -- sync ---------------------------------------------------------------------------------------


async def test_sync_json_answer_is_the_result(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/v1/upscale", {"url": "https://cdn/x.png", "scale": 2})
    connector = await rest_connector(sync_env(service))
    result, ctx = await _run(connector, {"endpoint": "/v1/upscale", "method": "POST", "data": {"scale": 2},
                                         "headers": {"X-Request-Id": "r-1"}})
    assert result == {"status_code": 200, "endpoint": "/v1/upscale", "method": "POST",
                      "data": {"url": "https://cdn/x.png", "scale": 2}}
    [request] = service.seen("/api/v1/upscale")
    assert request.json() == {"scale": 2} and request.headers["X-Request-Id"] == "r-1"
    assert ctx.updates[-1].progress == 100 and not ctx.outputs


async def test_a_get_sends_data_as_query_and_the_service_defaults_apply(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("GET", "/api/search", {"hits": 1})
    connector = await rest_connector(sync_env(service, method="GET", path="/search",
                                              headers={"X-Client": "emp"}))
    result, _ = await _run(connector, {"data": {"q": "cat"}})
    assert result["data"] == {"hits": 1} and result["method"] == "GET"
    [request] = service.seen("/api/search")
    assert request.path == "/api/search?q=cat" and request.headers["X-Client"] == "emp"


async def test_a_non_json_answer_becomes_an_output(service: FakeService, rest_connector: ConnectorFactory) -> None:
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    service.route("POST", "/api/render", image)
    connector = await rest_connector(sync_env(service))
    result, ctx = await _run(connector, {"endpoint": "/render"})
    assert result == {"status_code": 200, "endpoint": "/render", "method": "POST", "output": "response.png",
                      "content_type": "image/png"}
    [output] = ctx.outputs
    assert (output.name, output.content_type, output.data) == ("response.png", "image/png", PNG)


async def test_json_with_nan_is_kept_as_an_output_not_a_result(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    async def nan(request: web.Request) -> web.Response:
        return web.Response(body=b'{"score": NaN}', content_type="application/json")

    service.route("POST", "/api/score", nan)
    connector = await rest_connector(sync_env(service))
    result, ctx = await _run(connector, {"endpoint": "/score"})
    assert result["output"] == "response.json" and ctx.outputs[0].data == b'{"score": NaN}'


async def test_a_json_answer_over_the_result_limit_becomes_an_output(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    big = {"items": ["x" * 100] * 100}
    service.reply("POST", "/api/list", big)
    connector = await rest_connector({**sync_env(service), "EMP_REST_MAX_RESULT_BYTES": "2000"})
    result, ctx = await _run(connector, {"endpoint": "/list"})
    assert result["output"] == "response.json" and "data" not in result
    assert json.loads(ctx.outputs[0].data or b"") == big


async def test_an_answer_over_the_response_limit_fails_for_good(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/huge", {"blob": "x" * 50_000})
    connector = await rest_connector({**sync_env(service), "EMP_REST_MAX_RESPONSE_BYTES": "10000"})
    with pytest.raises(PermanentJobError, match="over this worker's limit of 10000 bytes"):
        await _run(connector, {"endpoint": "/huge"})


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500])
async def test_other_error_statuses_are_permanent_with_an_excerpt(
        service: FakeService, rest_connector: ConnectorFactory, status: int) -> None:
    service.reply("POST", "/api/run", {"error": f"bad input number {status}"}, status=status)
    connector = await rest_connector(sync_env(service))
    with pytest.raises(PermanentJobError, match=rf"answered {status} to POST /api/run: bad input number {status}"):
        await _run(connector, {"endpoint": "/run"})
    assert len(service.seen("/api/run")) == 1


async def test_an_operator_may_make_a_status_retryable(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/run", {"error": "flaky"}, status=500)
    connector = await rest_connector(sync_env(service, retryable_status=[500]))
    with pytest.raises(RetryableJobError, match="answered 500"):
        await _run(connector, {"endpoint": "/run"})


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_statuses_without_retry_after_fail_retryable_at_once(
        service: FakeService, rest_connector: ConnectorFactory, status: int) -> None:
    service.reply("POST", "/api/run", {"error": "busy"}, status=status)
    connector = await rest_connector(sync_env(service))
    with pytest.raises(ServiceBusy) as caught:
        await _run(connector, {"endpoint": "/run"})
    assert caught.value.retryable and caught.value.retry_after_s is None
    assert len(service.seen("/api/run")) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_a_short_retry_after_is_waited_out_then_the_request_is_sent_again(
        service: FakeService, rest_connector: ConnectorFactory, status: int) -> None:
    arrivals: list[float] = []

    async def busy_once(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return web.json_response({"error": "slow down"}, status=status, headers={"Retry-After": "1"})
        return web.json_response({"done": True})

    service.route("POST", "/api/run", busy_once)
    connector = await rest_connector(sync_env(service))
    result, ctx = await _run(connector, {"endpoint": "/run"})
    assert result["data"] == {"done": True} and len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.95  # the service's Retry-After, honoured
    assert any("retry in 1s" in u.message for u in ctx.updates)


async def test_a_long_retry_after_fails_retryable_and_carries_the_delay(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/run", {"error": "quota"}, status=429, headers={"Retry-After": "120"})
    connector = await rest_connector(sync_env(service, max_retry_after_s=30))
    started = time.monotonic()
    with pytest.raises(ServiceBusy, match=r"Retry-After: 120s") as caught:
        await _run(connector, {"endpoint": "/run"})
    assert caught.value.retry_after_s == 120 and time.monotonic() - started < 5
    assert len(service.seen("/api/run")) == 1


async def test_retry_after_is_waited_out_at_most_request_retries_times(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/run", {"error": "busy"}, status=503, headers={"Retry-After": "0"})
    connector = await rest_connector(sync_env(service, request_retries=2))
    with pytest.raises(ServiceBusy):
        await _run(connector, {"endpoint": "/run"})
    assert len(service.seen("/api/run")) == 3


async def test_a_slow_service_times_out_retryable(service: FakeService, rest_connector: ConnectorFactory) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 30)
        return web.json_response({})

    service.route("POST", "/api/slow", hang)
    connector = await rest_connector(sync_env(service, timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(RetryableJobError, match="did not answer"):
        await _run(connector, {"endpoint": "/slow"})
    assert time.monotonic() - started < 10 and len(service.seen("/api/slow")) == 1
    release.set()


async def test_an_answer_that_trickles_in_is_cut_at_the_whole_request_deadline(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(300):  # a byte every 0.1s: never idle long enough for a read timeout
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    service.route("POST", "/api/drip", drip)
    connector = await rest_connector(sync_env(service, timeout_s=1, connect_timeout_s=0.2))
    started = time.monotonic()
    with pytest.raises(RetryableJobError, match=r"did not answer POST /drip within 3\.1s"):
        await _run(connector, {"endpoint": "/drip"})
    assert 3 <= time.monotonic() - started < 10


async def test_credentials_are_sent_and_never_shown(service: FakeService, rest_connector: ConnectorFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def echo_auth(request: web.Request) -> web.Response:
        return web.json_response({"error": f"refused {request.headers.get('Authorization')}"}, status=400)

    service.route("POST", "/api/run", echo_auth)
    monkeypatch.setenv("API_TOKEN", "tok-s3cret-value")
    connector = await rest_connector(sync_env(service, auth={"type": "bearer", "token_env": "API_TOKEN"}))
    with pytest.raises(PermanentJobError) as caught:
        await _run(connector, {"endpoint": "/run"})
    assert service.seen("/api/run")[0].headers["Authorization"] == "Bearer tok-s3cret-value"
    assert "tok-s3cret-value" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(PermanentJobError, match="'Authorization' cannot be set by a job"):
        await _run(connector, {"endpoint": "/run", "headers": {"Authorization": "Bearer other"}})
    assert len(service.seen("/api/run")) == 1


async def test_basic_credentials_from_the_service_block(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("GET", "/api/me", {"me": "bob"})
    env = {"EMP_REST_SERVICES": "api", "EMP_REST_API_BASE_URL": f"{service.url}/api", "EMP_REST_API_METHOD": "GET",
           "EMP_REST_API_AUTH": "basic", "EMP_REST_API_USERNAME": "bob", "EMP_REST_API_PASSWORD": "hunter2"}
    connector = await rest_connector(env)
    result, _ = await _run(connector, {"endpoint": "/me"})
    assert result["data"] == {"me": "bob"}
    assert service.seen("/api/me")[0].headers["Authorization"] == "Basic Ym9iOmh1bnRlcjI="


# -- SSRF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [
    "http://evil.example/x",  # another host
    "OTHER_PORT",  # the same host, another port (filled in below)
    "https://127.0.0.1/api/x",  # another scheme
    "http://127.0.0.1@evil.example/",  # userinfo
    "/x@evil.example",
    "http://169.254.169.254/latest/meta-data/",  # an IP literal
    "//10.0.0.1/x",
    "http://[::1]/",  # IPv6
    "/[::1]/x",
    "/../secret",  # leaving the base path
    "/%2e%2e/secret",
    "/v1%2f..%2f..%2fsecret",
    "/..\\secret",
    "file:///etc/passwd",
])
async def test_ssrf_attempts_are_refused_and_send_nothing(
        service: FakeService, other_service: FakeService, rest_connector: ConnectorFactory, endpoint: str) -> None:
    endpoint = endpoint.replace("OTHER_PORT", f"http://127.0.0.1:{other_service.port}/api/x")
    connector = await rest_connector(sync_env(service))
    with pytest.raises(PermanentJobError, match=r"the job may only reach http://127\.0\.0\.1:\d+/api/; refused"):
        await _run(connector, {"endpoint": endpoint})
    assert service.received == [] and other_service.received == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_to_another_server_are_not_followed(
        service: FakeService, other_service: FakeService, rest_connector: ConnectorFactory, status: int) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{other_service.url}/steal"})

    service.route("POST", "/api/run", redirect)
    other_service.reply("POST", "/steal", {"stolen": True})
    other_service.reply("GET", "/steal", {"stolen": True})
    connector = await rest_connector(sync_env(service))
    with pytest.raises(PermanentJobError, match=f"redirect \\({status}\\); redirects are not followed"):
        await _run(connector, {"endpoint": "/run"})
    assert len(service.seen("/api/run")) == 1 and other_service.received == []


# -- async --------------------------------------------------------------------------------------


def async_env(service: FakeService, **fields: Any) -> dict[str, str]:
    spec = {"base_url": f"{service.url}/api", "mode": "async", "path": "/jobs", "status_path": "/jobs/{task_id}",
            "progress_field": "progress", "result_field": "output", "poll_interval_s": 0.05, **fields}
    return services_env(video=spec)


def statuses(service: FakeService, task_id: str, *documents: dict[str, Any]) -> None:
    """Answer the task's status with each document in turn, then the last one again."""
    remaining = list(documents)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(remaining.pop(0) if len(remaining) > 1 else remaining[0])

    service.route("GET", f"/api/jobs/{task_id}", status)


async def test_async_submit_then_poll_with_progress(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"id": "t-1", "status": "queued"}, status=202)
    statuses(service, "t-1", {"status": "running", "progress": 25}, {"status": "running", "progress": 75},
             {"status": "succeeded", "progress": 100, "output": {"url": "https://cdn/v.mp4"}})
    connector = await rest_connector(async_env(service))
    result, ctx = await run_job(connector, make_job("video", {"data": {"prompt": "a cat"}}))
    assert result == {"task_id": "t-1", "status": "succeeded", "endpoint": "/jobs",
                      "data": {"url": "https://cdn/v.mp4"}}
    assert service.seen("/api/jobs")[0].json() == {"prompt": "a cat"}
    progress = [u.progress for u in ctx.updates if u.message.startswith("task t-1")]
    assert progress == [25, 75]
    assert len(service.seen("/api/jobs/t-1")) == 3


async def test_progress_on_a_0_to_1_scale_and_nested_fields(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"data": {"task": {"id": 42}}})
    statuses(service, "42", {"state": "PROCESSING", "meta": {"p": 0.5}}, {"state": "DONE", "meta": {"p": 1.0}})
    connector = await rest_connector(async_env(service, task_id_field="data.task.id", status_field="state",
                                               progress_field="meta.p", progress_scale=1, result_field=""))
    result, ctx = await run_job(connector, make_job("video", {}))
    assert result["task_id"] == "42" and result["data"] == {"state": "DONE", "meta": {"p": 1.0}}
    assert [u.progress for u in ctx.updates if u.message.startswith("task 42")] == [50]


async def test_a_task_that_reports_failure_fails_at_once(service: FakeService,
                                                           rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"id": "t-2"})
    statuses(service, "t-2", {"status": "running", "progress": 10},
             {"status": "failed", "error": {"message": "CUDA out of memory"}})
    connector = await rest_connector(async_env(service, max_wait_s=600))
    started = time.monotonic()
    with pytest.raises(PermanentJobError, match=r"task t-2 ended 'failed'.*CUDA out of memory"):
        await run_job(connector, make_job("video", {}))
    assert time.monotonic() - started < 5 and len(service.seen("/api/jobs/t-2")) == 2


async def test_a_failed_task_may_be_configured_retryable(service: FakeService,
                                                          rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"id": "t-3", "status": "error", "error": "worker lost"})
    connector = await rest_connector(async_env(service, failure_retryable=True))
    with pytest.raises(RetryableJobError, match="worker lost"):
        await run_job(connector, make_job("video", {}))
    assert service.seen("/api/jobs/t-3") == []  # the submit answer already said it failed


async def test_a_task_past_max_wait_fails_retryable_and_is_cancelled(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"id": "t-4"})
    statuses(service, "t-4", {"status": "running"})
    service.reply("POST", "/api/jobs/t-4/cancel", {"ok": True})
    connector = await rest_connector(async_env(service, max_wait_s=0.3, cancel_path="/jobs/{task_id}/cancel"))
    with pytest.raises(RetryableJobError, match=r"still not done after 0\.3s"):
        await run_job(connector, make_job("video", {}))
    assert len(service.seen("/api/jobs/t-4/cancel")) == 1


async def test_cancelling_the_job_cancels_the_task(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"id": "t-5"})
    statuses(service, "t-5", {"status": "running", "progress": 5})
    service.reply("DELETE", "/api/jobs/t-5", {"ok": True})
    connector = await rest_connector(async_env(service, cancel_path="/jobs/{task_id}", cancel_method="DELETE"))
    with pytest.raises(JobCancelled):
        await run_job(connector, make_job("video", {}), cancel_after=lambda ctx: any(
            u.message.startswith("task t-5") for u in ctx.updates))
    assert [r.method for r in service.seen("/api/jobs/t-5")][-1] == "DELETE"


async def test_transient_poll_errors_are_tolerated_up_to_a_limit(
        service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"id": "t-6"})
    statuses(service, "t-6", {"status": "running"})
    answers = iter([503, 502, 200])

    async def flaky(request: web.Request) -> web.Response:
        status = next(answers, 200)
        body = {"status": "done", "output": "ok"} if status == 200 else {"error": "gateway"}
        return web.json_response(body, status=status)

    service.route("GET", "/api/jobs/t-6", flaky)
    connector = await rest_connector(async_env(service, max_poll_errors=2))
    result, _ = await run_job(connector, make_job("video", {}))
    assert result["data"] == "ok"
    service.reply("POST", "/api/jobs", {"id": "t-7"})
    service.reply("GET", "/api/jobs/t-7", {"error": "gateway"}, status=502)
    service.reply("POST", "/api/jobs/t-7/cancel", {})
    connector = await rest_connector(async_env(service, max_poll_errors=2, cancel_path="/jobs/{task_id}/cancel"))
    with pytest.raises(ServiceBusy, match="answered 502"):
        await run_job(connector, make_job("video", {}))
    assert len(service.seen("/api/jobs/t-7")) == 3  # then it gives up, and cancels the task it leaves behind
    assert len(service.seen("/api/jobs/t-7/cancel")) == 1


@pytest.mark.parametrize("task_id", ["../../admin", "a/b", "http://evil.example/"])
async def test_a_task_id_cannot_steer_the_poll(service: FakeService, rest_connector: ConnectorFactory,
                                              task_id: str) -> None:
    service.reply("POST", "/api/jobs", {"id": task_id})
    connector = await rest_connector(async_env(service))
    with pytest.raises(RetryableJobError, match="is not a plain token"):
        await run_job(connector, make_job("video", {}))
    assert [r.path for r in service.received] == ["/api/jobs"]


async def test_a_submit_answer_without_a_task_id(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/api/jobs", {"accepted": True})
    connector = await rest_connector(async_env(service))
    with pytest.raises(RetryableJobError, match="no task id at 'id'"):
        await run_job(connector, make_job("video", {}))


# -- the connector's life -----------------------------------------------------------------------


async def test_one_connector_serves_every_configured_service(
        service: FakeService, other_service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("POST", "/a/run", {"from": "a"})
    other_service.reply("POST", "/b/run", {"from": "b"})
    connector = await rest_connector(services_env(a={"base_url": f"{service.url}/a"},
                                                  b={"base_url": f"{other_service.url}/b"}))
    assert connector.service_types == ("a", "b")
    assert (await _run(connector, {"endpoint": "/run"}, "a"))[0]["data"] == {"from": "a"}
    assert (await _run(connector, {"endpoint": "/run"}, "b"))[0]["data"] == {"from": "b"}
    assert [r.path for r in service.received] == ["/a/run"] and [r.path for r in other_service.received] == ["/b/run"]


async def test_health_follows_the_health_paths(service: FakeService, rest_connector: ConnectorFactory) -> None:
    service.reply("GET", "/api/health", {"ok": True})
    connector = await rest_connector(sync_env(service, health_path="/health"))
    assert (await connector.health()).state is HealthState.OK
    service.reply("GET", "/api/health", {"ok": False}, status=503)
    health = await connector.health()
    assert health.state is HealthState.DOWN and "503" in health.message


async def test_a_connector_not_started_refuses_jobs_retryable(service: FakeService) -> None:
    from connectors.testing import make_connector

    connector = make_connector(RestConnector, env=sync_env(service))
    with pytest.raises(RetryableJobError, match="no started service 'api'"):
        await _run(connector, {"endpoint": "/run"})
    assert (await connector.health()).state is HealthState.DOWN
