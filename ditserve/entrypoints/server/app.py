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
from ditserve.entrypoints.media import image_bytes
from ditserve.entrypoints.server.connections import BodyTimeoutMiddleware, ConnectionLimits
from ditserve.entrypoints.server.errors import APIError, install_error_handlers
from ditserve.entrypoints.server.metrics import MetricsMiddleware, ServerMetrics
from ditserve.entrypoints.server.protocol import (
    VIDEO_ID_PATTERN,
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
    VideoCreateFields,
    VideoDeleted,
    VideoList,
    VideoObject,
    decode_form_json,
    form_schema,
    json_safe,
    parse_size,
    validate_fields,
)
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
    check_upload_count,
    decode_permits,
    read_form,
    read_images,
)
from ditserve.entrypoints.server.videos import VideoJob, VideoJobRunner, VideoStore, new_video_id
from ditserve.errors import DitServeError, InvalidParameterError, check_text
from ditserve.lora.manager import LoadedLoRA, LoRAManager
from ditserve.lora.request import LoRARequest
from ditserve.request import Request, RequestOutput

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


@dataclass
class ServerSettings:
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

    def __post_init__(self) -> None:
        try:
            self.allowed_origins = [normalise_origin(origin) for origin in self.allowed_origins]
        except ValueError as error:
            raise InvalidParameterError(f"allowed_origins: {error}", param="allowed_origins") from None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


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

    def accepted_uploads(self) -> int:
        """How many input images this model takes, known before any upload is decoded. The rule is the
        adapters' ``validate_inputs`` (edit models take images, up to ``max_input_images``; the others none),
        which judges the decoded images again in ``make_request``."""
        if self.kind != "edit":
            return 0
        most = getattr(self.engine.adapter, "max_input_images", None)
        return MAX_INPUT_IMAGES if most is None else min(most, MAX_INPUT_IMAGES)

    async def read_uploads(self, uploads: list[Any], field: str) -> list[Image.Image]:
        check_upload_count(uploads, field, self.accepted_uploads(), self.settings.served_model_name, self.kind)
        return await read_images(uploads, field, self.engine.config.limits.max_image_size, self.decoding)

    def check_texts(self, fields: ImageEditFields | VideoCreateFields) -> None:
        """The engine's text limits, checked before uploads are decoded (``make_request`` checks them again)."""
        limits = self.engine.config.limits
        check_text("prompt", fields.prompt, limits.max_prompt_chars)
        if fields.negative_prompt is not None:
            check_text("negative_prompt", fields.negative_prompt, limits.max_negative_prompt_chars)

    def model_card(self) -> ModelCard:
        d = self.defaults
        size = f"{d.width}x{d.height}" if d.width and d.height else "auto"
        return ModelCard(id=self.settings.served_model_name, created=self.created, kind=self.kind,  # type: ignore[arg-type]
                         default_size=size, default_num_inference_steps=d.num_inference_steps,
                         default_num_frames=d.num_frames if self.kind == "video" else None)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")

    def require_kind(self, kind: str, route: str) -> None:
        if self.kind == kind:
            return
        where = {"image": "POST /v1/images/generations", "edit": "POST /v1/images/edits",
                 "video": "POST /v1/videos"}[self.kind]
        raise APIError(400, f"{route} needs {with_article(kind)} model; {self.settings.served_model_name!r} is "
                            f"{with_article(self.kind)} model: use {where}", param="model",
                       code="unsupported_for_model")


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def get_state(request: HTTPRequest) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


# ---------------------------------------------------------------------------------------------- helpers
def sampling_params(options: GenerationOptions, size: str | None, **extra: Any) -> OmniDiffusionSamplingParams:
    """Our sampling params from a request's fields (unset fields stay None: the model's defaults)."""
    values: dict[str, Any] = {name: getattr(options, name) for name in
                              ("seed", "num_inference_steps", "guidance_scale", "true_cfg_scale", "negative_prompt")}
    dimensions = parse_size(size)
    if dimensions is not None:
        values["width"], values["height"] = dimensions
    values.update(extra)
    return OmniDiffusionSamplingParams(**{k: v for k, v in values.items() if v is not None})


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


def _encode_images(images: list[Image.Image], output_format: str) -> list[str]:
    return [base64.b64encode(image_bytes(image, output_format)).decode("ascii") for image in images]


async def images_response(output: RequestOutput, output_format: str) -> ImagesResponse:
    encoded = await run_in_threadpool(_encode_images, output.images, output_format)
    return ImagesResponse(
        created=int(time.time()), data=[ImageData(b64_json=b64) for b64 in encoded],
        output_format=output_format,  # type: ignore[arg-type]
        size="{}x{}".format(*output.images[0].size), seed=output.seed,
        timings=json_safe(output.timings), cache_stats=json_safe(output.cache_stats))


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


async def generate_images(http_request: HTTPRequest, state: ServerState, fields: ImageGenerationRequest,
                          images: list[Image.Image]) -> ImagesResponse | Response:
    params = sampling_params(fields, fields.size, num_outputs_per_prompt=fields.n)
    request = await make_request(state.engine, fields, fields.prompt, params, images)
    try:
        output = await run_until_done(http_request, state.engine, request)
    except ClientDisconnected:
        logger.info("client went away: aborted %s", request.request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return await images_response(output, fields.output_format or "png")


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
    seconds = f"{p.num_frames / p.fps:g}" if p.num_frames and p.fps else "auto"
    size = f"{p.width}x{p.height}" if p.width and p.height else "auto"
    return VideoJob(id=video_id, created_at=int(time.time()), status="queued",
                    model=state.settings.served_model_name, prompt=request.prompt, size=size, seconds=seconds,
                    num_frames=p.num_frames, fps=p.fps, seed=p.seed)


# ---------------------------------------------------------------------------------------------- OpenAPI
_BINARY = {"type": "string", "format": "binary"}
EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form_schema(
    ImageEditFields, {"image": {"anyOf": [_BINARY, {"type": "array", "items": _BINARY, "maxItems": 8}]},
                      "mask": _BINARY}, ("image",))}}}}
VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VideoCreateFields.model_json_schema()},
    "multipart/form-data": {"schema": form_schema(VideoCreateFields, {"input_reference": _BINARY}, ())}}}}
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
        return ModelList(data=[state.model_card()])

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

    @app.post("/v1/images/generations", response_model=ImagesResponse)
    async def create_images(body: ImageGenerationRequest, http_request: HTTPRequest, state: State) -> Any:
        state.check_model(body.model)
        state.require_kind("image", "POST /v1/images/generations")
        return await generate_images(http_request, state, body, [])

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=EDIT_BODY)
    async def edit_images(http_request: HTTPRequest, state: State) -> Any:
        # the kind is the server's, not the request's: a model that edits nothing refuses before reading the body
        state.require_kind("edit", "POST /v1/images/edits")
        form = await read_form(http_request, ("image", "mask"), state.settings.max_body_bytes)
        fields = validate_fields(ImageEditFields, decode_form_json(form.fields, ("lora",)), strict=False)
        state.check_model(fields.model)
        state.check_texts(fields)
        if "mask" in form.files:
            raise APIError(400, f"mask: {state.settings.served_model_name!r} edits from the prompt and takes no mask",
                           param="mask", code="invalid_parameter")
        if not form.files.get("image"):
            raise APIError(400, "image: at least one input image is required", param="image",
                           code="invalid_parameter")
        images = await state.read_uploads(form.files["image"], "image")
        return await generate_images(http_request, state, fields, images)

    @app.post("/v1/videos", response_model=VideoObject, openapi_extra=VIDEO_BODY)
    async def create_video(http_request: HTTPRequest, state: State) -> VideoObject:
        state.require_kind("video", "POST /v1/videos")
        content_type = http_request.headers.get("content-type", "")
        images: list[Image.Image] = []
        if content_type.startswith("application/json"):
            fields = validate_fields(VideoCreateFields, await read_json_object(http_request), strict=True)
            state.check_model(fields.model)
        else:
            form = await read_form(http_request, ("input_reference",), state.settings.max_body_bytes)
            fields = validate_fields(VideoCreateFields, decode_form_json(form.fields, ("lora",)), strict=False)
            state.check_model(fields.model)
            state.check_texts(fields)
            if form.files.get("input_reference"):
                images = await state.read_uploads(form.files["input_reference"], "input_reference")
        default_fps = state.defaults.fps or DEFAULT_FPS
        videos = state.videos
        assert videos is not None  # a video model's server always has its job runner (require_kind above)
        params = sampling_params(fields, fields.size, num_frames=video_seconds_to_frames(fields, default_fps),
                                 fps=fields.fps)
        video_id = new_video_id()
        try:
            request = await make_request(state.engine, fields, fields.prompt, params, images, request_id=video_id,
                                         progress_callback=videos.progress_callback(video_id))
        except DitServeError as error:
            if error.param == "image":  # the engine's name for what this route calls input_reference
                error.param = "input_reference"
            raise
        job = new_video_job(state, video_id, request)
        videos.start(job, request)
        return job.to_api()

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(state: State,
                          after: Annotated[str | None, Query(pattern=VIDEO_ID_PATTERN, max_length=38)] = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          order: Literal["asc", "desc"] = "desc") -> VideoList:
        if state.store is None:
            return VideoList(data=[], has_more=False)
        jobs, has_more = state.store.list(after, limit, order)
        data = [job.to_api() for job in jobs]
        return VideoList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                         last_id=data[-1].id if data else None)

    @app.get("/v1/videos/{video_id}", response_model=VideoObject)
    async def retrieve_video(video_id: VideoIdParam, state: State) -> VideoObject:
        return _job_or_404(state, video_id).to_api()

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
    return app
