"""ASGI layers in front of the routes: API-key check on ``/v1`` and a request-body size limit.

Both answer before the body is read, so an unauthenticated or oversized upload costs the server nothing.
"""

from __future__ import annotations

import hmac

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
