"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, never a stack trace.

Every failure a client can cause becomes a 4xx with a message that names the field; anything else is logged
here with its trace and answered with a bare 500, so internals never leak to a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.errors import (
    DitServeError,
    EngineClosedError,
    LoRAInUseError,
    LoRAPathError,
    QueueFullError,
    RequestAbortedError,
)

logger = logging.getLogger(__name__)

#: OpenAI's error ``type`` for each status we answer with
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error",
}


class APIError(Exception):
    """An error the server answers on purpose, with its HTTP status and OpenAI fields."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


def error_payload(status_code: int, message: str, param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status_code: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status_code, message, param, code), status_code=status_code,
                        headers=headers)


def api_error_from_engine(error: DitServeError) -> APIError:
    """The HTTP answer for an error raised by the engine or our validation."""
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), code="queue_full")
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), code="engine_closed")
    if isinstance(error, RequestAbortedError):
        return APIError(409, str(error), code="request_aborted")
    if isinstance(error, LoRAPathError):
        return APIError(403, str(error), param=error.param, code="lora_path_not_allowed")
    if isinstance(error, LoRAInUseError):
        return APIError(409, str(error), param=error.param, code="lora_in_use")
    return APIError(400, str(error), param=error.param, code="invalid_parameter")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as '<field>: <what is wrong>' and the field's name."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status_code == 429 else None
        return error_response(error.status_code, error.message, error.param, error.code, headers)

    @app.exception_handler(DitServeError)
    async def _engine_error(request: Request, error: DitServeError) -> JSONResponse:
        return await _api_error(request, api_error_from_engine(error))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(400, message, param, "invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=dict(error.headers or {}) or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", code="internal_error")
