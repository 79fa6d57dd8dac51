"""Edit checker: did the edited picture apply the instruction, and keep everything else?

The picture is read with the shapes checker (``checker.py``) against the edit's *target* scene, and the verdict is
split in two parts:

* applied: what the instruction names is right. Recolour and add: that object is present with its colour, shape
  and size. Move: that, and its old cell is empty. Remove: its cell is empty. Background: the colour is right.
* kept: every other object of the target is present with its colour, shape and size at its place, the background
  is right (unless it was the edit), and no other cell holds an object.

An edit passes when both hold, which is exactly the target scene read as correct by the shapes checker. An
unedited picture (the input returned as it was) fails every kind of edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ditserve.demo.checker import (
    PromptScore,
    extra_positions,
    label_image,
    mean_of,
    pass_rates_by_kind,
    score,
)
from ditserve.demo.edit_language import Edit, EditKind
from ditserve.errors import InvalidParameterError


@dataclass(frozen=True)
class EditScore:
    edit: Edit
    target: PromptScore
    # the target's empty positions that the picture fills
    extra: tuple[str, ...]

    def _edited_object(self) -> int | None:
        """Index in the target's objects of the object the instruction draws (None: it draws none)."""
        if self.edit.kind in (EditKind.RECOLOR, EditKind.MOVE):
            return self.edit.subject
        if self.edit.kind is EditKind.ADD:
            return len(self.edit.target.objects) - 1
        return None

    def _vacated(self) -> str | None:
        """The position the edit empties (move, remove), which must hold no object."""
        if self.edit.kind in (EditKind.MOVE, EditKind.REMOVE):
            return self.edit.source.objects[self.edit.subject].position
        return None

    @property
    def applied(self) -> bool:
        edited = self._edited_object()
        if edited is not None and not self.target.objects[edited].correct:
            return False
        if self.edit.kind is EditKind.BACKGROUND and not self.target.background_ok:
            return False
        return self._vacated() not in self.extra

    @property
    def kept(self) -> bool:
        edited = self._edited_object()
        others = [o for i, o in enumerate(self.target.objects) if i != edited]
        background_kept = self.edit.kind is EditKind.BACKGROUND or self.target.background_ok
        return all(o.correct for o in others) and background_kept and set(self.extra) <= {self._vacated()}

    @property
    def correct(self) -> bool:
        return self.applied and self.kept


def score_edit(image: Image.Image | np.ndarray | torch.Tensor, edit: Edit) -> EditScore:
    """Score one edited picture (square) against its edit."""
    if not isinstance(edit, Edit):
        raise InvalidParameterError(f"edit must be an Edit, got {type(edit).__name__}", param="edit")
    return EditScore(edit, score(image, edit.target), tuple(extra_positions(label_image(image), edit.target)))


def evaluate_edits(images: list, edits: list[Edit]) -> dict[str, float]:
    """Aggregate figures of ``images`` (paired by index with ``edits``): the pass rate, its two parts, and the
    pass rate per kind of edit (NaN for a kind with no edit)."""
    if len(images) != len(edits):
        raise InvalidParameterError(f"images and edits must pair up, got {len(images)} and {len(edits)}", param="images")
    if not images:
        raise InvalidParameterError("evaluate_edits needs at least one image", param="images")
    scores = [score_edit(image, edit) for image, edit in zip(images, edits, strict=True)]
    figures = {
        "edits": len(scores),
        "pass_rate": mean_of(s.correct for s in scores),
        "applied_rate": mean_of(s.applied for s in scores),
        "kept_rate": mean_of(s.kept for s in scores),
    }
    figures.update(pass_rates_by_kind(((s.edit.kind, s.correct) for s in scores), EditKind, "edits"))
    return figures
