"""The shared half of VAE patch parallelism: who decodes which tile, the exchange of decoded tiles, and the
blend of neighbours. What differs per VAE class (where the tiles are, how one tile is decoded, what happens to
the joined image) is a ``VaeTiling``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ditserve.errors import InvalidTypeError


@dataclass(frozen=True)
class TileGrid:
    """Where a tiled decode cuts the latent, and how its decoded tiles are blended and cropped (the VAE's own
    ``tiled_decode`` arithmetic)."""

    #: latent rows / columns of the tiles' top-left corners
    tops: list[int]
    lefts: list[int]
    #: decoded rows / columns blended with the tile above / to the left
    blend_height: int
    blend_width: int
    #: decoded rows / columns of each blended tile kept in the joined image
    keep_height: int
    keep_width: int

    def origins(self) -> list[tuple[int, int]]:
        """Top-left corners in the VAE's own order (row by row): tile ``n`` of this list is tile ``n`` everywhere."""
        return [(top, left) for top in self.tops for left in self.lefts]


@dataclass(frozen=True)
class VaeTiling:
    """How one VAE class tiles its decode."""

    #: (vae, latent) -> the grid
    grid: Callable[[Any, torch.Tensor], TileGrid]
    #: (vae, latent, grid, top, left) -> the decoded tile
    decode_tile: Callable[[Any, torch.Tensor, TileGrid, int, int], torch.Tensor]
    #: (vae, latent, joined image) -> the decode's output (final crop, un-patching, clamp: as the VAE does)
    finish: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


#: dtypes a tile may travel in; ranks send the index (+1, 0 meaning "no tile in this slot")
_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shape_table(tiles: list[torch.Tensor], slots: int, ndim: int, device: torch.device) -> torch.Tensor:
    """One row per slot of this rank: [dtype code, *shape], all zeros for an empty slot."""
    rows = [[0] * (1 + ndim) for _ in range(slots)]
    for slot, tile in enumerate(tiles):
        if tile.dtype not in _WIRE_DTYPES:
            raise InvalidTypeError(
                f"vae_patch_parallel_size: the VAE decoded a tile of dtype {tile.dtype}, which the tile exchange "
                f"does not carry; supported: {list(_WIRE_DTYPES)}", param="vae_patch_parallel_size")
        rows[slot] = [_WIRE_DTYPES.index(tile.dtype) + 1, *tile.shape]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def gather_tiles(mine: list[torch.Tensor], count: int, group: Any, like: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's decoded tiles, in tile order, on every rank of ``group``.

    Rank ``r`` holds tiles ``r, r + size, ...`` (``mine``). Edge tiles are smaller, and a rank may hold none
    (fewer tiles than ranks), so shapes and dtype travel first in a small table; then each rank pads its tiles
    to the largest tile of the group and one tensor all-gather moves them, on ``like``'s device (NCCL on GPUs,
    gloo on CPU). The returned tiles are views of the receive buffer, cropped back to their own shapes."""
    size = dist.get_world_size(group)
    slots = math.ceil(count / size)
    table = _shape_table(mine, slots, like.dim(), like.device)
    tables = [torch.empty_like(table) for _ in range(size)]
    dist.all_gather(tables, table, group=group)
    everything = torch.stack(tables)  # rank x slot x [dtype code, *shape]
    codes = everything[..., 0][everything[..., 0] > 0]
    dtype = _WIRE_DTYPES[int(codes[0]) - 1]
    largest = everything[..., 1:].flatten(0, 1).amax(dim=0).tolist()

    send = torch.zeros(slots, *largest, dtype=dtype, device=like.device)
    for slot, tile in enumerate(mine):
        send[(slot, *map(slice, tile.shape))] = tile
    receive = torch.empty(size, slots, *largest, dtype=dtype, device=like.device)
    dist.all_gather(list(receive.unbind(0)), send, group=group)

    tiles = []
    for index in range(count):
        rank, slot = index % size, index // size
        shape = everything[rank, slot, 1:].tolist()
        tiles.append(receive[(rank, slot, *map(slice, shape))])
    return tiles


def blend_and_join(vae: Any, rows: list[list[torch.Tensor]], grid: TileGrid) -> torch.Tensor:
    """Blend each tile with the one above and the one to the left, crop, and join, in the VAE's order and with its
    own ``blend_v`` / ``blend_h``. Those blend in place, so a tile's right and bottom edges are already blended
    when its neighbours read them, exactly as in a one-device tiled decode."""
    joined_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, grid.blend_height)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, grid.blend_width)
            kept.append(tile[..., :grid.keep_height, :grid.keep_width])
        joined_rows.append(torch.cat(kept, dim=-1))
    return torch.cat(joined_rows, dim=-2)


def parallel_tiled_decode(vae: Any, tiling: VaeTiling, z: torch.Tensor, group: Any, return_dict: bool = True) -> Any:
    """A drop-in ``vae.tiled_decode``: every rank of ``group`` decodes every ``size``-th tile, all ranks get all
    tiles and blend them, so each returns the image of a one-device tiled decode."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    grid = tiling.grid(vae, z)
    origins = grid.origins()
    mine = [tiling.decode_tile(vae, z, grid, *origins[index]) for index in range(rank, len(origins), size)]
    tiles = gather_tiles(mine, len(origins), group, like=z)
    columns = len(grid.lefts)
    rows = [tiles[start:start + columns] for start in range(0, len(tiles), columns)]
    image = tiling.finish(vae, z, blend_and_join(vae, rows, grid))
    return DecoderOutput(sample=image) if return_dict else (image,)
