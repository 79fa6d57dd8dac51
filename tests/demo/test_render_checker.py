import numpy as np
import pytest
import torch

from ditserve.demo import evaluate, render, sample_prompts, score
from ditserve.demo.language import parse_prompt, sample_scenes
from ditserve.demo.render import PALETTE, render_batch, to_pil


def _pixel(image, x_fraction, y_fraction):
    side = image.width
    return image.getpixel((int(x_fraction * side), int(y_fraction * side)))


def test_renderer_geometry():
    image = render("a large red square at the top left and a small blue triangle at the bottom right on a black background")
    assert image.size == (128, 128)
    assert _pixel(image, 1 / 6, 1 / 6) == PALETTE["red"]
    assert _pixel(image, 1 / 6 + 0.16, 1 / 6 + 0.16) == PALETTE["red"]  # inside the 0.34 square's corner
    assert _pixel(image, 1 / 6 + 0.19, 1 / 6) == PALETTE["black"]  # just outside it
    assert _pixel(image, 5 / 6, 5 / 6 + 0.08) == PALETTE["blue"]  # near the triangle's base
    assert _pixel(image, 5 / 6 + 0.08, 5 / 6 - 0.08) == PALETTE["black"]  # beside its apex
    assert _pixel(image, 0.5, 0.5) == PALETTE["black"]


def test_circle_area_matches_its_diameter():
    image = np.asarray(render("a large green circle in the center", size=256))
    covered = (np.abs(image.astype(int) - PALETTE["green"]).sum(-1) < 30).mean()
    assert covered == pytest.approx(np.pi * 0.17**2, rel=0.03)


def test_jitter_moves_objects_within_bound():
    scene = parse_prompt("a small red square in the center")
    images = render_batch([scene] * 8, jitter=0.04, generator=torch.Generator().manual_seed(0))
    red = torch.tensor(PALETTE["red"]) / 255
    centres = []
    for image in images:
        mask = ((image.permute(1, 2, 0) - red).abs().sum(-1) < 0.05).nonzero().float()
        centres.append(mask.mean(0) / 128)
    offsets = torch.stack(centres) - 0.5
    assert offsets.abs().max() <= 0.045 and offsets.abs().max() > 0.005


def test_checker_accepts_ground_truth_renders():
    scenes = sample_scenes(150, seed=2, split="all")
    images = to_pil(render_batch(scenes, jitter=0.04, generator=torch.Generator().manual_seed(1)))
    figures = evaluate(images, scenes)
    assert figures["object_accuracy"] >= 0.99
    assert figures["prompt_accuracy"] >= 0.97
    kinds = [f"{size}_{shape}_accuracy" for size in ("small", "large") for shape in ("circle", "square", "triangle")]
    assert all(figures[kind] >= 0.95 for kind in kinds)


def test_accuracy_by_kind_points_at_the_kind_that_is_drawn_wrong():
    prompts = ["a small red triangle on the left and a large blue circle at the top right"] * 4
    drawn = [render("a small red circle on the left and a large blue circle at the top right")] * 4
    figures = evaluate(drawn, prompts)
    assert figures["small_triangle_accuracy"] == 0.0 and figures["large_circle_accuracy"] == 1.0
    assert np.isnan(figures["small_square_accuracy"])


def test_checker_rejects_noise_and_mismatched_prompts():
    prompts = sample_prompts(60, seed=3, split="all")
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in prompts]
    assert evaluate(noise, prompts)["object_accuracy"] <= 0.02
    images = [render(p) for p in prompts]
    shifted = prompts[1:] + prompts[:1]
    mismatched = evaluate(images, shifted)
    assert mismatched["object_accuracy"] <= 0.1 and mismatched["prompt_accuracy"] <= 0.02


def test_checker_flags_each_attribute():
    image = render("a large red circle on the left")
    assert score(image, "a large red circle on the left").correct
    assert not score(image, "a small red circle on the left").objects[0].size_ok
    assert not score(image, "a large red square on the left").objects[0].shape_ok
    assert not score(image, "a large red circle on the right").objects[0].present
    assert not score(image, "a large blue circle on the left").objects[0].present
    assert not score(image, "a large red circle on the left on a black background").background_ok
    extra = render("a large red circle on the left and a small blue square on the right")
    assert score(extra, "a large red circle on the left").extra_objects == 1
