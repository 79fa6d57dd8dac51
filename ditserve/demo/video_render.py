"""Ground-truth renderer of the clip language (``video_language.py``): every frame of a batch of clips is laid out
as one ``render.Layout`` and drawn by one ``render.rasterize`` call, on any device.

Object slot j of every frame holds the clip's object j (0: the subject, 1: the still object), absent while it is
not in the frame; a moving subject's centre is the frame's interpolated one. Training jitter draws one offset per
clip and slot, the same in every frame, so an object shakes from clip to clip but never within a clip.
"""

from __future__ import annotations

import torch
from PIL import Image

from ditserve.demo.language import ALL_SIZES, COLORS, MAX_OBJECTS, SHAPES
from ditserve.demo.render import BOX_SIDE, Layout, check_jitter, rasterize, to_pil
from ditserve.demo.video_language import Clip, FrameObject, parse_video_prompt


def clip_layout(
    clips: list[Clip],
    frames: int,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    only_first: bool = False,
) -> Layout:
    """The layout of every frame of ``clips``, clip-major: clip b's frame f is entry b * frames + f. ``jitter`` and
    ``generator`` as in ``render.lay_out`` (the generator must live on ``device`` when jitter is used).
    ``only_first``: only the first of the ``frames`` of each clip (entry b is clip b's first frame)."""
    check_jitter(jitter)
    device = torch.device(device) if device is not None else torch.device("cpu")
    slots: list[tuple[float, ...]] = []
    backgrounds: list[int] = []
    kept = 1 if only_first else frames
    for clip in clips:
        for scene in clip.frames(frames)[:kept]:
            backgrounds.append(COLORS.index(scene.background_color))
            for slot in range(MAX_OBJECTS):
                placed = scene.objects[slot] if slot < len(scene.objects) else None
                slots.append(_ABSENT if placed is None else _slot_row(placed))
    # One float64 table holds the ids exactly; split into the layout's fields below.
    table = torch.tensor(slots, dtype=torch.float64).view(len(clips), kept, MAX_OBJECTS, len(_ABSENT)).to(device)
    center = table[..., :2].float()
    if jitter > 0:
        center = center + jitter * (torch.rand(len(clips), 1, MAX_OBJECTS, 2, generator=generator, device=device) * 2 - 1)
    table = table.flatten(0, 1)
    return Layout(
        center=center.flatten(0, 1),
        half=table[..., 2].float(),
        size=table[..., 3].long(),
        shape=table[..., 4].long(),
        color=table[..., 5].long(),
        present=table[..., 6].bool(),
        background=torch.tensor(backgrounds, dtype=torch.long, device=device),
    )


# x, y, half side, size id, shape id, colour id, present: a slot no object fills.
_ABSENT = (0.0, 0.0, 0.0, 0, 0, 0, 0)


def _slot_row(placed: FrameObject) -> tuple[float, ...]:
    obj = placed.object
    return (*placed.center, BOX_SIDE[obj.size] / 2, ALL_SIZES.index(obj.size), SHAPES.index(obj.shape),
            COLORS.index(obj.color), 1)


def render_clip_batch(
    clips: list[Clip],
    frames: int,
    size: int = 128,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Render clips to a float tensor (B, 3, frames, size, size) in [0, 1] on ``device``, the layout of video
    models' pixel input (see ``clip_layout`` for ``jitter`` and ``generator``)."""
    images = rasterize(clip_layout(clips, frames, jitter, generator, device), size)
    return images.view(len(clips), frames, 3, size, size).transpose(1, 2)


def to_pil_frames(videos: torch.Tensor) -> list[list[Image.Image]]:
    """Float (B, 3, F, H, W) in [0, 1] to one list of F PIL RGB images per clip."""
    return [to_pil(video.transpose(0, 1)) for video in videos]


def render_clip(prompt: str | Clip, frames: int, size: int = 128) -> list[Image.Image]:
    """The ground-truth frames of one clip prompt (no jitter)."""
    clip = parse_video_prompt(prompt) if isinstance(prompt, str) else prompt
    return to_pil_frames(render_clip_batch([clip], frames, size=size))[0]
