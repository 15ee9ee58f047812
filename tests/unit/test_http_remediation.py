"""http_request: the allowlist, userinfo, schemes, redirects, proxies and status handling."""

from __future__ import annotations

import json

import httpx
import pytest

from remediations import PermanentError, RemediationContext, TransientError
from remediations.http import HttpRequestParams, allowlisted, checked_url, http_request

ALLOW = ("127.0.0.1:*", "localhost:*", "api.example.com", "*.svc.example:8443", "[::1]:9000")


def ctx(handler: object = None, allow: tuple[str, ...] = ALLOW) -> RemediationContext:
    transport = httpx.MockTransport(handler) if handler else None  # type: ignore[arg-type]
    return RemediationContext(http_allowlist=allow, http_transport=transport)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:15101/hook/x", True),
        ("http://localhost/x", True),
        ("https://api.example.com/x", True),  # default port of the scheme
        ("https://api.example.com:8443/x", False),  # host without port: default port only
        ("https://a.svc.example:8443/", True),
        ("https://svc.example:8443/", False),  # *. is subdomains, not the apex
        ("http://[::1]:9000/", True),
        ("http://127.0.0.2:80/", False),
        ("http://evil.example/", False),
        ("http://127.0.0.1:1@evil.example/", False),  # userinfo: refused
        ("http://evil#@127.0.0.1/", False),
        ("ftp://127.0.0.1/", False),
        ("file:///etc/passwd", False),
        ("http:///nohost", False),
        ("not a url", False),
    ],
)
def test_url_checks(url: str, ok: bool) -> None:
    """Only http(s) URLs without userinfo to an allowlisted host and port pass."""
    if ok:
        assert checked_url(url, ALLOW)
    else:
        with pytest.raises(PermanentError):
            checked_url(url, ALLOW)


@pytest.mark.parametrize(
    "instance", ["127.0.0.1:1@evil", "evil#", "@evil.example", "../../admin", "x/../../@evil.example:80"]
)
def test_hostile_label_in_path_stays_on_allowlisted_host(instance: str) -> None:
    """A label rendered into the path cannot move the request to another host."""
    url = checked_url(f"http://127.0.0.1:15101/hook/{instance}", ALLOW)
    assert url.host == "127.0.0.1" and url.port == 15101


def test_hostile_label_as_host_is_refused() -> None:
    """A label rendered into the host part that names another host is refused."""
    for host in ("127.0.0.1:1@evil", "evil#", "evil.example"):
        with pytest.raises(PermanentError):
            checked_url(f"http://{host}/x", ALLOW)


def test_allowlist_empty_refuses_everything() -> None:
    """With no allowlist nothing is reachable."""
    assert not allowlisted((), scheme="http", host="127.0.0.1", port=80)


def test_sends_json_and_succeeds_on_expected_status() -> None:
    """A POST with a JSON body succeeds on an expected status."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    params = HttpRequestParams.model_validate(
        {
            "url": "http://127.0.0.1:9/hook",
            "json": {"a": "b"},
            "expected_status": [200, 204],
            "headers": {"X-T": "1"},
        }
    )
    result = http_request(ctx(handler), params)
    assert result.details["status"] == 204
    assert json.loads(seen[0].content) == {"a": "b"}
    assert seen[0].method == "POST" and seen[0].headers["x-t"] == "1"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, TransientError),
        (503, TransientError),
        (429, TransientError),
        (404, PermanentError),
        (302, PermanentError),
        (200, PermanentError),
    ],
)
def test_status_classes(status: int, error: type[Exception]) -> None:
    """5xx and 429 are transient; other unexpected statuses (redirects too) are permanent."""
    params = HttpRequestParams(url="http://127.0.0.1:9/", expected_status=[204])
    with pytest.raises(error):
        http_request(
            ctx(lambda _r: httpx.Response(status, headers={"Location": "http://evil.example/"})), params
        )


def test_connection_errors_and_timeouts_are_transient() -> None:
    """A refused connection or a timeout can be retried."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    params = HttpRequestParams(url="http://127.0.0.1:9/")
    with pytest.raises(TransientError, match="request failed"):
        http_request(ctx(refuse), params)
    with pytest.raises(TransientError, match="timed out"):
        http_request(ctx(slow), params)


def test_refused_url_sends_nothing() -> None:
    """A URL off the allowlist fails before any request is made."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    with pytest.raises(PermanentError, match="not on http_allowlist"):
        http_request(ctx(record), HttpRequestParams(url="http://evil.example/"))
    assert sent == []


def test_environment_proxy_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY in the environment does not reroute the call (trust_env=False)."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a closed port as the "proxy"
        s.bind(("127.0.0.1", 0))
        proxy_port = s.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy_port}")
    try:
        http_request(ctx(), HttpRequestParams(url=f"http://127.0.0.1:{server.server_port}/direct"))
    finally:
        server.shutdown()
        server.server_close()
    assert hits == ["/direct"]


def test_params_validation() -> None:
    """Header injection, both bodies, unknown methods and long timeouts are refused."""
    for bad in (
        {"url": "http://x/", "headers": {"X": "a\r\nInjected: 1"}},
        {"url": "http://x/", "json": {}, "body": "x"},
        {"url": "http://x/", "method": "TRACE"},
        {"url": "http://x/", "timeout": 3600},
        {"url": "http://x/", "follow_redirects": True},
    ):
        with pytest.raises(ValueError, match="validation error"):
            HttpRequestParams.model_validate(bad)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example\\.svc.example",
        "a..svc.example",
        ".svc.example",
        "ex_ample.svc.example",
        "-a.svc.example",
    ],
)
def test_wildcard_refuses_hosts_outside_the_host_name_set(host: str) -> None:
    """*.svc.example admits only real host names: no backslashes, empty labels or odd characters."""
    with pytest.raises(PermanentError):
        checked_url(f"https://{host}:8443/", ALLOW)
    assert checked_url("https://a.b-c.svc.example:8443/", ALLOW).host == "a.b-c.svc.example"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Host": "evil.example"}, "may not be set"),
        ({"content-length": "0"}, "may not be set"),
        ({"X-Who": "caf\u00e9"}, "non-ASCII"),
    ],
)
def test_headers_cannot_override_the_checked_host_or_carry_non_ascii(
    headers: dict[str, str], message: str
) -> None:
    """A Host header in params is refused, as is a non-ASCII value: at validation, before sending."""
    with pytest.raises(ValueError, match=message):
        HttpRequestParams(url="http://127.0.0.1:1/", headers=headers)


def test_idempotency_key_is_the_run_id() -> None:
    """Every call carries the run id, so a target can drop the repeat after a worker died mid-call."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    context = RemediationContext(
        run_id="run-42", http_allowlist=ALLOW, http_transport=httpx.MockTransport(handler)
    )
    http_request(context, HttpRequestParams(url="http://127.0.0.1:1/"))
    http_request(context, HttpRequestParams(url="http://127.0.0.1:1/", idempotency_header=None))
    http_request(context, HttpRequestParams(url="http://127.0.0.1:1/", headers={"idempotency-key": "mine"}))
    assert [r.headers.get("idempotency-key") for r in seen] == ["run-42", None, "mine"]


def test_retry_after_is_carried_on_the_transient_error() -> None:
    """A 429 with Retry-After gives a TransientError that says how long the target asked to wait."""

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "120"})

    with pytest.raises(TransientError) as caught:
        http_request(ctx(handler), HttpRequestParams(url="http://127.0.0.1:1/"))
    assert caught.value.retry_after == 120.0


@pytest.mark.parametrize("pooled", [False, True], ids=["mock transport", "pooled client"])
def test_cookies_a_target_sets_are_never_sent_by_a_later_run(pooled: bool) -> None:
    """Every run's call stands alone: a Set-Cookie from one target is not kept by the client,
    which is shared by the runs of a worker process."""
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "session=secret-from-run-1; Path=/"})

    if pooled:
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                seen.append(self.headers.get("cookie"))
                self.send_response(200)
                self.send_header("Set-Cookie", "session=secret-from-run-1; Path=/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        try:
            for _ in range(2):
                http_request(ctx(), HttpRequestParams(url=url))
        finally:
            server.shutdown()
            server.server_close()
    else:
        context = ctx(handler)
        for _ in range(2):
            http_request(context, HttpRequestParams(url="http://127.0.0.1:9/hook"))
    assert seen == [None, None]
