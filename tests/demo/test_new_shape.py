"""The LoRA's new shape word: parsed, rendered and checked like the base shapes, without changing anything the base
model's prompts, tokenizers or evaluation depend on."""

import numpy as np
import pytest

from ditserve.demo import evaluate, heldout_prompts, render, sample_prompts, score
from ditserve.demo.language import (
    NEW_SHAPE,
    NEW_SHAPE_MAX_OBJECTS,
    SHAPES,
    is_heldout_triple,
    new_shape_prompts,
    parse_prompt,
    sample_new_shape_scenes,
    vocabulary,
)
from ditserve.demo.model import MAX_SEQUENCE_LENGTH, build_t5_tokenizer
from ditserve.demo.render import PALETTE


def test_new_shape_stays_out_of_the_base_language():
    assert NEW_SHAPE not in SHAPES
    assert NEW_SHAPE not in vocabulary()
    assert not any(NEW_SHAPE in p for p in sample_prompts(500, 0) + heldout_prompts(64, 0))


def test_new_shape_prompts_parse_and_hold_one_new_object():
    scenes = sample_new_shape_scenes(200, seed=3, split="train")
    for scene in scenes:
        assert parse_prompt(scene.to_prompt()) == scene
        assert [o.shape for o in scene.objects].count(NEW_SHAPE) == 1
        assert len(scene.objects) <= NEW_SHAPE_MAX_OBJECTS
        assert not scene.is_heldout
    assert all(parse_prompt(p).is_heldout for p in new_shape_prompts(32, 0))


def test_new_shape_prompts_fit_the_text_padding_untruncated():
    # the base T5 tokenizer spells the unknown word letter by letter; it must not be cut off at 32 tokens
    tokenizer = build_t5_tokenizer()
    longest = max(len(tokenizer(p).input_ids) for p in new_shape_prompts(500, 1))
    assert longest <= MAX_SEQUENCE_LENGTH


def test_new_shape_loses_one_position_per_colour():
    from ditserve.demo.language import COLORS, POSITIONS

    for color in COLORS:
        assert sum(is_heldout_triple(color, NEW_SHAPE, p) for p in POSITIONS) == 1


def test_diamond_is_a_square_on_its_corner():
    image = np.asarray(render(f"a large red {NEW_SHAPE} in the center", size=256)).astype(int)
    red = (np.abs(image - PALETTE["red"]).sum(-1) < 30)
    assert red[128, 128] and red[128, 128 + 40] and red[128 + 40, 128]  # along the diagonals' ends
    assert not red[128 + 35, 128 + 35]  # where a square's corner would be
    assert red.mean() == pytest.approx(2 * 0.17**2, rel=0.03)


@pytest.mark.parametrize("size", ["small", "large"])
def test_checker_tells_the_diamond_from_every_base_shape(size):
    diamond = render(f"a {size} blue {NEW_SHAPE} at the top left")
    assert score(diamond, f"a {size} blue {NEW_SHAPE} at the top left").correct
    for shape in SHAPES:
        assert not score(diamond, f"a {size} blue {shape} at the top left").correct
        base = render(f"a {size} blue {shape} at the top left")
        assert not score(base, f"a {size} blue {NEW_SHAPE} at the top left").correct


def test_ground_truth_of_new_shape_prompts_scores_perfectly():
    prompts = new_shape_prompts(48, 2)
    figures = evaluate([render(p) for p in prompts], prompts)
    assert figures["object_accuracy"] == 1.0
    assert figures["prompt_accuracy"] == 1.0
    assert figures["large_diamond_accuracy"] == 1.0 and figures["small_diamond_accuracy"] == 1.0
