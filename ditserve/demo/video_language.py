"""The clip language of the demo video data: short clips of the shapes language (``language.py``) in which one
object moves, appears or changes colour, optionally beside one object that stays as it is::

    clip    := event [" and " OBJECT] [" on a " COLOR " background"]
    event   := LOOKS " moves from the " PLACE " to the " PLACE       (motion)
             | LOOKS " appears " POSITION                             (appear)
             | OBJECT " turns " COLOR                                 (colour change)
    LOOKS   := "a " SIZE " " COLOR " " SHAPE
    OBJECT  := LOOKS " " POSITION                                     (an object of the shapes language)
    PLACE   := a position without its preposition: "top left", "center", "right", ... (edit_language.PLACES)

The event's object is the clip's *subject*. Rules: a motion's two places differ and a colour change's two colours
do; the still object has a position of its own and a colour that no other colour of the clip has; no object ever
has the background's colour (a clip without a background phrase has a white background); and the still object
keeps clear of a moving subject's path: the path comes no nearer to its cell than a neighbouring cell's centre,
and the two never touch on the way (two large objects, wider than a cell, may not pass each other as neighbours).

Frames (``Clip.frames(n)``): a moving subject's centre goes in a straight line at constant speed from its start
cell's centre (first frame) to its end cell's (last frame); an appearing subject is absent before frame
``event_onset(n)`` and there from it on; a colour change shows the old colour before that frame and the new one
from it on. The still object and the background never change.

Held-out split: each kind of clip has a key, the combination its event asks for (motion: shape, start and end
place; appear: colour, shape and position; colour change: old and new colour). A residue rule holds out about one
key in nine (colour change: one in seven), so that each held-out key's parts were all seen in training, only never
together. Training clips never have a held-out key.
"""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass, replace

from ditserve.demo.edit_language import PLACES
from ditserve.demo.language import (
    COLORS,
    DEFAULT_BACKGROUND,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ShapeObject,
    Split,
    _alternation,
)
from ditserve.demo.render import BOX_SIDE, cell_center
from ditserve.errors import InvalidParameterError

# The clip words the shapes language lacks, in the order they would join the tokenizers (as edit_language's
# EDIT_WORDS): with them, every word of a clip prompt is one token.
VIDEO_WORDS: tuple[str, ...] = ("moves", "from", "to", "appears", "turns")
# A clip needs a first and a last frame.
MIN_FRAMES = 2


class ClipKind(str, enum.Enum):
    MOTION = "motion"
    APPEAR = "appear"
    COLOR_CHANGE = "color_change"


class ClipOutsideLanguageError(InvalidParameterError):
    """The prompt is not a sentence of the clip language (or breaks one of its rules)."""


@dataclass(frozen=True)
class FrameObject:
    """One object of a clip as one frame shows it. ``object`` is what it looks like (a moving subject keeps the
    position word of its start); ``center`` is where its centre is, (x, y) in fractions of the side, between
    cells while it moves."""

    object: ShapeObject
    center: tuple[float, float]


@dataclass(frozen=True)
class FrameScene:
    """What one frame of a clip shows. ``objects`` lines up with the clip's objects (0: the subject, 1: the still
    object, if any), None while that object is not in the frame (a subject yet to appear)."""

    objects: tuple[FrameObject | None, ...]
    background: str | None = None

    @property
    def background_color(self) -> str:
        return self.background or DEFAULT_BACKGROUND


def event_onset(frames: int) -> int:
    """The first frame that shows an appearing subject, or a colour change's new colour: the first of the
    second half (for 9 and 17 frames also the first frame of a latent of Wan's 4x temporal VAE, so that no latent
    mixes the two states)."""
    return (frames + 1) // 2


@dataclass(frozen=True)
class Clip:
    """A clip prompt, parsed. ``first`` and ``last`` are the subject in the first and the last frame: a motion
    changes only its position, a colour change only its colour, and an appearing subject has no ``first``.
    ``still`` is the optional object that stays as it is; ``background`` is None when the prompt has no
    background phrase (then it is white). Building a clip that breaks a rule of the language raises
    :class:`ClipOutsideLanguageError`."""

    first: ShapeObject | None
    last: ShapeObject
    still: ShapeObject | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        why = _broken_rule(self)
        if why is not None:
            raise ClipOutsideLanguageError(why, param="prompt")

    @property
    def kind(self) -> ClipKind:
        if self.first is None:
            return ClipKind.APPEAR
        if self.first.position != self.last.position:
            return ClipKind.MOTION
        return ClipKind.COLOR_CHANGE

    @property
    def background_color(self) -> str:
        return self.background or DEFAULT_BACKGROUND

    def to_prompt(self) -> str:
        subject = self.last
        looks = f"a {subject.size} {subject.color} {subject.shape}"
        if self.kind is ClipKind.MOTION:
            text = f"{looks} moves from the {_place(self.first.position)} to the {_place(subject.position)}"
        elif self.kind is ClipKind.APPEAR:
            text = f"{looks} appears {subject.position}"
        else:
            text = f"{self.first.phrase()} turns {subject.color}"
        if self.still is not None:
            text += f" and {self.still.phrase()}"
        if self.background is not None:
            text += f" on a {self.background} background"
        return text

    @property
    def key(self) -> tuple:
        """The combination this clip's event asks for; the held-out split is decided on it."""
        if self.kind is ClipKind.MOTION:
            return (self.kind, self.last.shape, self.first.position, self.last.position)
        if self.kind is ClipKind.APPEAR:
            return (self.kind, self.last.color, self.last.shape, self.last.position)
        return (self.kind, self.first.color, self.last.color)

    @property
    def is_heldout(self) -> bool:
        return is_heldout_key(self.key)

    def frames(self, n: int) -> list[FrameScene]:
        """What each of ``n`` frames shows (at least MIN_FRAMES)."""
        if n < MIN_FRAMES:
            raise InvalidParameterError(f"a clip needs at least {MIN_FRAMES} frames, got {n}", param="frames")
        still = () if self.still is None else (FrameObject(self.still, cell_center(*self.still.cell)),)
        return [FrameScene((self._subject_in_frame(index, n), *still), self.background) for index in range(n)]

    def _subject_in_frame(self, index: int, n: int) -> FrameObject | None:
        if self.kind is ClipKind.MOTION:
            (x0, y0), (x1, y1) = cell_center(*self.first.cell), cell_center(*self.last.cell)
            progress = index / (n - 1)
            return FrameObject(self.first, (x0 + progress * (x1 - x0), y0 + progress * (y1 - y0)))
        before = index < event_onset(n)
        if self.kind is ClipKind.APPEAR:
            return None if before else FrameObject(self.last, cell_center(*self.last.cell))
        return FrameObject(self.first if before else self.last, cell_center(*self.last.cell))


def _place(position: str) -> str:
    return PLACES[POSITIONS.index(position)]


def path_clearance(start: str, end: str, position: str) -> float:
    """The least Chebyshev distance, in cells, between ``position``'s cell centre and the straight path from
    ``start``'s to ``end``'s (1: the path comes as near as a neighbouring cell, no nearer)."""
    (r0, c0), (r1, c1), (r, c) = (divmod(POSITIONS.index(p), 3) for p in (start, end, position))
    rows, cols, row_step, col_step = r0 - r, c0 - c, r1 - r0, c1 - c0
    # The distance is convex and piecewise linear along the path: its least value lies at an end or where one of
    # its terms changes slope.
    times = {0.0, 1.0}
    for offset, slope in ((rows, row_step), (cols, col_step), (rows - cols, row_step - col_step),
                          (rows + cols, row_step + col_step)):
        if slope:
            times.add(min(1.0, max(0.0, -offset / slope)))
    return min(max(abs(rows + t * row_step), abs(cols + t * col_step)) for t in times)


def _broken_rule(clip: Clip) -> str | None:
    """Why ``clip`` is outside the language, or None when it is inside."""
    first, last = clip.first, clip.last
    if first is not None:
        changed = [field for field in ("size", "shape", "color", "position") if getattr(first, field) != getattr(last, field)]
        if changed not in (["color"], ["position"]):
            return (f"the subject must change its position (motion) or its colour (colour change) and nothing else, "
                    f"it changes {changed or 'nothing'}")
    subject = [obj for obj in (first, last) if obj is not None]
    colors = {obj.color for obj in subject}
    if clip.still is not None:
        if clip.still.color in colors:
            return f"the still object's colour {clip.still.color!r} must differ from the subject's {sorted(colors)}"
        if clip.still.position in {obj.position for obj in subject}:
            return f"the still object's position {clip.still.position!r} must differ from the subject's"
        if first is not None and first.position != last.position:
            clearance = path_clearance(first.position, last.position, clip.still.position)
            # Two large boxes are wider than a cell: as neighbours they touch, so a large subject may not slide past
            # a large still object, which would join their outlines mid-way.
            touching = clearance / 3 <= (BOX_SIDE[last.size] + BOX_SIDE[clip.still.size]) / 2
            if clearance < 1 or touching:
                return (f"the still object {clip.still.position!r} lies on or beside the path from {first.position!r} "
                        f"to {last.position!r}; it must keep at least a cell away, and out of reach of the moving one")
        colors.add(clip.still.color)
    if clip.background_color in colors:
        return f"no object may have the background's colour {clip.background_color!r}"
    return None


def is_heldout_key(key: tuple) -> bool:
    # As in edit_language: each rule fixes every part but one and lets that one walk through its values, so every
    # combination of the other parts loses at most one value and every part is seen in training in other company.
    kind = key[0]
    if kind is ClipKind.MOTION:
        _, shape, start, end = key
        return (SHAPES.index(shape) + 2 * POSITIONS.index(start) + POSITIONS.index(end)) % 9 == 2
    if kind is ClipKind.APPEAR:
        _, color, shape, position = key
        # Not the shapes language's residue 4, so that the appear split holds out other triples than the images'.
        return (COLORS.index(color) + 2 * SHAPES.index(shape) + POSITIONS.index(position)) % 9 == 6
    _, old, new = key
    # Odd, so old == new (an even sum) is never the held-out one: each old colour loses exactly one new colour.
    return (COLORS.index(old) + COLORS.index(new)) % 8 == 5


_LOOKS = f"a (?P<size>{_alternation(SIZES)}) (?P<color>{_alternation(COLORS)}) (?P<shape>{_alternation(SHAPES)})"
_EVENTS: dict[ClipKind, str] = {
    ClipKind.MOTION: f"{_LOOKS} moves from the (?P<start>{_alternation(PLACES)}) to the (?P<end>{_alternation(PLACES)})",
    ClipKind.APPEAR: f"{_LOOKS} appears (?P<position>{_alternation(POSITIONS)})",
    ClipKind.COLOR_CHANGE: f"{_LOOKS} (?P<position>{_alternation(POSITIONS)}) turns (?P<new_color>{_alternation(COLORS)})",
}
_TAIL = (
    f"(?: and a (?P<still_size>{_alternation(SIZES)}) (?P<still_color>{_alternation(COLORS)}) "
    f"(?P<still_shape>{_alternation(SHAPES)}) (?P<still_position>{_alternation(POSITIONS)}))?"
    f"(?: on a (?P<background>{_alternation(COLORS)}) background)?"
)
_CLIP_RES: dict[ClipKind, re.Pattern] = {kind: re.compile(event + _TAIL) for kind, event in _EVENTS.items()}

_GRAMMAR_HELP = (
    "expected: event [' and ' OBJECT] [' on a ' COLOR ' background'], event = LOOKS ' moves from the ' PLACE ' to "
    "the ' PLACE | LOOKS ' appears ' POSITION | OBJECT ' turns ' COLOR, LOOKS = 'a ' SIZE ' ' COLOR ' ' SHAPE, "
    f"OBJECT = LOOKS ' ' POSITION; SIZE in {list(SIZES)}, COLOR in {list(COLORS)}, SHAPE in {list(SHAPES)}, "
    f"POSITION in {list(POSITIONS)}, PLACE in {list(PLACES)}"
)


def parse_video_prompt(text: str) -> Clip:
    """Parse ``text`` into a :class:`Clip`, or raise :class:`ClipOutsideLanguageError` saying why."""
    if not isinstance(text, str):
        raise ClipOutsideLanguageError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
    for kind, pattern in _CLIP_RES.items():
        match = pattern.fullmatch(text)
        if match is not None:
            return _clip_from_match(kind, match, text)
    raise ClipOutsideLanguageError(f"prompt {text!r} is outside the clip language; {_GRAMMAR_HELP}", param="prompt")


def _clip_from_match(kind: ClipKind, match: re.Match, text: str) -> Clip:
    looks = match.group("size", "color", "shape")
    if kind is ClipKind.MOTION:
        first = ShapeObject(*looks, POSITIONS[PLACES.index(match.group("start"))])
        last = replace(first, position=POSITIONS[PLACES.index(match.group("end"))])
    elif kind is ClipKind.APPEAR:
        first, last = None, ShapeObject(*looks, match.group("position"))
    else:
        first = ShapeObject(*looks, match.group("position"))
        last = replace(first, color=match.group("new_color"))
    still = None
    if match.group("still_size") is not None:
        still = ShapeObject(*match.group("still_size", "still_color", "still_shape", "still_position"))
    try:
        return Clip(first, last, still, match.group("background"))
    except ClipOutsideLanguageError as error:
        raise ClipOutsideLanguageError(f"prompt {text!r}: {error}", param="prompt") from None


def is_in_video_language(text: str) -> bool:
    try:
        parse_video_prompt(text)
    except ClipOutsideLanguageError:
        return False
    return True


def _draw_clip(kind: ClipKind, rng: random.Random) -> Clip | None:
    """A random clip of ``kind``, or None when the draw breaks a rule (the caller draws again)."""
    subject = ShapeObject(rng.choice(SIZES), rng.choice(COLORS), rng.choice(SHAPES), rng.choice(POSITIONS))
    if kind is ClipKind.MOTION:
        first, last = subject, replace(subject, position=rng.choice(POSITIONS))
    elif kind is ClipKind.APPEAR:
        first, last = None, subject
    else:
        first, last = subject, replace(subject, color=rng.choice(COLORS))
    still = None
    if rng.random() < 0.5:
        still = ShapeObject(rng.choice(SIZES), rng.choice(COLORS), rng.choice(SHAPES), rng.choice(POSITIONS))
    # Half of the prompts carry no background phrase, as in the shapes language.
    background = rng.choice(COLORS) if rng.random() < 0.5 else None
    try:
        return Clip(first, last, still, background)
    except ClipOutsideLanguageError:
        return None


def sample_clips(n: int, seed: int, split: Split = "train") -> list[Clip]:
    """``n`` random clips of ``split`` ("train": no held-out key; "heldout": a held-out key; "all"), the kind of
    each drawn uniformly, reproducible from ``seed``."""
    if split not in SPLITS:
        raise InvalidParameterError(f"split must be one of {list(SPLITS)}, got {split!r}", param="split")
    if n < 0:
        raise InvalidParameterError(f"n must be >= 0, got {n}", param="n")
    rng = random.Random(seed)
    kinds = list(ClipKind)
    clips: list[Clip] = []
    for _ in range(n):
        kind = rng.choice(kinds)
        # Rejection within the kind, so that every kind keeps its share whatever its rules and split reject, and
        # each split is the language's own distribution restricted to it.
        while True:
            clip = _draw_clip(kind, rng)
            if clip is not None and (split == "all" or clip.is_heldout == (split == "heldout")):
                clips.append(clip)
                break
    return clips


def heldout_clips(n: int = 64, seed: int = 0) -> list[Clip]:
    """The evaluation set: ``n`` clips whose key never occurs in training."""
    return sample_clips(n, seed, split="heldout")
