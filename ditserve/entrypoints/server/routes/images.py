"""Image generations (JSON) and edits (multipart)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from PIL import Image

from ditserve.entrypoints.media import MEDIA_TYPES, image_bytes, image_format
from ditserve.entrypoints.server.errors import APIError
from ditserve.entrypoints.server.generation import (
    BINARY_SCHEMA,
    CLIENT_CLOSED_REQUEST,
    IMAGE_DATA_URL_SCHEMA,
    check_fields,
    encode_images,
    generate_images,
    ignored_fields,
    json_form_fields,
    requested_dimensions,
)
from ditserve.entrypoints.server.protocol import (
    ImageData,
    ImageEditFields,
    ImageGenerationRequest,
    ImagesResponse,
    form_schema,
    json_safe,
    validate_fields,
)
from ditserve.entrypoints.server.request_ids import request_id_of
from ditserve.entrypoints.server.state import ServerState, State
from ditserve.entrypoints.server.uploads import Form, check_upload_count, read_form
from ditserve.models.base import ModelKind
from ditserve.request import RequestOutput

#: edit inputs of the mirrored system that no model family served here takes, and why (refused: an edit that
#: dropped them would not be the edit asked for)
EDIT_INPUTS_REFUSED = {
    "mask": "edits from the prompt and takes no mask (no model family served here inpaints)",
    "mask_image": "edits from the prompt and takes no mask (no model family served here inpaints)",
    "reference_image": "takes no separate reference image (no model family served here uses one); give every "
                       "image to edit as image or url",
}


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
    encoded = await run_in_threadpool(encode_images, output.images, output_format, fields.output_compression)
    return ImagesResponse(
        created=int(time.time()), data=[ImageData(b64_json=b64) for b64 in encoded],
        output_format=output_format,  # type: ignore[arg-type]
        size="{}x{}".format(*output.images[0].size), seed=output.seed,
        timings=json_safe(output.timings), cache_stats=json_safe(output.cache_stats),
        ignored_fields=ignored_fields(fields, output_format))


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


EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form_schema(
    ImageEditFields, {"image": {"anyOf": [BINARY_SCHEMA, {"type": "array", "items": BINARY_SCHEMA, "maxItems": 8}]},
                      "url": {"anyOf": [IMAGE_DATA_URL_SCHEMA,
                                        {"type": "array", "items": IMAGE_DATA_URL_SCHEMA, "maxItems": 8}]},
                      "mask": BINARY_SCHEMA}, ())}}}}


async def create_images(body: ImageGenerationRequest, http_request: HTTPRequest, state: State) -> Any:
    check_fields(state, body, body.prompt)
    state.require_kind(ModelKind.IMAGE, "POST /v1/images/generations")
    output, output_format = await generate_images(http_request, state, body, body.prompt, [],
                                                  requested_dimensions(body.size))
    return await images_answer(http_request, body, output, output_format)


async def edit_images(http_request: HTTPRequest, state: State) -> Any:
    # the kind is the server's, not the request's: a model that edits nothing refuses before reading the body
    state.require_kind(ModelKind.EDIT, "POST /v1/images/edits")
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


def add_routes(app: FastAPI) -> None:
    image_files = {200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}}}
    app.add_api_route("/v1/images/generations", create_images, methods=["POST"], response_model=ImagesResponse,
                      responses=image_files)
    app.add_api_route("/v1/images/edits", edit_images, methods=["POST"], response_model=ImagesResponse,
                      openapi_extra=EDIT_BODY)
