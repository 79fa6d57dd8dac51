"""Sampling the demo model with plain ``diffusers.FluxPipeline`` and measuring it: adherence, gallery and the
step-to-step change of the transformer output (the redundancy that caches exploit)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import FluxPipeline
from PIL import Image, ImageDraw, ImageFont

from ditserve.demo.checker import evaluate
from ditserve.demo.language import parse_prompt
from ditserve.demo.render import render_batch, to_pil
from ditserve.errors import InvalidParameterError

DEFAULTS_FILE = "ditserve_defaults.json"


def load_sampling_defaults(model_dir: str | Path) -> dict:
    """The ``sampling_defaults`` mapping of a model folder's ditserve_defaults.json."""
    path = Path(model_dir) / DEFAULTS_FILE
    if not path.is_file():
        raise InvalidParameterError(f"{path} is missing: the demo model folder needs its {DEFAULTS_FILE}", param="model")
    return json.loads(path.read_text())["sampling_defaults"]


def load_pipeline(model_dir: str | Path, device: str | torch.device = "cpu", lora_path: str | Path | None = None) -> FluxPipeline:
    """The model folder as a FluxPipeline; with ``lora_path`` (a PEFT folder or a LoRA file) that adapter is
    fused into the transformer at scale 1 by ditserve's own reader (``ditserve.lora``), as the distill backend
    serves it."""
    pipe = FluxPipeline.from_pretrained(str(model_dir))
    if lora_path is not None:
        from ditserve.lora.files import read_adapter
        from ditserve.lora.manager import adapter_name_for, fuse_adapters

        adapter = read_adapter(adapter_name_for(str(lora_path)), Path(lora_path).resolve(), pipe)
        fuse_adapters([adapter], {"transformer": pipe.transformer})
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded_chunks(items: list, batch_size: int, seed: int) -> Iterator[tuple[int, list, list[torch.Generator]]]:
    """``items`` in batches, each with one CPU generator per item seeded ``seed + index``: item i gets the same
    noise whatever the batching."""
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield start, chunk, [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]


def generate(
    pipe: FluxPipeline,
    prompts: list[str],
    *,
    num_inference_steps: int,
    true_cfg_scale: float,
    seed: int = 0,
    batch_size: int = 16,
    height: int = 128,
    width: int = 128,
    max_sequence_length: int | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt i always uses seed + i, whatever the batching."""
    images: list[Image.Image] = []
    for _start, chunk, generators in seeded_chunks(prompts, batch_size, seed):
        # negative_prompt="" enables true CFG only when the scale is above 1 (FluxPipeline's rule).
        extra = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
        output = pipe(
            prompt=chunk,
            negative_prompt=[""] * len(chunk),
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            generator=generators,
            **extra,
        )
        images.extend(output.images)
    return images


def adherence(pipe: FluxPipeline, prompts: list[str], settings: list[tuple[int, float]], seed: int = 0,
              max_sequence_length: int | None = None) -> list[dict]:
    """Checker figures for each (steps, true_cfg_scale) setting, on the same prompts and seeds."""
    results = []
    for steps, cfg_scale in settings:
        images = generate(pipe, prompts, num_inference_steps=steps, true_cfg_scale=cfg_scale, seed=seed,
                          max_sequence_length=max_sequence_length)
        results.append({"num_inference_steps": steps, "true_cfg_scale": cfg_scale, **evaluate(images, prompts)})
    return results


@torch.no_grad()
def decoded_ground_truth(pipe: FluxPipeline, prompts: list[str], batch_size: int = 32) -> list[Image.Image]:
    """The true pictures passed through the VAE (posterior mean, then decoder): what a perfect transformer would
    give, so their checker score is the ceiling of the model's."""
    device = pipe.vae.device
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        pictures = render_batch([parse_prompt(p) for p in prompts[start : start + batch_size]], device=device)
        latents = pipe.vae.encode(pictures.to(pipe.vae.dtype) * 2 - 1).latent_dist.mode()
        images.extend(to_pil(((pipe.vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)))
    return images


def gallery(images: list[Image.Image], prompts: list[str], columns: int = 4, caption_width: int = 34) -> Image.Image:
    """Images in a grid with each prompt written under its picture."""
    font = ImageFont.load_default()
    side = images[0].width * 2
    lines = [textwrap.wrap(p, caption_width) for p in prompts]
    caption_height = 12 * max(len(line) for line in lines) + 6
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (side + 8), rows * (side + caption_height + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(zip(images, lines, strict=True)):
        x = (index % columns) * (side + 8) + 4
        y = (index // columns) * (side + caption_height + 8) + 4
        sheet.paste(image.resize((side, side), Image.NEAREST), (x, y))
        for line_number, line in enumerate(caption):
            draw.text((x, y + side + 3 + 12 * line_number), line, fill="black", font=font)
    return sheet


def step_changes(pipe: FluxPipeline, prompts: list[str], *, num_inference_steps: int, true_cfg_scale: float,
                 seed: int = 0, max_sequence_length: int | None = None) -> list[float]:
    """Mean over prompts of the relative L1 change of the transformer output between consecutive steps.

    Only conditional-branch calls are compared: with true CFG, FluxPipeline calls the transformer twice a step,
    conditional first, then the empty prompt.
    """
    calls: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(o[0].detach().float()))
    try:
        generate(pipe, prompts, num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale, seed=seed,
                 batch_size=len(prompts), max_sequence_length=max_sequence_length)
    finally:
        handle.remove()
    stride = 2 if true_cfg_scale > 1 else 1
    outputs = calls[::stride]
    changes = []
    for previous, current in zip(outputs[:-1], outputs[1:], strict=True):
        changes.append(((current - previous).abs().mean() / previous.abs().mean()).item())
    return changes
