"""The LoRA manager: loads adapters, checks them against the model, keeps an LRU of them, pins those in use.

``acquire`` resolves a request's ``LoRARequest`` to a loaded adapter (loading it if needed) and pins it until
``release``: the LRU evicts the least recently used adapter when a new one needs a slot, never a pinned one
(a waiting or running request would lose its adapter halfway). An adapter is validated completely (every
targeted module exists and is a Linear, every shape fits) before any layer sees it, so a bad file never leaves a
half-applied adapter. Reads happen under the manager's lock (two requests naming one new adapter load it once);
the engine's steps never take that lock, so a read delays other loads only, never a running batch.

The ``distill`` backend does not use the manager: ``fuse_adapters`` adds the adapters into the base weights once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditserve.errors import InvalidParameterError, LoRACapacityError, LoRAError, LoRAInUseError
from ditserve.lora.files import AdapterWeights, ModuleLoRA, read_adapter, resolve_lora_path
from ditserve.lora.layers import RowLoRA
from ditserve.lora.request import DEFAULT_MAX_LORA_BYTES, LoRABackend, LoRARequest, check_lora_name

logger = logging.getLogger(__name__)


@dataclass
class LoadedLoRA:
    """One resident adapter."""

    name: str
    path: str
    format: str
    rank: int
    num_modules: int
    num_bytes: int
    int_id: int | None = None
    #: requests (waiting or running) that use it; a pinned adapter is never evicted or unloaded
    pins: int = 0



def target_linear(transformer: torch.nn.Module, module_name: str) -> torch.nn.Module | None:
    try:
        return transformer.get_submodule(module_name)
    except AttributeError:
        return None


def validate_adapter(adapter: AdapterWeights, transformers: Mapping[str, torch.nn.Module]) -> None:
    """Every module the adapter targets exists in the model, is a Linear, and the shapes fit; else a LoRAError
    naming the adapter and the first problems (nothing has been applied yet)."""
    problems = []
    for transformer_name, modules in adapter.modules.items():
        transformer = transformers.get(transformer_name)
        if transformer is None:
            problems.append(f"the model has no {transformer_name}")
            continue
        for module_name, weights in modules.items():
            module = target_linear(transformer, module_name)
            if module is None:
                problems.append(f"{module_name}: no such module in the model")
            elif not isinstance(module, torch.nn.Linear):
                problems.append(f"{module_name}: a {type(module).__name__}, not a Linear")
            elif weights.down.shape[1] != module.in_features or weights.up.shape[0] != module.out_features:
                problems.append(f"{module_name}: the LoRA maps {weights.down.shape[1]} -> {weights.up.shape[0]} "
                                f"features, the layer {module.in_features} -> {module.out_features}")
            elif weights.up_bias is not None and tuple(weights.up_bias.shape) != (module.out_features,):
                problems.append(f"{module_name}: lora_B bias of shape {tuple(weights.up_bias.shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise LoRAError(f"LoRA {adapter.name!r} does not fit this model: {shown}")


class LoRAManager:
    """Adapters applied per request, per row. ``transformers``: the pipeline's denoising transformers by name."""

    def __init__(self, pipeline: Any, transformers: Mapping[str, torch.nn.Module], *,
                 lora_dirs: Sequence[str] | None = None, max_loras: int = 8,
                 max_bytes: int = DEFAULT_MAX_LORA_BYTES, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.pipeline = pipeline
        self.transformers = dict(transformers)
        #: where adapter weights live: the model's execution device and dtype (not where offloaded weights rest)
        first = next(next(iter(self.transformers.values())).parameters())
        self.device = device if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        self.lora_dirs = None if lora_dirs is None else list(lora_dirs)
        self.max_loras = max_loras
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        #: resident adapters, least recently used first
        self._loaded: OrderedDict[str, LoadedLoRA] = OrderedDict()
        #: name -> (real path, trusted) of every adapter loaded or configured, so an evicted one reloads by name
        #: alone (an untrusted path is checked against the allow-list again: the folder may have changed since)
        self._known: dict[str, tuple[str, bool]] = {}
        self._layers: dict[tuple[str, str], RowLoRA] = {}

    # ------------------------------------------------------------------ loading
    def register(self, name: str, path: str, *, trusted: bool = True, int_id: int | None = None) -> LoadedLoRA:
        """Load ``path`` as ``name`` now (start-up ``--lora NAME=PATH`` is trusted: no allow-list check)."""
        check_lora_name(name)
        with self._lock:
            pinned = self._acquire_locked(name, path, int_id, trusted=trusted)
            pinned.pins -= 1
            return pinned

    def acquire(self, request: LoRARequest) -> str:
        """The loaded adapter for ``request``, pinned until ``release``; loads (and maybe evicts) if needed."""
        with self._lock:
            return self._acquire_locked(request.lora_name, request.lora_path, request.lora_int_id, trusted=False).name

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def unload(self, name: str) -> None:
        """Remove an adapter (hot unload). Refused while requests use it."""
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None and name not in self._known:
                raise LoRAError(f"LoRA {name!r} is not loaded", param="lora.name")
            if entry is not None and entry.pins:
                raise LoRAInUseError(f"LoRA {name!r} is used by {entry.pins} waiting or running request(s)",
                                     param="lora.name")
            if entry is not None:
                self._evict(name)
            self._known.pop(name, None)

    def loaded(self) -> list[LoadedLoRA]:
        with self._lock:
            return list(self._loaded.values())

    def _acquire_locked(self, name: str, path: str | None, int_id: int | None, *, trusted: bool) -> LoadedLoRA:
        real = None
        if path is not None:
            real = str(resolve_lora_path(name, path, None if trusted else self.lora_dirs))
        entry = self._loaded.get(name)
        if entry is not None:
            if real is not None and real != entry.path:
                raise LoRAError(f"LoRA {name!r} is loaded from another path; unload it first or use another name",
                                param="lora.name")
            if int_id is not None and entry.int_id is not None and int_id != entry.int_id:
                raise LoRAError(f"LoRA {name!r} is loaded with int_id {entry.int_id}, not {int_id}",
                                param="lora.int_id")
            self._loaded.move_to_end(name)
            entry.pins += 1
            return entry
        known = self._known.get(name)
        if real is None and known is None:
            raise LoRAError(f"LoRA {name!r} is not loaded; give its path", param="lora.path")
        if real is not None and known is not None and real != known[0]:
            raise LoRAError(f"LoRA {name!r} was loaded from another path; unload it first or use another name",
                            param="lora.name")
        if real is None:
            assert known is not None
            trusted = known[1]
            real = str(resolve_lora_path(name, known[0], None if trusted else self.lora_dirs))
        adapter = read_adapter(name, Path(real), self.pipeline, self.max_bytes)
        validate_adapter(adapter, self.transformers)
        self._make_room()
        entry = self._install(adapter, real, int_id, trusted)
        entry.pins += 1
        return entry

    def _make_room(self) -> None:
        while len(self._loaded) >= self.max_loras:
            victim = next((name for name, entry in self._loaded.items() if entry.pins == 0), None)
            if victim is None:
                raise LoRACapacityError(f"all {self.max_loras} LoRA slots hold adapters that waiting or running "
                                        "requests use; retry later (or raise max_loras)")
            logger.info("evicting LoRA %s (least recently used)", victim)
            self._evict(victim)

    def _install(self, adapter: AdapterWeights, real_path: str, int_id: int | None, trusted: bool) -> LoadedLoRA:
        for transformer_name, modules in adapter.modules.items():
            transformer = self.transformers[transformer_name]
            for module_name, weights in modules.items():
                key = (transformer_name, module_name)
                layer = self._layers.get(key)
                if layer is None:
                    linear = transformer.get_submodule(module_name)
                    layer = self._layers[key] = RowLoRA(f"{transformer_name}.{module_name}", linear)
                layer.adapters[adapter.name] = weights.to(self.device, self.dtype)
        entry = LoadedLoRA(adapter.name, real_path, adapter.format.value, adapter.rank, adapter.num_modules,
                           adapter.num_bytes, int_id)
        self._loaded[adapter.name] = entry
        self._known[adapter.name] = (real_path, trusted)
        logger.info("loaded LoRA %s (%s, rank %d, %d modules) from %s", adapter.name, adapter.format.value,
                    adapter.rank, adapter.num_modules, real_path)
        return entry

    def _evict(self, name: str) -> None:
        del self._loaded[name]
        for key in list(self._layers):
            layer = self._layers[key]
            layer.adapters.pop(name, None)
            if not layer.adapters:
                # a Linear no adapter targets runs without any hook: the base model, untouched
                layer.remove()
                del self._layers[key]

    def close(self) -> None:
        with self._lock:
            for name in list(self._loaded):
                self._evict(name)


def fuse_adapters(adapters: Sequence[AdapterWeights], transformers: Mapping[str, torch.nn.Module],
                  scale: float = 1.0) -> None:
    """The distill backend: add each adapter into the base weights (``W += scale * scaling * up @ down``), once.
    All adapters are validated before the first weight changes."""
    for adapter in adapters:
        validate_adapter(adapter, transformers)
        for transformer_name, modules in adapter.modules.items():
            for module_name, weights in modules.items():
                linear = transformers[transformer_name].get_submodule(module_name)
                if weights.up_bias is not None and linear.bias is None:
                    raise LoRAError(f"LoRA {adapter.name!r}: {module_name} has a lora_B bias but the layer has no "
                                    "bias to fuse it into")
    with torch.no_grad():
        for adapter in adapters:
            for transformer_name, modules in adapter.modules.items():
                for module_name, weights in modules.items():
                    linear = transformers[transformer_name].get_submodule(module_name)
                    _fuse_one(linear, weights, scale)
            logger.info("fused LoRA %s (rank %d, %d modules)", adapter.name, adapter.rank, adapter.num_modules)


def _fuse_one(linear: torch.nn.Linear, weights: ModuleLoRA, scale: float) -> None:
    factor = scale * weights.scaling
    # the product in float32 whatever the model dtype: a bf16 rank-r product loses the small update
    delta = (weights.up.float() @ weights.down.float()) * factor
    linear.weight.add_(delta.to(linear.weight.device, linear.weight.dtype))
    if weights.up_bias is not None:
        linear.bias.add_((weights.up_bias.float() * factor).to(linear.bias.device, linear.bias.dtype))


def adapter_name_for(path: str) -> str:
    """The name a start-up ``lora_path`` entry is known by: its file's stem or its folder's name."""
    given = Path(path)
    return given.stem if given.suffix.lower() == ".safetensors" else given.name


def _transformers(model: Any) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in ((n, getattr(model.pipeline, n, None)) for n in model.adapter.transformer_names)
            if module is not None}


def _startup_loras(config: Any) -> dict[str, str]:
    """Name -> path of the per-request adapters the config gives at start (``loras``, then ``lora_path`` named
    by stem)."""
    named = dict(config.loras or {})
    for path in config.lora_path or []:
        name = adapter_name_for(path)
        if name in named:
            raise InvalidParameterError(f"two start-up LoRAs are named {name!r}; rename one", param="lora_path")
        named[name] = path
    return named


def fuse_startup_loras(config: Any, model: Any) -> None:
    """The "distill" backend: the start-up adapters fused into the weights, each into the transformer its
    ``lora_path`` entry names (a plain list: ``transformer``, as diffusers' ``load_lora_weights`` does). Runs
    before the levers, so a quantizer converts the fused weights."""
    if LoRABackend(config.lora_backend) is not LoRABackend.DISTILL:
        return
    transformers = _transformers(model)
    by_transformer = config.lora_path if isinstance(config.lora_path, dict) else {"transformer": config.lora_path or []}
    adapters = []
    for transformer_name, paths in by_transformer.items():
        if transformer_name not in transformers:
            raise InvalidParameterError(f"lora_path names {transformer_name!r}; this model's transformers are "
                                        f"{sorted(transformers)}", param="lora_path")
        for path in paths:
            name = adapter_name_for(path)
            adapter = read_adapter(name, resolve_lora_path(name, path, None), model.pipeline, config.max_lora_bytes)
            adapters.append(adapter.for_transformer(transformer_name))
    fuse_adapters(adapters, transformers)


def build_lora_manager(config: Any, model: Any) -> LoRAManager | None:
    """The "peft" backend's manager with the start-up adapters loaded (None for "distill"). Runs after the
    levers: a lever that replaces Linear layers (fp8) would drop hooks put on them before; its layers are then
    refused by name instead."""
    if LoRABackend(config.lora_backend) is not LoRABackend.PEFT:
        return None
    named = _startup_loras(config)
    if len(named) > config.max_loras:
        raise InvalidParameterError(f"{len(named)} start-up LoRAs do not fit max_loras={config.max_loras}",
                                    param="max_loras")
    manager = LoRAManager(model.pipeline, _transformers(model), lora_dirs=config.lora_dir,
                          max_loras=config.max_loras, max_bytes=config.max_lora_bytes, device=model.device,
                          dtype=model.dtype)
    for name, path in named.items():
        manager.register(name, path)
    return manager
