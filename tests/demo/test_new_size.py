"""The LoRA's new size word: parsed, rendered and checked like the base sizes, without changing anything the base
model's prompts, tokenizers or evaluation depend on."""

import pytest

from ditserve.demo import evaluate, heldout_prompts, render, sample_prompts, score
from ditserve.demo.checker import NEW_SIZE_BAND, SIZE_CUT
from ditserve.demo.language import (
    NEW_SIZE,
    NEW_SIZE_MAX_OBJECTS,
    SHAPES,
    SIZES,
    new_size_prompts,
    parse_prompt,
    sample_new_size_scenes,
    vocabulary,
)
from ditserve.demo.model import MAX_SEQUENCE_LENGTH, build_t5_tokenizer
from ditserve.demo.render import BOX_SIDE
from ditserve.errors import InvalidParameterError


def test_new_size_stays_out_of_the_base_language():
    assert NEW_SIZE not in SIZES
    assert NEW_SIZE not in vocabulary()
    assert not any(NEW_SIZE in p for p in sample_prompts(500, 0) + heldout_prompts(64, 0))


def test_new_size_prompts_parse_and_hold_one_new_object():
    scenes = sample_new_size_scenes(200, seed=3, split="train")
    for scene in scenes:
        assert parse_prompt(scene.to_prompt()) == scene
        assert [o.size for o in scene.objects].count(NEW_SIZE) == 1
        assert len(scene.objects) <= NEW_SIZE_MAX_OBJECTS
        assert not scene.is_heldout
    assert all(parse_prompt(p).is_heldout for p in new_size_prompts(32, 0))


@pytest.mark.parametrize("pairs", [0.0, 0.75, 1.0])
def test_the_share_of_two_object_new_size_scenes_is_what_was_asked(pairs):
    scenes = sample_new_size_scenes(400, seed=5, split="train", pairs=pairs)
    share = sum(len(scene.objects) == 2 for scene in scenes) / len(scenes)
    assert share == pytest.approx(pairs, abs=0.06)
    assert all([o.size for o in scene.objects].count(NEW_SIZE) == 1 for scene in scenes)


def test_a_share_of_pairs_outside_zero_to_one_is_refused_by_name():
    with pytest.raises(InvalidParameterError) as error:
        sample_new_size_scenes(4, seed=0, pairs=1.5)
    assert error.value.param == "new_size_pairs"


def test_new_size_prompts_fit_the_text_padding_untruncated():
    # the base T5 tokenizer spells the unknown word letter by letter; it must not be cut off at 32 tokens
    tokenizer = build_t5_tokenizer()
    longest = max(len(tokenizer(p).input_ids) for p in new_size_prompts(500, 1))
    assert longest <= MAX_SEQUENCE_LENGTH


def test_new_size_sits_between_the_base_sizes_and_its_band_leaves_them_out():
    assert BOX_SIDE["small"] < NEW_SIZE_BAND[0] < BOX_SIDE[NEW_SIZE] < NEW_SIZE_BAND[1] < BOX_SIDE["large"]
    # the base sizes' own cut is unchanged: it runs through the new size's band
    assert NEW_SIZE_BAND[0] < SIZE_CUT < NEW_SIZE_BAND[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_checker_tells_the_new_size_from_every_base_size(shape):
    prompt = f"a {NEW_SIZE} blue {shape} at the top left"
    assert score(render(prompt), prompt).correct
    for size in SIZES:
        assert not score(render(f"a {size} blue {shape} at the top left"), prompt).correct


def test_base_sizes_keep_their_single_cut():
    # base prompts are judged as before the new size existed, so a medium object passes for the base size on
    # its side of the cut: the base figures cannot move, and the new size is checked by new-size prompts only
    medium = render(f"a {NEW_SIZE} red square in the center")
    assert score(medium, "a small red square in the center").correct
    assert not score(medium, "a large red square in the center").correct


def test_ground_truth_of_new_size_prompts_scores_perfectly():
    prompts = new_size_prompts(48, 2)
    figures = evaluate([render(p) for p in prompts], prompts)
    assert figures["object_accuracy"] == 1.0
    assert figures["prompt_accuracy"] == 1.0
    assert all(figures[f"{NEW_SIZE}_{shape}_accuracy"] == 1.0 for shape in SHAPES)
