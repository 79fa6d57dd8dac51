"""Training the demo LoRA: teaching the bundled ``ditserve-shapes`` a size word it never saw (NEW_SIZE).

The base model's tokenizers were built from the base language only, so they spell the new word letter by letter
(T5: "▁" and one piece per letter; CLIP: a few byte pairs). Those pieces still reach the transformer as tokens
distinct from every base word, so a LoRA on the transformer alone can learn what they mean; the text encoders,
VAE and base weights stay frozen. Part of each batch are prompts with the new size, the rest ordinary prompts,
so the base behaviour is rehearsed while the new word is learnt. Only training-split prompts are used: the
held-out colour-shape-position triples stay unseen, as for the base model.

The result is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, fp16) that
``LoRARequest(lora_path=...)``, ``Omni(..., lora_path=...)`` and PEFT itself load, with the same weights in
diffusers' own file beside them for ``load_lora_weights``. The defaults are the first of the four runs of the
shipped LoRA (its model card has the other three: each continues the last with ``init_lora`` and holds the base
more).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from ditserve.demo.data_parallel import DataShard
from ditserve.demo.language import ALL_SIZES, NEW_SIZE, sample_new_size_scenes, sample_scenes, stage_seed
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.object_probe import KINDS_WITH_NEW_SIZE, ObjectProbe, object_targets
from ditserve.demo.render import BOX_SIDE, MAX_JITTER, Layout, lay_out, rasterize
from ditserve.demo.train import (
    IMAGE_SIZE,
    _apply_prompt_dropout,
    _autocast,
    _flow_matching_batch,
    _lr_factor,
    _step_generator,
    _velocity,
    resolve_device,
    weighted_token_mse,
)
from ditserve.errors import InvalidParameterError

logger = logging.getLogger(__name__)


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
    targets: str = LoRATargets.ALL.value
    # Fraction of each batch whose prompt holds the new size; the rest are ordinary prompts (rehearsal). The
    # new-size prompts rehearse every base word too, only with one medium object among them.
    new_size_fraction: float = 0.5
    # Share of the new-size prompts with two objects, the other of a base size (None: about a third, as drawn). The
    # medium objects the shipped LoRA draws wrong are mostly in such pairs, taking the other object's size.
    new_size_pairs: float | None = None
    lr: float = 2e-3
    warmup_steps: int = 50
    # The empty prompt is true CFG's unconditional branch: it keeps being trained, so the LoRA leaves it alone.
    prompt_dropout: float = 0.1
    # Wall-clock budget in minutes (0: none); the cosine schedule ends with whichever runs out first.
    max_minutes: float = 45.0
    log_every: int = 25
    # Weight of a fresh object probe's loss (object_probe.py, knowing the new size as its own kind) beside the
    # denoising loss (0: none), and its cells per token side. The probe is not saved with the LoRA.
    probe_weight: float = 0.0
    probe_cells: int = 4
    # Extra loss weight of the image tokens around each new-size object (within a large object's box of its
    # centre): the pixels where medium differs from small and large are a thin ring of a mostly flat picture, so
    # plain flow matching hardly pays for a box a few pixels off (0: uniform weights).
    size_weight: float = 4.0
    # Ordinary prompts (and dropped ones, true CFG's negative branch) learn the base model's own velocity, computed
    # with the LoRA switched off, instead of the rendered picture's: they then pin the base behaviour where the
    # LoRA must not change it, rather than teach the base's remaining errors away.
    preserve_base: bool = True
    # With preserve_base: the loss weight of those rows against the new-size rows' (whose tokens near the new-size
    # object already weigh 1 + size_weight): a LoRA on every Linear shifts ordinary prompts too unless held there.
    preserve_weight: float = 1.0
    # A PEFT folder this command wrote (same targets, same or smaller rank: a larger rank grows it) to continue
    # from, with a new learning-rate schedule.
    # Batches are drawn by (seed, step), so a run continued with a seed of the runs before it replays their
    # batches: give it a new seed.
    init_lora: str = ""


def _training_batch(cfg: LoRATrainConfig, step: int, device: torch.device) -> tuple[list[str], Layout]:
    new_count = round(cfg.batch * cfg.new_size_fraction)
    scenes = (sample_new_size_scenes(new_count, stage_seed(cfg.seed, NEW_SIZE_STAGE, step), "train", cfg.new_size_pairs)
              + sample_scenes(cfg.batch - new_count, stage_seed(cfg.seed, BASE_STAGE, step), split="train"))
    generator = _step_generator(device, cfg.seed, NEW_SIZE_STAGE, step)
    return [s.to_prompt() for s in scenes], lay_out(scenes, MAX_JITTER, generator, device)


def new_size_token_weights(layout: Layout, tokens_per_side: int, extra: float) -> torch.Tensor:
    """(B, tokens) loss weights: 1 + ``extra`` on the tokens that reach into a large box centred on a new-size
    object, 1 elsewhere; FLUX's token order (row-major)."""
    centres = (torch.arange(tokens_per_side, device=layout.center.device) + 0.5) / tokens_per_side
    reach = BOX_SIDE["large"] / 2 + 0.5 / tokens_per_side
    new_size = layout.present & (layout.size == ALL_SIZES.index(NEW_SIZE))  # (B, objects)
    near_x = (centres[None, None, :] - layout.center[..., 0:1]).abs() < reach  # (B, objects, side)
    near_y = (centres[None, None, :] - layout.center[..., 1:2]).abs() < reach
    covered = (near_y[..., :, None] & near_x[..., None, :] & new_size[..., None, None]).any(dim=1)
    return 1 + extra * covered.flatten(1).float()


def _check_config(cfg: LoRATrainConfig) -> None:
    if cfg.rank < 1 or cfg.batch < 1 or cfg.steps < 1:
        raise InvalidParameterError("rank, batch and steps must be >= 1", param="lora")
    if not 0.0 <= cfg.new_size_fraction <= 1.0:
        raise InvalidParameterError(f"new_size_fraction must be in [0, 1], got {cfg.new_size_fraction}",
                                    param="new_size_fraction")
    if cfg.targets not in {t.value for t in LoRATargets}:
        raise InvalidParameterError(f"targets must be one of {[t.value for t in LoRATargets]}, got {cfg.targets!r}",
                                    param="targets")


def _preserved_rows(cfg: LoRATrainConfig, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(B,) bool: the rows that learn the base model's velocity (ordinary and dropped prompts)."""
    new_count = round(cfg.batch * cfg.new_size_fraction)
    return torch.tensor([i >= new_count or p == "" for i, p in enumerate(prompts)], device=device)


@torch.no_grad()
def _base_preserving_target(pipe: FluxPipeline, fm, rows: torch.Tensor) -> torch.Tensor:
    """The rendered target, but the base model's velocity (LoRA off) on ``rows``."""
    pipe.transformer.disable_adapters()
    try:
        base = _velocity(pipe, fm.noisy, fm.sigma, fm.text, fm.image_ids).float()
    finally:
        pipe.transformer.enable_adapters()
    return torch.where(rows[:, None, None], base, fm.target)


def add_lora(pipe: FluxPipeline, cfg: LoRATrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the pipeline and give its transformer a fresh PEFT LoRA; returns the LoRA's parameters."""
    from peft import LoraConfig

    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pipe.transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(TARGET_MODULES[LoRATargets(cfg.targets)]),
                                            init_lora_weights=True))
    if cfg.init_lora:
        _load_lora_state(pipe, Path(cfg.init_lora))
    return [p for name, p in pipe.transformer.named_parameters() if "lora_" in name and p.requires_grad]


def _load_lora_state(pipe: FluxPipeline, folder: Path) -> None:
    """Copy a saved PEFT folder's weights into the fresh adapter (same targets). A run of a larger rank grows the
    saved LoRA: its A rows and B columns come first, the new B columns start at zero (PEFT's own start), so the
    grown LoRA begins as exactly the saved one's update, rescaled to this run's alpha / rank."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from ditserve.lora.files import PEFT_WEIGHTS_FILE

    saved = {k.removeprefix(PEFT_KEY_PREFIX): v.float() for k, v in load_file(str(folder / PEFT_WEIGHTS_FILE)).items()}
    saved_config = json.loads((folder / "adapter_config.json").read_text())
    expected = get_peft_model_state_dict(pipe.transformer)
    saved_rank = saved_config["r"]
    if set(saved) != set(expected) or any(not _fits(k, saved[k], v) for k, v in expected.items()):
        raise InvalidParameterError(f"init_lora {folder}: its weights do not match this run's targets, or its rank "
                                    f"({saved_rank}) is above this run's", param="init_lora")
    config = pipe.transformer.peft_config["default"]
    rescale = (saved_config["lora_alpha"] / saved_rank) / (config.lora_alpha / config.r)
    grown = {}
    for key, fresh in expected.items():
        axis, weight = _rank_axis(key), fresh.detach().float().clone()
        # the update is B A * alpha / rank: rescaling B alone keeps it
        weight.narrow(axis, 0, saved[key].shape[axis]).copy_(saved[key] * (rescale if axis == 1 else 1.0))
        grown[key] = weight
    set_peft_model_state_dict(pipe.transformer, grown)


def _rank_axis(key: str) -> int:
    """The rank's axis of a LoRA matrix: A is rank x in, B is out x rank."""
    return 0 if "lora_A" in key else 1


def _fits(key: str, saved: torch.Tensor, fresh: torch.Tensor) -> bool:
    """A saved LoRA matrix fits a fresh one of the same module at the same or a larger rank."""
    axis = _rank_axis(key)
    return (saved.dim() == fresh.dim() == 2 and saved.shape[1 - axis] == fresh.shape[1 - axis]
            and saved.shape[axis] <= fresh.shape[axis])


def save_lora(pipe: FluxPipeline, output_dir: Path, record: dict) -> Path:
    """Write the transformer's LoRA in fp16 (half the bytes; ditserve and PEFT compute the update in the model's
    dtype anyway) twice: as a PEFT folder, and as diffusers' own file (``pytorch_lora_weights.safetensors``, what
    ``FluxPipeline.load_lora_weights(folder)`` reads: it takes PEFT's key prefix for another format), with how
    it was trained beside them."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ditserve.lora.files import PEFT_WEIGHTS_FILE

    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(pipe.transformer).items()}
    save_file({PEFT_KEY_PREFIX + k: v for k, v in state.items()}, str(output_dir / PEFT_WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = pipe.transformer.peft_config["default"]
    config.save_pretrained(str(output_dir))
    FluxPipeline.save_lora_weights(output_dir, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=config.to_dict())
    (output_dir / TRAINING_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return output_dir


def step_losses(pipe: FluxPipeline, cfg: LoRATrainConfig, probe: ObjectProbe | None, step: int, rows: slice,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoising and the probe loss of step ``step``'s batch, on its ``rows`` (a data-parallel process's share)."""
    tokens_per_side = IMAGE_SIZE // (2 * pipe.vae_scale_factor)  # FLUX packs 2x2 latent pixels per token
    prompts, layout = _training_batch(cfg, step, device)
    generator = _step_generator(device, cfg.seed, NOISE_STAGE, step)
    prompts = _apply_prompt_dropout(prompts, generator, cfg.prompt_dropout)
    fm = _flow_matching_batch(pipe, prompts, rasterize(layout, IMAGE_SIZE), generator, MAX_SEQUENCE_LENGTH, rows)
    probe_loss = torch.zeros((), device=device)
    if probe is not None:
        targets = object_targets(layout, tokens_per_side, cfg.probe_cells, [p != "" for p in prompts])
        probe_loss = probe.loss(targets[rows])
    target = fm.target
    weights = new_size_token_weights(layout, tokens_per_side, cfg.size_weight)[rows]
    if cfg.preserve_base:
        preserved = _preserved_rows(cfg, prompts, device)[rows]
        target = _base_preserving_target(pipe, fm, preserved)
        weights = torch.where(preserved[:, None], cfg.preserve_weight * weights, weights)
    return weighted_token_mse(fm.prediction, target, weights), probe_loss


def train_lora(cfg: LoRATrainConfig, output_dir: str | Path) -> Path:
    """Train the LoRA and write it as a PEFT folder to ``output_dir``. Launched as several processes
    (``data_parallel``), each trains on its share of every batch and rank 0 writes."""
    from ditserve.demo import demo_model_path

    _check_config(cfg)
    earlier = earlier_record(cfg)
    if cfg.seed in seeds_drawn(earlier):
        logger.warning("seed %d was a seed of the runs init_lora continues: this run replays their batches (pass "
                       "another --seed for new ones)", cfg.seed)
    requested = resolve_device(cfg.device)
    shard = DataShard.from_environment(requested)
    device = shard.device(requested)
    rows = shard.rows(cfg.batch)
    model_dir = Path(cfg.model) if cfg.model else demo_model_path()
    pipe = FluxPipeline.from_pretrained(str(model_dir)).to(device)
    parameters = add_lora(pipe, cfg)
    probe = None
    if cfg.probe_weight > 0:
        probe = ObjectProbe(pipe.transformer, cfg.probe_cells, KINDS_WITH_NEW_SIZE).to(device)
        parameters += list(probe.parameters())
    shard.start_alike(parameters)
    pipe.transformer.train()
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    budget = 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    began = time.perf_counter()
    losses: list[float] = []
    probe_losses: list[float] = []
    step = 0
    progress = tqdm(range(cfg.steps), desc="lora", disable=not shard.is_main)
    for step in progress:
        fraction = max(step / cfg.steps, shard.agreed(time.perf_counter() - began) / budget)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup_steps, fraction)
        with _autocast(device):
            loss, probe_loss = step_losses(pipe, cfg, probe, step, rows, device)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.probe_weight * probe_loss).backward()
        shard.average_gradients(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        probe_losses.append(probe_loss.item())
        if step % cfg.log_every == 0:
            recent = shard.mean(sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]))
            recent_probe = shard.mean(sum(probe_losses[-cfg.log_every:]) / len(probe_losses[-cfg.log_every:]))
            progress.set_postfix(loss=f"{recent:.4f}")
            if shard.is_main:
                print(json.dumps({"step": step, "loss": round(recent, 5), "probe_loss": round(recent_probe, 4),
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "seconds": round(time.perf_counter() - began, 1)}), flush=True)
        if shard.agreed(time.perf_counter() - began) > budget:
            break
    if probe is not None:
        probe.detach()
    pipe.transformer.eval()
    steps_done = step + 1
    record = {"config": asdict(cfg), "base_model": model_dir.name, "steps": steps_done,
              "pictures": steps_done * cfg.batch, "minutes": round((time.perf_counter() - began) / 60, 2),
              "final_loss": round(shard.mean(sum(losses[-100:]) / len(losses[-100:])), 5), "processes": shard.world}
    if not shard.is_main:
        return Path(output_dir)
    if earlier is not None:
        # the run this one continues, with the runs before it: the whole recipe travels with the folder
        record["continues"] = earlier
    return save_lora(pipe, Path(output_dir), record)


def earlier_record(cfg: LoRATrainConfig) -> dict | None:
    """The training record of the run ``init_lora`` continues (with the runs before it), if it has one."""
    path = Path(cfg.init_lora) / TRAINING_RECORD_FILE if cfg.init_lora else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def seeds_drawn(record: dict | None) -> list[int]:
    """The seeds of a training record's run and of every run it continues, latest first."""
    seeds = []
    while record is not None:
        seeds.append(record["config"]["seed"])
        record = record.get("continues")
    return seeds
