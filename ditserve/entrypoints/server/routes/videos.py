"""Video jobs (created, listed, polled, downloaded, deleted) and synchronous video generation."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.entrypoints.media import output_video_bytes
from ditserve.entrypoints.server.errors import APIError
from ditserve.entrypoints.server.generation import (
    BINARY_SCHEMA,
    CLIENT_CLOSED_REQUEST,
    DEFAULT_FPS,
    IMAGE_DATA_URL_SCHEMA,
    check_fields,
    generate,
    http_param,
    ignored_fields,
    json_form_fields,
    make_request,
    read_json_object,
    requested_dimensions,
    sampling_params,
)
from ditserve.entrypoints.server.protocol import (
    VIDEO_ID_PATTERN,
    VideoCreateFields,
    VideoDeleted,
    VideoList,
    VideoObject,
    form_schema,
    standalone_schema,
    validate_fields,
)
from ditserve.entrypoints.server.request_ids import request_id_of
from ditserve.entrypoints.server.state import ServerState, State
from ditserve.entrypoints.server.uploads import MULTIPART, URLENCODED, check_upload_count, read_form
from ditserve.entrypoints.server.videos import VideoJob, VideoStore, new_video_id
from ditserve.errors import DitServeError
from ditserve.models.base import ModelKind
from ditserve.request import Request

logger = logging.getLogger(__name__)


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


def json_video_schema() -> dict[str, Any]:
    """A JSON video request: the form's fields, and ``input_reference`` as a data URL."""
    schema = standalone_schema(VideoCreateFields)
    schema["properties"]["input_reference"] = {**IMAGE_DATA_URL_SCHEMA,
                                               "description": "the first frame (image-to-video models)"}
    return schema


VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": json_video_schema()},
    "multipart/form-data": {"schema": form_schema(VideoCreateFields, {"input_reference": BINARY_SCHEMA}, ())},
    "application/x-www-form-urlencoded": {"schema": form_schema(VideoCreateFields, {}, ())}}}}


VideoIdParam = Annotated[str, PathParam(pattern=VIDEO_ID_PATTERN, max_length=38)]


async def create_video(http_request: HTTPRequest, state: State) -> VideoObject:
    state.require_kind(ModelKind.VIDEO, "POST /v1/videos")
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


async def create_video_sync(http_request: HTTPRequest, state: State) -> Response:
    """Generate and answer with the MP4 itself: no job is recorded (the mirrored system's benchmark route)."""
    state.require_kind(ModelKind.VIDEO, "POST /v1/videos/sync")
    fields, images, image_field = await read_video_request(http_request, state)
    output = await generate(http_request, state, fields, fields.prompt, video_params(state, fields), images,
                            image_field)
    if output is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    data = await run_in_threadpool(output_video_bytes, output, 0, DEFAULT_FPS)
    name = f"{request_id_of(http_request.scope)}.mp4"
    return Response(data, media_type="video/mp4", headers={"Content-Disposition": f'attachment; filename="{name}"'})


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


async def retrieve_video(video_id: VideoIdParam, state: State) -> VideoObject:
    return _job_or_404(state, video_id).to_api(state.settings.video_ttl_s)


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


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/videos", create_video, methods=["POST"], response_model=VideoObject,
                      openapi_extra=VIDEO_BODY)
    app.add_api_route("/v1/videos/sync", create_video_sync, methods=["POST"], response_class=Response,
                      openapi_extra=VIDEO_BODY,
                      responses={200: {"content": {"video/mp4": {}}, "description": "the MP4 file"}})
    app.add_api_route("/v1/videos", list_videos, methods=["GET"], response_model=VideoList)
    app.add_api_route("/v1/videos/{video_id}", retrieve_video, methods=["GET"], response_model=VideoObject)
    app.add_api_route("/v1/videos/{video_id}/content", video_content, methods=["GET"],
                      response_class=FileResponse)
    app.add_api_route("/v1/videos/{video_id}", delete_video, methods=["DELETE"], response_model=VideoDeleted)
