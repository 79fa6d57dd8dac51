"""Sampling the video demo model with plain ``diffusers.WanPipeline`` and measuring it with the clip checker."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import WanPipeline

from ditserve.demo.evaluation import DEFAULTS_FILE, seeded_chunks
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.video_checker import evaluate_clips
from ditserve.demo.video_language import Clip
from ditserve.demo.video_model import VIDEO_SIZE, wan_pipeline_num_frames
from ditserve.demo.video_render import render_clip_batch


def write_video_defaults(model_dir: str | Path, guidance_scale: float, frames: int) -> None:
    """The sampling defaults the engine reads for this model. WanPipeline's negative prompt is "" when none is
    given, so ``guidance_scale`` > 1 is true CFG against the empty prompt that training dropped prompts to."""
    defaults = {
        "sampling_defaults": {
            "height": VIDEO_SIZE,
            "width": VIDEO_SIZE,
            "num_frames": frames,
            "num_inference_steps": 50,
            "guidance_scale": guidance_scale,
            # Trained at this T5 length (and a few steps at WanPipeline's 226); the engine's Wan default is 512.
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
    }
    (Path(model_dir) / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def load_video_pipeline(model_dir: str | Path, device: str | torch.device = "cpu") -> WanPipeline:
    pipe = WanPipeline.from_pretrained(str(model_dir)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_clips(pipe: WanPipeline, clips: list[Clip], *, frames: int, num_inference_steps: int,
                   guidance_scale: float, seed: int = 0, batch_size: int = 16,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """One generated clip per prompt, (B, 3, frames, H, W) in [0, 1]; clip i always uses seed + i, whatever the
    batching."""
    videos = []
    for _start, chunk, generators in seeded_chunks(clips, batch_size, seed):
        output = pipe(prompt=[c.to_prompt() for c in chunk], height=VIDEO_SIZE, width=VIDEO_SIZE,
                      num_frames=wan_pipeline_num_frames(frames),
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generators,
                      max_sequence_length=max_sequence_length, output_type="pt")
        videos.append(output.frames.float())
    # WanPipeline's "pt" output is (B, frames, 3, H, W)
    return torch.cat(videos).transpose(1, 2)


def clip_adherence(pipe: WanPipeline, clips: list[Clip], settings: list[tuple[int, float]], *, frames: int,
                   seed: int = 0, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> list[dict]:
    """Clip-checker figures for each (steps, guidance_scale) setting, on the same clips and seeds."""
    results = []
    for steps, scale in settings:
        videos = generate_clips(pipe, clips, frames=frames, num_inference_steps=steps, guidance_scale=scale, seed=seed,
                                max_sequence_length=max_sequence_length)
        results.append({"num_inference_steps": steps, "guidance_scale": scale, **evaluate_clips(videos, clips)})
    return results


@torch.no_grad()
def decoded_ground_truth_clips(pipe: WanPipeline, clips: list[Clip], frames: int, batch_size: int = 8) -> torch.Tensor:
    """The true clips through the VAE (posterior mean, then decoder), (B, 3, frames, H, W) in [0, 1]: what a
    perfect transformer would give, so their checker score is the ceiling of the model's."""
    device = pipe.vae.device
    videos = []
    for start in range(0, len(clips), batch_size):
        truth = render_clip_batch(clips[start : start + batch_size], frames, VIDEO_SIZE, device=device)
        latents = pipe.vae.encode(truth.to(pipe.vae.dtype) * 2 - 1).latent_dist.mode()
        videos.append(((pipe.vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(videos)
