"""Training of the demo model, in stages: the VAE on rendered pictures (then, optionally, its decoder on
posterior means); the text encoders' parsing stage; the transformer with rectified-flow matching exactly as
``FluxPipeline`` samples; optionally, the decoder again on the transformer's own latents.

Training data is generated on the fly (sampler + on-device renderer), seeded by step, so a resumed run sees
the same batches as an uninterrupted one. Checkpoints go under ``run_dir`` (outside git); the final pipeline
(EMA weights) is written with ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tqdm.auto import tqdm

from ditserve.demo.language import sample_scenes, stage_seed
from ditserve.demo.model import (
    MAX_SEQUENCE_LENGTH,
    build_clip_text_encoder,
    build_pipeline,
    build_t5_text_encoder,
    build_transformer,
    encode_prompts,
)
from ditserve.demo.object_probe import ObjectProbe, object_targets
from ditserve.demo.render import MAX_JITTER, Layout, lay_out, rasterize
from ditserve.demo.text_pretrain import pretrain_text_encoders
from ditserve.errors import InvalidParameterError

IMAGE_SIZE = 128
# FluxPipeline's own check caps max_sequence_length at 512.
LONGEST_PADDING = 512


@dataclass
class TrainConfig:
    run_dir: str = "runs/ditserve-shapes"
    device: str = "auto"
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # The defaults are the from-scratch run timed on a 2-core CPU with AVX-512-bf16 (model card). The transformer
    # stage is bounded by max_minutes; steps never end first there. The other stages have fixed step counts, so
    # a slower machine (an AVX2-only CPU trains about 4x slower) takes longer in them.
    steps: int = 100_000
    batch: int = 32
    lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    # Some steps pad T5 to FluxPipeline's default 512 tokens, so callers that omit max_sequence_length still
    # get pictures that follow the prompt.
    long_padding_fraction: float = 0.05
    # Weight of the object probe's loss (object_probe.py) beside the denoising loss (0: no probe), and its grid
    # of cells per token side (4: cells of 4x4 pixels).
    probe_weight: float = 0.3
    probe_cells: int = 4
    checkpoint_every: int = 500
    log_every: int = 50
    # Wall-clock budget of the transformer stage in minutes (0: none). The learning-rate schedule ends with
    # whichever runs out first, steps or minutes; then training stops at a checkpoint and exports. A resumed
    # run counts the minutes its checkpoint had already spent.
    max_minutes: float = 65.0
    # A trained diffusers folder to continue from: its VAE and latent scaling are kept as they are and its
    # transformer is the starting point of a new learning-rate schedule.
    init_from: str = ""
    # With init_from: keep that folder's text encoders (frozen) and the transformer whole, with no parsing
    # stage; for continuing a finished model with more compute. Without it the encoders are trained afresh.
    keep_text_encoders: bool = False
    # Decoder fine-tuning on posterior means, the latents the transformer learns to produce (0: none).
    decoder_steps: int = 1200
    decoder_lr: float = 2e-4
    # Text encoders are first trained to parse prompts (text_pretrain.py), then frozen while the transformer
    # learns to draw (as a real model keeps its pretrained T5 frozen). 0 steps: no parsing stage, and the
    # encoders train jointly with the transformer.
    text_steps: int = 2500
    text_batch: int = 128
    text_lr: float = 2e-3
    # Last stage: the decoder learns to render the transformer's own latents (0: none). Half of each batch is
    # ground-truth means; the other half is the same pictures' latents noised part way and denoised again by
    # the trained transformer, whose small shapes come out rounder than the encoder's.
    decoder_adapt_steps: int = 400
    # Extra weight of edge pixels in both decoder stages' loss (0: uniform): a small triangle's apex is a few
    # pixels of a picture that is mostly flat background.
    decoder_edge_weight: float = 6.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def _autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CPUs with native bf16 (1.2-2x faster on AVX-512-bf16); fp32 elsewhere, with TF32
    matmuls on CUDA.

    Without native bf16 (an AVX2-only EPYC) autocast is emulated and made a VAE step 15x slower than fp32.
    bf16 autocast on CUDA (torch 2.11, H100) failed in the transformer's backward with
    CUBLAS_STATUS_EXECUTION_FAILED; this model is small enough that TF32 costs little there.
    """
    if device.type == "cpu" and _cpu_has_native_bf16():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def _cpu_has_native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _step_generator(device: torch.device, seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stage_seed(seed, stage, step))


def _training_layout(batch: int, seed: int, stage: int, step: int, device: torch.device) -> tuple[list[str], Layout]:
    scenes = sample_scenes(batch, seed=stage_seed(seed, stage, step), split="train")
    layout = lay_out(scenes, jitter=MAX_JITTER, generator=_step_generator(device, seed, stage, step), device=device)
    return [s.to_prompt() for s in scenes], layout


def _training_images(batch: int, seed: int, stage: int, step: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
    prompts, layout = _training_layout(batch, seed, stage, step, device)
    return prompts, rasterize(layout, IMAGE_SIZE)


def _lr_factor(step: int, total: int, warmup: int, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 10 %; ``progress`` (0..1), when given, replaces step / total."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Logger:
    """Loss lines appended to ``run_dir/log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: float | int | str) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _save_checkpoint(path: Path, state: dict) -> None:
    # Write-then-rename: an interrupted save never destroys the previous checkpoint.
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, edge_weight: float = 0.0,
                         extra_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE + L1 (L1 keeps the flat colours' edges sharp, MSE the colours themselves); ``edge_weight`` adds that
    much weight on the pixels within one pixel of a colour edge, where a small shape's corners are;
    ``extra_weights`` (B, 1, H, W) adds its own weight per pixel."""
    error = (reconstruction - target).pow(2) + (reconstruction - target).abs()
    if edge_weight == 0 and extra_weights is None:
        return error.mean()
    weights = torch.ones_like(error[:, :1])
    if edge_weight:
        spread = F.max_pool2d(target, 3, stride=1, padding=1) + F.max_pool2d(-target, 3, stride=1, padding=1)
        weights = weights + edge_weight * (spread.amax(dim=1, keepdim=True) > 0.1).float()
    if extra_weights is not None:
        weights = weights + extra_weights
    return (error * weights).mean() / weights.mean()


def train_vae(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device, logger: _Logger) -> None:
    """Reconstruction (MSE + L1) with a tiny KL term; then sets the latent scaling/shift factors."""
    vae = pipe.vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    checkpoint = Path(cfg.run_dir) / "vae.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    progress = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, cfg.warmup_steps)
        _, images = _training_images(cfg.vae_batch, cfg.seed, 0, step, device)
        target = images * 2 - 1
        with _autocast(device):
            posterior = vae.encode(target).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
        reconstruction = reconstruction.float()
        loss_rec = _reconstruction_loss(reconstruction, target)
        loss = loss_rec + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            progress.set_postfix(loss=f"{loss_rec.item():.4f}")
            logger.write(stage="vae", step=step, loss=loss_rec.item())
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.vae_steps - 1:
            _save_checkpoint(checkpoint, {"step": step + 1, "vae": vae.state_dict(), "optimizer": optimizer.state_dict()})
    vae.eval().requires_grad_(False)
    _set_latent_statistics(pipe, cfg, device)


def finetune_decoder(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device, logger: _Logger,
                     adapt: bool = False) -> None:
    """Train the decoder alone; the encoder, hence the latent space, is frozen.

    Before the transformer stage (``adapt=False``) it learns to decode posterior means: the VAE was trained on
    posterior samples, and its decoder learnt to see through their noise at the cost of sharp corners (decoded
    means: 88 % of ground-truth shapes pass the checker), while the transformer produces means. After it
    (``adapt=True``) half of each batch is re-generated by the transformer (``_regenerated_latents``), so the
    decoder also sees the slightly-off latents that sampling really gives, each paired with its true picture.
    """
    steps, stage = (cfg.decoder_adapt_steps, "decoder_adapt") if adapt else (cfg.decoder_steps, "decoder")
    vae = pipe.vae.to(device)
    vae.eval().requires_grad_(False)
    vae.decoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    progress = tqdm(range(steps), desc=stage)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cfg.decoder_lr * _lr_factor(step, steps, min(cfg.warmup_steps, steps // 10))
        prompts, images = _training_images(cfg.vae_batch, cfg.seed, 6 if adapt else 5, step, device)
        target = images * 2 - 1
        with torch.no_grad():
            latents = vae.encode(target).latent_dist.mode()
            if adapt:
                half = cfg.vae_batch // 2
                generator = _step_generator(device, cfg.seed, 7, step)
                latents[half:] = _regenerated_latents(pipe, latents[half:], prompts[half:], generator)
        with _autocast(device):
            reconstruction = vae.decode(latents).sample.float()
        loss = _reconstruction_loss(reconstruction, target, cfg.decoder_edge_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        optimizer.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
            logger.write(stage=stage, step=step, loss=loss.item())
    vae.eval().requires_grad_(False)


# Re-generation for decoder adaptation. Starting points between these u (before the resolution shift; sigma
# about 0.5 to 0.86) keep each object where its true picture has it, so input and target stay aligned, yet
# leave the transformer to redraw the shapes. Full generation (u = 1) moves objects by up to the render
# jitter, and a decoder trained on such pairs would learn to blur.
REGENERATE_U = (0.4, 0.8)
REGENERATE_STEPS = 8
REGENERATE_CFG_SCALE = 2.0


@torch.no_grad()
def _regenerated_latents(pipe: FluxPipeline, latents: torch.Tensor, prompts: list[str],
                         generator: torch.Generator) -> torch.Tensor:
    """Noise the latents to a random level, then denoise with the transformer (Euler, true CFG against "")."""
    config = pipe.vae.config
    x0 = (latents - config.shift_factor) * config.scaling_factor
    batch, channels, height, width = x0.shape
    device = x0.device
    low, high = REGENERATE_U
    u_start = low + (high - low) * torch.rand(batch, generator=generator, device=device)
    fractions = torch.linspace(1, 0, REGENERATE_STEPS + 1, device=device)
    sigmas = _shifted_sigmas(pipe, (fractions[:, None] * u_start[None]).clamp(min=0), (height // 2) * (width // 2))
    noise = torch.randn(x0.shape, generator=generator, device=device)
    x = pipe._pack_latents((1 - sigmas[0, :, None, None, None]) * x0 + sigmas[0, :, None, None, None] * noise,
                           batch, channels, height, width)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, x0.dtype)
    conditional = encode_prompts(pipe, prompts, device, MAX_SEQUENCE_LENGTH)
    unconditional = encode_prompts(pipe, [""] * batch, device, MAX_SEQUENCE_LENGTH)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        with _autocast(device):
            unguided = _velocity(pipe, x, sigma, unconditional, image_ids).float()
            conditioned = _velocity(pipe, x, sigma, conditional, image_ids).float()
            guided = unguided + REGENERATE_CFG_SCALE * (conditioned - unguided)
        x = x + (sigma_next - sigma)[:, None, None] * guided
    x0_regenerated = pipe._unpack_latents(x, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor, pipe.vae_scale_factor)
    return x0_regenerated / config.scaling_factor + config.shift_factor


@torch.no_grad()
def _set_latent_statistics(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device) -> None:
    """Scale latents to unit variance around zero, as FluxPipeline undoes with scaling/shift factors."""
    _, images = _training_images(256, cfg.seed, 2, 0, device)
    latents = pipe.vae.encode(images * 2 - 1).latent_dist.mode().float()
    pipe.vae.register_to_config(shift_factor=round(latents.mean().item(), 5), scaling_factor=round(1 / latents.std().item(), 5))


def _shifted_sigmas(pipe: FluxPipeline, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """Map uniform u in (0, 1) through the scheduler's resolution shift, as its set_timesteps(mu=...) does."""
    config = pipe.scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return pipe.scheduler.time_shift(mu, 1.0, u)


def _velocity(pipe: FluxPipeline, packed: torch.Tensor, sigma: torch.Tensor, text: tuple,
              image_ids: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for packed latents at noise level ``sigma``, given ``encode_prompts``' output."""
    prompt_embeds, pooled, text_ids = text
    # FluxPipeline passes timestep / 1000 with timestep = sigma * 1000.
    return pipe.transformer(hidden_states=packed, timestep=sigma, guidance=None, pooled_projections=pooled,
                            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                            return_dict=False)[0]


@dataclass
class FlowMatchingBatch:
    """One rectified-flow training batch, packed as the transformer sees it, with its prediction."""

    noisy: torch.Tensor  # packed x_sigma
    sigma: torch.Tensor  # (B,)
    text: tuple  # encode_prompts' output
    image_ids: torch.Tensor
    prediction: torch.Tensor  # packed velocity
    target: torch.Tensor  # packed noise - x0


def _flow_matching_batch(pipe: FluxPipeline, prompts: list[str], images: torch.Tensor, generator: torch.Generator,
                         max_sequence_length: int, rows: slice = slice(None)) -> FlowMatchingBatch:
    """The batch's ``rows`` (a data-parallel process's share; the noise is drawn for the whole batch) noised and
    through the transformer."""
    device = images.device
    drawn = images.shape[0]
    prompts, images = prompts[rows], images[rows]
    batch = images.shape[0]
    with torch.no_grad():
        # The posterior's mean, not a sample: this VAE's posterior std is about 0.8 of the scaled latents' spread
        # (the decoder learnt to tolerate the noise), so sampled targets were mostly unpredictable noise.
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mode()
        x0 = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    _, channels, height, width = x0.shape
    noise = torch.randn((drawn, *x0.shape[1:]), generator=generator, device=device)[rows]
    u = torch.rand(drawn, generator=generator, device=device)[rows].clamp(1e-4, 1.0)
    sigma = _shifted_sigmas(pipe, u, (height // 2) * (width // 2))
    noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    text = encode_prompts(pipe, prompts, device, max_sequence_length)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, x0.dtype)
    packed = pipe._pack_latents(noisy, batch, channels, height, width)
    prediction = _velocity(pipe, packed, sigma, text, image_ids)
    target = pipe._pack_latents(noise - x0, batch, channels, height, width)
    return FlowMatchingBatch(packed, sigma, text, image_ids, prediction, target)


def _flow_matching_loss(pipe: FluxPipeline, prompts: list[str], images: torch.Tensor, generator: torch.Generator,
                        max_sequence_length: int) -> torch.Tensor:
    fm = _flow_matching_batch(pipe, prompts, images, generator, max_sequence_length)
    return F.mse_loss(fm.prediction.float(), fm.target)


def weighted_token_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE over packed tokens (B, tokens, C), each token's error weighted by ``weights`` (B, tokens)
    and normalised by their sum (uniform weights: plain MSE)."""
    errors = (prediction.float() - target).pow(2).mean(dim=-1)
    return (weights * errors).sum() / weights.sum()


def _text_encoders_frozen(cfg: TrainConfig) -> bool:
    return cfg.text_steps > 0 or cfg.keep_text_encoders


def _trainable_modules(pipe: FluxPipeline, cfg: TrainConfig) -> dict[str, torch.nn.Module]:
    if _text_encoders_frozen(cfg):
        return {"transformer": pipe.transformer}
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


def _apply_prompt_dropout(prompts: list[str], generator: torch.Generator, rate: float) -> list[str]:
    # The empty prompt is the unconditional branch that true CFG (negative_prompt="") compares against.
    drop = torch.rand(len(prompts), generator=generator, device=generator.device) < rate
    return ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]


def train_transformer(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device, logger: _Logger) -> dict[str, dict]:
    """Train the transformer (and the text encoders when there is no parsing stage), with the object probe's
    loss beside the denoising loss when ``cfg.probe_weight`` > 0; returns the EMA state dicts of the trained
    modules."""
    modules = _trainable_modules(pipe, cfg)
    for module in modules.values():
        module.to(device).train().requires_grad_(True)
    probe = ObjectProbe(pipe.transformer, cfg.probe_cells).to(device) if cfg.probe_weight > 0 else None
    parameters = [p for m in [*modules.values(), *([probe] if probe else [])] for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    checkpoint = Path(cfg.run_dir) / "transformer.pt"
    start, spent_before = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        _check_probe_matches(state, probe)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        if probe is not None:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        ema, start = state["ema"], state["step"]
        # checkpoints written before the time budget was recorded count as fresh time
        spent_before = state.get("seconds", 0.0)
    tokens_per_side = IMAGE_SIZE // (2 * pipe.vae_scale_factor)  # FLUX packs 2x2 latent pixels per token
    progress = tqdm(range(start, cfg.steps), desc="transformer", initial=start, total=cfg.steps)
    # a resumed run continues the same schedule: its clock starts at the time already spent
    began = time.perf_counter() - spent_before
    budget = 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    for step in progress:
        # With a time budget the schedule follows whichever ends first, steps or minutes, so that a run on a
        # slower machine still decays its learning rate fully before it stops.
        elapsed = time.perf_counter() - began
        fraction = max(step / cfg.steps, elapsed / budget)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup_steps, fraction)
        prompts, layout = _training_layout(cfg.batch, cfg.seed, 1, step, device)
        images = rasterize(layout, IMAGE_SIZE)
        generator = _step_generator(device, cfg.seed, 3, step)
        prompts = _apply_prompt_dropout(prompts, generator, cfg.prompt_dropout)
        targets = object_targets(layout, tokens_per_side, cfg.probe_cells, [p != "" for p in prompts]) if probe else None
        long_padding = torch.rand(1, generator=generator, device=device).item() < cfg.long_padding_fraction
        if long_padding:
            # a quarter of the batch: at 512 text tokens a step costs several usual ones
            keep = max(1, cfg.batch // 4)
            prompts, images = prompts[:keep], images[:keep]
            targets = targets[:keep] if targets else None
        with _autocast(device):
            padding = LONGEST_PADDING if long_padding else MAX_SEQUENCE_LENGTH
            loss = _flow_matching_loss(pipe, prompts, images, generator, padding)
            probe_loss = probe.loss(targets) if probe else torch.zeros(())
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.probe_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        _update_ema(ema, modules, cfg.ema_decay, step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}", probe=f"{probe_loss.item():.3f}")
            logger.write(stage="transformer", step=step, loss=loss.item(), probe_loss=probe_loss.item(),
                         lr=optimizer.param_groups[0]["lr"])
        out_of_time = time.perf_counter() - began > budget
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1 or out_of_time:
            _save_checkpoint(checkpoint, {
                "step": step + 1,
                "seconds": time.perf_counter() - began,
                "modules": {name: m.state_dict() for name, m in modules.items()},
                "probe": probe.state_dict() if probe else None,
                "optimizer": optimizer.state_dict(),
                "ema": ema,
            })
        if out_of_time:
            logger.write(stage="transformer", stopped_early_at_step=step + 1, of_steps=cfg.steps)
            break
    if probe is not None:
        probe.detach()
    return ema


def _check_probe_matches(state: dict, probe: ObjectProbe | None) -> None:
    """A checkpoint resumes only with the probe setting it was written with: its optimizer state holds the probe's
    parameters or it does not."""
    written_with_probe = state.get("probe") is not None
    if written_with_probe != (probe is not None):
        setting = "> 0" if written_with_probe else "0"
        raise InvalidParameterError(
            f"the transformer checkpoint was written with probe_weight {setting}; resume with that setting, "
            f"or start a new run_dir", param="probe_weight")


@torch.no_grad()
def _update_ema(ema: dict[str, dict], modules: dict[str, torch.nn.Module], decay: float, step: int) -> None:
    # Short warm-up of the decay so early EMA weights are not dominated by the random init.
    decay = min(decay, (1 + step) / (10 + step))
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name][key].lerp_(value, 1 - decay)
            else:
                ema[name][key].copy_(value)


def _train_text_encoders(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device, logger: _Logger) -> None:
    """Parsing stage (checkpointed as a whole: it takes minutes). A continued run gets fresh encoders, and the
    transformer's text input layers are rebuilt for them, since the old ones read another feature space."""
    checkpoint = Path(cfg.run_dir) / "text_encoders.pt"
    if cfg.init_from:
        pipe.text_encoder = build_clip_text_encoder(len(pipe.tokenizer))
        pipe.text_encoder_2 = build_t5_text_encoder(len(pipe.tokenizer_2))
        pipe.transformer = _with_fresh_text_inputs(pipe.transformer)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        pipe.text_encoder.load_state_dict(state["text_encoder"])
        pipe.text_encoder_2.load_state_dict(state["text_encoder_2"])
        _freeze_text_encoders(pipe, device)
        return
    accuracy = pretrain_text_encoders(
        pipe, steps=cfg.text_steps, batch=cfg.text_batch, lr=cfg.text_lr,
        paddings=(MAX_SEQUENCE_LENGTH, LONGEST_PADDING), long_padding_fraction=cfg.long_padding_fraction,
        seed=cfg.seed, device=device,
    )
    logger.write(stage="text_encoders", heldout_parse_accuracy=accuracy)
    _save_checkpoint(checkpoint, {"text_encoder": pipe.text_encoder.state_dict(),
                                  "text_encoder_2": pipe.text_encoder_2.state_dict()})


def _freeze_text_encoders(pipe: FluxPipeline, device: torch.device) -> None:
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to(device).eval().requires_grad_(False)


def _with_fresh_text_inputs(trained: torch.nn.Module) -> torch.nn.Module:
    """A transformer of the current architecture holding ``trained``'s weights, except the layers that take
    the text encoders' features (context embedder, pooled-text projection), which start afresh."""
    fresh = build_transformer()
    text_inputs = ("context_embedder.", "time_text_embed.text_embedder.")
    kept = {k: v for k, v in trained.state_dict().items() if not k.startswith(text_inputs)}
    missing, unexpected = fresh.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(text_inputs) for k in missing):
        raise ValueError(f"init_from transformer does not match the demo architecture: {missing + unexpected}")
    return fresh


def train(cfg: TrainConfig, output_dir: str | Path) -> Path:
    """Full training (resumable from ``cfg.run_dir``); writes the diffusers folder to ``output_dir``."""
    if cfg.keep_text_encoders and not cfg.init_from:
        raise InvalidParameterError("keep_text_encoders keeps the text encoders of init_from: give init_from too",
                                    param="keep_text_encoders")
    device = resolve_device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    logger = _Logger(run_dir / "log.jsonl")
    torch.manual_seed(cfg.seed)
    pipe = FluxPipeline.from_pretrained(cfg.init_from) if cfg.init_from else build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    if cfg.init_from:
        # retraining the VAE (or re-measuring its latent statistics) would move the latent space under the
        # transformer that learnt it
        pipe.vae.to(device).eval().requires_grad_(False)
    else:
        train_vae(pipe, cfg, device, logger)
    if cfg.decoder_steps > 0:
        finetune_decoder(pipe, cfg, device, logger)
    vae_seconds = time.perf_counter() - started
    if cfg.keep_text_encoders:
        _freeze_text_encoders(pipe, device)
    elif cfg.text_steps > 0:
        _train_text_encoders(pipe, cfg, device, logger)
    text_seconds = time.perf_counter() - started - vae_seconds
    ema = train_transformer(pipe, cfg, device, logger)
    for name, module in _trainable_modules(pipe, cfg).items():
        module.load_state_dict(ema[name])
        module.eval().requires_grad_(False)
    if cfg.decoder_adapt_steps > 0:
        finetune_decoder(pipe, cfg, device, logger, adapt=True)
    logger.write(stage="done", vae_seconds=vae_seconds, text_seconds=text_seconds, total_seconds=time.perf_counter() - started, device=str(device))
    output_dir = Path(output_dir)
    pipe.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    return output_dir
