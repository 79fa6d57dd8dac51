"""Lossless levers applied to a loaded model: regional compile, CPU offload, VAE slicing/tiling, quantization."""

from __future__ import annotations

from ditserve.config import OmniDiffusionConfig
from ditserve.errors import InvalidParameterError
from ditserve.models.loader import LoadedModel

_LEVER_FLAGS = ("enable_cpu_offload", "enable_layerwise_offload", "vae_use_slicing", "vae_use_tiling")


def apply_levers(model: LoadedModel, config: OmniDiffusionConfig) -> None:
    """Apply every lever the config asks for; one that cannot apply is an error, never silently skipped."""
    asked = [flag for flag in _LEVER_FLAGS if getattr(config, flag)]
    if not config.enforce_eager:
        asked.append("enforce_eager=False")
    if config.quantization is not None:
        asked.append(f"quantization={config.quantization!r}")
    if asked:
        raise InvalidParameterError(f"{asked} not available in this build yet", param=asked[0])
