"""The LoRA adapters a server holds: list, hot-load, unload."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from ditserve.entrypoints.server.errors import APIError
from ditserve.entrypoints.server.generation import check_client_lora_path
from ditserve.entrypoints.server.protocol import LoRACard, LoRAList, LoRALoadRequest, LoRAUnloadRequest
from ditserve.entrypoints.server.state import ServerState, State
from ditserve.lora.manager import LoadedLoRA, LoRAManager


def lora_manager(state: ServerState) -> LoRAManager:
    manager = state.engine.runner.loras
    if manager is None:
        raise APIError(400, "this server takes no per-request LoRA (it fuses its adapters at start, or runs on "
                       "several devices)", param="lora", code="lora_unsupported")
    return manager


def lora_card(entry: LoadedLoRA) -> LoRACard:
    return LoRACard(name=entry.name, int_id=entry.int_id, format=entry.format, rank=entry.rank,
                    num_modules=entry.num_modules, bytes=entry.num_bytes, in_use=entry.pins)


async def list_loras(state: State) -> LoRAList:
    manager = state.engine.runner.loras
    return LoRAList(data=[lora_card(entry) for entry in (manager.loaded() if manager is not None else [])])


async def load_lora(body: LoRALoadRequest, state: State) -> LoRACard:
    manager = lora_manager(state)
    check_client_lora_path(state.engine, body.path)
    # a path from a client: the allow-list applies (trusted=False)
    entry = await run_in_threadpool(manager.register, body.name, body.path, trusted=False, int_id=body.int_id)
    return lora_card(entry)


async def unload_lora(body: LoRAUnloadRequest, state: State) -> LoRAList:
    manager = lora_manager(state)
    manager.unload(body.name)
    return LoRAList(data=[lora_card(entry) for entry in manager.loaded()])


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/loras", list_loras, methods=["GET"], response_model=LoRAList)
    app.add_api_route("/v1/loras/load", load_lora, methods=["POST"], response_model=LoRACard)
    app.add_api_route("/v1/loras/unload", unload_lora, methods=["POST"], response_model=LoRAList)
