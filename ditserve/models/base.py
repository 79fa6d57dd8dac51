"""The adapter contract: what the engine needs to know about a family of diffusers pipelines.

An adapter is small. It resolves a request's params against the family's defaults, and for adapters that use
ditserve's shared denoising loop (``LoopAdapter``) it says how to encode prompts, prepare latents from each
request's own generator, predict the velocity/noise at a step (guidance included), and decode. The loop
itself (steps, scheduler, cancellation, progress, the forward context read by caches) lives in
``ditserve.engine.denoise`` and is the same for every family.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.context import branch_context
from ditserve.engine.request import Request
from ditserve.errors import InvalidParameterError

#: what a batch produces per request: a list of PIL images, or a list of uint8 videos (frames x H x W x 3)
RequestMedia = list[Any]


@dataclass
class StageTimings:
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class BatchResult:
    media: list[RequestMedia]
    timings: StageTimings


@dataclass
class DenoiseState:
    """Everything the shared loop carries from one step to the next for one batch."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    requests: Sequence[Request]
    #: family-specific tensors (prompt embeddings, position ids, masks, guidance...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> OmniDiffusionSamplingParams:
        return self.requests[0].params

    def row_request_ids(self) -> tuple[str, ...]:
        """The request id of each row of the latents (a request with n outputs owns n rows)."""
        return tuple(r.request_id for r in self.requests for _ in range(r.num_outputs))


#: hooks the engine gives an adapter for one batch: called before each step (may raise to abort),
#: and after each step with (step_index, num_steps)
StepHooks = tuple[Callable[[int, int], None], Callable[[int, int], None]]


class ModelAdapter(ABC):
    """Base of every family adapter."""

    #: ``model_index.json`` ``_class_name`` values this adapter serves (registry key)
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: "image" (text-to-image), "edit" (needs input images) or "video"
    kind: ClassVar[str] = "image"
    #: pipeline attributes holding the denoising transformers, in call order
    transformer_names: ClassVar[tuple[str, ...]] = ("transformer",)
    #: whether the engine's own denoising loop runs this family (False: diffusers' ``__call__`` does)
    uses_shared_loop: ClassVar[bool] = True
    #: sampling params that mean nothing to this family: an error, never silently ignored
    unsupported_params: ClassVar[tuple[str, ...]] = ()
    #: how this family is guided, said in the error for an unsupported param
    guidance_note: ClassVar[str] = ""

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
        if self.kind != "video" and params.num_frames not in (None, 1):
            raise InvalidParameterError(
                f"num_frames is only for video models; {self.pipeline_class_name} makes images",
                param="num_frames")

    def validate_inputs(self, images: Sequence[Any]) -> None:
        """Edit models need input images; the others accept none (never silently ignored)."""
        if self.kind == "edit" and not images:
            raise InvalidParameterError(
                f"{self.pipeline_class_name} edits images: pass multi_modal_data={{'image': ...}}", param="image")
        if self.kind != "edit" and images:
            raise InvalidParameterError(
                f"{self.pipeline_class_name} takes no input image (it is a {self.kind} model)", param="image")

    def batch_key(self, request: Request) -> tuple[Any, ...]:
        """Requests with equal keys may share a batch: everything but prompt, seed and output count."""
        p = request.params
        excluded = {"seed", "negative_prompt", "num_outputs_per_prompt"}
        values = tuple((f.name, getattr(p, f.name)) for f in dataclasses.fields(p) if f.name not in excluded)
        input_sizes = tuple(img.size for img in request.images)
        return values + (("has_negative", p.negative_prompt is not None), ("input_sizes", input_sizes))

    @property
    def pipeline_class_name(self) -> str:
        return type(self.pipeline).__name__

    # ------------------------------------------------------------------ generation
    @abstractmethod
    def generate(self, requests: Sequence[Request], hooks: StepHooks,
                 encode: Callable[[Request], Any]) -> BatchResult:
        """Run one batch of compatible requests; ``encode`` is ``encode_request`` behind the prompt cache."""

    def encode_request(self, request: Request) -> Any:
        """Prompt embeddings of one request (one output's worth; the loop repeats them per output).
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
    """An adapter whose batches run in ditserve's shared denoising loop."""

    @abstractmethod
    def collate(self, embeddings: Sequence[Any], requests: Sequence[Request]) -> dict[str, Any]:
        """Stack per-request embeddings into batch tensors (rows repeated per output)."""

    @abstractmethod
    def prepare(self, requests: Sequence[Request], conditioning: dict[str, Any]) -> DenoiseState:
        """Initial latents (each request from its own generator) and the scheduler's timesteps."""

    @abstractmethod
    def predict(self, state: DenoiseState, step_index: int, t: torch.Tensor) -> torch.Tensor:
        """The model output at this step, guidance applied; transformer calls go through ``call_transformer``."""

    @abstractmethod
    def decode(self, state: DenoiseState) -> list[RequestMedia]:
        """Final latents to images or videos, one list per request."""

    def scheduler_step(self, state: DenoiseState, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return state.scheduler.step(model_output, t, state.latents, return_dict=False)[0]

    def call_transformer(self, branch: str, transformer_name: str = "transformer", **kwargs: Any) -> Any:
        """Call a transformer inside the branch's forward context, so caches keep per-branch state."""
        module = getattr(self.pipeline, transformer_name)
        with branch_context(branch, transformer_name):
            return module(**kwargs, return_dict=False)[0]

    def generate(self, requests: Sequence[Request], hooks: StepHooks,
                 encode: Callable[[Request], Any]) -> BatchResult:
        from ditserve.engine.denoise import run_denoising_loop

        return run_denoising_loop(self, requests, hooks, encode)


def request_generator(request: Request) -> torch.Generator:
    """The request's own CPU generator: seed ``s`` matches diffusers with ``torch.Generator('cpu').manual_seed(s)``."""
    return torch.Generator("cpu").manual_seed(request.seed)


def stack_rows(per_request: Sequence[torch.Tensor | None], requests: Sequence[Request]) -> torch.Tensor | None:
    """Batch tensors computed per request (leading dim 1): each request's row repeated once per output, as
    diffusers' ``num_images_per_prompt`` does, then concatenated in request order."""
    if per_request[0] is None:
        return None
    rows = [t.repeat(r.num_outputs, *([1] * (t.dim() - 1))) for t, r in zip(per_request, requests, strict=True)]
    return torch.cat(rows, dim=0)
