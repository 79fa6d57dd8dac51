"""The LoRA records a caller and a request carry (names as in the system we mirror: ``LoRARequest``)."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

from ditserve.errors import InvalidParameterError, InvalidTypeError

#: adapter names travel in URLs, logs and metrics labels: a short, plain alphabet
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: the weights a request may give its LoRA (diffusers' ``set_adapters`` takes any float; beyond this range an
#: adapter only produces noise, and an infinite one breaks the whole row)
MAX_ABS_SCALE = 16.0
#: default limit on an adapter's weights file (rank-128 FLUX LoRAs are about 1.3 GB)
DEFAULT_MAX_LORA_BYTES = 2 << 30


class LoRABackend(str, enum.Enum):
    #: adapters kept apart from the base weights, chosen per request and applied per row of a step batch
    PEFT = "peft"
    #: adapters fused into the base weights once at start (distilled few-step LoRAs): every request uses them
    DISTILL = "distill"


def check_lora_name(name: Any, param: str = "lora.name") -> str:
    if not isinstance(name, str):
        raise InvalidTypeError(f"{param} must be a string, got {type(name).__name__}", param=param)
    if not NAME_PATTERN.match(name):
        raise InvalidParameterError(
            f"{param}={name[:64]!r}: 1-128 characters of letters, digits, '.', '_' and '-', starting with a letter "
            "or digit", param=param)
    return name


def check_lora_scale(scale: Any, param: str = "lora_scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidTypeError(f"{param} must be a number, got {type(scale).__name__}", param=param)
    if not math.isfinite(scale) or abs(scale) > MAX_ABS_SCALE:
        raise InvalidParameterError(f"{param}={scale} must be a finite number in [-{MAX_ABS_SCALE}, {MAX_ABS_SCALE}]",
                                    param=param)
    return float(scale)


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request uses. ``lora_path``: a PEFT folder or a single ``.safetensors`` file (inside an
    allowed folder); it may be left out for an adapter already loaded (or configured at start) under
    ``lora_name``. ``lora_int_id``: the caller's numeric id, kept and reported."""

    lora_name: str
    lora_int_id: int | None = None
    lora_path: str | None = None

    def __post_init__(self) -> None:
        check_lora_name(self.lora_name, "lora_name")
        if self.lora_int_id is not None and (isinstance(self.lora_int_id, bool)
                                             or not isinstance(self.lora_int_id, int)):
            raise InvalidTypeError(f"lora_int_id must be an integer, got {type(self.lora_int_id).__name__}",
                                   param="lora_int_id")
        if self.lora_path is not None and (not isinstance(self.lora_path, str) or not self.lora_path):
            raise InvalidTypeError("lora_path must be a non-empty string", param="lora_path")


@dataclass(frozen=True)
class AppliedLoRA:
    """What a resolved request carries: the loaded adapter's name and the request's own scale."""

    name: str
    scale: float = 1.0
