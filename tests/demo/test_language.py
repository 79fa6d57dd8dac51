import pytest

from ditserve.demo import heldout_prompts, is_in_language, parse_prompt, sample_prompts
from ditserve.demo.language import COLORS, PromptOutsideLanguageError, Scene, is_heldout_triple, sample_scenes
from ditserve.errors import InvalidParameterError


def test_parses_objects_and_background():
    scene = parse_prompt("a small red circle at the bottom right and a large black square at the bottom on a blue background")
    assert [(o.size, o.color, o.shape, o.position) for o in scene.objects] == [
        ("small", "red", "circle", "at the bottom right"),
        ("large", "black", "square", "at the bottom"),
    ]
    assert scene.background == "blue"
    assert parse_prompt("a large green triangle in the center").background_color == "white"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle in the center",  # no size
        "a small red circle in the middle",  # unknown position
        "A small red circle in the center",  # case matters
        "a small red circle in the center ",  # trailing space
        "a small red circle in the center and a small blue square on the left and a small green square on the right"
        " and a small black circle at the top",  # four objects
        "a small red circle in the center and a large red square on the left",  # repeated colour
        "a small red circle in the center and a large blue square in the center",  # repeated position
        "a small red circle in the center on a red background",  # object has the background colour
        "a small white circle in the center",  # white object on the implicit white background
    ],
)
def test_rejects_text_outside_language(text):
    assert not is_in_language(text)
    with pytest.raises(PromptOutsideLanguageError):
        parse_prompt(text)


def test_error_is_an_invalid_parameter_naming_the_field():
    with pytest.raises(InvalidParameterError, match="POSITION") as info:
        parse_prompt("a small red circle somewhere")
    assert isinstance(info.value, ValueError) and info.value.param == "prompt"


def test_sampler_obeys_rules_and_is_reproducible():
    prompts = sample_prompts(400, seed=5, split="all")
    assert prompts == sample_prompts(400, seed=5, split="all")
    assert prompts != sample_prompts(400, seed=6, split="all")
    scenes = [parse_prompt(p) for p in prompts]  # raises if any rule is broken
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == {None, *COLORS}
    assert all(parse_prompt(p).to_prompt() == p for p in prompts)


def test_heldout_split_is_disjoint_from_training():
    train = sample_scenes(500, seed=1, split="train")
    assert not any(o.is_heldout for s in train for o in s.objects)
    held = heldout_prompts(50, seed=0)
    assert held == heldout_prompts(50, seed=0)
    assert all(parse_prompt(p).is_heldout for p in held)


def test_each_colour_shape_pair_loses_exactly_one_position():
    from ditserve.demo.language import POSITIONS, SHAPES

    for color in COLORS:
        for shape in SHAPES:
            assert sum(is_heldout_triple(color, shape, p) for p in POSITIONS) == 1


def test_bad_split_is_rejected():
    with pytest.raises(InvalidParameterError, match="split"):
        sample_prompts(1, seed=0, split="test")
    assert isinstance(parse_prompt("a small red circle in the center"), Scene)
