"""Training of the edit demo model ``ditserve-shapes-edit``: FLUX.1-Kontext's conditioning on the text-to-image
demo model's transformer.

``FluxKontextPipeline`` appends the input picture's packed latent tokens (the VAE's mode, scaled and shifted like
the output's) after the noisy tokens, with position ids whose first coordinate is 1 instead of 0, and keeps only
the first (noisy) part of the transformer's output. The timestep shift is computed from the noisy tokens alone.
Training does exactly that, with rectified-flow matching as ``train.py`` does for ``FluxPipeline``, starting from
the image model's weights: its VAE stays frozen; its text encoders gain the instruction words (``EDIT_WORDS``) as
new tokens, and ``text_training`` decides what of them learns.

Data is rendered on the fly from training-split edits (``edit_language.sample_edits``), seeded by step, so a
resumed run sees the batches an uninterrupted one would. Checkpoints go under ``run_dir``; the final pipeline (EMA
weights) is written with ``save_pretrained``.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline, FluxPipeline
from tqdm.auto import tqdm

from ditserve.demo.data_parallel import DataShard
from ditserve.demo.edit_language import EDIT_WORDS, Edit, sample_edits
from ditserve.demo.language import MAX_OBJECTS, stage_seed
from ditserve.demo.model import MAX_SEQUENCE_LENGTH, build_clip_tokenizer, build_t5_tokenizer, encode_prompts
from ditserve.demo.object_probe import ObjectProbe, cells_by_token, object_targets
from ditserve.demo.render import MAX_JITTER, Layout, check_jitter, lay_out, rasterize
from ditserve.demo.train import (
    IMAGE_SIZE,
    _apply_prompt_dropout,
    _autocast,
    _Logger,
    _lr_factor,
    _save_checkpoint,
    _shifted_sigmas,
    _step_generator,
    _update_ema,
    resolve_device,
    weighted_token_mse,
)
from ditserve.errors import InvalidParameterError

# Stage numbers for stage_seed: apart from train.py's (0-7), so no edit batch repeats an image-model batch.
EDIT_DATA_STAGE = 10
EDIT_NOISE_STAGE = 11


class TextTraining(str, enum.Enum):
    """What of the text encoders learns. FROZEN: nothing (the new words keep their initial embeddings).
    NEW_WORDS: only the embeddings of the instruction words, so base prompts read exactly as before. FULL: both
    encoders whole, at ``text_lr_scale`` times the transformer's learning rate."""

    FROZEN = "frozen"
    NEW_WORDS = "new-words"
    FULL = "full"


@dataclass
class EditTrainConfig:
    run_dir: str = "runs/ditserve-shapes-edit"
    # The text-to-image model to start from ("": the bundled ditserve-shapes), or an edit model to continue.
    # Batches are drawn by (seed, step): a continued run with the seed of the runs before it replays their batches
    # (runs 1-4 of the shipped weights did; run 5 took seed 5).
    init_from: str = ""
    device: str = "auto"
    seed: int = 0
    # The defaults are the first of the three runs of the shipped weights (model card; the second continued it
    # with the object probe, the third with the changed tokens weighted up); its time budget, not the step count,
    # ends it.
    steps: int = 100_000
    batch: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    # Dropped instructions ("") keep the edited target: the unconditional branch of true CFG (negative_prompt "")
    # then predicts an average edit of the input, and CFG pushes toward the named one.
    prompt_dropout: float = 0.1
    text_training: str = TextTraining.NEW_WORDS.value
    text_lr_scale: float = 0.3
    checkpoint_every: int = 200
    log_every: int = 25
    # Wall-clock budget in minutes (0: none); the learning-rate schedule ends with whichever runs out first,
    # steps or minutes. A resumed run counts the minutes its checkpoint had already spent.
    max_minutes: float = 75.0
    # Weight of the object probe's loss (object_probe.py) on the edited picture's tokens beside the denoising
    # loss (0: none), and its cells per token side: every pixel of a recoloured, moved or added object is
    # labelled, not only its rim. The probe is not saved with the model.
    probe_weight: float = 0.0
    probe_cells: int = 4
    # Extra loss weight on the tokens an edit changes (their 16x16 pixels differ between input and edited picture):
    # they weigh 1 + change_weight (0: uniform). A recolour or a move changes a few tokens of 64; with uniform
    # weights, copying the input picture costs the loss little, and copying is what the held-out edits that
    # fail do most.
    change_weight: float = 0.0
    # Weight of the change read-out's loss (object_probe.ObjectProbe's reads_change; 0: none): which cells the edit
    # changes, read from the edited and the input picture's tokens. Run 7 of the shipped weights used 0.3, runs 1-6 none.
    change_probe_weight: float = 0.0


def load_edit_pipeline(init_from: str | Path) -> FluxKontextPipeline:
    """The text-to-image folder's components as a FluxKontextPipeline, with the instruction words added to both
    tokenizers (after every base token, so base ids keep their meaning) and to both text encoders' embeddings."""
    base = FluxPipeline.from_pretrained(str(init_from))
    tokenizer, tokenizer_2 = build_clip_tokenizer(EDIT_WORDS), build_t5_tokenizer(EDIT_WORDS)
    for old, new in ((base.tokenizer, tokenizer), (base.tokenizer_2, tokenizer_2)):
        if any(new.get_vocab().get(token) != index for token, index in old.get_vocab().items()):
            raise InvalidParameterError(f"{init_from}'s tokenizers are not the demo language's", param="init_from")
    base.text_encoder.resize_token_embeddings(len(tokenizer))
    base.text_encoder_2.resize_token_embeddings(len(tokenizer_2))
    pipe = FluxKontextPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                               tokenizer=tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=tokenizer_2,
                               transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit_layouts(edits: list[Edit], jitter: float = 0.0, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> tuple[Layout, Layout]:
    """Source and target layouts of a batch of edits. One jitter offset per object: an object the edit leaves
    alone sits at the same place in both pictures (a moved one keeps its offset at its new cell)."""
    source = lay_out([e.source for e in edits], device=device)
    target = lay_out([e.target for e in edits], device=device)
    if jitter == 0:
        return source, target
    check_jitter(jitter)
    offsets = jitter * (torch.rand(source.center.shape, generator=generator, device=source.center.device) * 2 - 1)
    slots = torch.tensor([[*e.target_slots(), *range(MAX_OBJECTS)][:MAX_OBJECTS] for e in edits], device=offsets.device)
    target_offsets = torch.gather(offsets, 1, slots[..., None].expand(-1, -1, 2))
    return replace(source, center=source.center + offsets), replace(target, center=target.center + target_offsets)


def _as_pipeline_input(images: torch.Tensor) -> torch.Tensor:
    """Rendered pictures in [0, 1] as the pipeline sees an input picture: 8-bit PIL, then scaled to [-1, 1]."""
    return (images * 255).round() / 255 * 2 - 1


def _scaled_latents(pipe: FluxKontextPipeline, images: torch.Tensor) -> torch.Tensor:
    """The VAE's mode, scaled as ``FluxKontextPipeline._encode_vae_image`` (sample_mode "argmax") does."""
    latents = pipe.vae.encode(images).latent_dist.mode()
    return (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def kontext_ids(pipe: FluxKontextPipeline, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids of the noisy tokens followed by the input picture's (first coordinate 1), as the pipeline's
    ``prepare_latents`` and ``__call__`` build them, for latents of ``height`` x ``width``."""
    noisy = pipe._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
    context = noisy.clone()
    context[..., 0] = 1
    return torch.cat([noisy, context], dim=0)


def edit_velocity(pipe: FluxKontextPipeline, noisy: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
                  text: tuple, ids: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for the packed noisy tokens, conditioned on the packed input-picture tokens."""
    prompt_embeds, pooled, text_ids = text
    output = pipe.transformer(hidden_states=torch.cat([noisy, context], dim=1), timestep=sigma, guidance=None,
                              pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                              img_ids=ids, return_dict=False)[0]
    return output[:, : noisy.shape[1]]


def _changed_pixels(sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where the input and the edited picture (in [0, 1]) differ beyond an 8-bit step."""
    return ((targets - sources).abs().amax(dim=1, keepdim=True) > 1.5 / 255).float()


def changed_token_weights(sources: torch.Tensor, targets: torch.Tensor, tokens_per_side: int, extra: float) -> torch.Tensor:
    """(B, tokens) loss weights: 1 + ``extra`` on the tokens any of whose pixels differ between the input and the
    edited picture, 1 elsewhere; FLUX's token order (row-major)."""
    per_token = F.adaptive_max_pool2d(_changed_pixels(sources, targets), tokens_per_side)  # (B, 1, side, side)
    return 1 + extra * per_token.flatten(1)


def changed_cells(sources: torch.Tensor, targets: torch.Tensor, tokens_per_side: int, cells_per_token: int) -> torch.Tensor:
    """(B, tokens, cells) bool: the cells (as the object probe splits tokens) any of whose pixels the edit changes."""
    grid = F.adaptive_max_pool2d(_changed_pixels(sources, targets), tokens_per_side * cells_per_token)
    return cells_by_token(grid[:, 0] > 0, tokens_per_side, cells_per_token)


def edit_flow_matching_loss(pipe: FluxKontextPipeline, instructions: list[str], sources: torch.Tensor,
                            targets: torch.Tensor, generator: torch.Generator, change_weight: float = 0.0,
                            rows: slice = slice(None)) -> torch.Tensor:
    """Rectified-flow loss of editing ``sources`` into ``targets`` (pictures in [0, 1]) as instructed, the tokens
    the edit changes weighted 1 + ``change_weight``, over the batch's ``rows`` (a data-parallel process's share:
    the noise is drawn for the whole batch, so the shares together see what one process would)."""
    device = targets.device
    drawn = targets.shape[0]
    instructions, sources, targets = instructions[rows], sources[rows], targets[rows]
    batch = targets.shape[0]
    with torch.no_grad():
        context = _scaled_latents(pipe, _as_pipeline_input(sources))
        # The target's posterior mean, as train.py: this VAE's posterior noise is most of a sampled latent.
        x0 = _scaled_latents(pipe, targets * 2 - 1)
    _, channels, height, width = x0.shape
    noise = torch.randn((drawn, *x0.shape[1:]), generator=generator, device=device)[rows]
    u = torch.rand(drawn, generator=generator, device=device)[rows].clamp(1e-4, 1.0)
    # The pipeline's shift reads only the noisy tokens' count.
    sigma = _shifted_sigmas(pipe, u, (height // 2) * (width // 2))
    noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    text = encode_prompts(pipe, instructions, device, MAX_SEQUENCE_LENGTH)
    ids = kontext_ids(pipe, height, width, device, x0.dtype)
    pack = pipe._pack_latents
    prediction = edit_velocity(pipe, pack(noisy, batch, channels, height, width),
                               pack(context, batch, channels, height, width), sigma, text, ids)
    weights = changed_token_weights(sources, targets, height // 2, change_weight)
    return weighted_token_mse(prediction, pack(noise - x0, batch, channels, height, width), weights)


def _text_parameters(pipe: FluxKontextPipeline, mode: TextTraining) -> list[torch.nn.Parameter]:
    """Make the text encoders' trainable part require gradients (see TextTraining) and return it."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
    if mode is TextTraining.FROZEN:
        return []
    if mode is TextTraining.FULL:
        for encoder in encoders:
            encoder.requires_grad_(True)
        return [p for encoder in encoders for p in encoder.parameters()]
    base_sizes = (len(build_clip_tokenizer()), len(build_t5_tokenizer()))
    parameters = []
    for encoder, base_size in zip(encoders, base_sizes, strict=True):
        weight = encoder.get_input_embeddings().weight
        weight.requires_grad_(True)
        # Only the new words' rows learn: the base rows get no gradient, so Adam never moves them (and their
        # parameter group has no weight decay, which would).
        weight.register_hook(lambda grad, n=base_size: torch.cat([torch.zeros_like(grad[:n]), grad[n:]]))
        parameters.append(weight)
    return parameters


def train_edit(cfg: EditTrainConfig, output_dir: str | Path) -> Path:
    """Train (resumable from ``cfg.run_dir``) and write the FluxKontextPipeline folder to ``output_dir``. Launched as
    several processes (``data_parallel``), each trains on its share of every batch and rank 0 writes."""
    from ditserve.demo import demo_model_path

    if cfg.text_training not in [m.value for m in TextTraining]:
        raise InvalidParameterError(f"text_training must be one of {[m.value for m in TextTraining]}, got "
                                    f"{cfg.text_training!r}", param="text_training")
    for name in ("change_weight", "probe_weight", "change_probe_weight"):
        if getattr(cfg, name) < 0:
            raise InvalidParameterError(f"{name} must be >= 0, got {getattr(cfg, name)}", param=name)
    mode = TextTraining(cfg.text_training)
    requested = resolve_device(cfg.device)
    shard = DataShard.from_environment(requested)
    device = shard.device(requested)
    rows = shard.rows(cfg.batch)
    run_dir = Path(cfg.run_dir)
    if shard.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    logger = _Logger(run_dir / "log.jsonl") if shard.is_main else None
    torch.manual_seed(cfg.seed)
    pipe = load_edit_pipeline(cfg.init_from or demo_model_path()).to(device)
    pipe.vae.eval().requires_grad_(False)
    transformer = pipe.transformer.train().requires_grad_(True)
    text_parameters = _text_parameters(pipe, mode)
    groups = [{"params": list(transformer.parameters()), "lr_scale": 1.0, "weight_decay": cfg.weight_decay}]
    if text_parameters:
        decay = cfg.weight_decay if mode is TextTraining.FULL else 0.0
        groups.append({"params": text_parameters, "lr_scale": cfg.text_lr_scale, "weight_decay": decay})
    probe = None
    if cfg.probe_weight > 0 or cfg.change_probe_weight > 0:
        probe = ObjectProbe(transformer, cfg.probe_cells, reads_change=cfg.change_probe_weight > 0).to(device)
        groups.append({"params": list(probe.parameters()), "lr_scale": 1.0, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    tokens_per_side = IMAGE_SIZE // (2 * pipe.vae_scale_factor)  # FLUX packs 2x2 latent pixels per token
    modules = {"transformer": transformer}
    if mode is not TextTraining.FROZEN:
        modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    ema = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    checkpoint = run_dir / "edit.pt"
    start, spent_before = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        written, expected = set(state["probe"] or {}), set(probe.state_dict() if probe is not None else {})
        if written != expected:
            change_differs = any(key.startswith("change_") for key in written ^ expected)
            param = "change_probe_weight" if change_differs else "probe_weight"
            raise InvalidParameterError("the edit checkpoint was written with another probe_weight or "
                                        "change_probe_weight setting (0 or > 0): resume with those settings, or start "
                                        "a new run_dir", param=param)
        if probe is not None:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        ema, start, spent_before = state["ema"], state["step"], state["seconds"]
    parameters = [p for group in groups for p in group["params"]]
    shard.start_alike(parameters)
    began = time.perf_counter() - spent_before
    budget = 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    progress = tqdm(range(start, cfg.steps), desc="edit", initial=start, total=cfg.steps, disable=not shard.is_main)
    for step in progress:
        fraction = max(step / cfg.steps, shard.agreed(time.perf_counter() - began) / budget)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * _lr_factor(step, cfg.steps, cfg.warmup_steps, fraction)
        edits = sample_edits(cfg.batch, stage_seed(cfg.seed, EDIT_DATA_STAGE, step), split="train")
        data_generator = _step_generator(device, cfg.seed, EDIT_DATA_STAGE, step)
        source, target = edit_layouts(edits, MAX_JITTER, data_generator, device)
        generator = _step_generator(device, cfg.seed, EDIT_NOISE_STAGE, step)
        instructions = _apply_prompt_dropout([e.instruction for e in edits], generator, cfg.prompt_dropout)
        sources, targets = rasterize(source, IMAGE_SIZE), rasterize(target, IMAGE_SIZE)
        with _autocast(device):
            loss = edit_flow_matching_loss(pipe, instructions, sources, targets, generator, cfg.change_weight, rows)
            probe_loss = change_loss = torch.zeros(())
            if probe is not None:
                objects = object_targets(target, tokens_per_side, cfg.probe_cells, [i != "" for i in instructions])[rows]
                if cfg.change_probe_weight > 0:
                    changed = changed_cells(sources[rows], targets[rows], tokens_per_side, cfg.probe_cells)
                    objects = replace(objects, changed=changed)
                probe_losses = probe.losses(objects)
                probe_loss, change_loss = probe_losses.objects, probe_losses.changed
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.probe_weight * probe_loss + cfg.change_probe_weight * change_loss).backward()
        shard.average_gradients(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        _update_ema(ema, modules, cfg.ema_decay, step)
        if step % cfg.log_every == 0:
            losses = [shard.mean(value.item()) for value in (loss, probe_loss, change_loss)]
            progress.set_postfix(loss=f"{losses[0]:.4f}")
            if logger is not None:
                logger.write(stage="edit", step=step, loss=losses[0], probe_loss=losses[1], change_loss=losses[2],
                             lr=optimizer.param_groups[0]["lr"], seconds=round(time.perf_counter() - began, 1))
        out_of_time = shard.agreed(time.perf_counter() - began) > budget
        checkpoint_due = (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1 or out_of_time
        if checkpoint_due and shard.is_main:
            _save_checkpoint(checkpoint, {"step": step + 1, "seconds": time.perf_counter() - began,
                                          "modules": {name: m.state_dict() for name, m in modules.items()},
                                          "probe": probe.state_dict() if probe else None,
                                          "optimizer": optimizer.state_dict(), "ema": ema})
        if out_of_time:
            if logger is not None:
                logger.write(stage="edit", stopped_early_at_step=step + 1, of_steps=cfg.steps)
            break
    if probe is not None:
        probe.detach()
    for name, module in modules.items():
        module.load_state_dict(ema[name])
        module.eval().requires_grad_(False)
    output_dir = Path(output_dir)
    if shard.is_main:
        logger.write(stage="done", total_seconds=time.perf_counter() - began, device=str(device), processes=shard.world)
        pipe.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    return output_dir
