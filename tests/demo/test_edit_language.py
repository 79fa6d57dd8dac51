import itertools

import pytest
from transformers import CLIPTokenizer, T5Tokenizer

from ditserve.demo import demo_model_path
from ditserve.demo.edit_language import (
    EDIT_WORDS,
    PLACES,
    EditKind,
    InstructionOutsideLanguageError,
    heldout_edits,
    is_heldout_key,
    parse_instruction,
    sample_edits,
)
from ditserve.demo.language import (
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    is_in_language,
    parse_prompt,
    sample_prompts,
)
from ditserve.demo.model import build_clip_tokenizer, build_t5_tokenizer
from ditserve.errors import InvalidParameterError


def test_sampled_edits_are_reproducible_and_stay_in_the_language():
    edits = sample_edits(300, seed=3, split="all")
    assert edits == sample_edits(300, seed=3, split="all")
    assert {e.kind for e in edits} == set(EditKind)
    for edit in edits:
        assert is_in_language(edit.source.to_prompt()) and is_in_language(edit.target.to_prompt())
        assert parse_instruction(edit.instruction, edit.source) == edit
        assert edit.target != edit.source


def test_split_keeps_heldout_keys_out_of_training():
    train = sample_edits(2000, seed=0, split="train")
    heldout = heldout_edits(200, seed=0)
    assert not any(e.is_heldout for e in train)
    assert all(e.is_heldout for e in heldout)
    assert {e.kind for e in heldout} == set(EditKind)
    assert not {e.key for e in train} & {e.key for e in heldout}


@pytest.mark.parametrize("kind, parts", [
    (EditKind.RECOLOR, (SHAPES, COLORS, COLORS)),
    (EditKind.MOVE, (SHAPES, POSITIONS, POSITIONS)),
    (EditKind.REMOVE, (COLORS, SHAPES, POSITIONS)),
    (EditKind.ADD, (COLORS, SHAPES, POSITIONS)),
    (EditKind.BACKGROUND, (COLORS, COLORS)),
])
def test_every_heldout_key_is_made_of_parts_seen_together_in_training(kind, parts):
    keys = [(kind, *values) for values in itertools.product(*parts)]
    held = [k for k in keys if is_heldout_key(k)]
    assert 0.08 <= len(held) / len(keys) <= 0.15
    trained = {k for k in keys if not is_heldout_key(k)}
    for key in held:
        # drop any one part: the remaining pair (or single part) occurs in some training key
        for dropped in range(1, len(key)):
            rest = key[:dropped] + key[dropped + 1:]
            assert any(k[:dropped] + k[dropped + 1:] == rest for k in trained), (key, dropped)


def test_instructions_apply_to_the_scene():
    source = parse_prompt("a small red circle at the top left and a large blue square in the center")
    recolor = parse_instruction("make the red circle green", source)
    assert recolor.target.to_prompt() == "a small green circle at the top left and a large blue square in the center"
    move = parse_instruction("move the small circle to the bottom right", source)
    assert move.target.objects[0].position == "at the bottom right"
    remove = parse_instruction("remove the square", source)
    assert remove.target.to_prompt() == "a small red circle at the top left"
    add = parse_instruction("add a large green triangle on the right", source)
    assert add.target.objects[-1].phrase() == "a large green triangle on the right"
    background = parse_instruction("change the background to yellow", source)
    assert background.target.background == "yellow" and background.target.objects == source.objects
    assert PLACES[POSITIONS.index("at the top left")] == "top left"


@pytest.mark.parametrize("instruction, why", [
    ("make the circle red", "new colour"),  # already red
    ("make the circle blue", "new colour"),  # the square's colour
    ("make the circle white", "new colour"),  # the background's colour
    ("move the circle to the center", "not free"),
    ("remove the triangle", "names 0"),
    ("paint the circle green", "outside the edit language"),
    ("add a small green circle in the center", "free position"),
    ("change the background to red", "background"),
])
def test_instructions_that_do_not_apply_are_refused_naming_the_field(instruction, why):
    source = parse_prompt("a small red circle at the top left and a large blue square in the center")
    with pytest.raises(InstructionOutsideLanguageError, match=why) as error:
        parse_instruction(instruction, source)
    assert error.value.param == "instruction"


def test_a_reference_must_name_one_object_and_a_scene_keeps_one():
    source = parse_prompt("a small red circle at the top left and a large blue circle in the center")
    with pytest.raises(InstructionOutsideLanguageError, match="names 2"):
        parse_instruction("remove the circle", source)
    assert parse_instruction("remove the large circle", source).target.objects[0].color == "red"
    with pytest.raises(InstructionOutsideLanguageError, match="at least one object"):
        parse_instruction("remove the circle", Scene(objects=source.objects[:1]))
    full = parse_prompt("a small red circle at the top left and a large blue square in the center and a small "
                        "green square at the top")
    with pytest.raises(InstructionOutsideLanguageError, match="already holds 3"):
        parse_instruction("add a small black triangle on the left", full)
    with pytest.raises(InvalidParameterError, match="split"):
        sample_edits(3, seed=0, split="test")


def test_edit_words_join_the_tokenizers_without_moving_base_tokens():
    folder = demo_model_path()
    old_clip = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    old_t5 = T5Tokenizer.from_pretrained(str(folder / "tokenizer_2"))
    clip, t5 = build_clip_tokenizer(EDIT_WORDS), build_t5_tokenizer(EDIT_WORDS)
    for prompt in sample_prompts(50, seed=0, split="all"):
        assert clip(prompt).input_ids == old_clip(prompt).input_ids
        assert t5(prompt).input_ids == old_t5(prompt).input_ids
    for word in EDIT_WORDS:
        # one token each (plus CLIP's start/end and T5's end), all of them new ids
        assert len(clip(word).input_ids) == 3 and clip(word).input_ids[1] >= len(old_clip)
        assert len(t5(word).input_ids) == 2 and t5(word).input_ids[0] >= len(old_t5)
    longest = max((e.instruction for e in sample_edits(500, seed=1, split="all")), key=lambda s: len(clip(s).input_ids))
    assert len(clip(longest).input_ids) <= 32 and len(t5(longest).input_ids) <= 32
