"""Training of the video demo model ``ditserve-shapes-video`` (``WanPipeline``, ``video_model.py``) on the clip
language (``video_language.py``), in stages as ``train.py`` trains the image model, with its helpers:

1. the video VAE, which works frame by frame (``video_model.per_frame``), on single frames of rendered clips
   (posterior samples, reconstruction + a small KL term), then the same with the colour edges weighted, then its
   decoder alone on posterior means, the latents the transformer learns to produce; after each, the clip checker
   scores decoded held-out ground-truth clips (the VAE's acceptance figure, logged as ``vae_frames_check`` /
   ``vae_edges_check`` / ``decoder_check``);
2. the text encoder's parsing stage (``text_pretrain.train_parsing``): a clip prompt is parsed into the scenes of
   its first and last frames, which say everything the clip does (where a subject starts and ends, whether it is
   there at first, its colour before and after); then the encoder is frozen;
3. the transformer with rectified-flow matching exactly as ``WanPipeline`` samples: UniPC's flow sigmas
   ``sigma = shift * u / (1 + (shift - 1) * u)`` with the scheduler's fixed ``flow_shift``, the transformer called
   on ``(1 - sigma) * x0 + sigma * noise`` with the integer ``timestep = int(sigma * num_train_timesteps)`` (UniPC
   keeps its timesteps as int64, truncated; its update uses the float sigma) and trained to predict ``noise - x0``
   (UniPC's "flow_prediction": x0 = sample - sigma * output); ``x0`` is the VAE's posterior mean
   normalised as the pipeline undoes it, ``(latents - latents_mean) / latents_std``. Prompt dropout to "" (the
   pipeline's negative prompt for CFG), EMA, a time budget, checkpoints and the object probe over the frames.

Encoding clips is most of a transformer step's cost, so each clip is noised at ``noise_draws`` levels in one step.
Data is generated on the fly, seeded by step, so a resumed run sees the batches an uninterrupted one would.
Checkpoints go under ``run_dir``; the final pipeline (EMA weights) is written with ``save_pretrained``.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, WanPipeline
from tqdm.auto import tqdm

from ditserve.demo.data_parallel import DataShard, launched_world
from ditserve.demo.language import Scene, ShapeObject, Split, stage_seed
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.object_probe import ObjectProbe, ObjectTargets, object_targets
from ditserve.demo.render import MAX_JITTER, Layout, rasterize
from ditserve.demo.text_pretrain import CELLS, ParseTargets, ParsingTask, parse_targets, train_parsing
from ditserve.demo.train import (
    _apply_prompt_dropout,
    _autocast,
    _check_probe_matches,
    _Logger,
    _lr_factor,
    _reconstruction_loss,
    _save_checkpoint,
    _step_generator,
    _update_ema,
    resolve_device,
)
from ditserve.demo.video_checker import evaluate_clips
from ditserve.demo.video_evaluation import decoded_ground_truth_clips
from ditserve.demo.video_language import Clip, heldout_clips, sample_clips
from ditserve.demo.video_model import (
    PIPELINE_PADDING,
    SPATIAL_COMPRESSION,
    TEMPORAL_COMPRESSION,
    VIDEO_FRAMES,
    VIDEO_SIZE,
    build_video_pipeline,
    check_frames,
    text_embeddings,
    tokens_per_side,
    video_pipeline_from,
)
from ditserve.demo.video_render import clip_layout
from ditserve.errors import InvalidParameterError

# Stage numbers for stage_seed: apart from train.py's (0-7) and edit_train.py's (10, 11).
VAE_DATA_STAGE = 20
DECODER_DATA_STAGE = 21
LATENT_STATISTICS_STAGE = 22
TEXT_DATA_STAGE = 23
TRANSFORMER_DATA_STAGE = 24
TRANSFORMER_NOISE_STAGE = 25
FRAME_DATA_STAGE = 26
# Clips encoded at a time for the latent statistics.
LATENT_STATISTICS_CHUNK = 8
# Warm-up of the VAE stages after the first, which start from trained weights.
LATER_VAE_WARMUP_STEPS = 50


@dataclass
class VideoTrainConfig:
    """The VAE's defaults are the schedule measured in docs/demo/video_first_run.md (frame stage about 60 min on one
    shared CPU thread, edge stage 25 min); the rest were budgeted from timed steps (decoder 2 min, parsing 7-11,
    transformer 30)."""

    run_dir: str = "runs/ditserve-shapes-video"
    device: str = "auto"
    seed: int = 0
    # A video demo folder (or one with only its tokenizer/, text_encoder/ and vae/) whose trained tokenizer, text
    # encoder and VAE are kept, frozen, with no VAE or parsing stage; its transformer too when it has one (else a
    # fresh one).
    init_from: str = ""
    # Frames of every training clip, 4k + 1 (a latent frame each: 9 frames are 576 tokens, 17 are 1088).
    frames: int = VIDEO_FRAMES
    # Every VAE stage trains on single frames (one random frame of each clip a step): the VAE has no time to learn
    # (per frame), and a frame costs a ninth of a 9-frame clip. First the whole VAE, which learns the shapes there
    # at this lr with a long warm-up (docs/demo/video_first_run.md: on clips from scratch it stalled on flat
    # backgrounds)...
    frame_steps: int = 2400
    frame_batch: int = 16
    frame_lr: float = 5e-4
    # ... then again with the pixels of a colour edge weighted (vae_edge_weight), where a small shape's corners
    # are: decoded ground-truth object accuracy 86 % after the first stage, 90 % after 400 of these steps, 93 %
    # after 800 (docs/demo/video_first_run.md).
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 3e-4
    vae_edge_weight: float = 6.0
    # Every VAE stage trains on square crops of this side (a multiple of 8, up to 128: whole frames), one per frame:
    # the VAE's cost goes with the pixels (a 64-pixel crop costs a quarter of the whole frame), and its convolutions
    # do not care where in the frame they are. The acceptance check and the latents of the transformer stage use
    # whole frames.
    vae_crop: int = 64
    # Warm-up of the first VAE stage (the others: 50 steps): at 1e-3 with 50 warm-up steps the stock Wan VAE swung
    # at a loss of 0.4-0.8.
    vae_warmup_steps: int = 200
    vae_kl_weight: float = 1e-6
    # Decoder on posterior means (0: none), with the edge weight.
    decoder_steps: int = 100
    decoder_lr: float = 2e-4
    # Held-out clips whose decoded ground truth the clip checker scores after each VAE stage (0: none).
    vae_check_clips: int = 32
    # Training clips whose latents set the normalisation (32: 32 x 2304 latent values per channel).
    latent_statistics_clips: int = 32
    # Parsing stage of the text encoder, which is then frozen; 0 steps: no parsing stage, and the encoder trains
    # jointly with the transformer.
    text_steps: int = 2500
    text_batch: int = 128
    text_lr: float = 2e-3
    steps: int = 100_000
    # The transformer's first steps train on each clip's first frame alone (a one-frame clip: 64 tokens, not
    # 576), first_frame_batch clips a step: the prompt's shapes, colours, sizes and start positions at a ninth of a
    # clip's cost; the steps after that on whole clips, for the motion (0: whole clips from the start).
    first_frame_steps: int = 0
    first_frame_batch: int = 32
    # Distinct clips a step, and noise levels drawn for each: the transformer sees batch * noise_draws clips.
    batch: int = 8
    noise_draws: int = 4
    lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    # Steps padded to WanPipeline's default 226 T5 tokens, so callers that omit max_sequence_length still get
    # clips that follow the prompt: the pipeline's padding is zeros, which the transformer reads as tokens.
    long_padding_fraction: float = 0.05
    # Weight of the object probe's loss (object_probe.py) beside the denoising loss (0: no probe), and its cells
    # per token side.
    probe_weight: float = 0.3
    probe_cells: int = 4
    checkpoint_every: int = 100
    log_every: int = 25
    # Wall-clock budget of the transformer stage in minutes (0: none), as train.py's: the learning-rate schedule
    # ends with whichever runs out first, steps or minutes; a resumed run counts the minutes already spent.
    max_minutes: float = 30.0


class VaeStage(str, enum.Enum):
    """All on single frames. FRAMES: encoder and decoder, posterior samples, reconstruction plus a small KL term.
    EDGES: the same with the colour edges weighted. DECODER: the decoder alone on posterior means; the encoder,
    hence the latent space, stays as it is."""

    FRAMES = "vae_frames"
    EDGES = "vae_edges"
    DECODER = "decoder"


def _check_config(cfg: VideoTrainConfig) -> None:
    check_frames(cfg.frames)
    if cfg.vae_crop % SPATIAL_COMPRESSION or not 2 * SPATIAL_COMPRESSION <= cfg.vae_crop <= VIDEO_SIZE:
        raise InvalidParameterError(f"vae_crop must be a multiple of {SPATIAL_COMPRESSION} from {2 * SPATIAL_COMPRESSION} "
                                    f"to {VIDEO_SIZE}, got {cfg.vae_crop}", param="vae_crop")
    for name in ("frame_batch", "vae_batch", "text_batch", "batch", "first_frame_batch", "noise_draws", "probe_cells",
                 "checkpoint_every", "log_every", "latent_statistics_clips"):
        if getattr(cfg, name) < 1:
            raise InvalidParameterError(f"{name} must be >= 1, got {getattr(cfg, name)}", param=name)


def _frames_as_pictures(videos: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) as (B * F, C, H, W), for the picture losses of train.py."""
    return videos.transpose(1, 2).flatten(0, 1)


def _videos(layout: Layout, clips: int, frames: int) -> torch.Tensor:
    """A clip layout (``video_render.clip_layout``) rasterized as (B, 3, F, S, S) in [0, 1]."""
    return rasterize(layout, VIDEO_SIZE).view(clips, frames, 3, VIDEO_SIZE, VIDEO_SIZE).transpose(1, 2)


def _training_clips(batch: int, cfg: VideoTrainConfig, stage: int, step: int, generator: torch.Generator,
                    only_first: bool = False) -> tuple[list[Clip], Layout, torch.Tensor]:
    """Training-split clips of one step, jittered with ``generator`` (on the training device); ``only_first``: each
    clip's first frame, as a one-frame clip."""
    clips = sample_clips(batch, seed=stage_seed(cfg.seed, stage, step), split="train")
    layout = clip_layout(clips, cfg.frames, MAX_JITTER, generator, generator.device, only_first=only_first)
    return clips, layout, _videos(layout, batch, 1 if only_first else cfg.frames)


def _random_crops(videos: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """One square crop per clip, the same in every frame, with its corner on the latent grid (multiples of 8)."""
    if side == videos.shape[-1]:
        return videos
    positions = (videos.shape[-1] - side) // SPATIAL_COMPRESSION + 1
    corners = torch.randint(positions, (len(videos), 2), generator=generator, device=generator.device) * SPATIAL_COMPRESSION
    return torch.stack([video[..., y : y + side, x : x + side] for video, (y, x) in zip(videos, corners.tolist(), strict=True)])


def _one_frame_each(videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random frame of each clip, as a one-frame clip (B, C, 1, H, W)."""
    frames = torch.randint(videos.shape[2], (len(videos),), generator=generator, device=generator.device)
    return videos[torch.arange(len(videos), device=videos.device), :, frames].unsqueeze(2)


@dataclass(frozen=True)
class VaeStageSettings:
    steps: int
    lr: float
    batch: int
    data_stage: int
    warmup_steps: int
    edge_weight: float


def vae_stage_settings(stage: VaeStage, cfg: VideoTrainConfig) -> VaeStageSettings:
    """What a VAE stage runs with: the first learns the shapes unweighted with the long warm-up; the later ones
    start from trained weights (a short warm-up) and weigh the colour edges."""
    if stage is VaeStage.FRAMES:
        return VaeStageSettings(cfg.frame_steps, cfg.frame_lr, cfg.frame_batch, FRAME_DATA_STAGE,
                                min(cfg.vae_warmup_steps, cfg.frame_steps // 10), 0.0)
    steps, lr, data_stage = ((cfg.vae_steps, cfg.vae_lr, VAE_DATA_STAGE) if stage is VaeStage.EDGES
                             else (cfg.decoder_steps, cfg.decoder_lr, DECODER_DATA_STAGE))
    return VaeStageSettings(steps, lr, cfg.vae_batch, data_stage, min(LATER_VAE_WARMUP_STEPS, steps // 10),
                            cfg.vae_edge_weight)


def train_video_vae(pipe: WanPipeline, cfg: VideoTrainConfig, device: torch.device, logger: _Logger,
                    stage: VaeStage) -> None:
    """One VAE stage (see VaeStage), resumable from its checkpoint; after the last that trains the encoder, sets the
    latent statistics; after each, logs the clip checker's figures on decoded held-out ground truth."""
    decoder_only = stage is VaeStage.DECODER
    settings = vae_stage_settings(stage, cfg)
    steps = settings.steps
    vae = pipe.vae.to(device)
    vae.eval().requires_grad_(False)
    trained = [vae.post_quant_conv, vae.decoder] if decoder_only else [vae]
    for module in trained:
        module.train().requires_grad_(True)
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    checkpoint = Path(cfg.run_dir) / f"{stage.value}.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    began = time.perf_counter()
    progress = tqdm(range(start, steps), desc=stage.value, initial=start, total=steps)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, steps, settings.warmup_steps)
        generator = _step_generator(device, cfg.seed, settings.data_stage, step)
        _, _, videos = _training_clips(settings.batch, cfg, settings.data_stage, step, generator)
        target = _random_crops(_one_frame_each(videos, generator), cfg.vae_crop, generator) * 2 - 1
        with _autocast(device):
            if decoder_only:
                with torch.no_grad():
                    latents = vae.encode(target).latent_dist.mode()
                kl = torch.zeros((), device=device)
            else:
                posterior = vae.encode(target).latent_dist
                latents = posterior.sample(generator=generator)
                kl = posterior.kl().float().mean()
            reconstruction = vae.decode(latents).sample.float()
        loss_rec = _reconstruction_loss(_frames_as_pictures(reconstruction), _frames_as_pictures(target),
                                        settings.edge_weight)
        loss = loss_rec + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss_rec.item():.4f}")
            logger.write(stage=stage.value, step=step, loss=loss_rec.item(), seconds=round(time.perf_counter() - began, 1))
        if (step + 1) % cfg.checkpoint_every == 0 or step == steps - 1:
            _save_checkpoint(checkpoint, {"step": step + 1, "vae": vae.state_dict(), "optimizer": optimizer.state_dict()})
    vae.eval().requires_grad_(False)
    if stage is VaeStage.EDGES:  # the last stage that moves the encoder (run even when it has no steps)
        _set_latent_statistics(pipe, cfg, device)
    if cfg.vae_check_clips > 0 and start < steps:
        clips = heldout_clips(cfg.vae_check_clips)
        figures = evaluate_clips(decoded_ground_truth_clips(pipe, clips, cfg.frames), clips)
        logger.write(stage=f"{stage.value}_check", **figures)


@torch.no_grad()
def _set_latent_statistics(pipe: WanPipeline, cfg: VideoTrainConfig, device: torch.device) -> None:
    """Per-channel means and one spread shared by all channels, which WanPipeline undoes (latents * std + mean)
    before decoding. One spread: a channel the VAE hardly uses would otherwise be scaled up to unit variance, and
    the transformer would spend itself predicting that channel's noise."""
    chunks = []
    for start in range(0, cfg.latent_statistics_clips, LATENT_STATISTICS_CHUNK):
        generator = _step_generator(device, cfg.seed, LATENT_STATISTICS_STAGE, start)
        count = min(LATENT_STATISTICS_CHUNK, cfg.latent_statistics_clips - start)
        _, _, videos = _training_clips(count, cfg, LATENT_STATISTICS_STAGE, start, generator)
        chunks.append(pipe.vae.encode(videos * 2 - 1).latent_dist.mode().float())
    latents = torch.cat(chunks)
    mean = latents.mean(dim=(0, 2, 3, 4))
    spread = (latents - mean[None, :, None, None, None]).std().item()
    pipe.vae.register_to_config(latents_mean=[round(value, 5) for value in mean.tolist()],
                                latents_std=[round(spread, 5)] * len(mean))


def normalized_latents(pipe: WanPipeline, videos: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior means of videos in [0, 1], normalised as WanPipeline's decoding undoes:
    (latents - latents_mean) / latents_std. The mean, not a sample: the transformer learns to produce means."""
    latents = pipe.vae.encode(videos * 2 - 1).latent_dist.mode()
    config = pipe.vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
    std = torch.tensor(config.latents_std, device=latents.device).view(shape)
    return (latents - mean) / std


def _clip_parse_targets(clips: list[Clip], device: torch.device) -> ParseTargets:
    """What a clip prompt puts in each cell of its first frame, then of its last, and its background."""

    def scene(subject: ShapeObject | None, clip: Clip) -> Scene:
        return Scene(tuple(obj for obj in (subject, clip.still) if obj is not None), clip.background)

    first = parse_targets([scene(clip.first, clip) for clip in clips], device)
    last = parse_targets([scene(clip.last, clip) for clip in clips], device)
    return ParseTargets(torch.cat([first.cell_color, last.cell_color], dim=1), torch.cat([first.shape, last.shape], dim=1),
                        torch.cat([first.size, last.size], dim=1), first.background)


def parsing_task(pipe: WanPipeline, device: torch.device) -> ParsingTask:
    """The clip language's parsing task for the pipeline's UMT5 encoder, read through the pipeline's own encoding."""

    def encode(prompts: list[str], padding: int) -> tuple[torch.Tensor, None]:
        return text_embeddings(pipe, prompts, device, padding), None

    def examples(count: int, seed: int, split: Split) -> tuple[list[str], ParseTargets]:
        clips = sample_clips(count, seed, split)
        return [clip.to_prompt() for clip in clips], _clip_parse_targets(clips, device)

    return ParsingTask((pipe.text_encoder,), encode, examples, width=pipe.text_encoder.config.d_model, pooled=False,
                       cells=2 * CELLS, data_stage=TEXT_DATA_STAGE)


def _train_text_encoder(pipe: WanPipeline, cfg: VideoTrainConfig, device: torch.device, logger: _Logger) -> None:
    """Parsing stage (checkpointed as a whole), then the encoder is frozen.

    UMT5 masks the padding and its position bias is relative, so a real token's features do not depend on how many
    padding tokens follow: unlike the image model's stage, no step needs the long padding."""
    checkpoint = Path(cfg.run_dir) / "text_encoder.pt"
    if checkpoint.exists():
        pipe.text_encoder.load_state_dict(torch.load(checkpoint, map_location=device)["text_encoder"])
    else:
        accuracy = train_parsing(parsing_task(pipe, device), steps=cfg.text_steps, batch=cfg.text_batch, lr=cfg.text_lr,
                                 paddings=(MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH), long_padding_fraction=0.0,
                                 seed=cfg.seed, device=device)
        logger.write(stage="text_encoder", heldout_parse_accuracy=accuracy)
        _save_checkpoint(checkpoint, {"text_encoder": pipe.text_encoder.state_dict()})
    pipe.text_encoder.to(device).eval().requires_grad_(False)


def flow_sigmas(scheduler: UniPCMultistepScheduler, u: torch.Tensor) -> torch.Tensor:
    """UniPC's flow sigmas for uniform u in (0, 1]: its fixed shift, as ``set_timesteps`` applies it to the
    linspace(1, 1 / num_train_timesteps) of the steps."""
    shift = scheduler.config.flow_shift
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class VideoFlowBatch:
    """One rectified-flow batch as the transformer sees it (each clip repeated noise_draws times), with its
    prediction."""

    noisy: torch.Tensor  # (N, C, T, h, w) x_sigma
    sigma: torch.Tensor  # (N,)
    timestep: torch.Tensor  # (N,) int64, sigma * num_train_timesteps truncated: what WanPipeline passes
    text: torch.Tensor  # (N, padding, text width)
    prediction: torch.Tensor  # velocity
    target: torch.Tensor  # noise - x0


def flow_matching_batch(pipe: WanPipeline, prompts: list[str], videos: torch.Tensor, generator: torch.Generator,
                        max_sequence_length: int, noise_draws: int = 1, rows: slice = slice(None)) -> VideoFlowBatch:
    """Noise each clip's normalised latents at ``noise_draws`` levels and run the transformer on them as WanPipeline
    does; ``videos`` (B, 3, F, H, W) in [0, 1], one prompt each ("" for a dropped one). Only the clips ``rows`` (a
    data-parallel process's share) are run; the noise is drawn for the whole batch."""
    device = videos.device
    total = videos.shape[0] * noise_draws
    clips = range(videos.shape[0])[rows]
    shared = slice(clips.start * noise_draws, clips.stop * noise_draws)  # their rows among the repeated ones
    prompts, videos = prompts[rows], videos[rows]
    with torch.no_grad():
        x0 = normalized_latents(pipe, videos).repeat_interleave(noise_draws, dim=0)
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=device)[shared]
    u = torch.rand(total, generator=generator, device=device)[shared].clamp(1e-4, 1.0)
    sigma = flow_sigmas(pipe.scheduler, u)
    noisy = (1 - sigma[:, None, None, None, None]) * x0 + sigma[:, None, None, None, None] * noise
    timestep = (sigma * pipe.scheduler.config.num_train_timesteps).long()
    text = text_embeddings(pipe, prompts, device, max_sequence_length).repeat_interleave(noise_draws, dim=0)
    prediction = pipe.transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text,
                                  return_dict=False)[0]
    return VideoFlowBatch(noisy, sigma, timestep, text, prediction, noise - x0)


def probe_targets(layout: Layout, clips: int, frames: int, cells_per_token: int, prompted: list[bool]) -> ObjectTargets:
    """What each cell of each transformer token shows, in Wan's token order (latent frame, then row-major). A
    latent frame's tokens are labelled with one frame of the frames it holds: the first frame for the first, and
    the last frame of each further group of TEMPORAL_COMPRESSION."""
    side = tokens_per_side()
    per_frame = object_targets(layout, side, cells_per_token, [p for p in prompted for _ in range(frames)])

    def by_latent_frame(table: torch.Tensor) -> torch.Tensor:
        return table.view(clips, frames, side * side, -1)[:, ::TEMPORAL_COMPRESSION].flatten(1, 2)

    return ObjectTargets(by_latent_frame(per_frame.color), by_latent_frame(per_frame.kind), per_frame.prompted[::frames])


def _repeated(targets: ObjectTargets, times: int) -> ObjectTargets:
    return ObjectTargets(*(t.repeat_interleave(times, dim=0) for t in (targets.color, targets.kind, targets.prompted)))


def _trainable_modules(pipe: WanPipeline, cfg: VideoTrainConfig) -> dict[str, torch.nn.Module]:
    if cfg.text_steps > 0 or cfg.init_from:  # the text encoder was trained by a parsing stage, here or before
        return {"transformer": pipe.transformer}
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}


def train_video_transformer(pipe: WanPipeline, cfg: VideoTrainConfig, device: torch.device,
                            logger: _Logger | None, shard: DataShard = DataShard()) -> dict[str, dict]:
    """Train the transformer (and the text encoder when there is no parsing stage), with the object probe's loss
    beside the denoising loss when ``cfg.probe_weight`` > 0; returns the EMA state dicts of the trained modules.
    Data parallel with ``shard``: this process trains on its share of every batch; rank 0 alone logs (``logger``)
    and checkpoints."""
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
        ema, start, spent_before = state["ema"], state["step"], state["seconds"]
    shard.start_alike(parameters)
    progress = tqdm(range(start, cfg.steps), desc="transformer", initial=start, total=cfg.steps,
                    disable=not shard.is_main)
    began = time.perf_counter() - spent_before
    budget = 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    for step in progress:
        fraction = max(step / cfg.steps, shard.agreed(time.perf_counter() - began) / budget)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup_steps, fraction)
        first_frames = step < cfg.first_frame_steps
        data_generator = _step_generator(device, cfg.seed, TRANSFORMER_DATA_STAGE, step)
        clips, layout, videos = _training_clips(cfg.first_frame_batch if first_frames else cfg.batch, cfg,
                                                TRANSFORMER_DATA_STAGE, step, data_generator, only_first=first_frames)
        generator = _step_generator(device, cfg.seed, TRANSFORMER_NOISE_STAGE, step)
        prompts = _apply_prompt_dropout([clip.to_prompt() for clip in clips], generator, cfg.prompt_dropout)
        long_padding = torch.rand(1, generator=generator, device=device).item() < cfg.long_padding_fraction
        rows = shard.rows(len(clips))
        with _autocast(device):
            fm = flow_matching_batch(pipe, prompts, videos, generator,
                                     PIPELINE_PADDING if long_padding else MAX_SEQUENCE_LENGTH, cfg.noise_draws, rows)
            loss = F.mse_loss(fm.prediction.float(), fm.target)
            probe_loss = torch.zeros((), device=device)
            if probe is not None:
                targets = probe_targets(layout, len(clips), videos.shape[2], cfg.probe_cells, [p != "" for p in prompts])
                probe_loss = probe.loss(_repeated(targets[rows], cfg.noise_draws))
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.probe_weight * probe_loss).backward()
        shard.average_gradients(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        _update_ema(ema, modules, cfg.ema_decay, step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses = [shard.mean(value.item()) for value in (loss, probe_loss)]
            progress.set_postfix(loss=f"{losses[0]:.4f}", probe=f"{losses[1]:.3f}")
            if logger is not None:
                logger.write(stage="transformer", step=step, frames=videos.shape[2], loss=losses[0], probe_loss=losses[1],
                             lr=optimizer.param_groups[0]["lr"], seconds=round(time.perf_counter() - began, 1))
        out_of_time = shard.agreed(time.perf_counter() - began) > budget
        checkpoint_due = (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1 or out_of_time
        if checkpoint_due and shard.is_main:
            _save_checkpoint(checkpoint, {
                "step": step + 1,
                "seconds": time.perf_counter() - began,
                "modules": {name: m.state_dict() for name, m in modules.items()},
                "probe": probe.state_dict() if probe else None,
                "optimizer": optimizer.state_dict(),
                "ema": ema,
            })
        if out_of_time:
            if logger is not None:
                logger.write(stage="transformer", stopped_early_at_step=step + 1, of_steps=cfg.steps)
            break
    if probe is not None:
        probe.detach()
    return ema


def train_video(cfg: VideoTrainConfig, output_dir: str | Path) -> Path:
    """Full training (resumable from ``cfg.run_dir``); writes the WanPipeline folder to ``output_dir``. Launched as
    several processes (``data_parallel``), they share the transformer stage, continuing a model whose VAE and text
    encoder are trained (``init_from``); rank 0 writes."""
    _check_config(cfg)
    if launched_world() > 1 and not cfg.init_from:
        raise InvalidParameterError("several processes train only the transformer stage: pass --init-from a video "
                                    "model whose VAE and text encoder are trained (one process trains those)",
                                    param="init_from")
    requested = resolve_device(cfg.device)
    shard = DataShard.from_environment(requested)
    device = shard.device(requested)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(cfg.run_dir)
    if shard.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    logger = _Logger(run_dir / "log.jsonl") if shard.is_main else None
    torch.manual_seed(cfg.seed)
    pipe = video_pipeline_from(cfg.init_from) if cfg.init_from else build_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    if cfg.init_from:  # trained: no stage of theirs runs, and they stay frozen
        for module in (pipe.vae, pipe.text_encoder):
            module.to(device).eval().requires_grad_(False)
    else:
        for stage in VaeStage:  # a stage of 0 steps does nothing
            train_video_vae(pipe, cfg, device, logger, stage)
    vae_seconds = time.perf_counter() - started
    if cfg.text_steps > 0 and not cfg.init_from:
        _train_text_encoder(pipe, cfg, device, logger)
    text_seconds = time.perf_counter() - started - vae_seconds
    ema = train_video_transformer(pipe, cfg, device, logger, shard)
    for name, module in _trainable_modules(pipe, cfg).items():
        module.load_state_dict(ema[name])
        module.eval().requires_grad_(False)
    output_dir = Path(output_dir)
    if shard.is_main:
        logger.write(stage="done", vae_seconds=vae_seconds, text_seconds=text_seconds,
                     total_seconds=time.perf_counter() - started, device=str(device), processes=shard.world)
        pipe.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    return output_dir
