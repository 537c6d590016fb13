"""What a REST job asks for and what a service's answers say: pure functions as tables."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.rest.config import RestService
from connectors.rest.engine import retry_after_s
from connectors.rest.jobs import (
    BadAnswer,
    BadRequest,
    TaskState,
    dig,
    job_headers,
    parse_request,
    task_id_of,
    task_status,
)
from connectors.rest.urls import ForbiddenTarget

SPEC = RestService(base_url="http://127.0.0.1:9000/api", path="/run", headers={"X-Tenant": "t1"})


def test_the_emp_job_queue_payload_convention() -> None:
    request = parse_request({"endpoint": "/v1/upscale", "method": "post", "data": {"scale": 2},
                             "headers": {"X-Request-Id": "abc"}}, SPEC)
    assert (request.method, request.url) == ("POST", "http://127.0.0.1:9000/api/v1/upscale")
    assert request.json == {"scale": 2} and request.headers == {"X-Request-Id": "abc"} and request.params is None
    assert parse_request({"body": [1, 2]}, SPEC).json == [1, 2]  # body is data's other name
    default = parse_request({}, SPEC)
    assert (default.method, default.url, default.json) == ("POST", "http://127.0.0.1:9000/api/run", None)


def test_a_get_sends_data_as_the_query_string() -> None:
    request = parse_request({"method": "GET", "endpoint": "/items", "data": {"q": "cat", "tags": ["a", "b"]}}, SPEC)
    assert request.params == {"q": "cat", "tags": ["a", "b"]} and request.json is None


@pytest.mark.parametrize(("payload", "match"), [
    ({"method": "DELETE"}, "method 'DELETE' is not allowed"),
    ({"method": 7}, "method '7' is not allowed"),
    ({"method": "TRACE"}, "is not allowed"),
    ({"data": {}, "body": {}}, "data or as body, not both"),
    ({"method": "GET", "data": [1]}, "object of strings"),
    ({"method": "GET", "data": {"x": {"y": 1}}}, "object of strings"),
    ({"endpoint": 5}, "endpoint must be a string"),
    ({"headers": "X-A: b"}, "headers must be an object"),
    ({"headers": {f"X-{i}": "v" for i in range(40)}}, "at most 32"),
    ({"headers": {"X-A": 5}}, "values strings"),
    ({"headers": {"bad name": "v"}}, "HTTP tokens"),
    ({"headers": {"X-A": "a\r\nHost: evil"}}, "no control characters"),
    ({"headers": {"X-A": "v" * 5000}}, "at most 4096"),
    ({"headers": {"Authorization": "Bearer mine"}}, "'Authorization' cannot be set by a job"),
    ({"headers": {"host": "evil.example"}}, "'host' cannot be set"),
    ({"headers": {"Proxy-Authorization": "x"}}, "cannot be set"),
    ({"headers": {"Cookie": "a=b"}}, "cannot be set"),
    ({"headers": {"X-Forwarded-Host": "evil"}}, "cannot be set"),
    ({"headers": {"Content-Length": "0"}}, "cannot be set"),
    ({"headers": {"x-tenant": "t2"}}, "'x-tenant' cannot be set"),  # the operator's own header
])
def test_payloads_the_service_does_not_allow(payload: dict[str, Any], match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        parse_request(payload, SPEC)


def test_an_endpoint_outside_the_base_is_refused() -> None:
    with pytest.raises(ForbiddenTarget):
        parse_request({"endpoint": "http://169.254.169.254/latest/meta-data"}, SPEC)


OPEN = RestService(base_url="http://127.0.0.1:9000/api", headers={"X-Tenant": "t1"}, job_headers=["X-Render-Hint"])


@pytest.mark.parametrize("name", [
    # a method override or a rewritten URL: frameworks and proxies would act on these as another request
    "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-URL", "X-Rewrite-URL",
    "X-Original-URI",
    # a forged client, host or scheme: what a proxy's access rules look at
    "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "x-forwarded-proto", "X-Forwarded-Prefix",
    "X-Forwarded-Whatever", "X-Real-IP", "X-Client-IP", "X-Host",
    # credentials, framing, the operator's own header
    "Authorization", "Cookie", "Proxy-Anything", "Transfer-Encoding", "Expect", "X-Tenant",
    # not on the allow-list, and not one the operator added
    "X-Custom", "X-Amz-Security-Token", "X-Envoy-Original-Path", "User-Agent", "Origin", "Referer",
])
def test_job_headers_outside_the_allow_list_are_refused(name: str) -> None:
    with pytest.raises(BadRequest, match=f"header {name!r}"):
        job_headers({name: "v"}, OPEN)


@pytest.mark.parametrize("name", ["Accept", "accept-language", "Content-Type", "If-None-Match", "Prefer",
                                  "Idempotency-Key", "X-Request-Id", "X-Correlation-ID", "traceparent",
                                  "tracestate", "X-Render-Hint", "x-render-hint"])
def test_safe_job_headers_and_the_operators_extras_pass(name: str) -> None:
    assert job_headers({name: "v"}, OPEN) == {name: "v"}


def test_an_unlisted_header_names_the_setting_that_allows_it() -> None:
    with pytest.raises(BadRequest, match="job_headers"):
        job_headers({"X-Render-Hint": "v"}, SPEC)


@pytest.mark.parametrize(("job_headers_setting", "match"), [
    (["X-HTTP-Method-Override"], "can never be set by a job"),
    (["X-Forwarded-For"], "can never be set by a job"),
    (["x-forwarded-anything"], "can never be set by a job"),
    (["Authorization"], "can never be set by a job"),
    (["Proxy-Foo"], "can never be set by a job"),
    (["bad name"], "not an HTTP header name"),
    (["X-Tenant"], "configured in headers"),
])
def test_the_operator_cannot_open_dangerous_headers_to_jobs(job_headers_setting: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RestService(base_url="http://127.0.0.1:9000", headers={"X-Tenant": "t1"}, job_headers=job_headers_setting)


def test_headers_none_means_none() -> None:
    assert job_headers(None, SPEC) is None and job_headers({}, SPEC) == {}


@pytest.mark.parametrize(("document", "path", "expected"), [
    ({"id": "t1"}, "id", "t1"),
    ({"data": {"task": {"id": 7}}}, "data.task.id", 7),
    ({"items": [{"url": "a"}, {"url": "b"}]}, "items.1.url", "b"),
    ({"items": []}, "items.0", None),
    ({"a": 1}, "a.b", None),
    ({"a": {"b": None}}, "a.b", None),
    ([1, 2], "1", 2),
    ("text", "a", None),
    ({"a": 1}, "", {"a": 1}),
    ({"a": {"-1": "x"}}, "a.-1", "x"),
    ([1], "-1", None),
])
def test_dig(document: Any, path: str, expected: Any) -> None:
    assert dig(document, path) == expected


ASYNC = RestService(base_url="http://h", mode="async", progress_field="progress")
FRACTION = RestService(base_url="http://h", mode="async", status_field="state.name", progress_field="p",
                       progress_scale=1, success_values=["Ready"], failure_values=["Broken"])


@pytest.mark.parametrize(("spec", "document", "state", "percent"), [
    (ASYNC, {"status": "running", "progress": 40}, TaskState.RUNNING, 40.0),
    (ASYNC, {"status": "SUCCEEDED"}, TaskState.SUCCEEDED, None),
    (ASYNC, {"status": "Completed", "progress": 100}, TaskState.SUCCEEDED, 100.0),
    (ASYNC, {"status": "failed", "error": "oom"}, TaskState.FAILED, None),
    (ASYNC, {"status": "canceled"}, TaskState.FAILED, None),
    (ASYNC, {"status": "queued", "progress": 250}, TaskState.RUNNING, 100.0),
    (ASYNC, {"status": "queued", "progress": -3}, TaskState.RUNNING, 0.0),
    (ASYNC, {"status": "queued", "progress": "40"}, TaskState.RUNNING, None),  # not a number: no progress
    (ASYNC, {"status": "queued", "progress": True}, TaskState.RUNNING, None),
    (ASYNC, {"status": "queued", "progress": float("nan")}, TaskState.RUNNING, None),
    (ASYNC, {}, TaskState.RUNNING, None),
    (ASYNC, {"status": {"nested": "failed"}}, TaskState.RUNNING, None),
    (FRACTION, {"state": {"name": "working"}, "p": 0.25}, TaskState.RUNNING, 25.0),
    (FRACTION, {"state": {"name": "ready"}, "p": 1}, TaskState.SUCCEEDED, 100.0),
    (FRACTION, {"state": {"name": "broken"}}, TaskState.FAILED, None),
    (FRACTION, {"state": {"name": "failed"}}, TaskState.RUNNING, None),  # only the configured values count
])
def test_task_status(spec: RestService, document: Any, state: TaskState, percent: float | None) -> None:
    status = task_status(document, spec)
    assert (status.state, status.percent) == (state, percent)


@pytest.mark.parametrize(("document", "expected"), [({"id": "abc"}, "abc"), ({"id": 42}, "42")])
def test_task_id_of(document: Any, expected: str) -> None:
    assert task_id_of(document, ASYNC) == expected


@pytest.mark.parametrize("document", [{}, {"id": None}, {"id": ""}, {"id": True}, {"id": {"x": 1}}, {"id": [1]}])
def test_a_submit_answer_without_a_task_id(document: Any) -> None:
    with pytest.raises(BadAnswer, match="no task id at 'id'"):
        task_id_of(document, ASYNC)


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("", None),
    ("3", 3.0),
    (" 120 ", 120.0),
    ("0", 0.0),
    ("999999999", 86400.0),
    ("Thu, 01 Jan 2026 12:00:30 GMT", 30.0),
    ("Thu, 01 Jan 2026 11:00:00 GMT", 0.0),  # in the past: now
    ("-5", None),
    ("1.5", None),
    ("soon", None),
])
def test_retry_after(header: str | None, expected: float | None) -> None:
    assert retry_after_s(header, NOW) == expected
