"""Tiny LoRAs for the tiny FLUX pipeline, written once per test run (PEFT folder and diffusers single file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ditserve.testing.lora import lora_state_dict, write_diffusers_file, write_peft_folder


@dataclass
class TinyLoRA:
    path: Path
    state_dict: dict[str, torch.Tensor]
    fields: dict[str, Any]


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="session")
def peft_lora(tiny_flux_dir: str, lora_root: Path) -> TinyLoRA:
    """A PEFT folder with alpha != r and rank/alpha patterns (PEFT's per-module scaling is exercised)."""
    state_dict, fields = lora_state_dict(f"{tiny_flux_dir}/transformer", seed=11, r=4, alpha=8.0,
                                         rank_pattern={"to_k": 2}, alpha_pattern={"proj_mlp": 2.0})
    return TinyLoRA(write_peft_folder(lora_root / "peft_style", state_dict, fields), state_dict, fields)


@pytest.fixture(scope="session")
def file_lora(tiny_flux_dir: str, lora_root: Path) -> TinyLoRA:
    """A diffusers single file without metadata (diffusers then takes alpha = rank)."""
    state_dict, fields = lora_state_dict(f"{tiny_flux_dir}/transformer", seed=12, r=8, alpha=8.0,
                                         targets=("to_q", "to_v", "add_k_proj", "proj_out", "ff.net.2"))
    return TinyLoRA(write_diffusers_file(lora_root / "file_style.safetensors", state_dict), state_dict, fields)
