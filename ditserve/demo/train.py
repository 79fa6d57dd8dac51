"""Training of the demo model: the VAE on rendered pictures, then transformer and text encoders jointly with
rectified-flow matching exactly as ``FluxPipeline`` samples.

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

from ditserve.demo.language import sample_scenes
from ditserve.demo.model import MAX_SEQUENCE_LENGTH, build_pipeline
from ditserve.demo.render import MAX_JITTER, render_batch

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
    steps: int = 8000
    batch: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    # Some steps pad T5 to FluxPipeline's default 512 tokens, so callers that omit max_sequence_length still
    # get pictures that follow the prompt.
    long_padding_fraction: float = 0.05
    checkpoint_every: int = 500
    log_every: int = 50
    # Wall-clock budget of the transformer stage in minutes (0: none). When it runs out, training stops at a
    # checkpoint and the weights so far are exported; --resume continues the schedule later.
    max_minutes: float = 0.0
    # A trained diffusers folder to continue from (its VAE and latent scaling are kept as they are; only the
    # transformer and text encoders train): a new learning-rate schedule over already-learnt weights.
    init_from: str = ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def _autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CPU (1.2-2x faster on AVX-512-bf16); fp32 with TF32 matmuls on CUDA.

    bf16 autocast on CUDA (torch 2.11, H100) failed in the transformer's backward with
    CUBLAS_STATUS_EXECUTION_FAILED; this model is small enough that TF32 costs little there.
    """
    if device.type == "cpu":
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def _step_generator(device: torch.device, seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def _training_images(batch: int, seed: int, stage: int, step: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
    scenes = sample_scenes(batch, seed=seed * 1_000_003 + stage * 100_003 + step, split="train")
    images = render_batch(
        scenes, size=IMAGE_SIZE, jitter=MAX_JITTER, generator=_step_generator(device, seed, stage, step), device=device
    )
    return [s.to_prompt() for s in scenes], images


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


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
        loss_rec = F.mse_loss(reconstruction, target) + F.l1_loss(reconstruction, target)
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


@torch.no_grad()
def _set_latent_statistics(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device) -> None:
    """Scale latents to unit variance around zero, as FluxPipeline undoes with scaling/shift factors."""
    _, images = _training_images(256, cfg.seed, 2, 0, device)
    latents = pipe.vae.encode(images * 2 - 1).latent_dist.mode().float()
    pipe.vae.register_to_config(shift_factor=round(latents.mean().item(), 5), scaling_factor=round(1 / latents.std().item(), 5))


def _encode_prompts(pipe: FluxPipeline, prompts: list[str], device: torch.device, max_sequence_length: int):
    """The pipeline's own prompt encoding (same tokenizers, padding and pooled output), with gradients."""
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    return prompt_embeds, pooled, text_ids


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


def _flow_matching_loss(pipe: FluxPipeline, prompts: list[str], images: torch.Tensor, generator: torch.Generator,
                        max_sequence_length: int) -> torch.Tensor:
    device = images.device
    batch = images.shape[0]
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.sample(generator)
        x0 = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    _, channels, height, width = x0.shape
    noise = torch.randn(x0.shape, generator=generator, device=device)
    u = torch.rand(batch, generator=generator, device=device).clamp(1e-4, 1.0)
    sigma = _shifted_sigmas(pipe, u, (height // 2) * (width // 2))
    noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    prompt_embeds, pooled, text_ids = _encode_prompts(pipe, prompts, device, max_sequence_length)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, x0.dtype)
    prediction = pipe.transformer(
        hidden_states=pipe._pack_latents(noisy, batch, channels, height, width),
        # FluxPipeline passes timestep / 1000 with timestep = sigma * 1000.
        timestep=sigma,
        guidance=None,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    target = pipe._pack_latents(noise - x0, batch, channels, height, width)
    return F.mse_loss(prediction.float(), target)


def _trainable_modules(pipe: FluxPipeline) -> dict[str, torch.nn.Module]:
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


def _apply_prompt_dropout(prompts: list[str], generator: torch.Generator, rate: float) -> list[str]:
    # The empty prompt is the unconditional branch that true CFG (negative_prompt="") compares against.
    drop = torch.rand(len(prompts), generator=generator, device=generator.device) < rate
    return ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]


def train_transformer(pipe: FluxPipeline, cfg: TrainConfig, device: torch.device, logger: _Logger) -> dict[str, dict]:
    """Train transformer + text encoders; returns the EMA state dicts of those modules."""
    modules = _trainable_modules(pipe)
    for module in modules.values():
        module.to(device).train().requires_grad_(True)
    parameters = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    checkpoint = Path(cfg.run_dir) / "transformer.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        ema, start = state["ema"], state["step"]
    progress = tqdm(range(start, cfg.steps), desc="transformer", initial=start, total=cfg.steps)
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup_steps)
        prompts, images = _training_images(cfg.batch, cfg.seed, 1, step, device)
        generator = _step_generator(device, cfg.seed, 3, step)
        prompts = _apply_prompt_dropout(prompts, generator, cfg.prompt_dropout)
        long_padding = torch.rand(1, generator=generator, device=device).item() < cfg.long_padding_fraction
        with _autocast(device):
            loss = _flow_matching_loss(pipe, prompts, images, generator, LONGEST_PADDING if long_padding else MAX_SEQUENCE_LENGTH)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        _update_ema(ema, modules, cfg.ema_decay, step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
            logger.write(stage="transformer", step=step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        out_of_time = time.perf_counter() > deadline
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1 or out_of_time:
            _save_checkpoint(checkpoint, {
                "step": step + 1,
                "modules": {name: m.state_dict() for name, m in modules.items()},
                "optimizer": optimizer.state_dict(),
                "ema": ema,
            })
        if out_of_time:
            logger.write(stage="transformer", stopped_early_at_step=step + 1, of_steps=cfg.steps)
            break
    return ema


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


def train(cfg: TrainConfig, output_dir: str | Path) -> Path:
    """Full training (resumable from ``cfg.run_dir``); writes the diffusers folder to ``output_dir``."""
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
    vae_seconds = time.perf_counter() - started
    ema = train_transformer(pipe, cfg, device, logger)
    for name, module in _trainable_modules(pipe).items():
        module.load_state_dict(ema[name])
        module.eval().requires_grad_(False)
    logger.write(stage="done", vae_seconds=vae_seconds, total_seconds=time.perf_counter() - started, device=str(device))
    output_dir = Path(output_dir)
    pipe.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    return output_dir
