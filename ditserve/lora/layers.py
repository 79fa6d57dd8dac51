"""Per-row LoRA: each row of a transformer call gets the adapter and scale of the request it belongs to.

A ``RowLoRA`` is a forward hook on one targeted ``nn.Linear`` (the module itself is untouched; the hook is
registered and removed explicitly by the manager). After the Linear ran, it reads the forward context the runner
set for the call (which request owns each row, see ``ditserve.forward_context``), groups the rows by adapter and
adds ``scale * scaling * up(down(x))`` to each group's rows only, the same term PEFT's ``lora.Linear`` adds.
Rows whose request has no LoRA get nothing; when no row has one, the Linear's output is returned untouched, so a
request without LoRA runs exactly the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ditserve.forward_context import ForwardContext, current_forward_context
from ditserve.lora.files import ModuleLoRA
from ditserve.lora.request import AppliedLoRA


@dataclass(frozen=True)
class RowGroup:
    """The rows of a call that use one adapter."""

    name: str
    #: None: every row of the call
    index: torch.Tensor | None
    #: the requests' own scales: one number when the group agrees, else one per row (broadcast over the rest)
    scale: float | torch.Tensor


def _row_loras(ctx: ForwardContext, num_rows: int, where: str) -> list[AppliedLoRA | None]:
    """The LoRA of each of the ``num_rows`` rows the current (sub-)call holds."""
    pattern = [owner.request.lora if owner.request is not None else None for owner in ctx.row_owners]
    if ctx.rows is not None:
        return [pattern[row % len(pattern)] for row in ctx.rows]
    if pattern and num_rows % len(pattern) == 0:
        # a call that stacks several copies of its requests' rows (guidance passes concatenated)
        return pattern * (num_rows // len(pattern))
    if len(set(pattern)) == 1:
        # the input is not laid out by rows, but every row uses the same LoRA: it applies to all of it
        return [pattern[0]] * num_rows
    raise RuntimeError(f"LoRA on {where}: an input of {num_rows} rows does not match the {len(pattern)} request rows "
                       "of the call, and the rows use different LoRAs")


def row_groups(ctx: ForwardContext, num_rows: int, device: torch.device, where: str) -> list[RowGroup]:
    """The call's rows grouped by adapter (computed once per call and input layout, kept in the context)."""
    key = ("lora_row_groups", num_rows, str(device))
    if key in ctx.memo:
        return ctx.memo[key]
    loras = _row_loras(ctx, num_rows, where)
    by_name: dict[str, list[int]] = {}
    for row, lora in enumerate(loras):
        if lora is not None:
            by_name.setdefault(lora.name, []).append(row)
    groups = []
    for name, rows in by_name.items():
        scales = [loras[row].scale for row in rows]  # type: ignore[union-attr]
        scale: float | torch.Tensor = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, device=device)
        index = None if len(rows) == num_rows else torch.tensor(rows, device=device)
        groups.append(RowGroup(name, index, scale))
    ctx.memo[key] = groups
    return groups


class RowLoRA:
    """The adapters of one Linear, applied per row by a forward hook."""

    def __init__(self, module_name: str, linear: torch.nn.Linear) -> None:
        self.module_name = module_name
        self.linear = linear
        self.adapters: dict[str, ModuleLoRA] = {}
        self._handle = linear.register_forward_hook(self._after_forward)

    def remove(self) -> None:
        self._handle.remove()

    def _after_forward(self, _module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ctx = current_forward_context()
        if ctx is None or not self.adapters:
            return output
        x = args[0]
        groups = row_groups(ctx, x.shape[0], x.device, self.module_name)
        for group in groups:
            weights = self.adapters.get(group.name)
            if weights is None:  # the adapter does not target this layer
                continue
            rows = x if group.index is None else x.index_select(0, group.index)
            delta = F.linear(F.linear(rows.to(weights.down.dtype), weights.down), weights.up, weights.up_bias)
            # one multiply by scale x scaling, as PEFT does after ``set_adapters`` (the same rounding as diffusers)
            if isinstance(group.scale, torch.Tensor):
                factor = (group.scale * weights.scaling).to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
                delta = delta * factor
            else:
                delta = delta * (group.scale * weights.scaling)
            delta = delta.to(output.dtype)
            output = output + delta if group.index is None else output.index_add(0, group.index, delta)
        return output
