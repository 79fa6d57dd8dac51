"""Request and response bodies of the OpenAI-compatible API (pydantic), with ditserve's extra fields.

Requests forbid unknown fields (an option we would ignore is an error, never silently dropped) and reject
NaN/infinity. Text fields have a hard ceiling here (pydantic refuses longer ones before anything else runs);
the engine's configurable limits (``Limits``) are checked next, in ``make_request``. JSON bodies are strict (``"n": "2"`` is a type error); multipart forms carry only strings, so
they are validated with ``strict=False`` against the same models.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ditserve.config import MAX_TEXT_CHARS
from ditserve.entrypoints.server.errors import APIError
from ditserve.lora.request import MAX_ABS_SCALE, NAME_PATTERN

SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
#: our video ids: a fixed prefix and 128 random bits; nothing else ever reaches the store or the disk
VIDEO_ID_PATTERN = r"^video_[0-9a-f]{32}$"
MAX_SEED = 2**63 - 1

OutputFormat = Literal["png", "jpeg", "webp"]


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class LoRAField(StrictRequest):
    """A request's LoRA: a loaded (or start-up) adapter by name, or a new one from a path in an allowed folder."""

    name: str = Field(pattern=NAME_PATTERN.pattern, description="the adapter's name")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="PEFT folder or .safetensors file inside a --lora-dir folder")
    scale: float = Field(1.0, ge=-MAX_ABS_SCALE, le=MAX_ABS_SCALE)
    int_id: int | None = None


class LoRALoadRequest(StrictRequest):
    name: str = Field(pattern=NAME_PATTERN.pattern)
    path: str = Field(min_length=1, max_length=4096)
    int_id: int | None = None


class LoRAUnloadRequest(StrictRequest):
    name: str = Field(pattern=NAME_PATTERN.pattern)


class GenerationOptions(StrictRequest):
    """Sampling extras every generating route accepts (ditserve fields beyond OpenAI's)."""

    model: str | None = Field(None, max_length=256, description="the served model name; omit for the served model")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same bytes")
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    true_cfg_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    lora: LoRAField | None = Field(None, description="a LoRA adapter for this request (multipart forms: as JSON)")


class ImageGenerationRequest(GenerationOptions):
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=SIZE_PATTERN, description='"WxH" or "auto" (the model default)')
    response_format: Literal["b64_json"] | None = Field(
        None, description="only b64_json: this server keeps no image files to link to")
    output_format: OutputFormat | None = None


class ImageEditFields(ImageGenerationRequest):
    """The text fields of ``/v1/images/edits`` (the images arrive as file parts)."""


class VideoCreateFields(GenerationOptions):
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    size: str | None = Field(None, pattern=SIZE_PATTERN, description='"WxH" or "auto" (the model default)')
    seconds: Annotated[int, Field(ge=1, le=600)] | Annotated[str, Field(pattern=r"^[1-9][0-9]{0,2}$")] | None = (
        Field(None, description="clip length; becomes seconds * fps + 1 frames unless num_frames is given"))
    num_frames: int | None = Field(None, ge=1)
    fps: int | None = Field(None, ge=1, le=240)


# ---------------------------------------------------------------------------------------------- responses
class GenerationInfo(BaseModel):
    """ditserve's extra fields on every response that generated something (clients that do not know them
    ignore them)."""

    seed: int | None = None
    timings: dict[str, float] | None = None
    cache_stats: dict[str, Any] | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(GenerationInfo):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(GenerationInfo):
    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None = None
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    model: str
    prompt: str | None = None
    size: str
    seconds: str
    num_frames: int | None = None
    fps: int | None = None
    inference_time_s: float | None = None
    error: VideoError | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ditserve"
    kind: Literal["image", "edit", "video"]
    default_size: str
    default_num_inference_steps: int | None = None
    default_num_frames: int | None = None


class LoRACard(BaseModel):
    name: str
    object: Literal["lora"] = "lora"
    int_id: int | None = None
    format: str
    rank: int
    num_modules: int
    bytes: int
    #: waiting or running requests that use it (an adapter in use is never evicted or unloaded)
    in_use: int


class LoRAList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoRACard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------- helpers
def validate_fields(model: type[StrictRequest], values: dict[str, Any], *, strict: bool) -> Any:
    """``model.model_validate`` with pydantic's complaint turned into a 400 naming the field."""
    try:
        return model.model_validate(values, strict=strict)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_parameter") from None


def decode_form_json(values: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Multipart forms carry strings only: the object fields ``names`` arrive as JSON text and are decoded here."""
    decoded = dict(values)
    for name in names:
        if isinstance(decoded.get(name), str):
            try:
                decoded[name] = json.loads(decoded[name])
            except ValueError:
                raise APIError(400, f"{name}: a JSON object is expected", param=name,
                               code="invalid_parameter") from None
    return decoded


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"WxH"`` -> (width, height); ``None`` / ``"auto"`` -> None (the model's default)."""
    if size is None or size == "auto":
        return None
    match = re.fullmatch(r"([0-9]+)x([0-9]+)", size)
    if match is None:
        raise APIError(400, f"size={size!r} must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'", param="size",
                       code="invalid_parameter")
    return int(match.group(1)), int(match.group(2))


def form_schema(fields_model: type[BaseModel], file_fields: dict[str, dict[str, Any]],
                required_files: tuple[str, ...]) -> dict[str, Any]:
    """The multipart/form-data schema of a route whose text fields are ``fields_model`` (for OpenAPI)."""
    schema = fields_model.model_json_schema()
    properties = {**schema.get("properties", {}), **file_fields}
    required = [*schema.get("required", []), *required_files]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def json_safe(value: Any) -> Any:
    """Statistics as plain JSON: numpy/torch scalars and arrays to lists, NaN/inf to null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return str(value)
