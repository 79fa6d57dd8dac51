"""Ground-truth renderer of the demo language: batched torch rasterisation, on any device.

Geometry is in fractions of the image side S: an object's centre is its 3x3 cell's centre (training may jitter
it by up to ``MAX_JITTER``), a small object fits a box of side 0.20 S, a large one 0.34 S. Shapes are drawn
2x supersampled and averaged, so edges are anti-aliased like those of a decoded image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ditserve.demo.language import ALL_SIZES, COLORS, MAX_OBJECTS, NEW_SIZE, SHAPES, Scene, parse_prompt
from ditserve.errors import InvalidParameterError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# NEW_SIZE, the LoRA's word, sits half way between the base sizes.
BOX_SIDE: dict[str, float] = {"small": 0.20, "large": 0.34, NEW_SIZE: 0.27}
MAX_JITTER = 0.04
SUPERSAMPLING = 2


def cell_center(row: int, column: int) -> tuple[float, float]:
    """(x, y) of a grid cell's centre, in fractions of the image side."""
    return (column + 0.5) / 3.0, (row + 0.5) / 3.0


def _palette_tensor(device: torch.device) -> torch.Tensor:
    return torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32, device=device) / 255.0


def check_jitter(jitter: float) -> None:
    """Refuse a training jitter outside [0, MAX_JITTER] (the checker's tolerances allow no more)."""
    if not 0.0 <= jitter <= MAX_JITTER:
        raise InvalidParameterError(f"jitter must be in [0, {MAX_JITTER}], got {jitter}", param="jitter")


@dataclass(frozen=True)
class Layout:
    """Where every object slot of a batch of scenes lands: per scene and slot (padded to MAX_OBJECTS) its centre
    (jitter applied), half side, size, shape and colour ids and presence, and each scene's background id."""

    center: torch.Tensor  # (B, MAX_OBJECTS, 2) float, (x, y) in fractions of the side
    half: torch.Tensor  # (B, MAX_OBJECTS) float
    size: torch.Tensor  # (B, MAX_OBJECTS) long, index into ALL_SIZES
    shape: torch.Tensor  # (B, MAX_OBJECTS) long, index into SHAPES
    color: torch.Tensor  # (B, MAX_OBJECTS) long, index into COLORS
    present: torch.Tensor  # (B, MAX_OBJECTS) bool
    background: torch.Tensor  # (B,) long, index into COLORS

    def masks(self, side: int) -> torch.Tensor:
        """Boolean (B, MAX_OBJECTS, side, side) coverage of every slot, sampled at the centres of a side x side
        pixel grid."""
        coords = (torch.arange(side, device=self.center.device, dtype=torch.float32) + 0.5) / side
        return _shape_masks(coords[None, :], coords[:, None], self.center, self.half, self.shape) & self.present[..., None, None]


def lay_out(
    scenes: list[Scene],
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Layout:
    """Place the scenes' objects. ``jitter`` moves each object's centre uniformly by up to that fraction of the
    side in x and y (training only; at most MAX_JITTER). ``generator`` must live on ``device`` when jitter is
    used."""
    check_jitter(jitter)
    device = torch.device(device) if device is not None else torch.device("cpu")
    count = len(scenes)
    center = torch.zeros(count, MAX_OBJECTS, 2)
    half = torch.zeros(count, MAX_OBJECTS)
    size, shape, color = (torch.zeros(count, MAX_OBJECTS, dtype=torch.long) for _ in range(3))
    present = torch.zeros(count, MAX_OBJECTS, dtype=torch.bool)
    background = torch.zeros(count, dtype=torch.long)
    for i, scene in enumerate(scenes):
        background[i] = COLORS.index(scene.background_color)
        for j, obj in enumerate(scene.objects):
            center[i, j] = torch.tensor(cell_center(*obj.cell))
            half[i, j] = BOX_SIDE[obj.size] / 2
            size[i, j] = ALL_SIZES.index(obj.size)
            shape[i, j] = SHAPES.index(obj.shape)
            color[i, j] = COLORS.index(obj.color)
            present[i, j] = True
    center = center.to(device)
    if jitter > 0:
        offsets = torch.rand(center.shape, generator=generator, device=device) * 2 - 1
        center = center + jitter * offsets
    return Layout(center, half.to(device), size.to(device), shape.to(device), color.to(device), present.to(device),
                  background.to(device))


def _shape_masks(x: torch.Tensor, y: torch.Tensor, center: torch.Tensor, half: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Boolean (B, MAX_OBJECTS, H, W) coverage of every object slot, for pixel coordinates ``x``, ``y``."""
    dx = x - center[..., 0, None, None]
    dy = y - center[..., 1, None, None]
    h = half[..., None, None]
    disc = dx * dx + dy * dy <= h * h
    square = (dx.abs() <= h) & (dy.abs() <= h)
    # Apex up: at depth d below the apex the triangle is d wide (base and height both 2h).
    depth = dy + h
    triangle = (depth >= 0) & (dy <= h) & (dx.abs() <= depth / 2)
    shape = shape[..., None, None]
    masks = torch.where(shape == SHAPES.index("square"), square, disc)
    return torch.where(shape == SHAPES.index("triangle"), triangle, masks)


def rasterize(layout: Layout, size: int = 128) -> torch.Tensor:
    """The pictures of a layout: float (B, 3, size, size) in [0, 1], 2x supersampled."""
    if size < 8:
        raise InvalidParameterError(f"size must be >= 8 pixels, got {size}", param="size")
    fine = size * SUPERSAMPLING
    visible = object_map(layout, fine)
    palette = _palette_tensor(layout.center.device)
    # Column 0 is the background's colour, column j + 1 object j's: one gather paints every pixel with what
    # object_map sees there (later objects over earlier ones, as in the prompt's order).
    colors = torch.cat([palette[layout.background][:, :, None], palette[layout.color].transpose(1, 2)], dim=2)
    image = torch.gather(colors, 2, visible.flatten(1)[:, None].expand(-1, 3, -1))
    return F.avg_pool2d(image.view(-1, 3, fine, fine), SUPERSAMPLING)


def object_map(layout: Layout, side: int) -> torch.Tensor:
    """Which object is visible at the centre of each cell of a side x side grid: long (B, side, side), 0 for the
    background and j + 1 for the scene's object j (later objects cover earlier ones, as in ``rasterize``)."""
    masks = layout.masks(side)
    visible = torch.zeros(masks.shape[0], side, side, dtype=torch.long, device=masks.device)
    for slot in range(MAX_OBJECTS):
        visible = torch.where(masks[:, slot], slot + 1, visible)
    return visible


def render_batch(
    scenes: list[Scene],
    size: int = 128,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Render scenes to a float tensor (B, 3, size, size) in [0, 1] on ``device`` (see ``lay_out`` for
    ``jitter`` and ``generator``)."""
    return rasterize(lay_out(scenes, jitter, generator, device), size)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float (B, 3, H, W) in [0, 1] to PIL RGB images."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def render(prompt: str | Scene, size: int = 128) -> Image.Image:
    """The ground-truth picture of one prompt (no jitter)."""
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return to_pil(render_batch([scene], size=size))[0]
