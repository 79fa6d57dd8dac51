"""Finding and reading LoRA files: the allow-list, the size limit, and the formats diffusers and PEFT know.

Two layouts are read:
- a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``): the config is PEFT's ``LoraConfig``;
- a single ``.safetensors`` file (or a folder holding diffusers' ``pytorch_lora_weights.safetensors``): the
  pipeline class's own ``lora_state_dict`` converts it (diffusers, kohya/sd-scripts, the Wan and Qwen-Image
  community formats diffusers knows), and diffusers' ``_create_lora_config`` derives ranks and alphas exactly
  as ``load_lora_weights`` does, so a file means the same here as in diffusers.

Only safetensors are read (a pickle can run code). Either way the result is one ``ModuleLoRA`` per targeted
module with PEFT's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA); whether the modules exist in the
model and the shapes fit is checked by the manager before anything is applied.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditserve.errors import LoRAError, LoRAPathError
from ditserve.lora.request import DEFAULT_MAX_LORA_BYTES

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: what diffusers' ``save_lora_weights`` writes into a folder
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
#: a PEFT config is a small JSON document; anything bigger is not one
MAX_CONFIG_BYTES = 1 << 20
#: file suffixes that hold pickles: refused, never unpickled
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: PEFT's key prefix when the adapter was saved from a ``PeftModel``
PEFT_MODEL_PREFIX = "base_model.model."
#: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` / ``<module>.lora_B.bias``
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")


class AdapterFormat(str, enum.Enum):
    PEFT_FOLDER = "peft_folder"
    #: diffusers' own layout or a format its ``lora_state_dict`` converts (kohya, community Wan/Qwen files)
    SINGLE_FILE = "single_file"


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapter on one Linear: ``y += scaling * (up @ down @ x + up_bias)``."""

    down: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor | None
    #: PEFT's ``lora_alpha / r`` (or ``/ sqrt(r)``); the request's scale multiplies it
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> ModuleLoRA:
        bias = None if self.up_bias is None else self.up_bias.to(device, dtype)
        return ModuleLoRA(self.down.to(device, dtype), self.up.to(device, dtype), bias, self.scaling)


@dataclass
class AdapterWeights:
    """A read adapter: its modules by transformer attribute name, then by module path inside it."""

    name: str
    path: str
    format: AdapterFormat
    modules: dict[str, dict[str, ModuleLoRA]] = field(default_factory=dict)
    num_bytes: int = 0

    @property
    def rank(self) -> int:
        return max((m.rank for per in self.modules.values() for m in per.values()), default=0)

    def for_transformer(self, transformer_name: str) -> AdapterWeights:
        """The same adapter aimed at another transformer of the pipeline (Wan2.2 A14B's low-noise expert); the
        files name no transformer beyond diffusers' ``transformer.`` prefix."""
        modules = {transformer_name: {k: v for per in self.modules.values() for k, v in per.items()}}
        return dataclasses.replace(self, modules=modules)

    @property
    def num_modules(self) -> int:
        return sum(len(per) for per in self.modules.values())


# ---------------------------------------------------------------------------------------------- paths
def resolve_lora_path(name: str, path: str, lora_dirs: Sequence[str] | None) -> Path:
    """The real path of ``path`` (symlinks followed). With ``lora_dirs`` (the allow-list) it must lie inside one
    of them; a relative path is looked up in each folder in order. ``None``: no allow-list (an offline caller)."""
    given = Path(path).expanduser()
    if lora_dirs is None:
        candidates = [given.resolve()]
    else:
        roots = [Path(d).expanduser().resolve() for d in lora_dirs]
        if not roots:
            raise LoRAPathError(f"LoRA {name!r}: this server loads no LoRA by path (no lora_dir is configured)",
                                param="lora.path")
        candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
        # the check is on the resolved path: a symlink or '..' that leads out of every folder is refused
        candidates = [c for c in candidates if any(c.is_relative_to(root) for root in roots)]
        if not candidates:
            raise LoRAPathError(f"LoRA {name!r}: path {path!r} is outside the allowed LoRA folders",
                                param="lora.path")
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise LoRAError(f"LoRA {name!r}: path {path!r} does not exist", param="lora.path")


def _checked_size(name: str, file: Path, limit: int) -> int:
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise LoRAError(f"LoRA {name!r}: {file.name} is a pickle file, which is never loaded (it can run code); "
                        "convert it to .safetensors", param="lora.path")
    if not file.is_file():
        raise LoRAError(f"LoRA {name!r}: {file.name} is not a file", param="lora.path")
    size = file.stat().st_size
    if size > limit:
        raise LoRAError(f"LoRA {name!r}: {file.name} has {size} bytes; the limit is {limit}", param="lora.path")
    return size


def _load_safetensors(name: str, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, header  # noqa: SIM118 - not a dict
    except Exception as error:  # noqa: BLE001 - any unreadable file is the LoRA's fault
        raise LoRAError(f"LoRA {name!r}: {file.name} is not a readable safetensors file ({error})",
                        param="lora.path") from None


# ---------------------------------------------------------------------------------------------- reading
def read_adapter(name: str, path: Path, pipeline: Any, max_bytes: int = DEFAULT_MAX_LORA_BYTES) -> AdapterWeights:
    """Read the adapter at ``path`` (already resolved) for ``pipeline``'s transformer."""
    if path.is_dir():
        if (path / PEFT_CONFIG_FILE).is_file():
            return _read_peft_folder(name, path, max_bytes)
        if (path / DIFFUSERS_WEIGHTS_FILE).is_file():
            return _read_single_file(name, path / DIFFUSERS_WEIGHTS_FILE, pipeline, max_bytes)
        raise LoRAError(f"LoRA {name!r}: folder {path.name!r} has neither {PEFT_CONFIG_FILE} (a PEFT adapter) nor "
                        f"{DIFFUSERS_WEIGHTS_FILE} (diffusers)", param="lora.path")
    if path.suffix.lower() != ".safetensors":
        _checked_size(name, path, max_bytes)  # a pickle gets its own message
        raise LoRAError(f"LoRA {name!r}: {path.name} is not a .safetensors file", param="lora.path")
    return _read_single_file(name, path, pipeline, max_bytes)


def _read_peft_folder(name: str, folder: Path, max_bytes: int) -> AdapterWeights:
    from peft import LoraConfig

    config_file = folder / PEFT_CONFIG_FILE
    _checked_size(name, config_file, MAX_CONFIG_BYTES)
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise LoRAError(f"LoRA {name!r}: {PEFT_CONFIG_FILE} is not valid JSON ({error})") from None
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        # LoHa / LoKr (LyCORIS) and the other PEFT methods have no per-row form here yet
        raise LoRAError(f"LoRA {name!r}: a {peft_type} adapter; ditserve applies LoRA adapters only (peft_type LORA)")
    weights = folder / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise LoRAError(f"LoRA {name!r}: PEFT folder without {PEFT_WEIGHTS_FILE} (pickled adapter_model.bin files "
                        "are never loaded)", param="lora.path")
    size = _checked_size(name, weights, max_bytes)
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - PEFT's complaint about the file, reported as the LoRA's
        raise LoRAError(f"LoRA {name!r}: PEFT cannot read {PEFT_CONFIG_FILE} ({error})") from None
    state_dict, _ = _load_safetensors(name, weights)
    state_dict = {k.removeprefix(PEFT_MODEL_PREFIX): v for k, v in state_dict.items()}
    modules = _modules_from_state_dict(name, state_dict, config)
    return AdapterWeights(name, str(folder), AdapterFormat.PEFT_FOLDER, {"transformer": modules}, size)


def _read_single_file(name: str, file: Path, pipeline: Any, max_bytes: int) -> AdapterWeights:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils.peft_utils import _create_lora_config

    size = _checked_size(name, file, max_bytes)
    raw, header = _load_safetensors(name, file)
    pipeline_class = type(pipeline)
    if not hasattr(pipeline_class, "lora_state_dict"):
        raise LoRAError(f"LoRA {name!r}: diffusers has no LoRA loader for {pipeline_class.__name__}; use a PEFT "
                        "folder")
    # FluxLoraLoaderMixin hands the alphas of its plain format back apart; the other mixins fold them in
    wants_alphas = "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters
    try:
        converted = pipeline_class.lora_state_dict(raw, return_lora_metadata=True,
                                                   **({"return_alphas": True} if wants_alphas else {}))
    except Exception as error:  # noqa: BLE001 - the converters raise anything on a file they do not know
        raise LoRAError(f"LoRA {name!r}: diffusers' {pipeline_class.__name__} cannot convert {file.name} "
                        f"({type(error).__name__}: {error})") from None
    state_dict, alphas = (converted[0], converted[1]) if wants_alphas else (converted[0], None)
    prefix = "transformer."
    others = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(prefix) and "lora" in k})
    if others:
        raise LoRAError(f"LoRA {name!r} also adapts {others}; ditserve applies LoRAs to the transformer only")
    state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not state_dict:
        raise LoRAError(f"LoRA {name!r}: {file.name} holds no LoRA weights of a transformer")
    alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)} or None
    metadata = None
    if header.get(LORA_ADAPTER_METADATA_KEY):
        try:
            stored = json.loads(header[LORA_ADAPTER_METADATA_KEY])
        except ValueError:
            raise LoRAError(f"LoRA {name!r}: the {LORA_ADAPTER_METADATA_KEY} header is not JSON") from None
        metadata = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)} or None
    # the same rank table diffusers' load_lora_adapter builds ('^' anchors a module name, see PEFT #2419)
    ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    try:
        config = _create_lora_config(state_dict, alphas, metadata, ranks)
    except Exception as error:  # noqa: BLE001 - a config PEFT refuses is the file's fault
        raise LoRAError(f"LoRA {name!r}: no LoRA config can be derived from {file.name} ({error})") from None
    modules = _modules_from_state_dict(name, state_dict, config)
    return AdapterWeights(name, str(file), AdapterFormat.SINGLE_FILE, {"transformer": modules}, size)


def _modules_from_state_dict(name: str, state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, ModuleLoRA]:
    """``<module>.lora_A/B`` tensors and a PEFT ``LoraConfig`` -> one ``ModuleLoRA`` per module, with the scaling
    PEFT's ``LoraModel`` gives that module (its rank and alpha patterns matched the way PEFT matches them)."""
    from peft.utils.other import get_pattern_key

    if getattr(config, "use_dora", False) or any("lora_magnitude_vector" in k for k in state_dict):
        raise LoRAError(f"LoRA {name!r} is a DoRA adapter; DoRA is not supported")
    if getattr(config, "target_parameters", None):
        raise LoRAError(f"LoRA {name!r} targets parameters ({config.target_parameters}); only Linear layers are "
                        "supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = LORA_KEY.match(key)
        if match is None:
            # modules_to_save, embeddings, norms...: applying the rest without them would be half the adapter
            raise LoRAError(f"LoRA {name!r} holds weights ditserve cannot apply: {key!r} (only lora_A / lora_B of "
                            "Linear layers)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    modules = {}
    for module, tensors in sorted(parts.items()):
        down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if down is None or up is None or down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            raise LoRAError(f"LoRA {name!r}: module {module!r} needs 2-d lora_A (r x in) and lora_B (out x r) of one "
                            f"rank; got {shapes}")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if rank != down.shape[0]:
            raise LoRAError(f"LoRA {name!r}: module {module!r} has rank {down.shape[0]} but its config says {rank}")
        scaling = alpha / (math.sqrt(rank) if config.use_rslora else rank)
        modules[module] = ModuleLoRA(down, up, tensors.get("lora_B.bias"), float(scaling))
    if not modules:
        raise LoRAError(f"LoRA {name!r} holds no LoRA weights")
    return modules
