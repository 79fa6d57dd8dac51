"""Chat completions: the last user message is the prompt, its image_url parts the inputs; the answer carries
images or videos as data URLs."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ditserve.entrypoints.media import MEDIA_TYPES, image_format, output_video_bytes
from ditserve.entrypoints.server.errors import APIError
from ditserve.entrypoints.server.generation import (
    CLIENT_CLOSED_REQUEST,
    DEFAULT_FPS,
    check_fields,
    encode_images,
    generate_images,
    ignored_fields,
    requested_dimensions,
)
from ditserve.entrypoints.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatImagePart,
    ChatImageURL,
    ChatMessage,
    ChatResponseMessage,
    ChatVideoPart,
    ChatVideoURL,
    StageMetrics,
    json_safe,
)
from ditserve.entrypoints.server.request_ids import request_id_of
from ditserve.entrypoints.server.state import ServerState, State
from ditserve.entrypoints.server.uploads import check_upload_count
from ditserve.entrypoints.server.videos import accelerator_peak_mb, stage_durations
from ditserve.models.base import ModelKind
from ditserve.request import RequestOutput


def last_user_message(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The prompt (the last user message's text parts, joined by new lines) and its image URLs, each with the
    name of the field it came from."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role == "user":
            break
    else:
        raise APIError(400, "messages: there is no user message to take the prompt from", param="messages",
                       code="invalid_parameter")
    where = f"messages[{index}].content"
    if isinstance(message.content, str) or message.content is None:
        texts, urls = [message.content or ""], []
    else:
        texts = [part.text for part in message.content if part.type == "text"]
        urls = [(f"{where}[{j}].image_url", part.image_url.url) for j, part in enumerate(message.content)
                if part.type == "image_url"]
    prompt = "\n".join(text for text in texts if text)
    if not prompt.strip():
        raise APIError(400, f"{where}: the last user message has no text to use as the prompt", param=where,
                       code="invalid_parameter")
    return prompt, urls


def _encode_videos(output: RequestOutput) -> list[str]:
    return [base64.b64encode(output_video_bytes(output, index, DEFAULT_FPS)).decode("ascii")
            for index in range(len(output.videos))]


async def chat_answer(state: ServerState, fields: ChatCompletionRequest, output: RequestOutput,
                      output_format: str, request_id: str) -> ChatCompletionResponse:
    parts: list[ChatImagePart | ChatVideoPart]
    if output.videos:
        encoded = await run_in_threadpool(_encode_videos, output)
        parts = [ChatVideoPart(video_url=ChatVideoURL(url=f"data:video/mp4;base64,{b64}")) for b64 in encoded]
    else:
        encoded = await run_in_threadpool(encode_images, output.images, output_format, fields.output_compression)
        media_type = MEDIA_TYPES[image_format(output_format)]
        parts = [ChatImagePart(image_url=ChatImageURL(url=f"data:{media_type};base64,{b64}")) for b64 in encoded]
    metrics = (StageMetrics(stage_durations=stage_durations(output.timings), peak_memory_mb=accelerator_peak_mb())
               if fields.return_stage_metrics else None)
    return ChatCompletionResponse(
        id=f"chatcmpl-{request_id}", created=int(time.time()), model=fields.model or state.settings.served_model_name,
        choices=[ChatChoice(message=ChatResponseMessage(content=parts))], seed=output.seed,
        timings=json_safe(output.timings), cache_stats=json_safe(output.cache_stats),
        ignored_fields=ignored_fields(fields, output_format), metrics=metrics)


async def chat_completions(body: ChatCompletionRequest, http_request: HTTPRequest, state: State) -> Any:
    prompt, urls = last_user_message(body.messages)
    check_fields(state, body, prompt)
    check_upload_count(urls, "messages", state.accepted_uploads(), state.settings.served_model_name, state.kind)
    images = await state.read_image_urls(urls)
    dimensions = requested_dimensions(body.size, body.width, body.height)
    if state.kind is ModelKind.EDIT and not dimensions:
        dimensions = state.auto_size(images) if images else {}
    # num_frames and fps go to every model: an image model's own rules refuse what it cannot use
    output, output_format = await generate_images(http_request, state, body, prompt, images, dimensions,
                                                  num_frames=body.num_frames, fps=body.fps)
    if output is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return await chat_answer(state, body, output, output_format, request_id_of(http_request.scope))


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      response_model=ChatCompletionResponse)
