"""Reading multipart forms and uploaded images safely: bounded sizes, known formats, no decompression bombs,
counted before anything is decoded, and decoded a few at a time (a semaphore sized from the size limit)."""

from __future__ import annotations

import asyncio
import io
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import UploadFile

from ditserve.entrypoints.server.errors import APIError
from ditserve.models.base import ModelKind

#: image formats an upload may use (anything else, including formats Pillow could parse, is refused)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_FORM_FILES = 16
MAX_FORM_FIELDS = 64
#: the most input images one request may carry, whatever the model takes (the OpenAPI schema says the same)
MAX_INPUT_IMAGES = 8
#: memory the uploads being decoded at one time may take together
DECODE_MEMORY_BYTES = 256 * 1024 * 1024
#: bytes per pixel one decode may hold at its peak: the decoded image (up to RGBA) and its RGB copy
DECODE_BYTES_PER_PIXEL = 4 + 3


#: the form encodings routes read (urlencoded forms carry no files)
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


class Form:
    """A parsed form: one string per text field, a list of strings per list field, a list of uploads per file
    field."""

    def __init__(self, fields: dict[str, str], files: dict[str, list[UploadFile]],
                 lists: dict[str, list[str]] | None = None) -> None:
        self.fields = fields
        self.files = files
        self.lists = lists or {}


def _file_field_name(name: str) -> str:
    """The OpenAI client sends lists as ``image[]`` (or ``image[0]``...): all name the field ``image``."""
    return name.split("[", 1)[0] if name.endswith("]") and "[" in name else name


async def read_form(request: Request, file_fields: tuple[str, ...], max_part_bytes: int,
                    list_fields: tuple[str, ...] = (), encodings: tuple[str, ...] = (MULTIPART,)) -> Form:
    """The form of ``request`` in one of ``encodings``; ``list_fields`` are text fields that may repeat
    (``url``, ``url[]``), every other text field is given at most once."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(encodings):
        raise APIError(415, f"this route takes {' or '.join(encodings)}, not {content_type or 'an empty body'!r}",
                       code="unsupported_media_type")
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=max_part_bytes)
    fields: dict[str, str] = {}
    files: dict[str, list[UploadFile]] = defaultdict(list)
    lists: dict[str, list[str]] = defaultdict(list)
    for raw_name, value in form.multi_items():
        name = _file_field_name(raw_name)
        if name in list_fields and not isinstance(value, UploadFile):
            lists[name].append(value)
        elif isinstance(value, UploadFile):
            if name not in file_fields:
                raise APIError(400, f"{raw_name} is not a file field; file fields: {list(file_fields)}",
                               param=raw_name, code="invalid_parameter")
            files[name].append(value)
        elif name in file_fields:
            raise APIError(400, f"{name} must be a file upload, not a text field", param=name,
                           code="invalid_parameter")
        elif raw_name in fields:
            raise APIError(400, f"{raw_name} was given more than once", param=raw_name, code="invalid_parameter")
        else:
            fields[raw_name] = value
    return Form(fields, dict(files), dict(lists))


def decode_image(data: bytes, field: str, max_side: int, mode: str) -> Image.Image:
    """An uploaded PNG/JPEG/WebP in ``mode`` (the model's: RGB, or RGBA for a model that reads transparency);
    anything else, or a side over ``max_side``, is a 400."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns for large images; a server must refuse them before decoding
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            width, height = image.size
            if width > max_side or height > max_side:
                raise APIError(400, f"{field} is {width}x{height}; the largest side allowed is {max_side}",
                               param=field, code="invalid_image")
            image.load()
            return image.convert(mode)
    except APIError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as error:
        raise APIError(400, f"{field} is not a readable {'/'.join(UPLOAD_FORMATS)} image ({type(error).__name__})",
                       param=field, code="invalid_image") from None


def decode_permits(max_side: int) -> int:
    """How many uploads may be decoded at once: as many worst-case images (``max_side`` squared) as fit in
    ``DECODE_MEMORY_BYTES``, at least one, and no more than there are cores to decode them."""
    per_image = max_side * max_side * DECODE_BYTES_PER_PIXEL
    return max(1, min(os.cpu_count() or 1, DECODE_MEMORY_BYTES // per_image))


def check_upload_count(uploads: Sequence[object], field: str, accepted: int, model_name: str,
                       kind: ModelKind) -> None:
    """Refuse more uploads than the model takes before any of them is read or decoded."""
    if len(uploads) <= accepted:
        return
    if accepted == 0:
        message = f"{field}: {model_name!r} takes no input image (it is {kind.with_article} model); send the " \
                  "prompt alone"
    else:
        message = f"{field}: {model_name!r} takes at most {accepted} input image(s), got {len(uploads)}"
    raise APIError(400, message, param=field, code="invalid_parameter")


async def read_images(uploads: list[UploadFile], field: str, max_side: int, decoding: asyncio.Semaphore,
                      mode: str) -> list[Image.Image]:
    """Decode uploads (counted by the caller) while holding ``decoding``: its permits bound the memory that
    concurrent requests' uploads take while they are being decoded."""
    images = []
    for upload in uploads:
        async with decoding:
            data: Any = await upload.read()
            # decoding is CPU work: keep it off the event loop
            images.append(await run_in_threadpool(decode_image, data, field, max_side, mode))
    return images


async def decode_blob(data: bytes, field: str, max_side: int, decoding: asyncio.Semaphore,
                      mode: str) -> Image.Image:
    """``read_images`` for one image that arrived as bytes (a data URL, a fetched URL)."""
    async with decoding:
        return await run_in_threadpool(decode_image, data, field, max_side, mode)
