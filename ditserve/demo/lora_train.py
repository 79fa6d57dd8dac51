"""Training the demo LoRA: teaching the bundled ``ditserve-shapes`` a size word it never saw (NEW_SIZE).

The base model's tokenizers were built from the base language only, so they spell the new word letter by letter
(T5: "▁" and one piece per letter; CLIP: a few byte pairs). Those pieces still reach the transformer as tokens
distinct from every base word, so a LoRA on the transformer alone can learn what they mean; the text encoders,
VAE and base weights stay frozen. Part of each batch are prompts with the new size, the rest ordinary prompts,
so the base behaviour is rehearsed while the new word is learnt. Only training-split prompts are used: the
held-out colour-shape-position triples stay unseen, as for the base model.

The result is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, fp16) that
``LoRARequest(lora_path=...)``, ``Omni(..., lora_path=...)`` and PEFT itself load.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from ditserve.demo.language import sample_new_size_scenes, sample_scenes, stage_seed
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.render import MAX_JITTER, render_batch
from ditserve.demo.train import (
    IMAGE_SIZE,
    _apply_prompt_dropout,
    _autocast,
    _flow_matching_loss,
    _lr_factor,
    _step_generator,
    resolve_device,
)
from ditserve.errors import InvalidParameterError


class LoRATargets(str, enum.Enum):
    """Which transformer Linears the LoRA adapts."""

    # The T5 input projection only: the new word's letter pieces only have to land where the base model reads
    # a size it can already draw (it draws sizes between small and large), and every other weight stays the
    # base model's. In 5-minute probes, adding the pooled-CLIP projection and the double blocks' text stream
    # cost ordinary prompts 5 points; this alone 0 to 3 (the LoRA's model card has the figures).
    TEXT_INPUT = "text-input"
    # Every attention and MLP Linear of both stream types, plus the text input and the output projection (the
    # earlier diamond LoRA's targets: they cost ordinary prompts 4.7 points).
    ALL = "all"


TARGET_MODULES: dict[LoRATargets, tuple[str, ...]] = {
    LoRATargets.TEXT_INPUT: ("context_embedder",),
    LoRATargets.ALL: (
        "context_embedder",
        "to_q", "to_k", "to_v", "to_out.0",
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "proj_mlp", "proj_out",
    ),
}
TRAINING_RECORD_FILE = "ditserve_lora_training.json"
# Data stages of the LoRA run (language.stage_seed): its batches never repeat the base model's.
NEW_SIZE_STAGE, BASE_STAGE, NOISE_STAGE = 11, 12, 13
PEFT_KEY_PREFIX = "base_model.model."


@dataclass
class LoRATrainConfig:
    model: str = ""  # the base diffusers folder; empty: the bundled ditserve-shapes
    device: str = "auto"
    seed: int = 0
    rank: int = 8
    # alpha = rank: PEFT's scaling alpha / r is 1, so lora_scale 1.0 applies the update as trained
    alpha: float = 8.0
    steps: int = 100_000
    batch: int = 16
    targets: str = LoRATargets.TEXT_INPUT.value
    # Fraction of each batch whose prompt holds the new size; the rest are ordinary prompts (rehearsal). The
    # new-size prompts rehearse every base word too, only with one medium object among them.
    new_size_fraction: float = 0.75
    # High for a LoRA: it adapts one 64 -> 256 projection (2.6 k parameters) and must move it within the run.
    lr: float = 5e-3
    warmup_steps: int = 50
    # The empty prompt is true CFG's unconditional branch: it keeps being trained, so the LoRA leaves it alone.
    prompt_dropout: float = 0.1
    # Wall-clock budget in minutes (0: none); the cosine schedule ends with whichever runs out first.
    max_minutes: float = 38.0
    log_every: int = 25


def _training_batch(cfg: LoRATrainConfig, step: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
    new_count = round(cfg.batch * cfg.new_size_fraction)
    scenes = (sample_new_size_scenes(new_count, stage_seed(cfg.seed, NEW_SIZE_STAGE, step), split="train")
              + sample_scenes(cfg.batch - new_count, stage_seed(cfg.seed, BASE_STAGE, step), split="train"))
    generator = _step_generator(device, cfg.seed, NEW_SIZE_STAGE, step)
    images = render_batch(scenes, IMAGE_SIZE, jitter=MAX_JITTER, generator=generator, device=device)
    return [s.to_prompt() for s in scenes], images


def _check_config(cfg: LoRATrainConfig) -> None:
    if cfg.rank < 1 or cfg.batch < 1 or cfg.steps < 1:
        raise InvalidParameterError("rank, batch and steps must be >= 1", param="lora")
    if not 0.0 <= cfg.new_size_fraction <= 1.0:
        raise InvalidParameterError(f"new_size_fraction must be in [0, 1], got {cfg.new_size_fraction}",
                                    param="new_size_fraction")
    if cfg.targets not in {t.value for t in LoRATargets}:
        raise InvalidParameterError(f"targets must be one of {[t.value for t in LoRATargets]}, got {cfg.targets!r}",
                                    param="targets")


def add_lora(pipe: FluxPipeline, cfg: LoRATrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the pipeline and give its transformer a fresh PEFT LoRA; returns the LoRA's parameters."""
    from peft import LoraConfig

    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pipe.transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(TARGET_MODULES[LoRATargets(cfg.targets)]),
                                            init_lora_weights=True))
    return [p for name, p in pipe.transformer.named_parameters() if "lora_" in name and p.requires_grad]


def save_lora(pipe: FluxPipeline, output_dir: Path, record: dict) -> Path:
    """Write the transformer's LoRA as a PEFT folder in fp16 (half the bytes; ditserve and PEFT compute the
    update in the model's dtype anyway), with how it was trained beside it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ditserve.lora.files import PEFT_WEIGHTS_FILE

    output_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(pipe.transformer)
    save_file({PEFT_KEY_PREFIX + k: v.detach().to(torch.float16).contiguous() for k, v in state.items()},
              str(output_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    config = pipe.transformer.peft_config["default"]
    config.save_pretrained(str(output_dir))
    (output_dir / TRAINING_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return output_dir


def train_lora(cfg: LoRATrainConfig, output_dir: str | Path) -> Path:
    """Train the LoRA and write it as a PEFT folder to ``output_dir``."""
    from ditserve.demo import demo_model_path

    _check_config(cfg)
    device = resolve_device(cfg.device)
    model_dir = Path(cfg.model) if cfg.model else demo_model_path()
    pipe = FluxPipeline.from_pretrained(str(model_dir)).to(device)
    parameters = add_lora(pipe, cfg)
    pipe.transformer.train()
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    budget = 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    began = time.perf_counter()
    losses: list[float] = []
    step = 0
    progress = tqdm(range(cfg.steps), desc="lora")
    for step in progress:
        fraction = max(step / cfg.steps, (time.perf_counter() - began) / budget)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup_steps, fraction)
        prompts, images = _training_batch(cfg, step, device)
        generator = _step_generator(device, cfg.seed, NOISE_STAGE, step)
        prompts = _apply_prompt_dropout(prompts, generator, cfg.prompt_dropout)
        with _autocast(device):
            loss = _flow_matching_loss(pipe, prompts, images, generator, MAX_SEQUENCE_LENGTH)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            progress.set_postfix(loss=f"{recent:.4f}")
            print(json.dumps({"step": step, "loss": round(recent, 5), "lr": optimizer.param_groups[0]["lr"],
                              "seconds": round(time.perf_counter() - began, 1)}), flush=True)
        if time.perf_counter() - began > budget:
            break
    pipe.transformer.eval()
    steps_done = step + 1
    record = {"config": asdict(cfg), "base_model": model_dir.name, "steps": steps_done,
              "pictures": steps_done * cfg.batch, "minutes": round((time.perf_counter() - began) / 60, 2),
              "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5)}
    return save_lora(pipe, Path(output_dir), record)
