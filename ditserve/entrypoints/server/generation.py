"""What the generating routes share: request fields to sampling params, the run of one request (aborted when
its client goes away), LoRA paths, and the answers' common parts."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.media import LOSSY_FORMATS, check_alpha_format, image_bytes, image_format
from ditserve.entrypoints.server.errors import APIError
from ditserve.entrypoints.server.protocol import (
    ChatCompletionRequest,
    GenerationOptions,
    ImageEditFields,
    ImageGenerationRequest,
    OpenAIImageFields,
    VideoCreateFields,
    parse_size,
)
from ditserve.entrypoints.server.request_ids import request_id_of
from ditserve.entrypoints.server.state import ServerState
from ditserve.errors import DitServeError
from ditserve.lora.request import LoRARequest
from ditserve.models.base import ImageMode
from ditserve.request import Request, RequestOutput

ImageFields = ImageGenerationRequest | ImageEditFields | ChatCompletionRequest


logger = logging.getLogger(__name__)


#: how often a waiting handler checks whether its client is still there
DISCONNECT_POLL_S = 0.05


#: status recorded (metrics, logs) for a request whose client went away; nobody receives it
CLIENT_CLOSED_REQUEST = 499


DEFAULT_FPS = 16


DEFAULT_OUTPUT_FORMAT = "png"


#: form fields that carry a JSON object as text (multipart and urlencoded bodies have only strings)
JSON_FORM_FIELDS = ("extra_params", "lora", "image_reference", "video_reference", "audio_reference")


#: request fields that are sampling params under the same name
PASSED_THROUGH = ("seed", "num_inference_steps", "guidance_scale", "true_cfg_scale", "negative_prompt",
                  "max_sequence_length", "guidance_scale_2", "boundary_ratio", "flow_shift", "layers", "resolution")


#: OpenAPI schemas of an uploaded file and of an image given as a data URL
BINARY_SCHEMA = {"type": "string", "format": "binary"}
IMAGE_DATA_URL_SCHEMA = {"type": "string", "pattern": "^data:image/(png|jpeg|webp);base64,"}


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


def encode_images(images: list[Image.Image], output_format: str, quality: int | None) -> list[str]:
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


def http_param(error: DitServeError, image_field: str = "image") -> DitServeError:
    """An engine error with its field named as the route names it."""
    names = {"image": image_field, "num_outputs_per_prompt": "n"}
    error.param = names.get(error.param or "", error.param)
    return error


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
