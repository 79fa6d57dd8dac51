"""The OpenAI-compatible HTTP API over a ``DiffusionEngine``: images, edits, chat, async video jobs, LoRAs,
models, health and metrics (one router per resource, in ``routes``).

Generation always runs on the engine's own thread; handlers only await its futures, so the event loop stays
free for other clients. A client that disconnects while waiting has its request aborted (the engine stops it
within one denoising step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.connections import BodyTimeoutMiddleware
from ditserve.entrypoints.server.errors import install_error_handlers
from ditserve.entrypoints.server.metrics import MetricsMiddleware
from ditserve.entrypoints.server.request_ids import RequestIdMiddleware
from ditserve.entrypoints.server.routes import ROUTE_MODULES
from ditserve.entrypoints.server.security import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    OriginCheckMiddleware,
    allowed_host_patterns,
)
from ditserve.entrypoints.server.state import ServerSettings, ServerState
from ditserve.entrypoints.server.videos import VideoStore

logger = logging.getLogger(__name__)

#: the longest pause between two sweeps of expired video jobs
EXPIRY_SWEEP_S = 600.0


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the errors we really answer: 400 in OpenAI's shape where FastAPI documents 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if operation.get("parameters") or operation.get("requestBody"):
                    responses["400"] = {"description": "invalid request", **error}
                if "{video_id}" in path:
                    responses["404"] = {"description": "no such video", **error}
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
async def sweep_expired_videos(store: VideoStore, ttl_s: float) -> None:
    """Remove finished jobs older than ``ttl_s``, now and then every ``min(ttl_s / 10, EXPIRY_SWEEP_S)``."""
    while True:
        try:
            removed = await run_in_threadpool(store.expire, time.time() - ttl_s)
            if removed:
                logger.info("removed %d video job(s) finished more than %gs ago", removed, ttl_s)
        except Exception:  # noqa: BLE001 - a failed sweep is retried at the next one, never ends the server
            logger.exception("removing expired video jobs failed")
        await asyncio.sleep(min(ttl_s / 10, EXPIRY_SWEEP_S))


def create_app(engine: DiffusionEngine, settings: ServerSettings, store: VideoStore | None = None) -> FastAPI:
    """The FastAPI app over ``engine``. The app does not own the engine: whoever built it closes it.
    ``store``: the video store, when the caller opened it before loading the model (to check the folder
    early); otherwise a video model's server opens ``settings.output_dir`` here."""
    state = ServerState(engine, settings, store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = None
        if state.store is not None:
            # the folder's lock is ours: its unfinished jobs were left by a server that is gone
            interrupted = state.store.fail_interrupted(
                "server_restarted", "the server restarted before this job finished; submit it again")
            if interrupted:
                logger.warning("marked %d unfinished video job(s) of a previous run as failed", interrupted)
            if settings.video_ttl_s is not None:
                sweeper = asyncio.get_running_loop().create_task(
                    sweep_expired_videos(state.store, settings.video_ttl_s))
        engine.observers.append(state.metrics.observe_step)
        try:
            yield
        finally:
            engine.observers.remove(state.metrics.observe_step)
            if sweeper is not None:
                sweeper.cancel()
            if state.videos is not None and state.store is not None:
                await state.videos.shutdown()
                state.store.close()

    app = FastAPI(title="ditserve", description="OpenAI-compatible serving of diffusion transformers",
                  version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.server = state
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    for routes in ROUTE_MODULES:
        routes.add_routes(app)
    state.metrics.known_routes = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    # added innermost first: metrics see every answer; Host and Origin are checked before anything else, CORS
    # answers allowed pages' preflights before the key is asked for; the key is checked before the body is read
    app.add_middleware(BodyTimeoutMiddleware, body_timeout_s=settings.connections.body_timeout_s)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["authorization", "content-type"])
    app.add_middleware(OriginCheckMiddleware, allowed_origins=frozenset(settings.allowed_origins))
    app.add_middleware(HostCheckMiddleware, allowed=allowed_host_patterns(settings.host, settings.allowed_hosts))
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    # outermost: every answer, a refused Host or key included, carries the request's id
    app.add_middleware(RequestIdMiddleware)
    return app
