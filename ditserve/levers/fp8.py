"""FP8 (e4m3) weights and activations for the transformers' linear layers.

Weights are quantized once with one scale per output row; activations are quantized on the fly with one scale
per token, and the product runs on FP8 tensor cores through ``torch._scaled_mm`` (CUDA GPUs of compute
capability 8.9 and up: Ada, Hopper, Blackwell). Per-row and per-token scales keep the error of a layer close
to FP8's own rounding (about 2^-4 relative) even when a few channels carry large values.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

import torch

from ditserve.errors import InvalidParameterError

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
#: FP8 tensor-core GEMMs want both matrix dimensions in multiples of 16
FP8_DIM_MULTIPLE = 16
MIN_CAPABILITY = (8, 9)


def require_fp8_device(device: torch.device) -> None:
    """FP8 matmuls run fast only on CUDA GPUs of compute capability 8.9 and up: anything else is an error."""
    if device.type != "cuda":
        raise InvalidParameterError(
            f"quantization='fp8' needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer); the device "
            f"is {device.type!r}. On CPU use quantization='gguf' or 'int8'", param="quantization")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise InvalidParameterError(
            f"quantization='fp8' needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}. Use quantization='gguf' instead", param="quantization")


def _per_row_fp8(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` in FP8 and the float32 scale of each row (``matrix ~= fp8 * scale``)."""
    scale = matrix.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    quantized = (matrix.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


class Fp8Linear(torch.nn.Module):
    """A ``Linear`` whose weight is stored in FP8 and whose input is quantized to FP8 at every call."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _per_row_fp8(linear.weight.detach())
        self.register_buffer("weight", weight)
        # (1, out): the layout _scaled_mm wants for the right-hand operand's scale
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.compute_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scale = _per_row_fp8(rows)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else self.compute_dtype
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=out_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def is_ignored(name: str, ignored_layers: Sequence[str]) -> bool:
    """A layer is ignored when a pattern names it, one of its parents, or matches it as a glob."""
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in ignored_layers)


def _fits_fp8_gemm(linear: torch.nn.Linear) -> bool:
    return linear.in_features % FP8_DIM_MULTIPLE == 0 and linear.out_features % FP8_DIM_MULTIPLE == 0


def quantize_linears_fp8(module: torch.nn.Module, ignored_layers: Sequence[str] = ()) -> list[str]:
    """Replace every eligible ``Linear`` of ``module`` by an :class:`Fp8Linear`, in place; returns their names.
    Layers named by ``ignored_layers`` and layers whose sizes FP8 GEMMs cannot take stay as they are."""
    targets = [(name, sub) for name, sub in module.named_modules()
               if isinstance(sub, torch.nn.Linear) and not is_ignored(name, ignored_layers) and _fits_fp8_gemm(sub)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Fp8Linear(linear))
    logger.info("fp8: %d linear layers of %s quantized (%d ignored by pattern)", len(targets),
                type(module).__name__, sum(isinstance(m, torch.nn.Linear) and is_ignored(n, ignored_layers)
                                           for n, m in module.named_modules()))
    return [name for name, _ in targets]


def unmatched_patterns(module: torch.nn.Module, ignored_layers: Sequence[str]) -> list[str]:
    """Patterns of ``ignored_layers`` that name no layer of ``module``: almost surely a typo."""
    names = [name for name, _ in module.named_modules()]
    return [p for p in ignored_layers if not any(is_ignored(n, [p]) for n in names)]
