import itertools
from dataclasses import replace

import pytest

from ditserve.demo.language import COLORS, POSITIONS, SHAPES, ShapeObject, vocabulary
from ditserve.demo.model import build_clip_tokenizer, build_t5_tokenizer
from ditserve.demo.render import cell_center
from ditserve.demo.video_language import (
    VIDEO_WORDS,
    Clip,
    ClipKind,
    ClipOutsideLanguageError,
    event_onset,
    heldout_clips,
    is_heldout_key,
    is_in_video_language,
    parse_video_prompt,
    path_clearance,
    sample_clips,
)
from ditserve.errors import InvalidParameterError

STILL = "a large blue square at the bottom right"


def test_sampled_clips_are_reproducible_and_parse_back():
    clips = sample_clips(600, seed=4, split="all")
    assert clips == sample_clips(600, seed=4, split="all")
    assert clips != sample_clips(600, seed=5, split="all")
    kinds = [clip.kind for clip in clips]
    assert all(150 <= kinds.count(kind) <= 250 for kind in ClipKind)
    assert any(clip.still is not None for clip in clips) and any(clip.background is not None for clip in clips)
    for clip in clips:
        assert parse_video_prompt(clip.to_prompt()) == clip


def test_parses_each_kind_of_event():
    motion = parse_video_prompt(f"a small red circle moves from the top left to the center and {STILL} on a black background")
    assert motion.kind is ClipKind.MOTION
    assert motion.first == ShapeObject("small", "red", "circle", "at the top left")
    assert motion.last == ShapeObject("small", "red", "circle", "in the center")
    assert motion.still == ShapeObject("large", "blue", "square", "at the bottom right")
    assert motion.background == "black" and motion.key == (ClipKind.MOTION, "circle", "at the top left", "in the center")
    appear = parse_video_prompt("a large green triangle appears at the top")
    assert appear.kind is ClipKind.APPEAR and appear.first is None and appear.still is None
    assert appear.last.position == "at the top" and appear.background_color == "white"
    change = parse_video_prompt(f"a small red circle on the left turns yellow and {STILL}")
    assert change.kind is ClipKind.COLOR_CHANGE and change.key == (ClipKind.COLOR_CHANGE, "red", "yellow")
    assert change.first.color == "red" and change.last == replace(change.first, color="yellow")


@pytest.mark.parametrize("text, why", [
    ("a small red circle moves from the top left to the top left", "changes nothing"),
    ("a small red circle at the top turns red", "changes nothing"),
    ("a small red circle moves from the left to the right and a large blue square in the center", "on or beside"),
    ("a small red circle moves from the top left to the bottom and a large blue square on the left", "on or beside"),
    # two large objects would touch all the way along the top row
    ("a large red circle moves from the top left to the top right and a large blue square on the left",
     "on or beside"),
    ("a small red circle appears at the top and a large red square on the left", "colour 'red'"),
    ("a small red circle on the left turns blue and a large blue square on the right", "colour 'blue'"),
    ("a small red circle appears at the top and a large blue square at the top", "position"),
    ("a small white circle appears in the center", "background's colour"),
    ("a small red circle at the top turns white", "background's colour"),
    ("a small red circle appears in the center on a red background", "background's colour"),
    ("a small red circle moves to the right", "outside the clip language"),
    ("a small red circle moves from the at the top to the right", "outside the clip language"),
    ("a medium red circle appears in the center", "outside the clip language"),
    ("a small red circle in the center", "outside the clip language"),
    ("a small red circle appears in the center and a small blue square on the left and a small green square on "
     "the right", "outside the clip language"),
])
def test_refusals_name_the_field_and_say_why(text, why):
    assert not is_in_video_language(text)
    with pytest.raises(ClipOutsideLanguageError, match=why) as error:
        parse_video_prompt(text)
    assert error.value.param == "prompt"
    assert isinstance(error.value, InvalidParameterError) and isinstance(error.value, ValueError)


def test_a_clip_that_breaks_a_rule_cannot_be_built():
    first = ShapeObject("small", "red", "circle", "on the left")
    with pytest.raises(ClipOutsideLanguageError, match=r"\['color', 'position'\]"):
        Clip(first, replace(first, color="blue", position="on the right"))
    with pytest.raises(ClipOutsideLanguageError, match=r"\['size'\]"):
        Clip(first, replace(first, size="large"))
    with pytest.raises(ClipOutsideLanguageError, match="must be a string"):
        parse_video_prompt(None)
    with pytest.raises(InvalidParameterError, match="split"):
        sample_clips(3, seed=0, split="test")


def test_motion_frames_interpolate_and_the_still_object_stays():
    clip = parse_video_prompt(f"a small red circle moves from the top left to the bottom left and {STILL}")
    frames = clip.frames(5)
    assert [frame.objects[0].center for frame in frames] == [pytest.approx((1 / 6, 1 / 6 + k / 6)) for k in range(5)]
    assert all(frame.objects[0].object == clip.first for frame in frames)
    assert {frame.objects[1].center for frame in frames} == {cell_center(2, 2)}
    with pytest.raises(InvalidParameterError) as error:
        clip.frames(1)
    assert error.value.param == "frames"


@pytest.mark.parametrize("count", [2, 9, 17])
def test_appear_and_colour_change_happen_at_the_onset(count):
    onset = event_onset(count)
    assert 0 < onset < count
    # Wan's VAE encodes frame 0 alone and then groups of 4: the change starts a group at 9 and 17 frames
    assert all((event_onset(n) - 1) % 4 == 0 for n in (9, 17))
    appear = parse_video_prompt("a small red circle appears on the right on a black background")
    shown = [frame.objects[0] is not None for frame in appear.frames(count)]
    assert shown == [False] * onset + [True] * (count - onset)
    assert all(frame.background_color == "black" for frame in appear.frames(count))
    change = parse_video_prompt("a small red circle on the right turns green")
    colours = [frame.objects[0].object.color for frame in change.frames(count)]
    assert colours == ["red"] * onset + ["green"] * (count - onset)


def test_path_clearance_is_the_nearest_approach_in_cells():
    assert path_clearance("at the top left", "at the top right", "on the left") == 1.0
    assert path_clearance("at the top left", "at the bottom right", "in the center") == 0.0
    assert path_clearance("at the top left", "at the bottom right", "at the top right") == 1.0
    # the path from (row, column) (0, 0) to (2, 1) passes (2/3, 1/3), a third of a cell from the left cell's centre
    assert path_clearance("at the top left", "at the bottom", "on the left") == pytest.approx(1 / 3)
    assert path_clearance("at the top left", "at the bottom", "at the bottom left") == pytest.approx(2 / 3)
    assert is_in_video_language("a small red circle moves from the top left to the top right and a large blue "
                                "square on the left")
    clips = [c for c in sample_clips(600, seed=1, split="all") if c.kind is ClipKind.MOTION and c.still is not None]
    clearances = [(path_clearance(c.first.position, c.last.position, c.still.position),
                   c.last.size == c.still.size == "large") for c in clips]
    assert all(clearance > 1 if both_large else clearance >= 1 for clearance, both_large in clearances)
    assert (1.0, False) in clearances and (2.0, True) in clearances


def test_split_keeps_heldout_keys_out_of_training():
    train = sample_clips(2000, seed=0, split="train")
    heldout = heldout_clips(150, seed=0)
    assert not any(c.is_heldout for c in train) and all(c.is_heldout for c in heldout)
    assert {c.kind for c in heldout} == set(ClipKind)
    assert not {c.key for c in train} & {c.key for c in heldout}


def _valid_keys(kind: ClipKind) -> list[tuple]:
    if kind is ClipKind.MOTION:
        return [(kind, s, a, b) for s, a, b in itertools.product(SHAPES, POSITIONS, POSITIONS) if a != b]
    if kind is ClipKind.APPEAR:
        return [(kind, *parts) for parts in itertools.product(COLORS, SHAPES, POSITIONS)]
    return [(kind, a, b) for a, b in itertools.product(COLORS, COLORS) if a != b]


@pytest.mark.parametrize("kind", list(ClipKind))
def test_every_heldout_key_less_any_part_occurs_in_training(kind):
    keys = _valid_keys(kind)
    held = [k for k in keys if is_heldout_key(k)]
    assert 0.08 <= len(held) / len(keys) <= 0.15
    trained = [k for k in keys if not is_heldout_key(k)]
    for key in held:
        for dropped in range(1, len(key)):
            rest = key[:dropped] + key[dropped + 1:]
            assert any(k[:dropped] + k[dropped + 1:] == rest for k in trained), (key, dropped)


def test_prompts_fit_the_text_padding_with_the_clip_words():
    # the longest form: a motion between two-word places (13 words), a still object with a two-word place
    # (9 with "and") and a background (4)
    longest = ("a large purple triangle moves from the bottom right to the bottom left and a small yellow square at "
               "the top right on a black background")
    assert is_in_video_language(longest) and len(longest.split()) == 26
    prompts = [c.to_prompt() for c in sample_clips(1000, seed=2, split="all")]
    assert max(len(p.split()) for p in prompts) == 26
    assert {word for p in prompts for word in p.split()} == set(vocabulary()) | set(VIDEO_WORDS)
    t5, clip = build_t5_tokenizer(VIDEO_WORDS), build_clip_tokenizer(VIDEO_WORDS)
    assert len(t5(longest).input_ids) == 27 and len(clip(longest).input_ids) == 28  # one token a word
