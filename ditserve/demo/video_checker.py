"""Clip checker: does a clip show what its prompt says?

Every frame is read with the shapes checker (``checker.py``) against what ``Clip.frames`` says that frame shows:
each object in the frame is present with its colour, shape and size near where the frame places it (a moving
subject: near its interpolated centre), the background has its colour, and no cell that no object of the frame
reaches holds anything (so a subject that has not appeared yet must not be there). On top, the event is checked:

* motion: the subject, tracked as the largest region of its colour in the whole picture, must travel along the
  prompt's direction (start cell to end cell) by at least half the distance between the two cells from the first
  frame to the last, and end near the end cell;
* appear: the subject is absent from its cell in the first frame (no region of its colour, the cell empty) and
  there, right in colour, shape and size, in the last;
* colour change: in the first frame the subject has its old colour and not its new one, in the last the new and
  not the old.

A clip passes when its event does and every frame is right. Frames are read as 8-bit pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ditserve.demo.checker import (
    INNER_HALF,
    POSITION_TOLERANCE,
    ObjectScore,
    PromptScore,
    background_matches,
    filled_positions,
    find_region,
    label_colors,
    mean_of,
    pass_rates_by_kind,
    score_object,
)
from ditserve.demo.language import POSITIONS
from ditserve.demo.render import BOX_SIDE, MAX_JITTER, cell_center
from ditserve.demo.video_language import MIN_FRAMES, Clip, ClipKind, FrameObject, FrameScene
from ditserve.errors import InvalidParameterError

# The share of the start-to-end distance that the tracked subject must cover along the prompt's direction.
MIN_PROGRESS = 0.5
# The whole picture, as a search window: centre and half side.
WHOLE_PICTURE = ((0.5, 0.5), 0.5)


@dataclass(frozen=True)
class ClipScore:
    clip: Clip
    # one shapes-checker verdict per frame, against what Clip.frames says that frame shows
    frames: tuple[PromptScore, ...]
    # the event's own check (motion: the direction; appear and colour change: the first and the last frame)
    event_ok: bool

    @property
    def object_verdicts(self) -> list[ObjectScore]:
        return [verdict for frame in self.frames for verdict in frame.objects]

    @property
    def correct(self) -> bool:
        return self.event_ok and all(frame.correct for frame in self.frames)


def frame_labels(frames) -> np.ndarray:
    """The palette label (``checker.label_colors``) of every pixel of every frame, (F, H, W)."""
    pixels = _frames_uint8(frames)
    if pixels.shape[1] != pixels.shape[2]:
        raise InvalidParameterError(f"frames must be square, got {pixels.shape[2]}x{pixels.shape[1]}", param="frames")
    # A clip holds few distinct colours: each is labelled once, which gives every pixel the label it would get.
    codes = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    distinct, inverse = np.unique(codes, return_inverse=True)
    colors = np.stack([distinct >> 16, (distinct >> 8) & 255, distinct & 255], axis=-1).astype(np.float32)
    return label_colors(colors[None])[0][inverse].reshape(codes.shape)


def _frames_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) uint8 pixels of a list of pictures or of one (3, F, H, W) or (F, H, W, 3) tensor or array."""
    if isinstance(frames, (list, tuple)):
        pictures = [_picture_uint8(frame) for frame in frames]
        if len({picture.shape for picture in pictures}) != 1:
            raise InvalidParameterError("frames must be one or more pictures of one size", param="frames")
        return np.stack(pictures)
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        shape = tuple(frames.shape)
        if shape[3] == 3 and shape[1] == shape[2]:
            return _uint8(frames)
        if shape[0] == 3:
            return _uint8(frames).transpose(1, 2, 3, 0)
    raise InvalidParameterError(
        "frames must be a list of PIL images, (H, W, 3) arrays or (3, H, W) tensors, or one (3, F, H, W) or "
        f"(F, H, W, 3) tensor or array, got {type(frames).__name__} of shape {tuple(getattr(frames, 'shape', ()))}",
        param="frames",
    )


def _picture_uint8(picture) -> np.ndarray:
    if isinstance(picture, Image.Image):
        return np.asarray(picture.convert("RGB"))
    if isinstance(picture, torch.Tensor) and picture.ndim == 3 and picture.shape[0] == 3:
        return _uint8(picture).transpose(1, 2, 0)
    if isinstance(picture, np.ndarray) and picture.ndim == 3 and picture.shape[2] == 3:
        return _uint8(picture)
    raise InvalidParameterError(f"a frame must be a PIL image, an (H, W, 3) array or a (3, H, W) tensor, got "
                                f"{type(picture).__name__}", param="frames")


def _uint8(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """The values as 8-bit pixels: a float tensor holds [0, 1], arrays and other tensors 0..255, as for the shapes
    checker."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.float().clamp(0, 1) * 255 if values.is_floating_point() else values).numpy()
    return values if values.dtype == np.uint8 else np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _reaches(placed: FrameObject, position: str) -> bool:
    """Whether the object's box, jittered, may reach into the inner square of ``position``'s cell (its own cell,
    or a cell it passes over; never a neighbour's while it sits in its own)."""
    x, y = cell_center(*divmod(POSITIONS.index(position), 3))
    gap = max(abs(placed.center[0] - x), abs(placed.center[1] - y))
    return gap < BOX_SIDE[placed.object.size] / 2 + MAX_JITTER + INNER_HALF


def score_frame(labels: np.ndarray, scene: FrameScene) -> PromptScore:
    """The shapes checker's verdict on one labelled frame against what it should show: every object near its
    frame's centre, the background, and no object in a cell that no object of the frame reaches."""
    placed = [p for p in scene.objects if p is not None]
    reached = [position for position in POSITIONS if any(_reaches(p, position) for p in placed)]
    return PromptScore(
        objects=tuple(score_object(labels, p.object, p.center) for p in placed),
        background_ok=background_matches(labels, scene.background_color),
        extra_objects=len(filled_positions(labels, scene.background_color, skip=reached)),
    )


def _moves_as_told(first: np.ndarray, last: np.ndarray, clip: Clip) -> bool:
    """Motion: the subject travels along the prompt's direction by at least MIN_PROGRESS of the start-to-end
    distance, and ends near the end cell."""
    start, end = cell_center(*clip.first.cell), cell_center(*clip.last.cell)
    begin, finish = (find_region(labels, clip.first.color, *WHOLE_PICTURE) for labels in (first, last))
    if begin is None or finish is None:
        return False
    direction = (end[0] - start[0], end[1] - start[1])
    distance = math.hypot(*direction)
    moved = (finish.center[0] - begin.center[0], finish.center[1] - begin.center[1])
    progress = (moved[0] * direction[0] + moved[1] * direction[1]) / distance
    near_end = max(abs(finish.center[0] - end[0]), abs(finish.center[1] - end[1])) <= POSITION_TOLERANCE
    return progress >= MIN_PROGRESS * distance and near_end


def _cell_filled(labels: np.ndarray, position: str, background: str) -> bool:
    return bool(filled_positions(labels, background, skip=[p for p in POSITIONS if p != position]))


def _event_ok(labels: np.ndarray, clip: Clip) -> bool:
    first, last = labels[0], labels[-1]
    if clip.kind is ClipKind.MOTION:
        return _moves_as_told(first, last, clip)
    if clip.kind is ClipKind.APPEAR:
        absent = not score_object(first, clip.last).present and not _cell_filled(first, clip.last.position,
                                                                                  clip.background_color)
        return absent and score_object(last, clip.last).correct
    old_first, new_first, old_last, new_last = (score_object(frame, obj).present
                                                for frame in (first, last) for obj in (clip.first, clip.last))
    return old_first and not new_first and new_last and not old_last


def score_clip(frames, clip: Clip) -> ClipScore:
    """Score one clip's frames against it. ``frames``: a list of PIL images, (H, W, 3) arrays or (3, H, W)
    tensors, or one (3, F, H, W) or (F, H, W, 3) tensor or array, square, at least MIN_FRAMES of them; float
    tensors hold [0, 1] values, arrays and integer tensors 0..255, as for the shapes checker."""
    if not isinstance(clip, Clip):
        raise InvalidParameterError(f"clip must be a Clip, got {type(clip).__name__}", param="clip")
    labels = frame_labels(frames)
    if len(labels) < MIN_FRAMES:
        raise InvalidParameterError(f"a clip needs at least {MIN_FRAMES} frames, got {len(labels)}", param="frames")
    verdicts = tuple(score_frame(frame, scene) for frame, scene in zip(labels, clip.frames(len(labels)), strict=True))
    return ClipScore(clip, verdicts, _event_ok(labels, clip))


def evaluate_clips(clips_frames, clips: list[Clip]) -> dict[str, float]:
    """Aggregate figures of ``clips_frames`` (paired by index with ``clips``; a (B, 3, F, H, W) tensor will do):
    object accuracy over every object of every frame, frame accuracy, event accuracy, motion-direction accuracy,
    clip (prompt) accuracy, and the pass rate per kind of clip (NaN for a kind with no clip)."""
    if len(clips_frames) != len(clips):
        raise InvalidParameterError(f"clips_frames and clips must pair up, got {len(clips_frames)} and {len(clips)}",
                                    param="clips_frames")
    if not clips:
        raise InvalidParameterError("evaluate_clips needs at least one clip", param="clips")
    scores = [score_clip(frames, clip) for frames, clip in zip(clips_frames, clips, strict=True)]
    heldout = [s.correct for s in scores if s.clip.is_heldout]
    motion = [s.event_ok for s in scores if s.clip.kind is ClipKind.MOTION]
    figures = {
        "clips": len(scores),
        "object_accuracy": mean_of(v.correct for s in scores for v in s.object_verdicts),
        "frame_accuracy": mean_of(frame.correct for s in scores for frame in s.frames),
        "event_accuracy": mean_of(s.event_ok for s in scores),
        "motion_direction_accuracy": mean_of(motion) if motion else float("nan"),
        "prompt_accuracy": mean_of(s.correct for s in scores),
        "heldout_prompt_accuracy": mean_of(heldout) if heldout else float("nan"),
    }
    figures.update(pass_rates_by_kind(((s.clip.kind, s.correct) for s in scores), ClipKind, "clips"))
    return figures
