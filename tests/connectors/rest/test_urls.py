"""Where a REST job may send a request: the SSRF rules as tables (pure functions, no I/O)."""

from __future__ import annotations

import pytest

from connectors.rest.urls import ForbiddenTarget, fill_task_id, join_url, normalize_base

BASE = "http://127.0.0.1:8000/api/"


@pytest.mark.parametrize(("endpoint", "expected"), [
    ("", "http://127.0.0.1:8000/api/"),
    ("/", "http://127.0.0.1:8000/api/"),
    ("/v1/tasks", "http://127.0.0.1:8000/api/v1/tasks"),
    ("v1/tasks", "http://127.0.0.1:8000/api/v1/tasks"),
    ("/v1/tasks/", "http://127.0.0.1:8000/api/v1/tasks/"),
    ("/v1/tasks?limit=2&sort=-created", "http://127.0.0.1:8000/api/v1/tasks?limit=2&sort=-created"),
    ("/v1/models/gemini-pro:generateContent", "http://127.0.0.1:8000/api/v1/models/gemini-pro:generateContent"),
    ("/files/a%20b.png", "http://127.0.0.1:8000/api/files/a%20b.png"),
    ("/files/...", "http://127.0.0.1:8000/api/files/..."),  # three dots is a name, not a dot segment
    ("/a/.hidden", "http://127.0.0.1:8000/api/a/.hidden"),
    ("/127.0.0.1/x", "http://127.0.0.1:8000/api/127.0.0.1/x"),  # an IP in a path segment is just a name
    ("/q?next=http://x/y", "http://127.0.0.1:8000/api/q?next=http://x/y"),  # a query cannot move the host
    ("/~user/x_y-z.json", "http://127.0.0.1:8000/api/~user/x_y-z.json"),
    ("/cars;color=red/x", "http://127.0.0.1:8000/api/cars;color=red/x"),  # a matrix parameter is a name
    ("/a;v=1;w=2", "http://127.0.0.1:8000/api/a;v=1;w=2"),
    ("/a;...", "http://127.0.0.1:8000/api/a;..."),
])
def test_endpoints_under_the_base_are_joined(endpoint: str, expected: str) -> None:
    assert join_url(BASE, endpoint) == expected


@pytest.mark.parametrize("endpoint", [
    # another host, scheme or port
    "http://evil.example/x",
    "https://127.0.0.1:8000/api/x",  # same host, other scheme
    "http://127.0.0.1:8001/api/x",  # same host, other port
    "http://127.0.0.1:8000/api/x",  # even the base itself, absolute: jobs give paths
    "HTTP://evil.example/",
    "//evil.example/x",
    "///evil.example/x",
    "/\\evil.example/x",
    "\\\\evil.example\\x",
    "file:///etc/passwd",
    "file:/etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "javascript:alert(1)",
    "localhost:6379/x",
    "127.0.0.1:6379",
    # userinfo and IP literals
    "http://127.0.0.1:8000@evil.example/",
    "@evil.example/x",
    "/x@evil.example",
    "user:pass@evil.example/",
    "[::1]/x",
    "/[::1]:6379/x",
    "http://[::1]:8000/",
    "http://0x7f000001/",
    "http://2130706433/",
    # leaving the base path
    "..",
    "/..",
    "/../secret",
    "/v1/../../secret",
    "/./x",
    "/v1/./x",
    "/%2e%2e/secret",
    "/%2E%2E/secret",
    "/.%2e/secret",
    "/%2e./secret",
    "/%2e/x",
    "/v1%2f..%2f..%2fsecret",
    "/v1%2F..%2F..%2Fsecret",
    "/v1%5c..%5csecret",
    "/%252e%252e/secret",  # double encoding
    "/v1/%00/x",
    "/a//b",
    # ';' path parameters, which Tomcat, Jetty and Spring strip before normalising the path
    "..;/secret",
    "/..;/secret",
    "/a/..;/..;/secret",
    "a/..;/x",
    "/..;jsessionid=1/secret",
    "/.;/x",
    "/a/;..",
    "a/;../x",
    "/;x/secret",
    "/a/x;../..;",
    "/%2e%2e;/secret",
    "/..%3b/secret",
    "/..%3B/secret",
    "/a/%3b../x",
    # odd characters, encodings and fragments
    "/x y",
    "/x\ty",
    "/x\n/y",
    "/x\r\nHost: evil",
    "/caf\u00e9",
    "/\uff0e\uff0e/secret",  # fullwidth dots
    "/x#frag",
    "/x%zz",
    "/x%2",
    "/x?q=%zz",
    "/x?q=a b",
    "/x?q=\\",
    "/x\"y",
    "/<x>",
    "/x{y}",
    "/x|y",
    "/x^y",
    "/x`y",
    "/" + "a" * 3000,
])
def test_endpoints_that_could_leave_the_base_are_refused(endpoint: str) -> None:
    with pytest.raises(ForbiddenTarget):
        join_url(BASE, endpoint)


@pytest.mark.parametrize("endpoint", [None, 42, ["/x"], {"path": "/x"}])
def test_an_endpoint_that_is_not_a_string_is_refused(endpoint: object) -> None:
    with pytest.raises(ForbiddenTarget, match="must be a string"):
        join_url(BASE, endpoint)  # type: ignore[arg-type]


def test_refusals_say_why() -> None:
    with pytest.raises(ForbiddenTarget, match="absolute URL"):
        join_url(BASE, "http://evil.example/")
    with pytest.raises(ForbiddenTarget, match="another host"):
        join_url(BASE, "//evil.example/")
    with pytest.raises(ForbiddenTarget, match=r"'\.\.' segments"):
        join_url(BASE, "/%2e%2e/x")
    with pytest.raises(ForbiddenTarget, match="'@' is not allowed"):
        join_url(BASE, "/x@evil")


@pytest.mark.parametrize(("base", "expected"), [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/"),
    ("http://127.0.0.1:8000/api", "http://127.0.0.1:8000/api/"),
    ("https://api.example.com/v1/", "https://api.example.com/v1/"),
    ("http://[::1]:9000/x", "http://[::1]:9000/x/"),  # the operator may name any host
])
def test_base_urls_are_normalized(base: str, expected: str) -> None:
    assert normalize_base(base) == expected


@pytest.mark.parametrize(("base", "match"), [
    ("ftp://files.example/", "http:// or https://"),
    ("file:///etc", "http:// or https://"),
    ("127.0.0.1:8000", "http:// or https://"),
    ("http://", "with a host"),
    ("http://user:pw@api.example/", "credentials"),
    ("http://api.example/?key=1", "query"),
    ("http://api.example/#x", "fragment"),
    ("http://api.example:99999/", "port"),
    ("http://api.example/a/../b", "'..'"),
    ("http://api.example/a/..;/b", "'..'"),
])
def test_bad_base_urls_are_refused(base: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_base(base)


def test_a_joined_url_never_leaves_a_base_with_a_deeper_path() -> None:
    base = normalize_base("http://127.0.0.1:8000/tenants/42")
    assert join_url(base, "/jobs") == "http://127.0.0.1:8000/tenants/42/jobs"
    for attempt in ("/../43/jobs", "/%2e%2e/43/jobs", "..%2f43%2fjobs"):
        with pytest.raises(ForbiddenTarget):
            join_url(base, attempt)


@pytest.mark.parametrize(("task_id", "expected"), [
    ("abc-123", "/tasks/abc-123"),
    ("550e8400-e29b-41d4-a716-446655440000", "/tasks/550e8400-e29b-41d4-a716-446655440000"),
    ("42", "/tasks/42"),
    ("a.b_c~d", "/tasks/a.b_c~d"),
])
def test_task_ids_fill_the_template(task_id: str, expected: str) -> None:
    assert fill_task_id("/tasks/{task_id}", task_id) == expected


@pytest.mark.parametrize("task_id", ["", ".", "..", "../admin", "a/b", "a%2fb", "a?x=1", "a#b", "http://evil/",
                                     "a b", "@evil", "x" * 300])
def test_task_ids_that_could_steer_the_request_are_refused(task_id: str) -> None:
    with pytest.raises(ForbiddenTarget, match="plain token"):
        fill_task_id("/tasks/{task_id}", task_id)
