"""Per-family model knowledge the cache methods need, registered by transformer class name.

TeaCache and MagCache are generic: they decide per step whether to run a transformer's block loop or reuse the
residual it produced last time. What differs between families lives in a ``CacheSpec`` written beside the
family's adapter (``ditserve/models/<family>/cache_spec.py``): which block lists form the loop, how to read
the main hidden stream in and out of a block, how to build a skipped block's output, which tensor TeaCache
compares (the modulated input of the first block), and the default coefficients with their source.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditserve.errors import CacheConfigError
from ditserve.models.registry import cache_spec_modules

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def block_argument(args: Args, kwargs: Kwargs, name: str, position: int) -> Any:
    """A block's argument given by keyword or position (diffusers calls blocks both ways)."""
    if name in kwargs:
        return kwargs[name]
    return args[position]


@dataclass(frozen=True)
class BlockIO:
    """How one kind of block (one ``nn.ModuleList``) carries the image/video stream.

    ``hidden_name``/``hidden_position``: the argument holding the stream. ``output_index``: where the stream is
    in the block's output tuple (``None``: the block returns the stream alone). ``passthrough_names``: the
    arguments a skipped block returns unchanged, in the order of its output tuple. ``shared_names``: keyword
    arguments that hold no batch rows (rotary embeddings of the token positions), never cut to a sub-batch.
    ``extra_streams``: further streams the loop carries to the model's output, whose residual is stored and
    reused with the main stream's, as (argument name, position, index in the output tuple): LTX-2's audio
    beside its video. A stream not listed leaves a skipped loop as it entered (a text stream that the model's
    output does not read).
    """

    hidden_name: str
    hidden_position: int
    output_index: int | None = None
    passthrough_names: tuple[tuple[str, int], ...] = ()
    shared_names: tuple[str, ...] = ()
    extra_streams: tuple[tuple[str, int, int], ...] = ()

    def hidden_in(self, args: Args, kwargs: Kwargs) -> torch.Tensor:
        return block_argument(args, kwargs, self.hidden_name, self.hidden_position)

    def hidden_out(self, output: Any) -> torch.Tensor:
        return output if self.output_index is None else output[self.output_index]

    def streams_in(self, args: Args, kwargs: Kwargs) -> tuple[torch.Tensor, ...]:
        """The main stream, then the extra streams, as the block receives them."""
        extras = tuple(block_argument(args, kwargs, name, position) for name, position, _ in self.extra_streams)
        return (self.hidden_in(args, kwargs), *extras)

    def streams_out(self, output: Any) -> tuple[torch.Tensor, ...]:
        return (self.hidden_out(output), *(output[index] for _, _, index in self.extra_streams))

    def with_streams_out(self, output: Any, streams: tuple[torch.Tensor, ...]) -> Any:
        """``output`` with the main stream and the extra streams replaced (in ``streams_out``'s order)."""
        if self.output_index is None:
            return streams[0]
        items = list(output)
        items[self.output_index] = streams[0]
        for (_, _, index), stream in zip(self.extra_streams, streams[1:], strict=True):
            items[index] = stream
        return tuple(items)

    def passthrough(self, args: Args, kwargs: Kwargs) -> Any:
        """What the block returns when its body is skipped: its inputs, shaped like its output."""
        if self.output_index is None:
            return self.hidden_in(args, kwargs)
        return tuple(block_argument(args, kwargs, name, pos) for name, pos in self.passthrough_names)


#: the block stream IO shared by FLUX / Qwen-Image style dual-stream blocks: in (hidden, encoder), out (encoder, hidden)
DUAL_STREAM_IO = BlockIO(hidden_name="hidden_states", hidden_position=0, output_index=1,
                         passthrough_names=(("encoder_hidden_states", 1), ("hidden_states", 0)),
                         shared_names=("image_rotary_emb",))


@dataclass(frozen=True)
class CacheSpec:
    transformer_class: str
    #: attribute names of the block lists, in the order the forward runs them, with each list's IO
    block_lists: tuple[tuple[str, BlockIO], ...]
    #: (first block, its args, its kwargs) -> the tensor TeaCache compares between steps
    modulated_input: Callable[[torch.nn.Module, Args, Kwargs], torch.Tensor]
    #: TeaCache rescale polynomial (highest power first, as numpy.polyval) and where it comes from
    tea_coefficients: tuple[float, ...] | None = None
    tea_coefficients_source: str = ""
    #: MagCache magnitude ratios per step (first entry 1.0) and where they come from
    mag_ratios: tuple[float, ...] | None = None
    mag_ratios_source: str = ""
    #: the name of cache-dit's ``ForwardPattern`` of the blocks, for a transformer whose class cache-dit has no
    #: adapter registered under (it knows SD3 by its pipeline's name only): we then describe the blocks to it
    #: (a ``BlockAdapter``); None where cache-dit finds the transformer by its class name
    cache_dit_forward_pattern: str | None = None
    #: why cache-dit cannot serve the transformer (said at ``Omni(...)``), or None where it can
    cache_dit_refusal: str | None = None

    def blocks(self, transformer: torch.nn.Module) -> list[tuple[torch.nn.Module, BlockIO]]:
        """Every block of the loop, in call order, with its IO."""
        found = []
        for attribute, io in self.block_lists:
            module_list = getattr(transformer, attribute, None)
            if module_list is None:
                raise CacheConfigError(
                    f"{type(transformer).__name__} has no '{attribute}' block list expected by its cache spec",
                    param="cache_backend")
            found.extend((block, io) for block in module_list)
        if not found:
            raise CacheConfigError(f"{type(transformer).__name__} has no transformer blocks to cache",
                                   param="cache_backend")
        return found


_SPECS: dict[str, CacheSpec] = {}


def register_cache_spec(spec: CacheSpec) -> CacheSpec:
    _SPECS[spec.transformer_class] = spec
    return spec


def supported_transformers() -> list[str]:
    return sorted(cache_spec_modules())


def cache_spec_for(transformer: torch.nn.Module, backend_name: str) -> CacheSpec:
    """The spec of a transformer's class, or a CacheConfigError naming the class and the supported ones."""
    class_name = type(transformer).__name__
    modules = cache_spec_modules()
    if class_name not in _SPECS and class_name in modules:
        # importing the family's spec module registers its spec (lazily: start-up stays light)
        importlib.import_module(modules[class_name])
    spec = _SPECS.get(class_name)
    if spec is None:
        raise CacheConfigError(
            f"cache_backend={backend_name!r} cannot serve {class_name}; supported transformers: "
            f"{supported_transformers()}", param="cache_backend")
    return spec


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """numpy.polyval without numpy arrays: coefficients highest power first."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value
