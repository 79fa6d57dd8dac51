"""ASGI layers in front of the routes: the Host and Origin checks that keep web pages out, the API-key check
on ``/v1`` and a request-body size limit.

All answer before the body is read, so a refused request costs the server nothing.

Why Host and Origin: with no API key (the default) a server on loopback trusts whoever can reach it, and a
web page in the user's browser can: a multipart POST is a "simple" request that browsers send cross-origin
without asking (CORS only hides the answer, the job still runs), and a DNS-rebinding name (a page's own host
name re-pointed at 127.0.0.1) makes the page same-origin and lets it read the answers. A refused Host stops the
second; refusing every request whose ``Origin`` is neither this server nor an allowed origin stops the first.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ditserve.entrypoints.server.errors import error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    """401 on every ``/v1`` route unless ``Authorization: Bearer <key>`` matches (constant-time)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._is_protected(scope["path"]) and not self._authorized(scope):
            response = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _is_protected(path: str) -> bool:
        return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")

    def _authorized(self, scope: Scope) -> bool:
        given = Headers(scope=scope).get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._expected)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes (--max-body-mb)")


class BodyLimitMiddleware:
    """413 for a declared Content-Length over the limit (before reading anything), and for a streamed body
    that grows past it (raised from ``receive``, answered by the app's error handler)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            error = BodyTooLarge(self.max_body_bytes)
            status = 413 if declared.isdigit() else 400
            message = error.detail if status == 413 else "Content-Length must be a non-negative integer"
            # the client may still be sending: close the connection rather than read what we refuse
            response = error_response(status, message, code="body_too_large" if status == 413 else None,
                                      headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, receive_with_limit, send)


#: names that always reach this machine and that no web page can re-point (unlike a DNS name it controls)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: addresses that mean "every interface": never a name a client sends
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})


def host_name(host_header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1`` (lower case, no trailing dot)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def allowed_host_patterns(bound_host: str, allowed_hosts: Iterable[str]) -> frozenset[str]:
    """The Host names accepted: loopback names, the address the server is bound to, and ``--allowed-hosts``
    (exact names, ``*.example.com`` for sub-domains, or ``*`` to turn the check off)."""
    hosts = set(LOOPBACK_HOSTS) | {host_name(h) if h != "*" and not h.startswith("*.") else h.lower()
                                   for h in allowed_hosts}
    if bound_host not in WILDCARD_ADDRESSES:
        hosts.add(host_name(bound_host))
    return frozenset(hosts)


def host_allowed(host: str, patterns: frozenset[str]) -> bool:
    if "*" in patterns or host in patterns:
        return True
    return any(p.startswith("*.") and host.endswith(p[1:]) for p in patterns)


class HostCheckMiddleware:
    """400 unless the ``Host`` header names this server (DNS rebinding: a page's own name pointed at us)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = Headers(scope=scope).get("host", "")
            if not host_allowed(host_name(given), self.allowed):
                response = error_response(
                    400, f"Host {given[:100]!r} is not a name of this server; start it with --allowed-hosts to accept "
                         "other names", param="Host", code="invalid_host", headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` as browsers send it; anything else (a path, no scheme) is refused here."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port], e.g. https://app.example.com")
    return f"{parts.scheme}://{parts.netloc.lower()}"


class OriginCheckMiddleware:
    """403 for a request sent by a web page of another origin, unless ``--allowed-origins`` lists it.

    Requests without ``Origin`` (curl, SDKs, servers) pass; so do the server's own pages (``/docs``): an
    origin whose host is the request's ``Host``, which ``HostCheckMiddleware`` has already checked."""

    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self._allowed(origin, headers.get("host", "")):
                response = error_response(
                    403, f"cross-origin request from {origin[:100]!r} refused; start the server with "
                         "--allowed-origins to let that page use it", param="Origin", code="origin_not_allowed")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, host: str) -> bool:
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()
