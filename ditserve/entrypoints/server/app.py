"""The OpenAI-compatible HTTP API over a ``DiffusionEngine``: images, edits, async video jobs, models,
health and metrics.

Generation always runs on the engine's own thread; handlers only await its futures, so the event loop stays
free for other clients. A client that disconnects while waiting has its request aborted (the engine stops it
within one denoising step).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query
from fastapi import Path as PathParam
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.media import (
    LOSSY_FORMATS,
    MEDIA_TYPES,
    check_alpha_format,
    image_bytes,
    image_format,
    output_video_bytes,
)
from ditserve.entrypoints.server.connections import BodyTimeoutMiddleware, ConnectionLimits
from ditserve.entrypoints.server.errors import APIError, install_error_handlers
from ditserve.entrypoints.server.image_urls import RemoteImagePolicy, image_url_bytes
from ditserve.entrypoints.server.metrics import MetricsMiddleware, ServerMetrics
from ditserve.entrypoints.server.protocol import (
    VIDEO_ID_PATTERN,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatImagePart,
    ChatImageURL,
    ChatMessage,
    ChatResponseMessage,
    ChatVideoPart,
    ChatVideoURL,
    GenerationOptions,
    ImageData,
    ImageEditFields,
    ImageGenerationRequest,
    ImagesResponse,
    LoRACard,
    LoRAList,
    LoRALoadRequest,
    LoRAUnloadRequest,
    ModelCard,
    ModelList,
    OpenAIImageFields,
    StageMetrics,
    VideoCreateFields,
    VideoDeleted,
    VideoList,
    VideoObject,
    form_schema,
    json_safe,
    parse_size,
    standalone_schema,
    validate_fields,
)
from ditserve.entrypoints.server.request_ids import RequestIdMiddleware, request_id_of
from ditserve.entrypoints.server.security import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    OriginCheckMiddleware,
    allowed_host_patterns,
    normalise_origin,
)
from ditserve.entrypoints.server.uploads import (
    MAX_INPUT_IMAGES,
    MULTIPART,
    URLENCODED,
    Form,
    check_upload_count,
    decode_blob,
    decode_permits,
    read_form,
    read_images,
)
from ditserve.entrypoints.server.videos import (
    VideoJob,
    VideoJobRunner,
    VideoStore,
    accelerator_peak_mb,
    new_video_id,
    stage_durations,
)
from ditserve.errors import DitServeError, InvalidParameterError, check_text
from ditserve.lora.manager import LoadedLoRA, LoRAManager
from ditserve.lora.request import LoRARequest
from ditserve.models.base import ImageMode, InputImages
from ditserve.request import Request, RequestOutput

ImageFields = ImageGenerationRequest | ImageEditFields | ChatCompletionRequest

logger = logging.getLogger(__name__)

#: how often a waiting handler checks whether its client is still there
DISCONNECT_POLL_S = 0.05
#: status recorded (metrics, logs) for a request whose client went away; nobody receives it
CLIENT_CLOSED_REQUEST = 499
DEFAULT_FPS = 16
DEFAULT_OUTPUT_DIR = Path.home() / ".cache" / "ditserve" / "server"
DEFAULT_VIDEO_TTL_S = 24 * 3600.0
#: the longest pause between two sweeps of expired video jobs
EXPIRY_SWEEP_S = 600.0
DEFAULT_OUTPUT_FORMAT = "png"
#: form fields that carry a JSON object as text (multipart and urlencoded bodies have only strings)
JSON_FORM_FIELDS = ("extra_params", "lora", "image_reference", "video_reference", "audio_reference")
#: edit inputs of the mirrored system that no model family served here takes, and why (refused: an edit that
#: dropped them would not be the edit asked for)
EDIT_INPUTS_REFUSED = {
    "mask": "edits from the prompt and takes no mask (no model family served here inpaints)",
    "mask_image": "edits from the prompt and takes no mask (no model family served here inpaints)",
    "reference_image": "takes no separate reference image (no model family served here uses one); give every "
                       "image to edit as image or url",
}


@dataclass
class ServerSettings:
    #: the model's name in answers; clients may also use any of ``aliases``
    served_model_name: str
    #: clients must send ``Authorization: Bearer <api_key>`` on /v1 routes; None: no authentication
    api_key: str | None = None
    #: video jobs' database and MP4 files (used, and locked, only by servers of video models)
    output_dir: Path = field(default_factory=lambda: DEFAULT_OUTPUT_DIR)
    #: finished video jobs (rows and files) are removed this long after they ended; None keeps them
    video_ttl_s: float | None = DEFAULT_VIDEO_TTL_S
    max_body_mb: float = 32.0
    #: the address the server listens on: a Host header naming it is accepted, as are loopback names
    host: str = "127.0.0.1"
    #: other Host names accepted (``*.example.com``, or ``*`` for any: behind a proxy that checks them)
    allowed_hosts: list[str] = field(default_factory=list)
    #: web origins (``https://app.example.com``) whose pages may call the API; other pages are refused
    allowed_origins: list[str] = field(default_factory=list)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: other names clients may give the model (a hub id, the folder's name); /v1/models lists them all
    aliases: list[str] = field(default_factory=list)
    #: fetch http(s) image URLs (chat image_url parts, edits' url fields); data URLs are always accepted
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        try:
            self.allowed_origins = [normalise_origin(origin) for origin in self.allowed_origins]
        except ValueError as error:
            raise InvalidParameterError(f"allowed_origins: {error}", param="allowed_origins") from None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys([self.served_model_name, *self.aliases]))

    @property
    def remote_images(self) -> RemoteImagePolicy:
        return RemoteImagePolicy(allowed=self.allow_remote_images, max_bytes=self.max_body_bytes)


class ServerState:
    """What the routes share: the engine, the settings, the video jobs, the metrics, the model card."""

    def __init__(self, engine: DiffusionEngine, settings: ServerSettings, store: VideoStore | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.kind: str = engine.adapter.kind
        self.defaults = engine.adapter.resolve_params(OmniDiffusionSamplingParams())
        self.metrics = ServerMetrics(engine.queue_depth)
        #: video jobs exist only on servers of video models; the others neither need nor lock the folder
        self.store: VideoStore | None = None
        self.videos: VideoJobRunner | None = None
        if self.kind == "video":
            self.store = store if store is not None else VideoStore(settings.output_dir)
            self.videos = VideoJobRunner(engine, self.store)
        elif store is not None:
            store.close()
        self.created = int(time.time())
        self.decoding = asyncio.Semaphore(decode_permits(engine.config.limits.max_image_size))
        #: ids of the requests this server is waiting on: a client's X-Request-Id must name one request at a time
        self.in_flight: set[str] = set()

    def accepted_uploads(self) -> int:
        """How many input images this model takes, known before any upload is decoded. The rule is the
        adapters' ``validate_inputs`` (edit and image-to-video models take images, up to ``max_input_images``;
        the others none), which judges the decoded images again in ``make_request``."""
        adapter = self.engine.adapter
        if adapter.input_images is InputImages.NONE:
            return 0
        most = adapter.max_input_images
        return MAX_INPUT_IMAGES if most is None else min(most, MAX_INPUT_IMAGES)

    async def read_uploads(self, uploads: list[Any], field: str) -> list[Image.Image]:
        check_upload_count(uploads, field, self.accepted_uploads(), self.settings.served_model_name, self.kind)
        return await read_images(uploads, field, self.engine.config.limits.max_image_size, self.decoding,
                                 self.engine.adapter.input_image_mode.value)

    async def read_image_urls(self, urls: list[tuple[str, str]]) -> list[Image.Image]:
        """Images given as (field, URL) pairs, fetched (data URLs decoded) one at a time and then decoded; the
        caller has counted them (``check_upload_count``)."""
        images = []
        for name, url in urls:
            data = await image_url_bytes(url, name, self.settings.remote_images)
            images.append(await decode_blob(data, name, self.engine.config.limits.max_image_size, self.decoding,
                                            self.engine.adapter.input_image_mode.value))
        return images

    def auto_size(self, images: list[Image.Image]) -> dict[str, int]:
        """``size=auto`` for an edit: the size the model picks for these inputs (their aspect ratio at its pixel
        budget, in its multiple), shrunk to fit ``--max-image-size`` when it is over; {} keeps the model's own
        choice untouched."""
        adapter = self.engine.adapter
        if not adapter.takes_output_size:
            # the model sizes its output from the input itself (and refuses a size)
            return {}
        chosen = adapter.complete_params(Request(prompt="", params=self.defaults, images=images))
        width, height, limit = chosen.width, chosen.height, self.engine.config.limits.max_image_size
        if not width or not height or max(width, height) <= limit:
            return {}
        scale, multiple = limit / max(width, height), adapter.size_multiple
        return {"width": max(multiple, int(width * scale) // multiple * multiple),
                "height": max(multiple, int(height * scale) // multiple * multiple)}

    def check_texts(self, prompt: str, fields: GenerationOptions) -> None:
        """The engine's text limits, checked before uploads are decoded (``make_request`` checks them again)."""
        limits = self.engine.config.limits
        check_text("prompt", prompt, limits.max_prompt_chars)
        if fields.negative_prompt is not None:
            check_text("negative_prompt", fields.negative_prompt, limits.max_negative_prompt_chars)

    def model_cards(self) -> list[ModelCard]:
        d = self.defaults
        size = f"{d.width}x{d.height}" if d.width and d.height else "auto"
        return [ModelCard(id=name, created=self.created, kind=self.kind,  # type: ignore[arg-type]
                          default_size=size, default_num_inference_steps=d.num_inference_steps,
                          default_num_frames=d.num_frames if self.kind == "video" else None)
                for name in self.settings.model_names]

    def check_model(self, model: str | None) -> None:
        names = self.settings.model_names
        if model is not None and model not in names:
            raise APIError(404, f"model {model!r} is not served here; this server serves {names[0]!r}"
                                + (f" (also named {names[1:]})" if len(names) > 1 else ""),
                           param="model", code="model_not_found")

    def require_kind(self, kind: str, route: str) -> None:
        if self.kind == kind:
            return
        where = {"image": "POST /v1/images/generations or /v1/chat/completions",
                 "edit": "POST /v1/images/edits or /v1/chat/completions",
                 "video": "POST /v1/videos or /v1/chat/completions"}[self.kind]
        raise APIError(400, f"{route} needs {with_article(kind)} model; {self.settings.served_model_name!r} is "
                            f"{with_article(self.kind)} model: use {where}", param="model",
                       code="unsupported_for_model")


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def get_state(request: HTTPRequest) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


# ---------------------------------------------------------------------------------------------- helpers
#: request fields that are sampling params under the same name
PASSED_THROUGH = ("seed", "num_inference_steps", "guidance_scale", "true_cfg_scale", "negative_prompt",
                  "max_sequence_length", "guidance_scale_2", "boundary_ratio", "layers", "resolution")


def sampling_params(options: GenerationOptions, dimensions: dict[str, int], **extra: Any) -> OmniDiffusionSamplingParams:
    """Our sampling params from a request's fields (unset fields stay None: the model's defaults)."""
    values: dict[str, Any] = {name: getattr(options, name) for name in PASSED_THROUGH}
    values.update(dimensions)
    values.update(extra)
    return OmniDiffusionSamplingParams(**{k: v for k, v in values.items() if v is not None})


def requested_dimensions(size: str | None, width: int | None = None, height: int | None = None) -> dict[str, int]:
    """``width``/``height`` from ``size`` ("WxH") or from the two fields (the mirrored system's), not both."""
    parsed = parse_size(size)
    if parsed is not None and (width is not None or height is not None):
        raise APIError(400, "give either size or width/height, not both", param="size", code="invalid_parameter")
    if parsed is not None:
        width, height = parsed
    return {name: value for name, value in (("width", width), ("height", height)) if value is not None}


def check_fields(state: ServerState, fields: GenerationOptions, prompt: str) -> None:
    """What every generating route checks once its fields are valid, before any upload is decoded."""
    state.check_model(fields.model)
    state.check_texts(prompt, fields)
    fields.refuse_unsupported()
    if isinstance(fields, OpenAIImageFields):
        fields.refuse_unhonourable(state.engine.adapter.output_image_mode is ImageMode.RGBA)


def json_form_fields(values: dict[str, str]) -> dict[str, Any]:
    """A form's text fields, with those that carry a JSON object (``JSON_FORM_FIELDS``) decoded."""
    decoded: dict[str, Any] = dict(values)
    for name in JSON_FORM_FIELDS:
        if name in values:
            try:
                decoded[name] = json.loads(values[name])
            except (json.JSONDecodeError, RecursionError):
                raise APIError(400, f"{name} must be a JSON object", param=name, code="invalid_parameter") from None
    return decoded


class ClientDisconnected(Exception):
    pass


async def run_until_done(http_request: HTTPRequest, engine: DiffusionEngine, request: Request) -> RequestOutput:
    """Submit and wait, aborting the request as soon as its client goes away."""
    future = asyncio.wrap_future(engine.submit(request))
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
        if done:
            return future.result()
        if await http_request.is_disconnected():
            engine.abort(request.request_id)
            # nobody awaits it any more: retrieve its abort error so asyncio does not log it as lost
            future.add_done_callback(_retrieve_outcome)
            raise ClientDisconnected(request.request_id)


def _retrieve_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _encode_images(images: list[Image.Image], output_format: str, quality: int | None) -> list[str]:
    return [base64.b64encode(image_bytes(image, output_format, quality)).decode("ascii") for image in images]


def ignored_fields(fields: ImageFields | VideoCreateFields, output_format: str | None = None) -> list[str] | None:
    """The fields of this request that changed nothing: OpenAI's fields with no meaning here, and
    ``output_compression`` for a lossless format."""
    names = fields.ignored_fields()
    if (output_format is not None and getattr(fields, "output_compression", None) is not None
            and image_format(output_format) not in LOSSY_FORMATS):
        names.append("output_compression")
    return names or None


def output_format_of(fields: ImageFields) -> str:
    chosen = fields.output_format
    if isinstance(fields, ChatCompletionRequest) and fields.image_format is not None:
        if chosen is not None and chosen != fields.image_format:
            raise APIError(400, "image_format and output_format name the same thing; give one",
                           param="image_format", code="invalid_parameter")
        chosen = fields.image_format
    return chosen or DEFAULT_OUTPUT_FORMAT


async def generate(http_request: HTTPRequest, state: ServerState, fields: GenerationOptions, prompt: str,
                   params: OmniDiffusionSamplingParams, images: list[Image.Image],
                   image_field: str = "image") -> RequestOutput | None:
    """Run one request under the client's request id; None when the client went away (it was aborted)."""
    request_id = request_id_of(http_request.scope)
    if request_id in state.in_flight:
        raise APIError(409, f"X-Request-Id {request_id!r} names a request that is still running; give each "
                            "request its own id", param="X-Request-Id", code="duplicate_request_id")
    try:
        request = await make_request(state.engine, fields, prompt, params, images, request_id=request_id)
    except DitServeError as error:
        raise http_param(error, image_field) from None
    state.in_flight.add(request_id)
    try:
        return await run_until_done(http_request, state.engine, request)
    except ClientDisconnected:
        logger.info("client went away: aborted %s", request_id)
        return None
    finally:
        state.in_flight.discard(request_id)


async def generate_images(http_request: HTTPRequest, state: ServerState, fields: ImageFields, prompt: str,
                          images: list[Image.Image], dimensions: dict[str, int],
                          **extra: Any) -> tuple[RequestOutput | None, str]:
    """Generate for an image route (``extra``: more sampling params); returns the output (None: the client went
    away) and the output format."""
    output_format = output_format_of(fields)
    if state.engine.adapter.output_image_mode is ImageMode.RGBA:
        check_alpha_format(output_format)
    # a layered model makes one image per layer of each output
    layers = fields.layers or state.defaults.layers or 1
    if getattr(fields, "response_format", None) == "file" and fields.n * layers != 1:
        made = f"n={fields.n}" + (f" outputs of {layers} layers" if layers != 1 else "")
        raise APIError(400, f"response_format='file' returns the bytes of one image; {made} needs "
                            "response_format='b64_json'", param="response_format", code="invalid_parameter")
    params = sampling_params(fields, dimensions, num_outputs_per_prompt=fields.n, **extra)
    return await generate(http_request, state, fields, prompt, params, images), output_format


async def images_answer(http_request: HTTPRequest, fields: ImageGenerationRequest | ImageEditFields,
                        output: RequestOutput | None, output_format: str) -> ImagesResponse | Response:
    if output is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if fields.response_format == "file":
        data = await run_in_threadpool(image_bytes, output.images[0], output_format, fields.output_compression)
        fmt = image_format(output_format)
        name = f"{request_id_of(http_request.scope)}.{output_format}"
        return Response(data, media_type=MEDIA_TYPES[fmt], headers={
            "Content-Disposition": f'attachment; filename="{name}"'})
    encoded = await run_in_threadpool(_encode_images, output.images, output_format, fields.output_compression)
    return ImagesResponse(
        created=int(time.time()), data=[ImageData(b64_json=b64) for b64 in encoded],
        output_format=output_format,  # type: ignore[arg-type]
        size="{}x{}".format(*output.images[0].size), seed=output.seed,
        timings=json_safe(output.timings), cache_stats=json_safe(output.cache_stats),
        ignored_fields=ignored_fields(fields, output_format))


async def make_request(engine: DiffusionEngine, fields: GenerationOptions, prompt: str,
                       params: OmniDiffusionSamplingParams, images: list[Image.Image], **options: Any) -> Request:
    """``engine.make_request`` with the request's LoRA; one that may read adapter files runs off the event loop."""
    if fields.lora is None:
        return engine.make_request(prompt, params, images, **options)
    check_client_lora_path(engine, fields.lora.path)
    lora = LoRARequest(fields.lora.name, fields.lora.int_id, fields.lora.path)
    return await run_in_threadpool(engine.make_request, prompt, params, images, lora=lora,
                                   lora_scale=fields.lora.scale, **options)


def check_client_lora_path(engine: DiffusionEngine, path: str | None) -> None:
    """A path from a client needs an allow-list: an engine built without ``lora_dir`` (offline ``Omni``'s default
    trusts its caller) takes none over HTTP."""
    if path is not None and engine.config.lora_dir is None:
        raise APIError(403, "this server loads no LoRA by path (it was started without a LoRA folder)",
                       param="lora.path", code="lora_path_not_allowed")


def lora_manager(state: ServerState) -> LoRAManager:
    manager = state.engine.runner.loras
    if manager is None:
        raise APIError(400, "this server takes no per-request LoRA (it fuses its adapters at start, or runs on "
                       "several devices)", param="lora", code="lora_unsupported")
    return manager


def lora_card(entry: LoadedLoRA) -> LoRACard:
    return LoRACard(name=entry.name, int_id=entry.int_id, format=entry.format, rank=entry.rank,
                    num_modules=entry.num_modules, bytes=entry.num_bytes, in_use=entry.pins)


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
        encoded = await run_in_threadpool(_encode_images, output.images, output_format, fields.output_compression)
        media_type = MEDIA_TYPES[image_format(output_format)]
        parts = [ChatImagePart(image_url=ChatImageURL(url=f"data:{media_type};base64,{b64}")) for b64 in encoded]
    metrics = (StageMetrics(stage_durations=stage_durations(output.timings), peak_memory_mb=accelerator_peak_mb())
               if fields.return_stage_metrics else None)
    return ChatCompletionResponse(
        id=f"chatcmpl-{request_id}", created=int(time.time()), model=fields.model or state.settings.served_model_name,
        choices=[ChatChoice(message=ChatResponseMessage(content=parts))], seed=output.seed,
        timings=json_safe(output.timings), cache_stats=json_safe(output.cache_stats),
        ignored_fields=ignored_fields(fields, output_format), metrics=metrics)


async def read_json_object(http_request: HTTPRequest) -> dict[str, Any]:
    try:
        value = json.loads(await http_request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply", code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return value


def video_seconds_to_frames(fields: VideoCreateFields, default_fps: int) -> int | None:
    if fields.seconds is None:
        return fields.num_frames
    if fields.num_frames is not None:
        raise APIError(400, "give either seconds or num_frames, not both", param="seconds",
                       code="invalid_parameter")
    return int(fields.seconds) * (fields.fps or default_fps) + 1


def new_video_job(state: ServerState, video_id: str, request: Request) -> VideoJob:
    p = request.params
    # whole seconds, as OpenAI's video objects give them: seconds * fps + 1 frames make ``seconds``
    seconds = str(round((p.num_frames - 1) / p.fps)) if p.num_frames and p.fps else "auto"
    size = f"{p.width}x{p.height}" if p.width and p.height else "auto"
    return VideoJob(id=video_id, created_at=int(time.time()), status="queued",
                    model=state.settings.served_model_name, prompt=request.prompt, size=size, seconds=seconds,
                    num_frames=p.num_frames, fps=p.fps, seed=p.seed)


async def read_video_request(http_request: HTTPRequest, state: ServerState) -> tuple[VideoCreateFields,
                                                                                     list[Image.Image], str]:
    """A video request's fields, its input images and the field they came from (``input_reference`` or
    ``image_reference``), from a JSON, multipart or urlencoded body."""
    content_type = http_request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = await read_json_object(http_request)
        # JSON cannot carry a file: there the first frame is a data URL (or a fetched URL, where allowed)
        reference = body.pop("input_reference", None)
        fields = validate_fields(VideoCreateFields, body, strict=True)
        check_fields(state, fields, fields.prompt)
        if reference is not None and not isinstance(reference, str):
            raise APIError(400, "input_reference: in a JSON body, the first frame is a data URL string "
                                "(data:image/png;base64,...); upload a file with a multipart body",
                           param="input_reference", code="invalid_parameter")
        urls = [("input_reference", reference)] if reference is not None else []
        return fields, await read_reference_urls(state, fields, urls), reference_field(fields)
    form = await read_form(http_request, ("input_reference",), state.settings.max_body_bytes,
                           encodings=(MULTIPART, URLENCODED))
    fields = validate_fields(VideoCreateFields, json_form_fields(form.fields), strict=False)
    check_fields(state, fields, fields.prompt)
    uploads = form.files.get("input_reference", [])
    if uploads:
        if fields.image_reference is not None:
            raise APIError(400, "give the first frame once: as input_reference or as image_reference, not both",
                           param="image_reference", code="invalid_parameter")
        return fields, await state.read_uploads(uploads, "input_reference"), "input_reference"
    return fields, await read_reference_urls(state, fields, []), reference_field(fields)


def reference_field(fields: VideoCreateFields) -> str:
    """The field that names a video request's input image in errors."""
    return "image_reference" if fields.image_reference is not None else "input_reference"


async def read_reference_urls(state: ServerState, fields: VideoCreateFields,
                              urls: list[tuple[str, str]]) -> list[Image.Image]:
    """A video request's input image given as a URL: ``input_reference`` (``urls``) or ``image_reference``."""
    if fields.image_reference is not None:
        if fields.image_reference.file_id is not None:
            raise APIError(400, "image_reference.file_id: this server keeps no uploaded files; give the image as "
                                "image_reference.image_url (a data URL) or upload it as input_reference",
                           param="image_reference.file_id", code="unsupported_parameter")
        if urls:
            raise APIError(400, "give the first frame once: as input_reference or as image_reference, not both",
                           param="image_reference", code="invalid_parameter")
        urls = [("image_reference.image_url", fields.image_reference.image_url or "")]
    if not urls:
        return []
    check_upload_count([url for _, url in urls], urls[0][0], state.accepted_uploads(),
                       state.settings.served_model_name, state.kind)
    return await state.read_image_urls(urls)


def video_params(state: ServerState, fields: VideoCreateFields) -> OmniDiffusionSamplingParams:
    default_fps = state.defaults.fps or DEFAULT_FPS
    return sampling_params(fields, requested_dimensions(fields.size, fields.width, fields.height),
                           num_frames=video_seconds_to_frames(fields, default_fps), fps=fields.fps)


def http_param(error: DitServeError, image_field: str = "image") -> DitServeError:
    """An engine error with its field named as the route names it."""
    names = {"image": image_field, "num_outputs_per_prompt": "n"}
    error.param = names.get(error.param or "", error.param)
    return error


async def read_edit_images(state: ServerState, form: Form) -> list[Image.Image]:
    """An edit's input images: uploaded ``image`` files, then ``url`` data URLs (or fetched http(s) URLs),
    counted together before any is read."""
    uploads, urls = form.files.get("image", []), form.lists.get("url", [])
    if not uploads and not urls:
        raise APIError(400, "image: at least one input image is required (an image file, or url with a data URL)",
                       param="image", code="invalid_parameter")
    check_upload_count([*uploads, *urls], "image", state.accepted_uploads(), state.settings.served_model_name,
                       state.kind)
    images = await state.read_uploads(uploads, "image") if uploads else []
    return images + await state.read_image_urls([(f"url[{i}]", url) for i, url in enumerate(urls)])


# ---------------------------------------------------------------------------------------------- OpenAPI
_BINARY = {"type": "string", "format": "binary"}
_URL = {"type": "string", "pattern": "^data:image/(png|jpeg|webp);base64,"}
EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form_schema(
    ImageEditFields, {"image": {"anyOf": [_BINARY, {"type": "array", "items": _BINARY, "maxItems": 8}]},
                      "url": {"anyOf": [_URL, {"type": "array", "items": _URL, "maxItems": 8}]},
                      "mask": _BINARY}, ())}}}}
def json_video_schema() -> dict[str, Any]:
    """A JSON video request: the form's fields, and ``input_reference`` as a data URL."""
    schema = standalone_schema(VideoCreateFields)
    schema["properties"]["input_reference"] = {**_URL, "description": "the first frame (image-to-video models)"}
    return schema


VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": json_video_schema()},
    "multipart/form-data": {"schema": form_schema(VideoCreateFields, {"input_reference": _BINARY}, ())},
    "application/x-www-form-urlencoded": {"schema": form_schema(VideoCreateFields, {}, ())}}}}
VideoIdParam = Annotated[str, PathParam(pattern=VIDEO_ID_PATTERN, max_length=38)]


# ---------------------------------------------------------------------------------------------- routes
def add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(state: State) -> Response:
        alive = state.engine.is_alive()
        degraded = state.store.degraded if state.store is not None else None
        status = "engine_down" if not alive else "degraded" if degraded else "ok"
        body = {"status": status, "model": state.settings.served_model_name,
                "kind": state.kind, "queue_depth": state.engine.queue_depth()}
        if degraded:
            body["reason"] = degraded
        # a load balancer must see a dead engine, or a video server that cannot save videos, as unhealthy
        return Response(json.dumps(body), status_code=200 if status == "ok" else 503, media_type="application/json")

    @app.get("/metrics", response_class=Response)
    async def metrics(state: State) -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(state: State) -> ModelList:
        return ModelList(data=state.model_cards())

    @app.get("/v1/loras", response_model=LoRAList)
    async def list_loras(state: State) -> LoRAList:
        manager = state.engine.runner.loras
        return LoRAList(data=[lora_card(entry) for entry in (manager.loaded() if manager is not None else [])])

    @app.post("/v1/loras/load", response_model=LoRACard)
    async def load_lora(body: LoRALoadRequest, state: State) -> LoRACard:
        manager = lora_manager(state)
        check_client_lora_path(state.engine, body.path)
        # a path from a client: the allow-list applies (trusted=False)
        entry = await run_in_threadpool(manager.register, body.name, body.path, trusted=False, int_id=body.int_id)
        return lora_card(entry)

    @app.post("/v1/loras/unload", response_model=LoRAList)
    async def unload_lora(body: LoRAUnloadRequest, state: State) -> LoRAList:
        manager = lora_manager(state)
        manager.unload(body.name)
        return LoRAList(data=[lora_card(entry) for entry in manager.loaded()])

    @app.post("/v1/images/generations", response_model=ImagesResponse,
              responses={200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}}})
    async def create_images(body: ImageGenerationRequest, http_request: HTTPRequest, state: State) -> Any:
        check_fields(state, body, body.prompt)
        state.require_kind("image", "POST /v1/images/generations")
        output, output_format = await generate_images(http_request, state, body, body.prompt, [],
                                                      requested_dimensions(body.size))
        return await images_answer(http_request, body, output, output_format)

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=EDIT_BODY)
    async def edit_images(http_request: HTTPRequest, state: State) -> Any:
        # the kind is the server's, not the request's: a model that edits nothing refuses before reading the body
        state.require_kind("edit", "POST /v1/images/edits")
        # the refused inputs are read as files or as (URL) text, as the mirrored system takes them, so that both
        # shapes get the reason
        form = await read_form(http_request, ("image", *EDIT_INPUTS_REFUSED), state.settings.max_body_bytes,
                               list_fields=("url", *EDIT_INPUTS_REFUSED))
        for name, reason in EDIT_INPUTS_REFUSED.items():
            if name in form.files or name in form.lists:
                raise APIError(400, f"{name}: {state.settings.served_model_name!r} {reason}", param=name,
                               code="invalid_parameter")
        fields = validate_fields(ImageEditFields, json_form_fields(form.fields), strict=False)
        check_fields(state, fields, fields.prompt)
        images = await read_edit_images(state, form)
        dimensions = requested_dimensions(fields.size) if fields.size not in (None, "auto") else state.auto_size(images)
        output, output_format = await generate_images(http_request, state, fields, fields.prompt, images, dimensions)
        return await images_answer(http_request, fields, output, output_format)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, http_request: HTTPRequest, state: State) -> Any:
        prompt, urls = last_user_message(body.messages)
        check_fields(state, body, prompt)
        check_upload_count(urls, "messages", state.accepted_uploads(), state.settings.served_model_name, state.kind)
        images = await state.read_image_urls(urls)
        dimensions = requested_dimensions(body.size, body.width, body.height)
        if state.kind == "edit" and not dimensions:
            dimensions = state.auto_size(images) if images else {}
        # num_frames and fps go to every model: an image model's own rules refuse what it cannot use
        output, output_format = await generate_images(http_request, state, body, prompt, images, dimensions,
                                                      num_frames=body.num_frames, fps=body.fps)
        if output is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await chat_answer(state, body, output, output_format, request_id_of(http_request.scope))

    @app.post("/v1/videos", response_model=VideoObject, openapi_extra=VIDEO_BODY)
    async def create_video(http_request: HTTPRequest, state: State) -> VideoObject:
        state.require_kind("video", "POST /v1/videos")
        fields, images, image_field = await read_video_request(http_request, state)
        videos = state.videos
        assert videos is not None  # a video model's server always has its job runner (require_kind above)
        video_id = new_video_id()
        try:
            request = await make_request(state.engine, fields, fields.prompt, video_params(state, fields), images,
                                         request_id=video_id, progress_callback=videos.progress_callback(video_id))
        except DitServeError as error:
            raise http_param(error, image_field) from None
        logger.info("request %s is video job %s", request_id_of(http_request.scope), video_id)
        job = new_video_job(state, video_id, request)
        videos.start(job, request)
        return job.to_api(ignored_fields=ignored_fields(fields))

    @app.post("/v1/videos/sync", response_class=Response, openapi_extra=VIDEO_BODY,
              responses={200: {"content": {"video/mp4": {}}, "description": "the MP4 file"}})
    async def create_video_sync(http_request: HTTPRequest, state: State) -> Response:
        """Generate and answer with the MP4 itself: no job is recorded (the mirrored system's benchmark route)."""
        state.require_kind("video", "POST /v1/videos/sync")
        fields, images, image_field = await read_video_request(http_request, state)
        output = await generate(http_request, state, fields, fields.prompt, video_params(state, fields), images,
                                image_field)
        if output is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        data = await run_in_threadpool(output_video_bytes, output, 0, DEFAULT_FPS)
        name = f"{request_id_of(http_request.scope)}.mp4"
        return Response(data, media_type="video/mp4", headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(state: State,
                          after: Annotated[str | None, Query(pattern=VIDEO_ID_PATTERN, max_length=38)] = None,
                          limit: Annotated[int, Query(ge=0, le=100)] = 20,
                          order: Literal["asc", "desc"] = "desc") -> VideoList:
        if state.store is None:
            return VideoList(data=[], has_more=False)
        jobs, has_more = state.store.list(after, limit, order)
        data = [job.to_api(state.settings.video_ttl_s) for job in jobs]
        return VideoList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                         last_id=data[-1].id if data else None)

    @app.get("/v1/videos/{video_id}", response_model=VideoObject)
    async def retrieve_video(video_id: VideoIdParam, state: State) -> VideoObject:
        return _job_or_404(state, video_id).to_api(state.settings.video_ttl_s)

    @app.get("/v1/videos/{video_id}/content", response_class=FileResponse)
    async def video_content(video_id: VideoIdParam, state: State,
                            variant: Literal["video"] = "video") -> FileResponse:
        job = _job_or_404(state, video_id)
        if job.status != "completed":
            raise APIError(409, f"video {video_id} is {job.status}; its content exists once it is completed",
                           param="video_id", code="video_not_ready")
        path = _store_or_404(state, video_id).video_path(video_id)
        if not path.is_file():
            raise APIError(404, f"the file of video {video_id} is missing from the output directory",
                           param="video_id", code="video_file_missing")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
    async def delete_video(video_id: VideoIdParam, state: State) -> VideoDeleted:
        job = _job_or_404(state, video_id)
        if job.status in ("queued", "in_progress") and state.videos is not None:
            state.videos.cancel(video_id)
        _store_or_404(state, video_id).delete(video_id)
        return VideoDeleted(id=video_id, deleted=True)


def _store_or_404(state: ServerState, video_id: str) -> VideoStore:
    if state.store is None:
        raise APIError(404, f"no video with id {video_id} (this server's model makes no videos)", param="video_id",
                       code="video_not_found")
    return state.store


def _job_or_404(state: ServerState, video_id: str) -> VideoJob:
    job = _store_or_404(state, video_id).get(video_id)
    if job is None:
        raise APIError(404, f"no video with id {video_id}", param="video_id", code="video_not_found")
    return job


# ---------------------------------------------------------------------------------------------- factory
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
    add_routes(app)
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
