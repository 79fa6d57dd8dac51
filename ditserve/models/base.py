"""The adapter contract: what the engine needs to know about a family of diffusers pipelines.

An adapter is family policy only. It resolves a request's params against the family's defaults, and for
adapters that run in ditserve's step loop (``LoopAdapter``) it says how to encode one request's prompts,
prepare one request's latents and schedule, predict the model output for a step batch of requests that may each
be at a different step of a different schedule (guidance included), step one request's scheduler, and decode one
request. The loop itself (who runs at each step, progress, abort, the forward context read by caches) belongs
to the engine's runner; adapters never import the engine.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.forward_context import RowOwner
from ditserve.request import AudioTrack, Request

#: what a request produces: a list of PIL images, or a list of uint8 videos (frames x H x W x 3)
RequestMedia = list[Any]


class ModelKind(str, enum.Enum):
    """What a model makes from a prompt (a str, so it reads and serialises as its value)."""

    IMAGE = "image"  # text-to-image
    EDIT = "edit"  # needs input images
    VIDEO = "video"  # text-to-video (``input_images`` says where image-to-video takes a first frame)

    def __str__(self) -> str:
        return self.value

    @property
    def with_article(self) -> str:
        return f"an {self.value}" if self.value[0] in "aeiou" else f"a {self.value}"


class InputImages(enum.Enum):
    """What a family does with ``multi_modal_data={"image": ...}``."""

    #: text-to-image and text-to-video: an input image would be silently ignored, so it is refused
    NONE = "none"
    #: edit models (the images to edit) and image-to-video models (the video's first frame)
    REQUIRED = "required"


class ImageMode(enum.Enum):
    """The PIL mode of a family's input or output images."""

    RGB = "RGB"
    #: with an alpha channel (Qwen-Image-Layered reads and makes transparent images)
    RGBA = "RGBA"


#: sampling params that only some families take -> which: refused by every adapter that does not list them in
#: ``own_params`` (a family written before them refuses them without knowing they exist)
FAMILY_ONLY_PARAMS = {"layers": "Qwen-Image-Layered", "resolution": "Qwen-Image-Layered"}


@dataclass
class StageTimings:
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class RequestState:
    """One request in the running set: its latents (one row per output), its own scheduler and schedule, where
    it is in it, and its conditioning (the embeddings ``encode_request`` made, plus the family's extras)."""

    request: Request
    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    conditioning: dict[str, Any]
    step_index: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> OmniDiffusionSamplingParams:
        return self.request.params

    @property
    def num_rows(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def t(self) -> torch.Tensor:
        """This request's timestep at its current step."""
        return self.timesteps[self.step_index]

    @property
    def finished(self) -> bool:
        return self.step_index >= self.num_steps

    def owner(self) -> RowOwner:
        return RowOwner(self.request_id, self.step_index, self.num_steps, self.num_rows, request=self.request)


#: (cond rows, uncond rows, request) -> the guided prediction of that request's rows
Guide = Callable[[torch.Tensor, torch.Tensor, "RequestState"], torch.Tensor]
#: (branch, requests) -> that guidance branch's model output for the requests' rows
BranchCall = Callable[[str, Sequence["RequestState"]], torch.Tensor]


class TransformerCall(Protocol):
    """How an adapter calls a transformer for some requests of the step batch (their rows, in order). The runner
    provides it: it names the requests for the caches, and a multi-device runner wraps it (CFG-parallel). It
    answers the transformer's output: its one tensor, or the tuple of its streams where it has several (LTX-2's
    video and audio)."""

    def __call__(self, branch: str, states: Sequence[RequestState], transformer_name: str = "transformer",
                 **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


@dataclass
class StepBatch:
    """The requests that run this step, in row order, and the transformer call the runner gives for them."""

    states: list[RequestState]
    call: TransformerCall
    #: values derived from the members alone (collated embeddings): kept by the runner while they stay the same
    memo: dict[Any, Any] = field(default_factory=dict)

    def latents(self, states: Sequence[RequestState] | None = None) -> torch.Tensor:
        return torch.cat([s.latents for s in (self.states if states is None else states)])

    def timesteps(self, states: Sequence[RequestState] | None = None) -> torch.Tensor:
        """Each row's own timestep (requests in one batch may be at different points of their schedules)."""
        return torch.cat([s.t.expand(s.num_rows) for s in (self.states if states is None else states)])

    def call_with_context(self, branch: str, states: Sequence[RequestState], latents: torch.Tensor,
                          context: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """The transformer's output for the noisy token ``latents`` of ``states`` when they attend to ``context``
        tokens as well (edit models: the packed latents of the input images, appended along the sequence after
        the noisy ones). The context is read, never predicted: only the noisy tokens' output is kept."""
        hidden = latents if context is None else torch.cat([latents, context], dim=1)
        return self.call(branch, states, hidden_states=hidden, **kwargs)[:, :latents.shape[1]]

    def remember(self, key: Any, states: Sequence[RequestState], make: Callable[[], Any]) -> Any:
        """``make()`` once per key and set of requests, while the membership of the running set lasts."""
        full_key = (key, tuple(s.request_id for s in states))
        if full_key not in self.memo:
            self.memo[full_key] = make()
        return self.memo[full_key]

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, guided: Sequence[RequestState],
                guide: Guide, states: Sequence[RequestState] | None = None) -> torch.Tensor:
        """The prediction for ``states`` (default: the whole batch; ``cond`` holds their rows): ``cond``, replaced
        by ``guide(cond, uncond, state)`` on the rows of the ``guided`` requests (``uncond`` holds theirs, in
        order). Guidance is applied per request with its own scale, so a row never depends on its batch mates."""
        combined = cond.clone()
        starts, start = {}, 0
        for state in self.states if states is None else states:
            starts[state.request_id] = start
            start += state.num_rows
        uncond_start = 0
        for state in guided:
            rows = slice(starts[state.request_id], starts[state.request_id] + state.num_rows)
            uncond_rows = slice(uncond_start, uncond_start + state.num_rows)
            combined[rows] = guide(cond[rows], uncond[uncond_rows], state)
            uncond_start += state.num_rows
        return combined


class ModelAdapter(ABC):
    """Base of every family adapter."""

    #: ``model_index.json`` ``_class_name`` values this adapter serves (registry key)
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[ModelKind] = ModelKind.IMAGE
    #: how many input images a request may bring (None: any number), where ``input_images`` takes them
    max_input_images: ClassVar[int | None] = None
    #: where to go for more input images than ``max_input_images``, said in the error
    more_images_note: ClassVar[str] = ""
    #: pipeline attributes holding the denoising transformers, in call order
    transformer_names: ClassVar[tuple[str, ...]] = ("transformer",)
    #: sampling params that mean nothing to this family: an error, never silently ignored
    unsupported_params: ClassVar[tuple[str, ...]] = ()
    #: how this family is guided, said in the error for an unsupported param
    guidance_note: ClassVar[str] = ""
    #: the ``FAMILY_ONLY_PARAMS`` this family takes
    own_params: ClassVar[tuple[str, ...]] = ()
    #: whether height and width are request params; where not, the family sets the output size itself (from its
    #: input image) in ``complete_params``
    takes_output_size: ClassVar[bool] = True
    #: how the output size is chosen, said in the error for height or width where ``takes_output_size`` is False
    output_size_note: ClassVar[str] = ""
    #: the mode input images are converted to before the family sees them, and the mode of its outputs
    input_image_mode: ClassVar[ImageMode] = ImageMode.RGB
    output_image_mode: ClassVar[ImageMode] = ImageMode.RGB
    #: whether every Linear of the transformer sees the batch's rows along its first dimension, so a LoRA can be
    #: chosen per row; a family where that is not known to hold batches only requests of the same LoRA and scale
    lora_per_row: ClassVar[bool] = True
    #: whether the engine sees each denoising step of a request (progress, abort between steps, the step index
    #: step caches key on); only a pipeline run through its own ``__call__`` without a step callback does not
    reports_steps: bool = True

    def __init__(self, pipeline: Any, model_defaults: Mapping[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.model_defaults = dict(model_defaults or {})

    @classmethod
    def preloaded_components(cls, path: str) -> dict[str, Any]:
        """Components to hand to ``from_pretrained`` instead of letting diffusers load them from ``path``."""
        return {}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformers()[0].dtype

    def transformers(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, n) for n in self.transformer_names if getattr(self.pipeline, n, None)]

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor times the patch size)."""
        return int(getattr(self.pipeline, "vae_scale_factor", 8)) * 2

    # ------------------------------------------------------------------ params
    @abstractmethod
    def family_defaults(self) -> dict[str, Any]:
        """Defaults of the family, the same as diffusers' pipeline ``__call__`` uses."""

    def diffusers_call_arguments(self) -> dict[str, Any]:
        """Keyword arguments that diffusers' own pipeline needs beyond the sampling params to make what this
        adapter makes from the same folder (model-level settings of the folder's defaults): none for most."""
        return {}

    def resolve_params(self, params: OmniDiffusionSamplingParams) -> OmniDiffusionSamplingParams:
        """Fill ``None`` fields from the model folder's defaults, then the family's, and validate."""
        defaults = {**self.family_defaults(), **self.model_defaults}
        fills = {k: v for k, v in defaults.items() if getattr(params, k, None) is None}
        resolved = params.replace(**fills) if fills else dataclasses.replace(params)
        self.validate_params(resolved)
        return resolved

    def complete_params(self, request: Request) -> OmniDiffusionSamplingParams:
        """Params that depend on the request's inputs (edit models: the output size follows the input image);
        the engine stores the result so outputs report what really ran."""
        return request.params

    def validate_params(self, params: OmniDiffusionSamplingParams) -> None:
        for name, owner in FAMILY_ONLY_PARAMS.items():
            if name not in self.own_params and getattr(params, name) is not None:
                raise InvalidParameterError(
                    f"{name} is a parameter of {owner}, not of {self.pipeline_class_name}", param=name)
        if not self.takes_output_size:
            for name in ("height", "width"):
                if getattr(params, name) is not None:
                    raise InvalidParameterError(
                        f"{name} cannot be set for {self.pipeline_class_name}: its output size follows its input "
                        f"image ({self.output_size_note})", param=name)
        for name in self.unsupported_params:
            if getattr(params, name) is not None:
                raise InvalidParameterError(
                    f"{name} is not a parameter of {self.pipeline_class_name}; it uses guidance_scale "
                    f"({self.guidance_note})", param=name)
        multiple = self.size_multiple
        for name in ("height", "width"):
            value = getattr(params, name)
            if value is not None and value % multiple:
                raise InvalidParameterError(
                    f"{name}={value} must be a multiple of {multiple} for {self.pipeline_class_name}",
                    param=name)
        if self.kind is not ModelKind.VIDEO and params.num_frames not in (None, 1):
            raise InvalidParameterError(
                f"num_frames is only for video models; {self.pipeline_class_name} makes images",
                param="num_frames")

    @property
    def input_images(self) -> InputImages:
        """Edit models need input images; the others take none unless their adapter says so (image-to-video)."""
        return InputImages.REQUIRED if self.kind is ModelKind.EDIT else InputImages.NONE

    def validate_inputs(self, images: Sequence[Any]) -> None:
        """Input images where the family needs them, none where it takes none (never silently ignored)."""
        if self.input_images is InputImages.REQUIRED and not images:
            needs = "edits images" if self.kind is ModelKind.EDIT else f"makes {self.kind.with_article} from an input image"
            raise InvalidParameterError(
                f"{self.pipeline_class_name} {needs}: pass multi_modal_data={{'image': ...}}", param="image")
        if self.input_images is InputImages.NONE and images:
            raise InvalidParameterError(
                f"{self.pipeline_class_name} takes no input image (it is {self.kind.with_article} model)", param="image")
        if self.max_input_images is not None and len(images) > self.max_input_images:
            raise InvalidParameterError(
                f"{self.pipeline_class_name} takes {self.max_input_images} input image, got {len(images)}"
                f"{self.more_images_note}", param="image")

    def batch_key(self, request: Request) -> tuple[Any, ...]:
        """Requests with equal keys may run as one cohort (request scheduling, and caches that decide for the
        whole batch): everything but prompt, seed and output count."""
        p = request.params
        excluded = {"seed", "negative_prompt", "num_outputs_per_prompt"}
        values = tuple((f.name, getattr(p, f.name)) for f in dataclasses.fields(p) if f.name not in excluded)
        return values + (("has_negative", p.negative_prompt is not None),
                         ("input_sizes", self.input_image_sizes(request)))

    def input_image_sizes(self, request: Request) -> tuple[tuple[int, int], ...]:
        """The (width, height) of each input image as the model sees it: they fix the image-token shapes a batch
        stacks. By default the images' own sizes; a family that resizes inputs to a size of its own choosing
        returns those, so inputs that end up the same size batch together."""
        return tuple(img.size for img in request.images)

    @property
    def pipeline_class_name(self) -> str:
        return type(self.pipeline).__name__

    # ------------------------------------------------------------------ generation
    def encode_request(self, request: Request) -> Any:
        """Prompt embeddings of one request (one output's worth; rows are repeated per output when collated).
        Must be a pure function of ``prompt_cache_key(request)``."""
        raise NotImplementedError

    def uses_guidance(self, request: Request) -> bool:
        """Whether the request runs an unconditional branch (its embeddings then include the negative prompt)."""
        return False

    def prompt_cache_key(self, request: Request) -> tuple[Any, ...] | None:
        """Everything the embedding of ``request`` depends on, or None when it must not be cached."""
        p = request.params
        return (request.prompt, p.negative_prompt, p.max_sequence_length, str(self.dtype), str(self.device),
                self.uses_guidance(request))


class LoopAdapter(ModelAdapter):
    """An adapter whose requests run in ditserve's step loop, each with its own state, in a running batch."""

    def step_key(self, request: Request) -> tuple[Any, ...]:
        """Requests with equal keys may share a denoising step: their latents, text and image-token shapes
        stack. Prompt, seed, step count, guidance and the negative prompt may differ."""
        p = request.params
        return (p.height, p.width, p.num_frames, p.max_sequence_length, self.input_image_sizes(request))

    @abstractmethod
    def prepare(self, request: Request, embeddings: Any) -> RequestState:
        """The request's initial latents (from its own generator), its own scheduler and timesteps, and its
        conditioning (the embeddings, and whatever else the family computes once per request)."""

    def guided(self, state: RequestState) -> bool:
        """Whether the request runs the unconditional branch at its current step."""
        return self.uses_guidance(state.request)

    @abstractmethod
    def predict(self, batch: StepBatch) -> torch.Tensor:
        """The model output of every row of the batch at each request's own step, guidance applied; transformer
        calls go through ``batch.call``."""

    def guided_prediction(self, batch: StepBatch, call_branch: BranchCall, guide: Guide,
                          states: Sequence[RequestState] | None = None) -> torch.Tensor:
        """The conditional branch for every request of ``states`` (default: the batch), the unconditional one only
        for those that run guidance at their current step, combined per request by ``guide``."""
        states = batch.states if states is None else states
        cond = call_branch("cond", states)
        guided = [s for s in states if self.guided(s)]
        if not guided:
            return cond
        return batch.combine(cond, call_branch("uncond", guided), guided, guide, states)

    def scheduler_step(self, state: RequestState, model_output: torch.Tensor) -> torch.Tensor:
        """The request's latents after its scheduler's step (each request owns its scheduler)."""
        return state.scheduler.step(model_output, state.t, state.latents, return_dict=False)[0]

    @abstractmethod
    def decode(self, state: RequestState) -> RequestMedia:
        """A finished request's latents to its images or videos."""

    def decode_audio(self, state: RequestState) -> list[AudioTrack]:
        """A finished request's sound tracks, one per video, where its pipeline makes them (LTX-2); none here."""
        return []


def request_generator(request: Request) -> torch.Generator:
    """The request's own CPU generator: seed ``s`` matches diffusers with ``torch.Generator('cpu').manual_seed(s)``."""
    return torch.Generator("cpu").manual_seed(request.seed)


def stack_rows(per_request: Sequence[torch.Tensor | None], states: Sequence[RequestState]) -> torch.Tensor | None:
    """Batch tensors computed per request (leading dim 1): each request's row repeated once per output, as
    diffusers' ``num_images_per_prompt`` does, then concatenated in request order."""
    if per_request[0] is None:
        return None
    rows = [t.repeat(s.num_rows, *([1] * (t.dim() - 1))) for t, s in zip(per_request, states, strict=True)]
    return torch.cat(rows, dim=0)
