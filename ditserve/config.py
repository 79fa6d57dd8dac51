"""Configuration objects: sampling params of a request, engine config, parallel config, limits.

Public names follow vLLM-Omni (``OmniDiffusionSamplingParams``, ``OmniDiffusionConfig``,
``DiffusionParallelConfig``) so its users can switch with little change. Every object validates itself on
construction and rejects unknown keys with an error that lists the allowed ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ditserve.errors import (
    InvalidParameterError,
    InvalidTypeError,
    ParallelConfigError,
    check_choice,
    check_keys,
)
from ditserve.lora.request import DEFAULT_MAX_LORA_BYTES, LoRABackend

#: a shift of 0 would put every sigma at 0; published models use 1 to 17
MIN_FLOW_SHIFT, MAX_FLOW_SHIFT = 0.01, 100.0


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name} must be an integer, got {type(value).__name__}", param=name)
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise InvalidParameterError(f"{name}={value} must be >= {minimum}{upper}", param=name)


def _check_float(name: str, value: Any, minimum: float, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__}", param=name)
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise InvalidParameterError(f"{name}={value} must be a finite number in [{minimum}, {maximum}]", param=name)


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be a string or None, got {type(value).__name__}", param=name)


def _path_list(name: str, value: Any) -> list[str]:
    """A path or a list of paths, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidTypeError(f"{name} must be a path or a list of paths", param=name)
    return list(value)


#: the most layers one Qwen-Image-Layered request may ask for
MAX_LAYERS = 16


@dataclass
class OmniDiffusionSamplingParams:
    """How to sample one request. ``None`` means "the model family's default" (the same default diffusers'
    own pipeline uses, or the model folder's ``ditserve_defaults.json``)."""

    num_inference_steps: int | None = None
    height: int | None = None
    width: int | None = None
    #: seed ``s`` gives the initial noise of diffusers with ``torch.Generator("cpu").manual_seed(s)``;
    #: ``None`` draws a seed, reported in the output.
    seed: int | None = None
    #: distilled (embedded) guidance for FLUX.1-dev-like models, classic CFG scale for SD3 / Z-Image / Wan
    guidance_scale: float | None = None
    #: "true" classifier-free guidance with a negative prompt (FLUX, Qwen-Image)
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    num_outputs_per_prompt: int = 1
    num_frames: int | None = None
    fps: int | None = None
    max_sequence_length: int | None = None
    #: Wan2.2 A14B: guidance of the low-noise expert, and the boundary between the two experts
    guidance_scale_2: float | None = None
    boundary_ratio: float | None = None
    #: this request's fixed timestep shift (see ``OmniDiffusionConfig.flow_shift``); None: the engine's
    flow_shift: float | None = None
    #: Qwen-Image-Layered: how many RGBA layers the input image is decomposed into, and the resolution bucket
    #: (640 or 1024) its condition and layers are made at (vLLM-Omni's names)
    layers: int | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 8)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        for name in ("guidance_scale", "true_cfg_scale", "guidance_scale_2"):
            value = getattr(self, name)
            if value is not None:
                _check_float(name, value, 0.0, 100.0)
        if self.boundary_ratio is not None:
            _check_float("boundary_ratio", self.boundary_ratio, 0.0, 1.0)
        if self.flow_shift is not None:
            _check_float("flow_shift", self.flow_shift, MIN_FLOW_SHIFT, MAX_FLOW_SHIFT)
        _check_optional_str("negative_prompt", self.negative_prompt)
        _check_int("num_outputs_per_prompt", self.num_outputs_per_prompt, 1)
        if self.num_frames is not None:
            _check_int("num_frames", self.num_frames, 1)
        if self.fps is not None:
            _check_int("fps", self.fps, 1, 240)
        if self.max_sequence_length is not None:
            _check_int("max_sequence_length", self.max_sequence_length, 1, 4096)
        if self.layers is not None:
            # each layer adds an image's worth of tokens to every step: bounded as frames are, so that one request
            # cannot hold an engine for hours
            _check_int("layers", self.layers, 1, MAX_LAYERS)
        if self.resolution is not None:
            _check_int("resolution", self.resolution, 1, 65536)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OmniDiffusionSamplingParams:
        check_keys("sampling params", values.keys(), cls.field_names())
        return cls(**dict(values))

    def replace(self, **changes: Any) -> OmniDiffusionSamplingParams:
        check_keys("sampling params", changes.keys(), self.field_names())
        return dataclasses.replace(self, **changes)


#: the most characters any text field may be configured to take (the HTTP models refuse longer ones outright)
MAX_TEXT_CHARS = 65536


@dataclass
class Limits:
    """Upper bounds a request may ask for: protects a server from a request that would run for hours."""

    max_steps: int = 200
    max_image_size: int = 2048
    max_n: int = 8
    max_frames: int = 257
    max_prompt_chars: int = 4000
    max_negative_prompt_chars: int = 4000

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_int(f.name, getattr(self, f.name), 1)
        for name in ("max_prompt_chars", "max_negative_prompt_chars"):
            _check_int(name, getattr(self, name), 1, MAX_TEXT_CHARS)


@dataclass
class DiffusionParallelConfig:
    """Degrees of each kind of multi-device parallelism; their product is the world size."""

    cfg_parallel_size: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    tensor_parallel_size: int = 1
    vae_patch_parallel_size: int = 1
    #: seconds a collective may wait before the run fails (a dead rank must never hang the engine)
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("cfg_parallel_size", "ulysses_degree", "ring_degree", "tensor_parallel_size",
                     "vae_patch_parallel_size"):
            _check_int(name, getattr(self, name), 1, 64)
        if self.cfg_parallel_size not in (1, 2):
            raise InvalidParameterError(
                f"cfg_parallel_size={self.cfg_parallel_size}: allowed values are 1 and 2 "
                "(one rank per guidance branch)", param="cfg_parallel_size")
        _check_float("timeout_s", self.timeout_s, 1.0, 3600.0)
        if self.vae_patch_parallel_size > self.world_size:
            raise ParallelConfigError(
                f"vae_patch_parallel_size={self.vae_patch_parallel_size} must be <= the world size "
                f"{self.world_size} set by cfg_parallel_size x ulysses_degree x ring_degree x tensor_parallel_size "
                "(VAE patch parallelism reuses the denoising ranks)", param="vae_patch_parallel_size")

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.cfg_parallel_size * self.sequence_parallel_size * self.tensor_parallel_size

    @classmethod
    def from_any(cls, value: DiffusionParallelConfig | Mapping[str, Any] | None) -> DiffusionParallelConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            check_keys("parallel_config", value.keys(), [f.name for f in fields(cls)])
            return cls(**dict(value))
        raise InvalidTypeError(
            f"parallel_config must be a DiffusionParallelConfig or a dict, got {type(value).__name__}",
            param="parallel_config")


DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "fp8", "gguf", "int8")
SCHEDULING_MODES = ("step", "request")


@dataclass
class OmniDiffusionConfig:
    """Everything an engine is built from. ``Omni(**kwargs)`` builds one of these."""

    #: local diffusers folder, hub id, or ``None`` / ``"ditserve-shapes"`` for the bundled demo model
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    cache_backend: str | None = None
    cache_config: dict[str, Any] | None = None
    #: prompt-embedding cache (``None``: on, unless OMNI_DIFFUSION_PROMPT_EMBED_CACHE says otherwise)
    enable_prompt_embed_cache: bool | None = None
    prompt_embed_cache_size: int | None = None
    max_batch_size: int = 4
    #: "step": requests join and leave a running batch between denoising steps; "request": a batch forms when
    #: the running set is empty and runs to its end (the behaviour before step scheduling, for comparison)
    scheduling: str = "step"
    #: requests allowed to wait; beyond it new ones are refused (QueueFullError, HTTP 429). None: unbounded
    max_queue_size: int | None = None
    #: a fixed timestep shift for the model's flow-matching scheduler (Wan's ``flow_shift``, FLUX-style ``shift``),
    #: replacing a resolution-dependent one; ``None`` keeps the scheduler's own (vLLM-Omni's ``flow_shift``)
    flow_shift: float | None = None
    #: the default boundary between the two experts of Wan2.2 A14B (requests may still set their own); refused
    #: at start-up by models without a second expert
    boundary_ratio: float | None = None
    #: ``False`` compiles the family's repeated transformer blocks with torch.compile (regional compile);
    #: ``None`` is auto: compile on CUDA, eager on CPU (see ditserve/levers/compile.py for the figures)
    enforce_eager: bool | None = None
    enable_cpu_offload: bool = False
    enable_layerwise_offload: bool = False
    vae_use_slicing: bool = False
    vae_use_tiling: bool = False
    quantization: str | None = None
    ignored_layers: list[str] | None = None
    gguf_model: str | None = None
    parallel_config: DiffusionParallelConfig = field(default_factory=DiffusionParallelConfig)
    limits: Limits = field(default_factory=Limits)
    #: tqdm progress bar over denoising steps
    show_progress: bool = False
    #: LoRA adapters given at start: a path or a list (each named after its file or folder); with the "peft"
    #: backend they are loaded for requests that name them, with "distill" they are fused into the weights.
    #: "distill" also takes a dict from transformer to paths, for models with two experts (Wan2.2 A14B:
    #: ``{"transformer": high_noise, "transformer_2": low_noise}``)
    lora_path: str | list[str] | dict[str, str | list[str]] | None = None
    #: named adapters given at start (``--lora NAME=PATH``), "peft" backend only
    loras: dict[str, str] | None = None
    #: "peft": adapters chosen per request and applied per row of a step batch; "distill": fused at start
    lora_backend: str = "peft"
    #: adapters kept loaded at once (least recently used evicted, never one a waiting or running request uses)
    max_loras: int = 8
    #: folders a request or a hot load may take LoRA paths from (symlinks resolved first). ``None``: any path
    #: (an offline caller is trusted); ``[]``: none. ``ditserve serve`` always passes a list.
    lora_dir: str | list[str] | None = None
    #: largest adapter weights file read, in bytes
    max_lora_bytes: int = DEFAULT_MAX_LORA_BYTES

    def __post_init__(self) -> None:
        _check_optional_str("model", self.model)
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str):
            raise InvalidTypeError("device must be a string such as 'auto', 'cpu', 'cuda' or 'cuda:1'",
                                   param="device")
        _check_optional_str("cache_backend", self.cache_backend)
        if self.cache_config is not None and not isinstance(self.cache_config, Mapping):
            raise InvalidTypeError("cache_config must be a dict", param="cache_config")
        if self.cache_config and self.cache_backend is None:
            raise InvalidParameterError("cache_config was given without cache_backend; set cache_backend too",
                                        param="cache_config")
        _check_int("max_batch_size", self.max_batch_size, 1, 256)
        check_choice("scheduling", self.scheduling, SCHEDULING_MODES)
        if self.flow_shift is not None:
            _check_float("flow_shift", self.flow_shift, MIN_FLOW_SHIFT, MAX_FLOW_SHIFT)
        if self.boundary_ratio is not None:
            _check_float("boundary_ratio", self.boundary_ratio, 0.0, 1.0)
        if self.enforce_eager is not None and not isinstance(self.enforce_eager, bool):
            raise InvalidTypeError("enforce_eager must be True, False or None (auto: compile on CUDA only)",
                                   param="enforce_eager")
        if self.ignored_layers is not None and (
                not isinstance(self.ignored_layers, list) or not all(isinstance(x, str) for x in self.ignored_layers)):
            raise InvalidTypeError("ignored_layers must be a list of layer-name substrings", param="ignored_layers")
        if self.max_queue_size is not None:
            _check_int("max_queue_size", self.max_queue_size, 1)
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        if self.quantization == "gguf" and not self.gguf_model:
            raise InvalidParameterError("quantization='gguf' needs gguf_model (path to a .gguf transformer file)",
                                        param="gguf_model")
        if self.gguf_model and self.quantization != "gguf":
            raise InvalidParameterError("gguf_model is only used with quantization='gguf'", param="gguf_model")
        if self.enable_cpu_offload and self.enable_layerwise_offload:
            raise InvalidParameterError(
                "enable_cpu_offload and enable_layerwise_offload are mutually exclusive; choose one",
                param="enable_layerwise_offload")
        self.parallel_config = DiffusionParallelConfig.from_any(self.parallel_config)
        self._validate_lora()
        if isinstance(self.limits, Mapping):
            check_keys("limits", self.limits.keys(), [f.name for f in fields(Limits)])
            self.limits = Limits(**dict(self.limits))

    def _validate_lora(self) -> None:
        check_choice("lora_backend", self.lora_backend, [b.value for b in LoRABackend])
        if isinstance(self.lora_path, Mapping):
            if self.lora_backend != LoRABackend.DISTILL.value:
                raise InvalidParameterError("lora_path as a dict (adapters per transformer) is for "
                                            "lora_backend='distill'", param="lora_path")
            self.lora_path = {key: _path_list(f"lora_path[{key!r}]", value) for key, value in self.lora_path.items()}
        elif self.lora_path is not None:
            self.lora_path = _path_list("lora_path", self.lora_path)
        if self.lora_dir is not None:
            self.lora_dir = _path_list("lora_dir", self.lora_dir)
        if self.loras is not None and (not isinstance(self.loras, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.loras.items())):
            raise InvalidTypeError("loras must map adapter names to paths", param="loras")
        _check_int("max_loras", self.max_loras, 1, 1024)
        _check_int("max_lora_bytes", self.max_lora_bytes, 1)
        if self.lora_backend == LoRABackend.DISTILL.value and self.loras:
            raise InvalidParameterError("loras (named adapters) are for lora_backend='peft'; the distill backend "
                                        "fuses lora_path at start", param="loras")
        if (self.lora_path or self.loras) and self.parallel_config.world_size > 1:
            raise ParallelConfigError("LoRA adapters are not supported with multi-device parallelism yet",
                                      param="lora_path")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> OmniDiffusionConfig:
        check_keys("Omni", kwargs.keys(), cls.field_names())
        return cls(**dict(kwargs))
