"""``X-Request-Id``: the id a client sends (or one made here) names the request in the engine and in logs,
and comes back on every answer, errors included."""

from __future__ import annotations

import re

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ditserve.entrypoints.server.errors import error_response
from ditserve.request import new_request_id

REQUEST_ID_HEADER = "x-request-id"
#: ids we accept from clients: they end up in logs and response headers, so nothing beyond these characters
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(scope: Scope) -> str:
    """The id ``RequestIdMiddleware`` gave this request."""
    return scope["state"]["request_id"]


class RequestIdMiddleware:
    """Reads or makes the request id (kept in ``request.state.request_id``) and echoes it in the answer; a
    malformed ``X-Request-Id`` is a 400 (answered with an id of our own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given if given is not None and REQUEST_ID_PATTERN.fullmatch(given) else new_request_id()
        if given is not None and given != request_id:
            response = error_response(400, "X-Request-Id must be 1 to 128 letters, digits or ._:- characters",
                                      param="X-Request-Id", code="invalid_request_id",
                                      headers={REQUEST_ID_HEADER: request_id})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
