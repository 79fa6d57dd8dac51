"""Connection limits and read timeouts: a client that trickles its headers or its body, or opens connections
and sends nothing, must not hold the server's sockets forever.

uvicorn times out only idle keep-alive connections (after a response); a connection that has not yet sent a
whole request head waits indefinitely (400 trickling connections stayed open). So:

* ``TimedH11Protocol``: uvicorn's h11 protocol with a deadline for each request head, armed when the
  connection opens and after each response, disarmed when a complete head has arrived; past it the
  connection is closed.
* ``BodyTimeoutMiddleware``: the body must arrive within ``body_timeout_s`` of the request's start; past it
  the request ends with a 408 in OpenAI's shape.
* uvicorn's own limits: ``limit_concurrency`` (connections and requests at once; more get a 503),
  ``timeout_keep_alive`` and the largest request head h11 buffers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

#: the largest request head (request line and headers) h11 buffers before it refuses the request
MAX_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    #: seconds a client has to send a complete request head
    header_timeout_s: float = 15.0
    #: seconds a client has to send a whole body (32 MB at 2 Mbit/s takes about 130 s)
    body_timeout_s: float = 180.0
    #: seconds an idle keep-alive connection stays open (uvicorn's default)
    keep_alive_s: int = 5
    #: connections (and requests) served at once; beyond it new requests get a 503
    max_connections: int = 256


class TimedH11Protocol(H11Protocol):
    """``H11Protocol`` with a deadline for each request head (see the module docstring)."""

    header_timeout_s = ConnectionLimits.header_timeout_s

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # uvicorn starts a new request cycle once h11 has parsed a complete head
        if self._head_timer is not None and self.cycle is not self._cycle_when_armed:
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this keep-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._cycle_when_armed = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.logger.debug("closing a connection that sent no complete request head in %ss",
                              self.header_timeout_s)
            self.transport.close()


def protocol_with_header_timeout(header_timeout_s: float) -> type[TimedH11Protocol]:
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": header_timeout_s})


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """Our limits as ``uvicorn.run`` / ``uvicorn.Config`` keyword arguments."""
    return {"http": protocol_with_header_timeout(limits.header_timeout_s), "timeout_keep_alive": limits.keep_alive_s,
            "limit_concurrency": limits.max_connections, "h11_max_incomplete_event_size": MAX_HEADER_BYTES}


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s (--body-timeout)")


class BodyTimeoutMiddleware:
    """408 when the body is not complete ``body_timeout_s`` after the request started (raised from
    ``receive``, answered by the app's error handler). Once the body is complete, ``receive`` is left alone:
    handlers wait on it for a disconnect for as long as a generation takes."""

    def __init__(self, app: ASGIApp, body_timeout_s: float) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout_s
        body_complete = False

        async def receive_before_deadline() -> Message:
            nonlocal body_complete
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        await self.app(scope, receive_before_deadline, send)
