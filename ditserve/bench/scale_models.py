"""The full-size architectures ``ditserve bench scale`` builds, and how it builds them: published configs written
here (nothing is downloaded), random bf16 weights drawn directly on the device, the matching VAE, and a
diffusers pipeline around them that our family adapter serves.

Text encoders are not built: each request's prompt embeddings are random tensors of the published text width and
a fixed length (``ScaleModel.text_tokens``), so every figure is of the denoising transformer and the VAE alone.
Random weights give the real cost of every kernel; they say nothing about image quality.

Sources of the numbers (the ``config.json`` files of the published diffusers repositories):
- Qwen-Image: huggingface.co/Qwen/Qwen-Image, ``transformer/config.json``, ``vae/config.json``,
  ``scheduler/scheduler_config.json``;
- FLUX.1-dev: huggingface.co/black-forest-labs/FLUX.1-dev, the same three files;
- Wan2.2-TI2V-5B: huggingface.co/Wan-AI/Wan2.2-TI2V-5B-Diffusers, the same three files and ``model_index.json``
  (``expand_timesteps``), cross-checked with the Wan team's ``wan/configs/wan_ti2v_5B.py`` (dim 3072,
  ffn_dim 14336, 24 heads, 30 layers, VAE stride 4x16x16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ditserve.models.base import ModelAdapter
from ditserve.models.loader import LoadedModel
from ditserve.request import Request


class Scale(str, Enum):
    """FULL: the published architecture and output size. TINY: the same classes and code path with a few narrow
    blocks at 64x64, so a CPU runs every row in seconds (``--dry-run``)."""

    FULL = "full"
    TINY = "tiny"


@dataclass(frozen=True)
class OutputSize:
    height: int
    width: int
    #: video frames; 1 for image models
    frames: int = 1


@dataclass(frozen=True)
class ScaleModel:
    """One published model: its classes, configs at each scale, and the request shape the bench times."""

    name: str
    pipeline_class: str
    transformer_class: str
    transformer_config: Mapping[str, Any]
    vae_class: str
    vae_config: Mapping[str, Any]
    scheduler_class: str
    scheduler_config: Mapping[str, Any]
    size: OutputSize
    #: prompt-embedding length of every request (see each model's comment for why this length)
    text_tokens: int
    #: FLUX's CLIP pooled embedding width; None for models without one
    pooled_width: int | None
    #: sampling params of every request: one transformer pass per step (no classifier-free guidance)
    params: Mapping[str, Any]
    #: transformer passes per step with the family's default guidance (for the derived 50-step figure)
    default_cfg_passes: int
    #: layers the FP8 rows keep in bf16 (``ignored_layers``): embedders and the output projection, which are
    #: small and sit where precision matters most. The engine has no per-family default list yet: this is it.
    fp8_ignored_layers: tuple[str, ...]
    #: pipeline ``__init__`` arguments beyond the components (Wan2.2 TI2V's per-token timesteps)
    pipeline_config: Mapping[str, Any] = field(default_factory=dict)
    #: config overrides of the TINY scale
    tiny_transformer: Mapping[str, Any] = field(default_factory=dict)
    tiny_vae: Mapping[str, Any] = field(default_factory=dict)
    tiny_size: OutputSize = OutputSize(64, 64)
    tiny_text_tokens: int = 16

    def transformer_kwargs(self, scale: Scale) -> dict[str, Any]:
        return {**self.transformer_config, **(self.tiny_transformer if scale is Scale.TINY else {})}

    def vae_kwargs(self, scale: Scale) -> dict[str, Any]:
        return {**self.vae_config, **(self.tiny_vae if scale is Scale.TINY else {})}

    def output_size(self, scale: Scale) -> OutputSize:
        return self.tiny_size if scale is Scale.TINY else self.size

    def tokens_of_text(self, scale: Scale) -> int:
        return self.tiny_text_tokens if scale is Scale.TINY else self.text_tokens


# Qwen-Image's text encoder (Qwen2.5-VL) is cut to the prompt's own length after its 34-token template, so the
# text length varies by prompt; 256 tokens stands for a detailed prompt.
QWEN_IMAGE = ScaleModel(
    name="qwen-image",
    pipeline_class="QwenImagePipeline",
    transformer_class="QwenImageTransformer2DModel",
    transformer_config={"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
                        "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)},
    vae_class="AutoencoderKLQwenImage",
    vae_config={"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                "temperal_downsample": [False, True, True], "dropout": 0.0},
    scheduler_class="FlowMatchEulerDiscreteScheduler",
    scheduler_config={"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                      "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                      "time_shift_type": "exponential", "use_dynamic_shifting": True},
    size=OutputSize(1024, 1024),
    text_tokens=256,
    pooled_width=None,
    params={"true_cfg_scale": 1.0},
    # diffusers' QwenImagePipeline default: true_cfg_scale 4 with a negative prompt, a second pass per step
    default_cfg_passes=2,
    fp8_ignored_layers=("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"),
    tiny_transformer={"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                      "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)},
    tiny_vae={"base_dim": 16},
)

# FLUX.1-dev's T5 embeddings are padded to max_sequence_length, 512 by default: every prompt costs 512 tokens.
FLUX1_DEV = ScaleModel(
    name="flux1-dev",
    pipeline_class="FluxPipeline",
    transformer_class="FluxTransformer2DModel",
    transformer_config={"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
    vae_class="AutoencoderKL",
    vae_config={"in_channels": 3, "out_channels": 3, "latent_channels": 16,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                "act_fn": "silu", "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
                "force_upcast": True},
    scheduler_class="FlowMatchEulerDiscreteScheduler",
    scheduler_config={"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    size=OutputSize(1024, 1024),
    text_tokens=512,
    pooled_width=768,
    # guidance-distilled: guidance_scale is an input of the transformer, not a second pass
    params={"guidance_scale": 3.5, "true_cfg_scale": 1.0},
    default_cfg_passes=1,
    fp8_ignored_layers=("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"),
    tiny_transformer={"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                      "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": (8, 12, 12)},
    tiny_vae={"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
    tiny_text_tokens=16,
)

# Wan's UMT5 embeddings are padded to 512 tokens. 704x1280 with 81 frames is the model card's 720p setting at
# the frame count the issue asks for (the card's own default is 121 frames); --frames changes it.
WAN22_TI2V_5B = ScaleModel(
    name="wan2.2-ti2v-5b",
    pipeline_class="WanPipeline",
    transformer_class="WanTransformer3DModel",
    transformer_config={"patch_size": (1, 2, 2), "num_attention_heads": 24, "attention_head_dim": 128,
                        "in_channels": 48, "out_channels": 48, "text_dim": 4096, "freq_dim": 256,
                        "ffn_dim": 14336, "num_layers": 30, "cross_attn_norm": True,
                        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024},
    vae_class="AutoencoderKLWan",
    # the published latents_mean/latents_std (48 values each) normalise latents before decoding; they do not
    # change its cost and random latents need no normalising, so the class defaults stay
    vae_config={"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4],
                "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
                "dropout": 0.0, "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2,
                "scale_factor_temporal": 4, "scale_factor_spatial": 16},
    scheduler_class="UniPCMultistepScheduler",
    scheduler_config={"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                      "flow_shift": 5.0, "solver_order": 2},
    size=OutputSize(704, 1280, 81),
    text_tokens=512,
    pooled_width=None,
    params={"guidance_scale": 1.0},
    # the model card samples with guidance 5: a second pass per step
    default_cfg_passes=2,
    fp8_ignored_layers=("condition_embedder", "proj_out"),
    pipeline_config={"expand_timesteps": True},
    tiny_transformer={"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "text_dim": 64,
                      "ffn_dim": 128},
    tiny_vae={"base_dim": 16, "decoder_base_dim": 32},
    tiny_size=OutputSize(64, 64, 5),
)

MODELS: dict[str, ScaleModel] = {m.name: m for m in (QWEN_IMAGE, FLUX1_DEV, WAN22_TI2V_5B)}


@dataclass(frozen=True)
class Workload:
    """What one denoising step of a model costs, for planning (``ditserve.bench.scale`` estimates row times from
    it before anything is measured)."""

    parameters: int
    weight_bytes: int
    image_tokens: int
    text_tokens: int
    #: transformer blocks that attend over the joint sequence
    attention_layers: int
    inner_dim: int
    output_megapixel_frames: float

    @property
    def step_flops(self) -> float:
        """Matrix products (2 FLOPs per weight and token) plus attention (QK^T and AV over the joint sequence)."""
        tokens = self.image_tokens + self.text_tokens
        return 2.0 * self.parameters * tokens + 4.0 * self.attention_layers * tokens**2 * self.inner_dim


def latent_grid(model: ScaleModel, scale: Scale) -> tuple[int, int, int]:
    """(frames, rows, columns) of VAE latents for the model's output size."""
    size = model.output_size(scale)
    vae = model.vae_kwargs(scale)
    spatial = vae.get("scale_factor_spatial") or 2 ** (len(vae.get("block_out_channels") or vae["dim_mult"]) - 1)
    frames = 1 if size.frames == 1 else (size.frames - 1) // vae["scale_factor_temporal"] + 1
    return frames, size.height // spatial, size.width // spatial


def latent_channels(model: ScaleModel, scale: Scale) -> int:
    vae = model.vae_kwargs(scale)
    return vae.get("z_dim") or vae["latent_channels"]


#: the one VAE class here without a frame axis (Qwen-Image's and Wan's are video VAEs: an image is one frame)
IMAGE_VAE_CLASS = "AutoencoderKL"


def vae_latent_shape(model: ScaleModel, scale: Scale) -> tuple[int, ...]:
    """The shape of one output's latents as the VAE decodes them."""
    frames, rows, columns = latent_grid(model, scale)
    temporal = () if model.vae_class == IMAGE_VAE_CLASS else (frames,)
    return (1, latent_channels(model, scale), *temporal, rows, columns)


def workload(model: ScaleModel, scale: Scale) -> Workload:
    """The step's size, from the transformer built on the meta device (exact parameter count, no memory)."""
    config = model.transformer_kwargs(scale)
    transformer_class = _class(model.transformer_class)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in transformer_class(**config).parameters())
    frames, rows, columns = latent_grid(model, scale)
    patch = config["patch_size"]
    # FLUX packs 2x2 latent patches before its patch_size-1 embedder
    patch_rows = patch[1] if isinstance(patch, tuple) else 2
    size = model.output_size(scale)
    return Workload(
        parameters=parameters, weight_bytes=2 * parameters,
        image_tokens=frames * (rows // patch_rows) * (columns // patch_rows),
        text_tokens=model.tokens_of_text(scale),
        attention_layers=config["num_layers"] + config.get("num_single_layers", 0),
        inner_dim=config["num_attention_heads"] * config["attention_head_dim"],
        output_megapixel_frames=size.height * size.width * size.frames / 1e6)


def _class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _keep_in_fp32(module: torch.nn.Module) -> None:
    """Parameters of the modules the class keeps in float32 (Wan's norms, time embedder, modulation table), as
    ``from_pretrained(torch_dtype=bfloat16)`` keeps them."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, parameter in module.named_parameters():
        if keep & set(name.split(".")):
            parameter.data = parameter.data.float()


def build_module(class_name: str, config: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                 seed: int) -> torch.nn.Module:
    """The module with the constructor's own random initialisation, allocated and drawn on ``device`` in
    ``dtype`` (a 20 B-parameter model never passes through CPU memory or float32). Same seed, same weights."""
    # resolved first: diffusers imports the class's module lazily, and a module-level tensor made inside the
    # device context below would land on that device (a meta tensor breaks the caches' tables)
    module_class = _class(class_name)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        module = module_class(**config)
    _keep_in_fp32(module)
    return module.eval().requires_grad_(False)


def synthetic_text(model: ScaleModel, scale: Scale, device: torch.device, dtype: torch.dtype,
                   seed: int) -> dict[str, torch.Tensor]:
    """One request's prompt embeddings in the layout of the family's ``encode_request``, drawn at random."""
    generator = torch.Generator("cpu").manual_seed(seed)
    config = model.transformer_kwargs(scale)
    width = config.get("joint_attention_dim") or config["text_dim"]
    tokens = model.tokens_of_text(scale)
    embeddings = {"prompt_embeds": torch.randn(1, tokens, width, generator=generator)}
    if model.pooled_width is not None:
        embeddings["pooled"] = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    embeddings = {k: v.to(device, dtype) for k, v in embeddings.items()}
    if model.pooled_width is not None:
        # FLUX's text positions are all zero (FluxPipeline.encode_prompt)
        embeddings["text_ids"] = torch.zeros(tokens, 3, device=device, dtype=dtype)
    return embeddings


def synthetic_adapter_class(adapter_class: type[ModelAdapter], model: ScaleModel, scale: Scale,
                            seed: int) -> type[ModelAdapter]:
    """The family adapter, with random prompt embeddings in place of the text encoders."""

    def encode_request(self: ModelAdapter, request: Request) -> dict[str, torch.Tensor]:
        return synthetic_text(model, scale, self.device, self.dtype, seed)

    return type(f"Synthetic{adapter_class.__name__}", (adapter_class,), {"encode_request": encode_request})


def build_pipeline(model: ScaleModel, scale: Scale, device: torch.device, dtype: torch.dtype, seed: int,
                   with_transformer: bool = True) -> LoadedModel:
    """The model's diffusers pipeline (random transformer and VAE, no text encoders) wrapped in its adapter."""
    import diffusers

    from ditserve.models.registry import adapter_class_for

    transformer = (build_module(model.transformer_class, model.transformer_kwargs(scale), device, dtype, seed)
                   if with_transformer else None)
    vae = build_module(model.vae_class, model.vae_kwargs(scale), device, dtype, seed + 1)
    scheduler = _class(model.scheduler_class)(**model.scheduler_config)
    components: dict[str, Any] = {"transformer": transformer, "vae": vae, "scheduler": scheduler,
                                  "text_encoder": None, "tokenizer": None}
    if model.pipeline_class == "FluxPipeline":
        components |= {"text_encoder_2": None, "tokenizer_2": None}
    pipeline = getattr(diffusers, model.pipeline_class)(**components, **model.pipeline_config)
    pipeline.set_progress_bar_config(disable=True)
    adapter = synthetic_adapter_class(adapter_class_for(model.pipeline_class), model, scale, seed)(pipeline)
    return LoadedModel(name=model.name, path=f"synthetic:{model.name}:{scale.value}", pipeline=pipeline,
                       adapter=adapter, device=device, dtype=dtype)

