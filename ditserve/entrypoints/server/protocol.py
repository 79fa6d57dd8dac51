"""Request and response bodies of the OpenAI-compatible API (pydantic), with ditserve's extra fields.

Requests forbid unknown fields and reject NaN/infinity. Fields that OpenAI or the mirrored system (vLLM-Omni)
define are accepted where they apply: honoured, or accepted and named in the response's ``ignored_fields`` (never
silently dropped), or refused with a 400 that says why (``refuse_unsupported``). Text fields have a hard ceiling here (pydantic refuses longer ones before anything else runs);
the engine's configurable limits (``Limits``) are checked next, in ``make_request``. JSON bodies are strict (``"n": "2"`` is a type error); multipart forms carry only strings, so
they are validated with ``strict=False`` against the same models.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ditserve.config import MAX_FLOW_SHIFT, MAX_LAYERS, MAX_TEXT_CHARS, MIN_FLOW_SHIFT
from ditserve.entrypoints.server.errors import APIError
from ditserve.lora.request import MAX_ABS_SCALE, NAME_PATTERN

SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
#: our video ids: a fixed prefix and 128 random bits; nothing else ever reaches the store or the disk
VIDEO_ID_PATTERN = r"^video_[0-9a-f]{32}$"
MAX_SEED = 2**63 - 1
#: the most images one request may ask for (OpenAI's and the mirrored system's ceiling); ``--max-n`` may lower it
MAX_IMAGES_PER_REQUEST = 10
#: the only device seeds are drawn on: every request has its own CPU generator, so a seed gives the same
#: noise on any accelerator
GENERATOR_DEVICE = "cpu"

OutputFormat = Literal["png", "jpeg", "webp"]
#: other spellings clients send for an output format (OpenAI's docs and the mirrored system accept ``jpg``)
OUTPUT_FORMAT_ALIASES = {"jpg": "jpeg"}


def _normalise_output_format(value: Any) -> Any:
    """``"PNG"`` -> ``"png"``, ``"jpg"`` -> ``"jpeg"``; anything else is left for the type check to refuse."""
    if isinstance(value, str):
        lowered = value.lower()
        return OUTPUT_FORMAT_ALIASES.get(lowered, lowered)
    return value


#: the schema lists the spellings accepted, so a schema-driven client (or fuzzer) knows ``jpg``/``PNG`` are valid
OutputFormatField = Annotated[OutputFormat, BeforeValidator(_normalise_output_format), WithJsonSchema(
    {"type": "string", "enum": ["png", "jpeg", "jpg", "webp", "PNG", "JPEG", "JPG", "WEBP"]})]


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    #: fields a client may send that change nothing here (named in the response's ``ignored_fields``)
    ignored_when_set: ClassVar[tuple[str, ...]] = ()

    def ignored_fields(self) -> list[str]:
        """The fields this request set that the server accepts and ignores, in declaration order."""
        return [name for name in self.ignored_when_set if name in self.model_fields_set]


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
    """Sampling extras every generating route accepts (ditserve's and the mirrored system's fields beyond
    OpenAI's)."""

    model: str | None = Field(None, max_length=256, description="the served model name; omit for the served model")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same bytes")
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    true_cfg_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    lora: LoRAField | None = Field(None, description="a LoRA adapter for this request (multipart forms: as JSON)")
    max_sequence_length: int | None = Field(None, ge=1, le=4096)
    guidance_scale_2: float | None = Field(None, ge=0, le=100,
                                           description="two-expert video models: the low-noise expert's guidance")
    boundary_ratio: float | None = Field(None, ge=0, le=1,
                                         description="two-expert video models: where the low-noise expert takes over")
    generator_device: str | None = Field(None, max_length=32, description='only "cpu": seeds drive CPU generators')
    extra_params: dict[str, Any] | None = Field(
        None, description="named pipeline arguments beyond these fields; none is accepted yet (an empty object is)")
    flow_shift: float | None = Field(None, ge=MIN_FLOW_SHIFT, le=MAX_FLOW_SHIFT,
                                     description="a fixed timestep shift for this request's flow-matching scheduler "
                                                 "(Wan's flow_shift, FLUX-style shift); default: the engine's")
    layers: int | None = Field(None, ge=1, le=MAX_LAYERS,
                               description="Qwen-Image-Layered: how many RGBA layers the input image is split into "
                                           "(one data entry each)")
    resolution: int | None = Field(None, description="Qwen-Image-Layered: 640 or 1024, the layers' size bucket")

    @field_validator("generator_device")
    @classmethod
    def _cpu_generator(cls, value: str | None) -> str | None:
        if value is not None and value != GENERATOR_DEVICE:
            raise ValueError(f"only {GENERATOR_DEVICE!r} is allowed: every request's seed drives its own CPU "
                             "generator, so the same seed gives the same image on any device")
        return value

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field set here that this server cannot honour (never silently dropped)."""
        if self.extra_params:
            first = sorted(self.extra_params)[0]
            raise APIError(400, f"extra_params.{first}: this server passes no extra arguments to its pipelines; "
                                f"use the named request fields (unknown: {sorted(self.extra_params)})",
                           param=f"extra_params.{first}", code="unsupported_parameter")


class OpenAIImageFields(StrictRequest):
    """Fields OpenAI's image routes define beyond prompt/size/n: honoured where they mean something here,
    otherwise accepted and named in ``ignored_fields``."""

    user: str | None = Field(None, max_length=512, description="accepted and ignored")
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = Field(
        None, description="accepted and ignored: quality follows num_inference_steps")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="transparent for models that make RGBA images (Qwen-Image-Layered), opaque for the others")
    output_compression: int | None = Field(None, ge=0, le=100,
                                           description="JPEG/WebP quality; ignored for PNG (lossless)")
    stream: bool | None = Field(None, description="false only: streaming is not implemented")

    def refuse_unhonourable(self, transparent_output: bool) -> None:
        """``transparent_output``: whether the served model makes RGBA images (its background is always
        transparent where its layers are) rather than opaque RGB ones."""
        if self.stream:
            raise APIError(400, "stream=true is not supported yet: send stream=false (or omit it) and receive the "
                                "whole answer at once", param="stream", code="unsupported_parameter")
        if self.background == "transparent" and not transparent_output:
            raise APIError(400, "background='transparent' needs a model that makes RGBA images; this model makes "
                                "opaque RGB images: use 'opaque' or 'auto'", param="background",
                           code="unsupported_parameter")
        if self.background == "opaque" and transparent_output:
            raise APIError(400, "background='opaque': this model makes transparent RGBA layers: use 'transparent' "
                                "or 'auto'", param="background", code="unsupported_parameter")


#: the mirrored system's system-prompt presets (HunyuanImage-3's prompt templates)
SystemPromptType = Literal["dynamic", "en_vanilla", "en_recaption", "en_think_recaption", "en_unified", "custom"]
#: its prompting knobs, in the order ``ignored_fields`` names them
PROMPT_MODE_FIELDS = ("bot_task", "use_system_prompt", "sys_type", "system_prompt")


class PromptModeFields(StrictRequest):
    """The mirrored system's prompting knobs for models that rewrite or reason over their prompt before drawing
    (HunyuanImage-3: ``bot_task`` think/recaption/vanilla, a system-prompt preset or text). Its serving benchmark
    sends ``bot_task`` with every edit. No model served here has such a stage, so they are accepted and named in
    ``ignored_fields``."""

    bot_task: str | None = Field(None, max_length=64, description="accepted and ignored: no model served here "
                                                                   "has a prompt-reasoning stage")
    use_system_prompt: SystemPromptType | None = Field(None, description="accepted and ignored")
    sys_type: SystemPromptType | None = Field(None, description="accepted and ignored (edits' name for "
                                                                "use_system_prompt)")
    system_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="accepted and ignored")


class ImageGenerationRequest(OpenAIImageFields, PromptModeFields, GenerationOptions):
    ignored_when_set = ("user", "quality", "style", "moderation", *PROMPT_MODE_FIELDS)

    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(None, pattern=SIZE_PATTERN, description='"WxH" or "auto" (the model default)')
    response_format: Literal["b64_json", "file"] | None = Field(
        None, description='b64_json (JSON, the default) or file (the raw bytes of one image); this server keeps no '
                          'image files to link to')
    output_format: OutputFormatField | None = Field(None, description="png, jpeg (or jpg) or webp, any case")
    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored")
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted and ignored")


class ImageEditFields(OpenAIImageFields, PromptModeFields, GenerationOptions):
    """The text fields of ``/v1/images/edits`` (the images arrive as file parts or ``url`` data URLs)."""

    ignored_when_set = ("user", "quality", *PROMPT_MODE_FIELDS)

    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(None, pattern=SIZE_PATTERN,
                             description='"WxH", or "auto" (the default): the model\'s own choice (Qwen-Image-Edit: '
                                         "the input's aspect ratio within its pixel budget; FLUX.1-Kontext: "
                                         "diffusers' square default)")
    response_format: Literal["b64_json", "file"] | None = None
    output_format: OutputFormatField | None = None


class ImageReference(StrictRequest):
    """The mirrored system's typed image input of a video request: ``{"image_url": ...}`` or ``{"file_id": ...}``
    (in a form, the same object as JSON text)."""

    image_url: str | None = Field(None, description="a data URL (data:image/png;base64,...), or http(s) with "
                                                    "--allow-remote-images")
    file_id: str | None = Field(None, max_length=256, description="refused: this server keeps no uploaded files")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageReference:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of image_url or file_id")
        return self


#: the mirrored system's video-request inputs that no model served here can take, and why: a conditioning input
#: that were dropped would make a different video than the one asked for, so they are refused, never ignored
UNSUPPORTED_VIDEO_INPUTS = {
    "video_reference": "no model served here generates from an input video (video-to-video); image-to-video "
                       "models take a first frame as input_reference or image_reference",
    "audio_reference": "no model served here generates video from speech or audio",
}


class VideoCreateFields(GenerationOptions):
    ignored_when_set = ("user",)

    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    size: str | None = Field(None, pattern=SIZE_PATTERN, description='"WxH" or "auto" (the model default)')
    width: int | None = Field(None, ge=1, le=65536, description="instead of size, with height")
    height: int | None = Field(None, ge=1, le=65536, description="instead of size, with width")
    seconds: Annotated[int, Field(ge=1, le=600)] | Annotated[str, Field(pattern=r"^[1-9][0-9]{0,2}$")] | None = (
        Field(None, description="clip length; becomes seconds * fps + 1 frames unless num_frames is given"))
    num_frames: int | None = Field(None, ge=1)
    fps: int | None = Field(None, ge=1, le=240)
    user: str | None = Field(None, max_length=512, description="accepted and ignored")
    image_reference: ImageReference | None = Field(
        None, description="image-to-video models: the first frame, instead of input_reference")
    video_reference: dict[str, Any] | None = Field(
        None, description="refused: " + UNSUPPORTED_VIDEO_INPUTS["video_reference"])
    audio_reference: dict[str, Any] | None = Field(
        None, description="refused: " + UNSUPPORTED_VIDEO_INPUTS["audio_reference"])

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name, reason in UNSUPPORTED_VIDEO_INPUTS.items():
            if getattr(self, name) is not None:
                raise APIError(400, f"{name} is not supported by this server: {reason}", param=name,
                               code="unsupported_parameter")


# ---------------------------------------------------------------------------------------------- chat
class TextPart(StrictRequest):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImageURL(StrictRequest):
    url: str = Field(description="a data URL (data:image/png;base64,...), or http(s) with --allow-remote-images")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(StrictRequest):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | Annotated[list[ContentPart], Field(max_length=64)]
              | None) = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(OpenAIImageFields, PromptModeFields, GenerationOptions):
    """``/v1/chat/completions`` for diffusion models: the last user message is the prompt (its text parts) and
    the input images (its ``image_url`` parts); generation fields at the top level or in ``extra_body``. Video
    models answer with ``video_url`` parts (MP4 data URLs)."""

    ignored_when_set = ("user", "quality", "temperature", "top_p", "max_tokens", "max_completion_tokens",
                        "modalities", "presence_penalty", "frequency_penalty", "stop", "logprobs", "stream_options",
                        "store", "metadata", *PROMPT_MODE_FIELDS)

    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(None, pattern=SIZE_PATTERN)
    width: int | None = Field(None, ge=1, le=65536)
    height: int | None = Field(None, ge=1, le=65536)
    output_format: OutputFormatField | None = None
    image_format: OutputFormatField | None = Field(None, description="the mirrored system's name for output_format")
    num_frames: int | None = Field(None, ge=1, description="video models: frames of the clip")
    fps: int | None = Field(None, ge=1, le=240, description="video models: frames per second of the MP4")
    temperature: float | None = Field(None, ge=0, le=2, description="accepted and ignored")
    top_p: float | None = Field(None, ge=0, le=1, description="accepted and ignored")
    max_tokens: int | None = Field(None, ge=1, description="accepted and ignored")
    max_completion_tokens: int | None = Field(None, ge=1, description="accepted and ignored")
    modalities: list[Literal["text", "image"]] | None = Field(None, max_length=2, description="accepted and ignored")
    # OpenAI's text-sampling fields, which SDKs and chat front ends send by default: they mean nothing to a
    # diffusion model, so they are accepted and named in ignored_fields (tools and the like stay refused)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="accepted and ignored")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="accepted and ignored")
    stop: Annotated[str, Field(max_length=256)] | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="accepted and ignored")
    logprobs: bool | None = Field(None, description="accepted and ignored")
    stream_options: dict[str, Any] | None = Field(None, description="accepted and ignored")
    store: bool | None = Field(None, description="accepted and ignored")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="accepted and ignored")
    extra_body: dict[str, Any] | None = Field(
        None, description="generation fields nested as curl users send them; merged into the top level")
    return_stage_metrics: bool | None = Field(
        None, description="true: the answer carries metrics (stage_durations, peak_memory_mb), as the mirrored "
                          "system's benchmark asks")

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, values: Any) -> Any:
        """The OpenAI SDK flattens ``extra_body`` into the top level; plain HTTP clients send it nested. Both
        mean the same request, so the nested fields are validated as top-level ones."""
        if not isinstance(values, dict) or not isinstance(values.get("extra_body"), dict):
            return values
        nested = values["extra_body"]
        merged = {name: value for name, value in values.items() if name != "extra_body"}
        for name, value in nested.items():
            if name == "extra_body":
                raise ValueError("extra_body.extra_body: extra_body cannot be nested")
            if name in merged and merged[name] != value:
                raise ValueError(f"extra_body.{name}: {name} is also given at the top level, with another value")
            merged[name] = value
        return merged


# ---------------------------------------------------------------------------------------------- responses
class GenerationInfo(BaseModel):
    """ditserve's extra fields on every response that generated something (clients that do not know them
    ignore them)."""

    seed: int | None = None
    timings: dict[str, float] | None = None
    cache_stats: dict[str, Any] | None = None
    #: request fields that were accepted but change nothing here (see the README)
    ignored_fields: list[str] | None = None


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
    #: seconds per stage of the generation: encode, denoise, decode
    stage_durations: dict[str, float] | None = None
    #: the accelerator's peak allocated memory in this server process when the job finished; 0 when none was
    #: measured (CPU, or a job not finished): the mirrored system's clients read it as a number
    peak_memory_mb: float = 0.0
    file_name: str | None = None
    #: when the finished job and its file are removed (None: kept until deleted)
    expires_at: int | None = None
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


class ChatImageURL(BaseModel):
    url: str


class ChatImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ChatImageURL


class ChatVideoURL(BaseModel):
    url: str


class ChatVideoPart(BaseModel):
    """A generated video, as chat APIs that take videos spell a video part."""

    type: Literal["video_url"] = "video_url"
    video_url: ChatVideoURL


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[ChatImagePart | ChatVideoPart]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: Literal["stop"] = "stop"


class ChatUsage(BaseModel):
    """No tokens are generated: OpenAI's clients expect the object, with zeros."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StageMetrics(BaseModel):
    """What the mirrored system's benchmark reads from a chat answer's ``metrics`` (``return_stage_metrics``)."""

    #: seconds per stage of the generation: encode, denoise, decode
    stage_durations: dict[str, float]
    #: as a video job's ``peak_memory_mb``: the process's accelerator peak, 0 when none was measured
    peak_memory_mb: float


class ChatCompletionResponse(GenerationInfo):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage = Field(default_factory=ChatUsage)
    #: only when the request asked for it (``return_stage_metrics``)
    metrics: StageMetrics | None = None


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


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"WxH"`` -> (width, height); ``None`` / ``"auto"`` -> None (the model's default)."""
    if size is None or size == "auto":
        return None
    match = re.fullmatch(r"([0-9]+)x([0-9]+)", size)
    if match is None:
        raise APIError(400, f"size={size!r} must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'", param="size",
                       code="invalid_parameter")
    return int(match.group(1)), int(match.group(2))


def standalone_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written out in place. Pydantic refers to them as
    ``#/$defs/...``, which inside an OpenAPI document points at the document's root, where nothing is: schema
    readers (and the fuzzer) could not resolve the body and skipped it. The request models nest no model in
    itself, so the inlining ends."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def form_schema(fields_model: type[BaseModel], file_fields: dict[str, dict[str, Any]],
                required_files: tuple[str, ...]) -> dict[str, Any]:
    """The multipart/form-data schema of a route whose text fields are ``fields_model`` (for OpenAPI)."""
    schema = standalone_schema(fields_model)
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
