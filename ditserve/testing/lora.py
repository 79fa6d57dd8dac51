"""Tiny random LoRA adapters for a tiny pipeline's transformer, written with PEFT (no download).

``init_lora_weights=False`` leaves both LoRA matrices random (PEFT's default zeroes ``lora_B``, an adapter that
changes nothing), so an adapter moves the tiny models' outputs far past the parity bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: FLUX projections most LoRAs target (attention of both streams, and the single blocks' MLP input)
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp")


def lora_state_dict(transformer_dir: str, *, seed: int, r: int = 4, alpha: float = 8.0,
                    targets: Sequence[str] = FLUX_TARGETS, rank_pattern: dict[str, int] | None = None,
                    alpha_pattern: dict[str, float] | None = None,
                    model_class: str = "FluxTransformer2DModel") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A random adapter for the transformer saved in ``transformer_dir``: (PEFT state dict without adapter name,
    its ``LoraConfig`` fields). Keys are ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = getattr(diffusers, model_class).from_pretrained(transformer_dir)
    fields = {"r": r, "lora_alpha": alpha, "target_modules": list(targets),
              "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(init_lora_weights=False, **fields), model)
    state_dict = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return state_dict, fields


def write_peft_folder(folder: Path, state_dict: dict[str, torch.Tensor], fields: dict[str, Any]) -> Path:
    """The layout ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors``
    with keys under ``base_model.model.``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(**fields).save_pretrained(str(folder))
    save_file({f"base_model.model.{k}": v for k, v in state_dict.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def write_diffusers_file(file: Path, state_dict: dict[str, torch.Tensor], fields: dict[str, Any] | None = None,
                         pipeline_class: str = "FluxPipeline") -> Path:
    """One ``.safetensors`` in diffusers' layout (``transformer.`` keys), written by the pipeline's own
    ``save_lora_weights``; ``fields``: the LoraConfig kept in the file's metadata (without: alpha = rank)."""
    import diffusers

    getattr(diffusers, pipeline_class).save_lora_weights(
        str(file.parent), transformer_lora_layers=state_dict, weight_name=file.name,
        transformer_lora_adapter_metadata=fields)
    return file
