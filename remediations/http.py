"""``http_request``: call an HTTP endpoint on the allowlist, never following redirects."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import ssl
import time
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Literal

import httpx
from pydantic import Field, PositiveFloat, field_validator, model_validator

from remediations.base import (
    SECRET_REFERENCE_MARKS,
    Preflight,
    RemediationContext,
    RemediationParams,
    RemediationResult,
)
from remediations.errors import PermanentError, TransientError
from remediations.registry import remediation

MAX_TIMEOUT = 60.0
RESPONSE_SNIPPET_BYTES = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
# One DNS label as host names have them (RFC 1123): letters, digits, inner hyphens.
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Headers that must come from the checked URL and the body, never from (rendered) params.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class HttpRequestParams(RemediationParams):
    """Params of ``http_request``; the URL is checked against ``http_allowlist`` before use."""

    url: str = Field(description="Absolute http(s) URL; host and port must be on the allowlist.")
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json", description="A JSON body (not with body).")
    body: str | None = Field(default=None, description="A raw text body (not with json).")
    expected_status: list[int] | None = Field(
        default=None, description="Statuses that count as success; any 2xx when unset."
    )
    timeout: PositiveFloat = Field(default=10.0, le=MAX_TIMEOUT, description="Seconds for the call.")
    idempotency_header: str | None = Field(
        default="Idempotency-Key",
        description="Header carrying the run id, so the target can drop a repeated call; null: none.",
    )

    model_config = RemediationParams.model_config | {"populate_by_name": True}

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if any(ord(c) < 32 or ord(c) == 127 for c in name + value):
                raise ValueError(f"header {name!r} contains a control character")
            # A secret's reference (resolved to its value before the request) is not the header.
            if not (name + value.translate(SECRET_REFERENCE_MARKS)).isascii():
                raise ValueError(f"header {name!r} contains a non-ASCII character")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} may not be set (it comes from the checked URL and body)")
        return headers

    @model_validator(mode="after")
    def _one_body(self) -> HttpRequestParams:
        if self.json_body is not None and self.body is not None:
            raise ValueError("give json or body, not both")
        return self


def _split_pattern(pattern: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``host:*``, ``[v6]:port`` -> (host, port or None)."""
    if pattern.startswith("["):
        host, _, rest = pattern[1:].partition("]")
        return host.lower(), rest[1:] if rest.startswith(":") else None
    if pattern.count(":") == 1:
        host, port = pattern.split(":")
        return host.lower(), port
    return pattern.lower(), None


def valid_host(host: str) -> bool:
    """An IP address, or a host name of RFC 1123 labels (no empty labels, no other characters)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_LABEL.match(label) for label in labels)


def _host_matches(pattern_host: str, host: str) -> bool:
    if pattern_host.startswith("*."):
        suffix = pattern_host[1:]
        return host.endswith(suffix) and len(host) > len(suffix) and valid_host(host)
    return host == pattern_host


def allowlisted(allowlist: tuple[str, ...], *, scheme: str, host: str, port: int | None) -> bool:
    """Whether ``host:port`` is on the allowlist.

    Patterns: ``host`` (default port of the scheme only), ``host:port``, ``host:*`` (any port),
    ``*.example.com`` (any subdomain, not the apex), ``[::1]:*`` for IPv6.
    """
    effective_port = port if port is not None else DEFAULT_PORTS[scheme]
    for pattern in allowlist:
        pattern_host, pattern_port = _split_pattern(pattern)
        if not _host_matches(pattern_host, host):
            continue
        if pattern_port == "*":
            return True
        if pattern_port is None and effective_port == DEFAULT_PORTS[scheme]:
            return True
        if pattern_port is not None and pattern_port.isdigit() and int(pattern_port) == effective_port:
            return True
    return False


def checked_url(url: str, allowlist: tuple[str, ...]) -> httpx.URL:
    """Parse a rendered URL and refuse it unless it is http(s), without userinfo, on the allowlist.

    The parsed object is what gets sent, so the check and the request cannot disagree on the host.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise PermanentError(f"invalid URL: {exc}") from exc
    if parsed.scheme not in DEFAULT_PORTS:
        raise PermanentError(f"URL scheme {parsed.scheme!r} is not allowed (http, https only)")
    if parsed.userinfo:
        raise PermanentError("URL must not contain userinfo (user:password@)")
    host = parsed.raw_host.decode("ascii").lower()
    if not host:
        raise PermanentError("URL has no host")
    if not valid_host(host):
        raise PermanentError(f"URL host {host[:100]!r} is not a valid host name or IP address")
    if not allowlisted(allowlist, scheme=parsed.scheme, host=host, port=parsed.port):
        shown = f"{host}:{parsed.port}" if parsed.port is not None else host
        raise PermanentError(f"host {shown!r} is not on http_allowlist")
    return parsed


def preflight_http_request(ctx: RemediationContext, params: HttpRequestParams) -> Preflight:
    """Refuse a URL outside the allowlist before anything is sent."""
    url = checked_url(params.url, ctx.http_allowlist)
    return Preflight(timeout=params.timeout, details={"url": str(url), "method": params.method})


def _is_success(status: int, expected: list[int] | None) -> bool:
    return status in expected if expected is not None else 200 <= status < 300


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _headers(ctx: RemediationContext, params: HttpRequestParams) -> dict[str, str]:
    headers = dict(params.headers)
    name = params.idempotency_header
    if name and ctx.run_id and name.lower() not in {h.lower() for h in headers}:
        headers[name] = ctx.run_id
    return headers


_clients: dict[tuple[int, int], httpx.Client] = {}


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context (the CA bundle loaded, tens of milliseconds and a few MiB) for this
    process and, built before the worker forks its pool, for every child it forks."""
    return httpx.create_ssl_context()


def warm_up() -> None:
    """Build the TLS context and this process's pooled client now: the first alert a fresh
    worker process handles should not wait for them."""
    _client(None)


def _client(transport: httpx.BaseTransport | None) -> httpx.Client:
    """This process's pooled client (per transport): connections and the TLS context are reused.

    Building a client per call built an SSL context each time, even for plain http (~30 ms).
    Keyed by process id, so a forked worker child never shares its parent's sockets.
    """
    key = (os.getpid(), id(transport))
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = httpx.Client(
            transport=transport,
            verify=_tls_context(),
            trust_env=False,  # HTTP(S)_PROXY from the environment must not reroute calls
            follow_redirects=False,  # a redirect could leave the allowlist
            # The client is shared by every run of this process: a cookie one target sets must
            # not ride along on a later run's call (each call stands alone, as configured).
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )
    return client


@remediation(
    name="http_request",
    timeout=10.0,
    max_timeout=MAX_TIMEOUT,
    preflight=preflight_http_request,
    # The URL without its query: a token in a query string is not an identity worth storing.
    target="{{ params.url.split('?', 1)[0] }}",
    destructive=True,
)
def http_request(ctx: RemediationContext, params: HttpRequestParams) -> RemediationResult:
    """Send one HTTP request to an allowlisted endpoint; redirects and environment proxies are off.

    Success is a status in ``expected_status`` (any 2xx by default). 5xx, 429, timeouts and
    connection errors are transient (honouring ``Retry-After``); any other status is permanent.
    The run id goes in an ``Idempotency-Key`` header: a worker killed mid-call makes the next
    attempt call again, and the target can recognise the repeat.
    """
    url = checked_url(params.url, ctx.http_allowlist)
    started = time.monotonic()
    try:
        with _client(ctx.http_transport).stream(
            params.method,
            url,
            headers=_headers(ctx, params),
            json=params.json_body,
            content=params.body,
            timeout=params.timeout,
        ) as response:
            snippet = b""
            for chunk in response.iter_bytes():
                snippet += chunk
                if len(snippet) >= RESPONSE_SNIPPET_BYTES:
                    break
    except httpx.TimeoutException as exc:
        raise TransientError(f"timed out after {params.timeout}s: {exc!r}") from exc
    except httpx.TransportError as exc:
        raise TransientError(f"request failed: {exc!r}") from exc
    details = {
        "status": response.status_code,
        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
        "response": snippet[:RESPONSE_SNIPPET_BYTES].decode("utf-8", "replace"),
    }
    status = response.status_code
    if _is_success(status, params.expected_status):
        return RemediationResult(summary=f"{params.method} {url} -> {status}", details=details)
    message = f"{params.method} {url} -> unexpected status {status}"
    if status >= 500 or status == 429:
        raise TransientError(
            message, details=details, retry_after=retry_after_s(response.headers.get("retry-after"))
        )
    raise PermanentError(message, details=details)
