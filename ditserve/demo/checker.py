"""Adherence checker: does an image show what its prompt says?

Every pixel is labelled with its nearest palette colour. For each object of the prompt the checker looks, near
the object's cell, for the largest connected region of the object's colour, then judges:

* present (colour + position): the region is big enough and centred near the cell's centre;
* size: the region's box side (every shape is as tall and as wide as its box) against the small/large cut,
  or for the LoRA's medium size the band half way to either;
* shape: how much of its bounding box the region fills (square 1, disc pi/4, triangle 1/2), and for the
  triangle that its mass sits low (apex up).

A prompt is correct when every object is, the background has the right colour, and no empty cell holds an
extra object.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ditserve.demo.language import (
    ALL_SIZES,
    COLORS,
    NEW_SIZE,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    parse_prompt,
)
from ditserve.demo.render import BOX_SIDE, MAX_JITTER, PALETTE, cell_center
from ditserve.errors import InvalidParameterError

# Half side of the search window around a cell centre: a large object (0.17) plus full jitter plus slack.
SEARCH_HALF = BOX_SIDE["large"] / 2 + MAX_JITTER + 0.03
# A region's bounding-box centre may sit this far from its cell centre (jitter plus slack).
POSITION_TOLERANCE = MAX_JITTER + 0.06
# Smallest region accepted as an object: 40 % of the smallest shape (small triangle, 0.02 S^2).
MIN_AREA = 0.4 * BOX_SIDE["small"] ** 2 / 2
SIZE_CUT = (BOX_SIDE["small"] + BOX_SIDE["large"]) / 2
# A NEW_SIZE object's box side must lie half way or less from its own to either base size's. Only prompts with
# the new size are judged by this band; base-size objects keep the single cut above, so base figures stay as
# they were.
NEW_SIZE_BAND = (
    (BOX_SIDE["small"] + BOX_SIDE[NEW_SIZE]) / 2,
    (BOX_SIDE[NEW_SIZE] + BOX_SIDE["large"]) / 2,
)
# Fill of the bounding box: square 1.0, disc 0.785, triangle 0.5; cuts half way.
SQUARE_FILL_CUT = 0.89
DISC_FILL_CUT = 0.64
# A triangle's centroid is 2/3 of the way down its box; a disc's or square's is half way.
APEX_UP_CUT = 0.58
# Pixels farther than this (RGB distance) from every palette colour are left unlabelled.
MAX_COLOR_DISTANCE = 90.0
# An empty cell's inner square (that no neighbour reaches) may hold this fraction of non-background pixels.
INNER_HALF = BOX_SIDE["small"] / 2
MAX_FOREIGN_FRACTION = 0.3

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass(frozen=True)
class ObjectScore:
    object: ShapeObject
    present: bool
    shape_ok: bool
    size_ok: bool

    @property
    def correct(self) -> bool:
        return self.present and self.shape_ok and self.size_ok


@dataclass(frozen=True)
class PromptScore:
    objects: tuple[ObjectScore, ...]
    background_ok: bool
    extra_objects: int

    @property
    def object_accuracy(self) -> float:
        return sum(o.correct for o in self.objects) / len(self.objects)

    @property
    def correct(self) -> bool:
        return all(o.correct for o in self.objects) and self.background_ok and self.extra_objects == 0


def _to_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """RGB uint8-valued float array (H, W, 3) from a PIL image, an HWC uint8 array or a CHW tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise InvalidParameterError(f"image tensor must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}", param="image")
        return image.detach().float().clamp(0, 1).mul(255).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        return image.astype(np.float32)
    raise InvalidParameterError(
        f"image must be a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor, got {type(image).__name__}",
        param="image",
    )


def label_colors(pixels: np.ndarray) -> np.ndarray:
    """Index into COLORS of each pixel's nearest palette colour; -1 where none is near."""
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE_ARRAY[None, None], axis=-1)
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > MAX_COLOR_DISTANCE] = -1
    return labels


def label_image(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """``label_colors`` of a square picture."""
    pixels = _to_array(image)
    if pixels.shape[0] != pixels.shape[1]:
        raise InvalidParameterError(f"image must be square, got {pixels.shape[1]}x{pixels.shape[0]}", param="image")
    return label_colors(pixels)


def _window(center: tuple[float, float], half: float, side: int) -> tuple[slice, slice]:
    cx, cy = center
    x0, x1 = max(0, round((cx - half) * side)), min(side, round((cx + half) * side))
    y0, y1 = max(0, round((cy - half) * side)), min(side, round((cy + half) * side))
    return slice(y0, y1), slice(x0, x1)


@dataclass(frozen=True, eq=False)
class Region:
    """A connected region of one colour: the row and column of each of its pixels in a side x side picture."""

    rows: np.ndarray
    cols: np.ndarray
    side: int

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of its bounding box's centre, in fractions of the side."""
        return ((self.cols.min() + self.cols.max() + 1) / 2 / self.side,
                (self.rows.min() + self.rows.max() + 1) / 2 / self.side)

    @property
    def box_side(self) -> float:
        """Mean of its bounding box's height and width, in fractions of the side."""
        return ((self.rows.max() - self.rows.min() + 1) + (self.cols.max() - self.cols.min() + 1)) / 2 / self.side

    def classify_shape(self) -> str:
        height = self.rows.max() - self.rows.min() + 1
        width = self.cols.max() - self.cols.min() + 1
        fill = self.rows.size / (height * width)
        if fill > SQUARE_FILL_CUT:
            return "square"
        if fill > DISC_FILL_CUT:
            return "circle"
        centroid_depth = (self.rows.mean() - self.rows.min() + 0.5) / height
        return "triangle" if centroid_depth > APEX_UP_CUT else "unknown"


def find_region(labels: np.ndarray, color: str, center: tuple[float, float], half: float = SEARCH_HALF) -> Region | None:
    """The largest connected region of ``color`` in the square window of half side ``half`` around ``center``
    (fractions of the side), or None when there is none of at least MIN_AREA."""
    side = labels.shape[0]
    window = _window(center, half, side)
    mask = labels[window] == COLORS.index(color)
    regions, count = ndimage.label(mask)
    if count == 0:
        return None
    areas = ndimage.sum_labels(mask, regions, index=np.arange(1, count + 1))
    largest = int(np.argmax(areas))
    if areas[largest] < MIN_AREA * side * side:
        return None
    rows, cols = np.nonzero(regions == largest + 1)
    return Region(rows + window[0].start, cols + window[1].start, side)


def score_object(labels: np.ndarray, obj: ShapeObject, center: tuple[float, float] | None = None) -> ObjectScore:
    """Judge one object of the prompt in a labelled picture. ``center`` is where the object should be (x, y in
    fractions of the side): its cell's centre unless given (a frame of a clip may place it between cells)."""
    center = cell_center(*obj.cell) if center is None else center
    region = find_region(labels, obj.color, center)
    if region is None:
        return ObjectScore(obj, present=False, shape_ok=False, size_ok=False)
    box_x, box_y = region.center
    if max(abs(box_x - center[0]), abs(box_y - center[1])) > POSITION_TOLERANCE:
        return ObjectScore(obj, present=False, shape_ok=False, size_ok=False)
    if obj.size == NEW_SIZE:
        size_ok = NEW_SIZE_BAND[0] < region.box_side <= NEW_SIZE_BAND[1]
    else:
        size_ok = ("large" if region.box_side > SIZE_CUT else "small") == obj.size
    return ObjectScore(obj, present=True, shape_ok=region.classify_shape() == obj.shape, size_ok=size_ok)


def filled_positions(labels: np.ndarray, background: str, skip: Iterable[str] = ()) -> list[str]:
    """The positions, other than ``skip``, whose inner square (that no neighbour reaches) is mostly not the
    ``background`` colour."""
    skip = set(skip)
    background_index = COLORS.index(background)
    filled = []
    for index, position in enumerate(POSITIONS):
        if position in skip:
            continue
        inner = labels[_window(cell_center(*divmod(index, 3)), INNER_HALF, labels.shape[0])]
        if (inner != background_index).mean() > MAX_FOREIGN_FRACTION:
            filled.append(position)
    return filled


def extra_positions(labels: np.ndarray, scene: Scene) -> list[str]:
    """The positions the scene leaves empty that hold something: an object the prompt does not have."""
    return filled_positions(labels, scene.background_color, skip=(obj.position for obj in scene.objects))


def background_matches(labels: np.ndarray, background: str) -> bool:
    """Whether ``background`` is the picture's most common palette colour."""
    known = labels[labels >= 0]
    dominant = int(np.bincount(known, minlength=len(COLORS)).argmax()) if known.size else -1
    return dominant == COLORS.index(background)


def score(image: Image.Image | np.ndarray | torch.Tensor, prompt: str | Scene) -> PromptScore:
    """Score one square image against its prompt."""
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    labels = label_image(image)
    return PromptScore(
        objects=tuple(score_object(labels, obj) for obj in scene.objects),
        background_ok=background_matches(labels, scene.background_color),
        extra_objects=len(extra_positions(labels, scene)),
    )


def evaluate(images: list, prompts: list[str | Scene]) -> dict[str, float]:
    """Aggregate adherence of ``images`` to ``prompts`` (same length, paired by index)."""
    if len(images) != len(prompts):
        raise InvalidParameterError(f"images and prompts must pair up, got {len(images)} and {len(prompts)}", param="images")
    if not images:
        raise InvalidParameterError("evaluate needs at least one image", param="images")
    scores = [score(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    objects = [o for s in scores for o in s.objects]
    heldout = [o for o in objects if o.object.is_heldout]
    return {
        "prompts": len(scores),
        "objects": len(objects),
        "object_accuracy": mean_of(o.correct for o in objects),
        "prompt_accuracy": mean_of(s.correct for s in scores),
        "present_accuracy": mean_of(o.present for o in objects),
        "shape_accuracy": mean_of(o.shape_ok for o in objects),
        "size_accuracy": mean_of(o.size_ok for o in objects),
        "background_accuracy": mean_of(s.background_ok for s in scores),
        "extra_object_rate": mean_of(s.extra_objects > 0 for s in scores),
        "heldout_object_accuracy": mean_of(o.correct for o in heldout) if heldout else float("nan"),
        **_accuracy_by_kind(objects),
    }


def kind_accuracy_key(size: str, shape: str) -> str:
    """The key of one size-and-shape accuracy in ``evaluate``'s figures, e.g. ``small_triangle_accuracy``."""
    return f"{size}_{shape}_accuracy"


def _accuracy_by_kind(objects: list[ObjectScore]) -> dict[str, float]:
    """Object accuracy per size and shape (``small_triangle_accuracy``, ...), NaN for a kind with no object:
    where the misses are."""
    figures = {}
    for size in ALL_SIZES:
        for shape in SHAPES:
            kind = [o.correct for o in objects if (o.object.size, o.object.shape) == (size, shape)]
            figures[kind_accuracy_key(size, shape)] = mean_of(kind) if kind else float("nan")
    return figures


def mean_of(values: Iterable) -> float:
    """The mean of numbers or truth values (the share of true ones)."""
    values = list(values)
    return float(sum(values)) / len(values)


def pass_rates_by_kind(verdicts: Iterable[tuple[enum.Enum, bool]], kinds: Iterable[enum.Enum], unit: str) -> dict[str, float]:
    """``<kind>_pass_rate`` (NaN where a kind has none) and ``<kind>_<unit>`` (how many) for every kind, from
    (kind, correct) pairs."""
    verdicts = list(verdicts)
    figures: dict[str, float] = {}
    for kind in kinds:
        of_kind = [correct for k, correct in verdicts if k is kind]
        figures[f"{kind.value}_pass_rate"] = mean_of(of_kind) if of_kind else float("nan")
        figures[f"{kind.value}_{unit}"] = len(of_kind)
    return figures
