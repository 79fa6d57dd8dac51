"""Sampling the edit demo model with plain ``diffusers.FluxKontextPipeline`` and measuring it with the edit
checker."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from ditserve.demo.edit_checker import evaluate_edits
from ditserve.demo.edit_language import Edit, heldout_edits
from ditserve.demo.evaluation import DEFAULTS_FILE, seeded_chunks
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.render import render_batch, to_pil

IMAGE_SIZE = 128
# FluxKontextPipeline's own defaults would resize both the input (to one of its preferred resolutions, 672 px
# and up) and the output (to max_area 1024**2): a 128x128 model must be called with these. The model folder
# states them as the sampling defaults ditserve's Kontext adapter reads (``auto_resize`` is diffusers'
# ``_auto_resize``).
KONTEXT_SIZING = {"max_area": IMAGE_SIZE * IMAGE_SIZE, "auto_resize": False}
KONTEXT_CALL_KWARGS = {"max_area": KONTEXT_SIZING["max_area"], "_auto_resize": KONTEXT_SIZING["auto_resize"]}


def write_edit_defaults(model_dir: Path, true_cfg_scale: float) -> None:
    """The sampling defaults the engine reads for this model, with the Kontext sizing it needs at 128 px."""
    defaults = {
        "sampling_defaults": {
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
            "num_inference_steps": 50,
            "true_cfg_scale": true_cfg_scale,
            "negative_prompt": "",
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            **KONTEXT_SIZING,
        },
    }
    (Path(model_dir) / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def load_edit_pipeline(model_dir: str | Path, device: str | torch.device = "cpu") -> FluxKontextPipeline:
    pipe = FluxKontextPipeline.from_pretrained(str(model_dir)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def source_images(edits: list[Edit]) -> list[Image.Image]:
    """The input pictures of the edits: their source scenes rendered without jitter."""
    return to_pil(render_batch([e.source for e in edits], size=IMAGE_SIZE))


def heldout_edit_inputs(count: int, seed: int) -> tuple[list[Edit], list[Image.Image]]:
    """``count`` held-out edits (``heldout_edits(count, seed)``) and their input pictures: what calibration and
    the bench run the edit model on (calibration with seed 1, the bench with seed 0)."""
    edits = heldout_edits(count, seed=seed)
    return edits, source_images(edits)


def generate_edits(pipe: FluxKontextPipeline, edits: list[Edit], *, num_inference_steps: int, true_cfg_scale: float,
                   seed: int = 0, batch_size: int = 16) -> list[Image.Image]:
    """One edited picture per edit; edit i always uses seed + i, whatever the batching."""
    inputs = source_images(edits)
    images: list[Image.Image] = []
    for start, chunk, generators in seeded_chunks(edits, batch_size, seed):
        output = pipe(
            image=inputs[start : start + len(chunk)],
            prompt=[e.instruction for e in chunk],
            # negative_prompt="" turns true CFG on only when the scale is above 1 (the pipeline's rule).
            negative_prompt=[""] * len(chunk),
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=generators,
            **KONTEXT_CALL_KWARGS,
        )
        images.extend(output.images)
    return images


def edit_adherence(pipe: FluxKontextPipeline, edits: list[Edit], settings: list[tuple[int, float]],
                   seed: int = 0) -> list[dict]:
    """Edit-checker figures for each (steps, true_cfg_scale) setting, on the same edits and seeds."""
    results = []
    for steps, cfg_scale in settings:
        images = generate_edits(pipe, edits, num_inference_steps=steps, true_cfg_scale=cfg_scale, seed=seed)
        results.append({"num_inference_steps": steps, "true_cfg_scale": cfg_scale, **evaluate_edits(images, edits)})
    return results


@torch.no_grad()
def decoded_edit_targets(pipe: FluxKontextPipeline, edits: list[Edit], batch_size: int = 32) -> list[Image.Image]:
    """The true edited pictures through the VAE (posterior mean, then decoder): the ceiling of the model's score."""
    device = pipe.vae.device
    images: list[Image.Image] = []
    for start in range(0, len(edits), batch_size):
        pictures = render_batch([e.target for e in edits[start : start + batch_size]], device=device)
        latents = pipe.vae.encode(pictures.to(pipe.vae.dtype) * 2 - 1).latent_dist.mode()
        images.extend(to_pil(((pipe.vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)))
    return images
