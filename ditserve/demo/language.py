"""The prompt language of the demo model ``ditserve-shapes``: grammar, parser, sampler and held-out split.

::

    prompt   := object (" and " object){0,2} [" on a " COLOR " background"]
    object   := "a " SIZE " " COLOR " " SHAPE " " POSITION

Objects of one prompt have distinct positions and distinct colours, none has the background's colour, and a
prompt without a background phrase has a white background.

Held-out split: for every (colour, shape) pair exactly one of the nine positions is never shown in training
(24 of the 216 colour-shape-position triples). Held-out prompts contain at least one such object, so they
measure whether the model composes attributes it has only seen separately.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from ditserve.errors import InvalidParameterError

SIZES: tuple[str, ...] = ("small", "large")
# A size word the base model never saw, taught by the demo LoRA (``lora_train.py``): half way between small and
# large. It is kept out of SIZES (and so out of ``vocabulary()``, the tokenizers, the samplers and the held-out
# prompts), so every base-model prompt, picture and evaluation figure stays what it was. A size, not a colour:
# the frozen VAE decodes every colour outside the palette into a palette colour, but draws any size.
NEW_SIZE = "medium"
ALL_SIZES: tuple[str, ...] = (*SIZES, NEW_SIZE)
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# The base tokenizers spell the new word letter by letter (7 T5 tokens instead of 1), so a new-size prompt keeps
# to one such object among at most this many, which fits the 32-token text padding untruncated.
NEW_SIZE_MAX_OBJECTS = 2
POSITIONS: tuple[str, ...] = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
DEFAULT_BACKGROUND = "white"
MAX_OBJECTS = 3

Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "heldout", "all")


class PromptOutsideLanguageError(InvalidParameterError):
    """The prompt is not a sentence of the demo model's language (or breaks one of its rules)."""


@dataclass(frozen=True)
class ShapeObject:
    size: str
    color: str
    shape: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position}"

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the object's cell in the 3x3 grid."""
        return divmod(POSITIONS.index(self.position), 3)

    @property
    def is_heldout(self) -> bool:
        return is_heldout_triple(self.color, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    """A parsed prompt. ``background`` is None when the prompt has no background phrase (then it is white)."""

    objects: tuple[ShapeObject, ...]
    background: str | None = None

    @property
    def background_color(self) -> str:
        return self.background or DEFAULT_BACKGROUND

    def to_prompt(self) -> str:
        text = " and ".join(obj.phrase() for obj in self.objects)
        if self.background is not None:
            text += f" on a {self.background} background"
        return text

    @property
    def is_heldout(self) -> bool:
        return any(obj.is_heldout for obj in self.objects)


def is_heldout_triple(color: str, shape: str, position: str) -> bool:
    # The residue walks through all nine positions for a fixed (colour, shape), so each pair loses exactly one.
    return (COLORS.index(color) + 2 * SHAPES.index(shape) + POSITIONS.index(position)) % 9 == 4


def _alternation(words: tuple[str, ...]) -> str:
    # Longest first: "at the bottom right" must not be read as "at the bottom" followed by junk.
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


_OBJECT_PATTERN = (
    f"a ({_alternation(ALL_SIZES)}) ({_alternation(COLORS)}) ({_alternation(SHAPES)}) ({_alternation(POSITIONS)})"
)
_OBJECT_RE = re.compile(_OBJECT_PATTERN)
_PROMPT_RE = re.compile(
    f"(?P<objects>{_OBJECT_PATTERN}(?: and {_OBJECT_PATTERN}){{0,{MAX_OBJECTS - 1}}})"
    f"(?: on a (?P<background>{_alternation(COLORS)}) background)?"
)

_GRAMMAR_HELP = (
    'expected: object (" and " object){0,2} [" on a " COLOR " background"], object = "a " SIZE " " COLOR " " '
    f"SHAPE \" \" POSITION; SIZE in {list(ALL_SIZES)}, COLOR in {list(COLORS)}, SHAPE in {list(SHAPES)}, "
    f"POSITION in {list(POSITIONS)}"
)


def parse_prompt(text: str) -> Scene:
    """Parse ``text`` into a :class:`Scene`, or raise :class:`PromptOutsideLanguageError` saying why."""
    if not isinstance(text, str):
        raise PromptOutsideLanguageError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
    match = _PROMPT_RE.fullmatch(text)
    if match is None:
        raise PromptOutsideLanguageError(f"prompt {text!r} is outside the demo language; {_GRAMMAR_HELP}", param="prompt")
    objects = tuple(ShapeObject(*groups) for groups in _OBJECT_RE.findall(match.group("objects")))
    scene = Scene(objects=objects, background=match.group("background"))
    _check_rules(scene, text)
    return scene


def _check_rules(scene: Scene, text: str) -> None:
    positions = [obj.position for obj in scene.objects]
    colors = [obj.color for obj in scene.objects]
    if len(set(positions)) != len(positions):
        raise PromptOutsideLanguageError(f"prompt {text!r}: objects must have distinct positions, got {positions}", param="prompt")
    if len(set(colors)) != len(colors):
        raise PromptOutsideLanguageError(f"prompt {text!r}: objects must have distinct colours, got {colors}", param="prompt")
    if scene.background_color in colors:
        raise PromptOutsideLanguageError(
            f"prompt {text!r}: no object may have the background's colour {scene.background_color!r}", param="prompt"
        )


def is_in_language(text: str) -> bool:
    try:
        parse_prompt(text)
    except PromptOutsideLanguageError:
        return False
    return True


def _sample_any_scene(rng: random.Random) -> Scene:
    # Half of the prompts carry no background phrase, so both forms (implicit and explicit white) are learnt.
    background = rng.choice(COLORS) if rng.random() < 0.5 else None
    background_color = background or DEFAULT_BACKGROUND
    count = rng.randint(1, MAX_OBJECTS)
    positions = rng.sample(POSITIONS, count)
    colors = rng.sample([c for c in COLORS if c != background_color], count)
    objects = tuple(
        ShapeObject(rng.choice(SIZES), color, rng.choice(SHAPES), position)
        for color, position in zip(colors, positions, strict=True)
    )
    return Scene(objects=objects, background=background)


def _in_split(scene: Scene, split: Split) -> bool:
    if split == "train":
        return not scene.is_heldout
    if split == "heldout":
        return scene.is_heldout
    return True


def stage_seed(seed: int, stage: int, step: int) -> int:
    """One seed per (run seed, training stage, step): every stage draws its own data, and a resumed stage replays
    the batches an uninterrupted run would have seen."""
    return seed * 1_000_003 + stage * 100_003 + step


def sample_scenes(n: int, seed: int, split: Split = "train") -> list[Scene]:
    """``n`` random scenes of ``split`` ("train": no held-out object; "heldout": at least one; "all")."""
    if split not in SPLITS:
        raise InvalidParameterError(f"split must be one of {list(SPLITS)}, got {split!r}", param="split")
    if n < 0:
        raise InvalidParameterError(f"n must be >= 0, got {n}", param="n")
    rng = random.Random(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        # Rejection keeps each split's distribution the language's own, restricted to the split.
        scene = _sample_any_scene(rng)
        if _in_split(scene, split):
            scenes.append(scene)
    return scenes


def sample_prompts(n: int, seed: int, split: Split = "train") -> list[str]:
    """``n`` random prompts of ``split``, reproducible from ``seed``."""
    return [scene.to_prompt() for scene in sample_scenes(n, seed, split)]


def heldout_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """A fixed evaluation set: ``n`` prompts that each contain at least one never-trained object."""
    return sample_prompts(n, seed, split="heldout")


def sample_new_size_scenes(n: int, seed: int, split: Split = "train", pairs: float | None = None) -> list[Scene]:
    """``n`` random scenes of ``split`` with one NEW_SIZE object among 1 to NEW_SIZE_MAX_OBJECTS (the others of
    the base sizes), reproducible from ``seed``: the LoRA's training data and its evaluation set. ``pairs``: the
    share of scenes with two objects (None: as the base scenes fall, about a third, as in the evaluation set)."""
    if split not in SPLITS:
        raise InvalidParameterError(f"split must be one of {list(SPLITS)}, got {split!r}", param="split")
    if pairs is not None and not 0.0 <= pairs <= 1.0:
        raise InvalidParameterError(f"pairs must be in [0, 1], got {pairs}", param="new_size_pairs")
    rng = random.Random(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        base = _sample_any_scene(rng)
        if pairs is None:
            count = rng.randint(1, NEW_SIZE_MAX_OBJECTS)
        else:
            count = 1 + (rng.random() < pairs)
            while len(base.objects) < count:
                base = _sample_any_scene(rng)
        objects = list(base.objects[:count])
        slot = rng.randrange(len(objects))
        objects[slot] = ShapeObject(NEW_SIZE, objects[slot].color, objects[slot].shape, objects[slot].position)
        scene = Scene(objects=tuple(objects), background=base.background)
        if _in_split(scene, split):
            scenes.append(scene)
    return scenes


def new_size_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """A fixed evaluation set for the new size: ``n`` prompts with one NEW_SIZE object and at least one
    never-trained colour-shape-position triple."""
    return [scene.to_prompt() for scene in sample_new_size_scenes(n, seed, split="heldout")]


def vocabulary() -> list[str]:
    """Every word of the base language, in a stable order (the tokenizers are built from it; NEW_SIZE is not in
    it, as a word the base model never saw)."""
    words: list[str] = []
    phrases = ("a", "and", "on", "background", *SIZES, *COLORS, *SHAPES, *POSITIONS)
    for phrase in phrases:
        for word in phrase.split():
            if word not in words:
                words.append(word)
    return words
