"""The instruction language of the edit demo model ``ditserve-shapes-edit``: an edit turns a source scene of the
shapes language (``language.py``) into a target scene, following one instruction::

    instruction := "make the " REF " " COLOR                  (recolour)
                 | "move the " REF " to the " PLACE           (move)
                 | "remove the " REF                          (remove)
                 | "add " OBJECT                               (add; OBJECT as in the shapes language)
                 | "change the background to " COLOR          (background)
    REF         := [SIZE " "] [COLOR " "] SHAPE                (must name exactly one object of the source)
    PLACE       := a position without its preposition: "top left", "center", "right", ...

Every edit keeps the scene inside the shapes language: objects keep distinct positions and colours, none has the
background's colour, and a scene keeps one to three objects. Everything the instruction does not name stays as
it was: the other objects (colour, shape, size, position, painting order) and the background.

Held-out split: each kind of edit has a key, the combination that the edit asks for (recolour: shape, old and new
colour; move: shape, old and new place; remove and add: the object's colour, shape and position; background: old
and new colour). A residue rule holds out about one key in eight or nine, so that each held-out key's parts were
all seen in training, only never together. Training edits never have a held-out key.
"""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass, replace

from ditserve.demo.language import (
    COLORS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    ShapeObject,
    Split,
    _alternation,
    sample_scenes,
)
from ditserve.errors import InvalidParameterError

# "at the top left" -> "top left": the destination of a move, after "to the".
PLACES: tuple[str, ...] = tuple(position.split(" ", 2)[2] for position in POSITIONS)
# The instruction words the shapes language lacks, in the order they join the tokenizers (model.py).
EDIT_WORDS: tuple[str, ...] = ("make", "move", "to", "remove", "add", "change")


class EditKind(str, enum.Enum):
    RECOLOR = "recolor"
    MOVE = "move"
    REMOVE = "remove"
    ADD = "add"
    BACKGROUND = "background"


class InstructionOutsideLanguageError(InvalidParameterError):
    """The instruction is not a sentence of the edit language, or does not apply to the source scene."""


@dataclass(frozen=True)
class Edit:
    """One edit: ``target`` is ``source`` with ``instruction`` applied. ``subject`` is the index, in the source's
    objects, of the object the instruction names (None for add and background)."""

    source: Scene
    kind: EditKind
    instruction: str
    target: Scene
    subject: int | None

    @property
    def key(self) -> tuple:
        """The combination this edit asks for; the held-out split is decided on it."""
        if self.kind is EditKind.RECOLOR:
            old = self.source.objects[self.subject]
            return (self.kind, old.shape, old.color, self.target.objects[self.subject].color)
        if self.kind is EditKind.MOVE:
            old = self.source.objects[self.subject]
            return (self.kind, old.shape, old.position, self.target.objects[self.subject].position)
        if self.kind is EditKind.REMOVE:
            old = self.source.objects[self.subject]
            return (self.kind, old.color, old.shape, old.position)
        if self.kind is EditKind.ADD:
            new = self.target.objects[-1]
            return (self.kind, new.color, new.shape, new.position)
        return (self.kind, self.source.background_color, self.target.background_color)

    @property
    def is_heldout(self) -> bool:
        return is_heldout_key(self.key)

    def target_slots(self) -> tuple[int, ...]:
        """For each object of the target, the source slot it comes from (an added object: the next free slot),
        so that an object the edit leaves alone is drawn at the same place, jitter included, in both pictures."""
        if self.kind is EditKind.REMOVE:
            return tuple(i for i in range(len(self.source.objects)) if i != self.subject)
        return tuple(range(len(self.target.objects)))


def is_heldout_key(key: tuple) -> bool:
    # Each rule fixes all parts but the last and lets the last walk through its values, so every combination of
    # the other parts loses (at most) one value of the last: every part is seen in training in other company.
    kind = key[0]
    if kind is EditKind.RECOLOR:
        _, shape, old, new = key
        return (SHAPES.index(shape) + 2 * COLORS.index(old) + COLORS.index(new)) % 8 == 5
    if kind is EditKind.MOVE:
        _, shape, old, new = key
        return (SHAPES.index(shape) + 2 * POSITIONS.index(old) + POSITIONS.index(new)) % 9 == 4
    if kind in (EditKind.REMOVE, EditKind.ADD):
        _, color, shape, position = key
        # Different residues for the two kinds (and from the image model's 4), so they hold out different triples.
        residue = 7 if kind is EditKind.REMOVE else 1
        return (COLORS.index(color) + 2 * SHAPES.index(shape) + POSITIONS.index(position)) % 9 == residue
    _, old, new = key
    return (COLORS.index(old) + COLORS.index(new)) % 8 == 3


def _references(scene: Scene, index: int) -> list[str]:
    """The REF phrases that name object ``index`` of ``scene`` and no other, shortest first."""
    obj = scene.objects[index]
    forms = [(obj.shape,), (obj.size, obj.shape), (obj.color, obj.shape), (obj.size, obj.color, obj.shape)]
    return [" ".join(form) for form in forms if sum(_matches(other, form) for other in scene.objects) == 1]


def _matches(obj: ShapeObject, form: tuple[str, ...]) -> bool:
    return all(word in (obj.size, obj.color, obj.shape) for word in form)


def _free_colors(scene: Scene) -> list[str]:
    taken = {o.color for o in scene.objects} | {scene.background_color}
    return [c for c in COLORS if c not in taken]


def _free_positions(scene: Scene) -> list[str]:
    taken = {o.position for o in scene.objects}
    return [p for p in POSITIONS if p not in taken]


def _replace_object(scene: Scene, index: int, obj: ShapeObject) -> Scene:
    objects = list(scene.objects)
    objects[index] = obj
    return replace(scene, objects=tuple(objects))


def _draw_edit(source: Scene, kind: EditKind, rng: random.Random) -> Edit | None:
    """A random edit of ``kind`` on ``source``, or None when the scene allows none of that kind."""
    count = len(source.objects)
    if kind in (EditKind.RECOLOR, EditKind.MOVE, EditKind.REMOVE):
        if kind is EditKind.REMOVE and count == 1:
            return None  # a scene keeps at least one object
        index = rng.randrange(count)
        obj = source.objects[index]
        reference = rng.choice(_references(source, index))
        if kind is EditKind.RECOLOR:
            color = rng.choice(_free_colors(source))
            target = _replace_object(source, index, replace(obj, color=color))
            return Edit(source, kind, f"make the {reference} {color}", target, index)
        if kind is EditKind.MOVE:
            position = rng.choice(_free_positions(source))
            target = _replace_object(source, index, replace(obj, position=position))
            return Edit(source, kind, f"move the {reference} to the {PLACES[POSITIONS.index(position)]}", target, index)
        target = replace(source, objects=source.objects[:index] + source.objects[index + 1:])
        return Edit(source, kind, f"remove the {reference}", target, index)
    if kind is EditKind.ADD:
        if count == MAX_OBJECTS:
            return None
        new = ShapeObject(rng.choice(SIZES), rng.choice(_free_colors(source)), rng.choice(SHAPES),
                          rng.choice(_free_positions(source)))
        # Painted last, as a later object of a prompt is.
        target = replace(source, objects=(*source.objects, new))
        return Edit(source, kind, f"add {new.phrase()}", target, None)
    background = rng.choice(_free_colors(source))
    return Edit(source, kind, f"change the background to {background}", replace(source, background=background), None)


def sample_edits(n: int, seed: int, split: Split = "train") -> list[Edit]:
    """``n`` random edits of ``split`` (kinds drawn uniformly, each on a random scene of the shapes language),
    reproducible from ``seed``."""
    if split not in SPLITS:
        raise InvalidParameterError(f"split must be one of {list(SPLITS)}, got {split!r}", param="split")
    if n < 0:
        raise InvalidParameterError(f"n must be >= 0, got {n}", param="n")
    rng = random.Random(seed)
    kinds = list(EditKind)
    edits: list[Edit] = []
    while len(edits) < n:
        # Rejection, as in language.sample_scenes: each split keeps the language's own distribution.
        source = sample_scenes(1, rng.getrandbits(62), split="all")[0]
        edit = _draw_edit(source, rng.choice(kinds), rng)
        if edit is not None and (split == "all" or edit.is_heldout == (split == "heldout")):
            edits.append(edit)
    return edits


def heldout_edits(n: int = 100, seed: int = 0) -> list[Edit]:
    """The evaluation set: ``n`` edits whose key never occurs in training."""
    return sample_edits(n, seed, split="heldout")


_REF = f"(?:({_alternation(SIZES)}) )?(?:({_alternation(COLORS)}) )?({_alternation(SHAPES)})"
_INSTRUCTIONS: dict[EditKind, re.Pattern] = {
    EditKind.RECOLOR: re.compile(f"make the {_REF} ({_alternation(COLORS)})"),
    EditKind.MOVE: re.compile(f"move the {_REF} to the ({_alternation(PLACES)})"),
    EditKind.REMOVE: re.compile(f"remove the {_REF}"),
    EditKind.ADD: re.compile(f"add a ({_alternation(SIZES)}) ({_alternation(COLORS)}) ({_alternation(SHAPES)}) "
                             f"({_alternation(POSITIONS)})"),
    EditKind.BACKGROUND: re.compile(f"change the background to ({_alternation(COLORS)})"),
}


def parse_instruction(instruction: str, source: Scene) -> Edit:
    """The edit ``instruction`` makes to ``source``, or :class:`InstructionOutsideLanguageError` saying why."""
    if not isinstance(instruction, str):
        raise InstructionOutsideLanguageError(f"instruction must be a string, got {type(instruction).__name__}",
                                              param="instruction")
    for kind, pattern in _INSTRUCTIONS.items():
        match = pattern.fullmatch(instruction)
        if match is not None:
            target, subject = _apply(kind, match.groups(), source, instruction)
            return Edit(source, kind, instruction, target, subject)
    raise InstructionOutsideLanguageError(
        f"instruction {instruction!r} is outside the edit language; expected 'make the REF COLOR', 'move the REF to "
        f"the PLACE', 'remove the REF', 'add OBJECT' or 'change the background to COLOR', REF = [SIZE] [COLOR] "
        f"SHAPE, PLACE in {list(PLACES)}", param="instruction")


def _apply(kind: EditKind, groups: tuple, source: Scene, instruction: str) -> tuple[Scene, int | None]:
    def fail(why: str) -> InstructionOutsideLanguageError:
        return InstructionOutsideLanguageError(f"instruction {instruction!r} on {source.to_prompt()!r}: {why}",
                                               param="instruction")

    if kind is EditKind.ADD:
        new = ShapeObject(*groups)
        if len(source.objects) == MAX_OBJECTS:
            raise fail(f"the scene already holds {MAX_OBJECTS} objects")
        if new.position not in _free_positions(source) or new.color not in _free_colors(source):
            raise fail("the new object needs a free position and a colour no other object or the background has")
        return replace(source, objects=(*source.objects, new)), None
    if kind is EditKind.BACKGROUND:
        if groups[0] not in _free_colors(source):
            raise fail("the new background must differ from the old one and from every object's colour")
        return replace(source, background=groups[0]), None
    form = tuple(word for word in groups[:3] if word is not None)
    named = [i for i, obj in enumerate(source.objects) if _matches(obj, form)]
    if len(named) != 1:
        raise fail(f"{' '.join(form)!r} must name exactly one object, it names {len(named)}")
    index = named[0]
    obj = source.objects[index]
    if kind is EditKind.RECOLOR:
        if groups[3] not in _free_colors(source):
            raise fail("the new colour must differ from every object's colour and the background's")
        return _replace_object(source, index, replace(obj, color=groups[3])), index
    if kind is EditKind.MOVE:
        position = POSITIONS[PLACES.index(groups[3])]
        if position not in _free_positions(source):
            raise fail(f"{position!r} is not free")
        return _replace_object(source, index, replace(obj, position=position)), index
    if len(source.objects) == 1:
        raise fail("a scene keeps at least one object")
    return replace(source, objects=source.objects[:index] + source.objects[index + 1:]), index
