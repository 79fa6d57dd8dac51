"""Health, metrics and the model list."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ditserve.entrypoints.server.protocol import ModelList
from ditserve.entrypoints.server.state import State


async def health(state: State) -> Response:
    alive = state.engine.is_alive()
    degraded = state.store.degraded if state.store is not None else None
    status = "engine_down" if not alive else "degraded" if degraded else "ok"
    body = {"status": status, "model": state.settings.served_model_name,
            "kind": state.kind.value, "queue_depth": state.engine.queue_depth()}
    if degraded:
        body["reason"] = degraded
    # a load balancer must see a dead engine, or a video server that cannot save videos, as unhealthy
    return Response(json.dumps(body), status_code=200 if status == "ok" else 503, media_type="application/json")


async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def list_models(state: State) -> ModelList:
    return ModelList(data=state.model_cards())


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response)
    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList)
