"""Residual reuse over a transformer's block loop, through diffusers' hook machinery (the model is untouched).

One ``LoopBlockHook`` wraps each block of the loop a ``CacheSpec`` describes. The first block's hook asks the
skip policy (TeaCache, MagCache, calibration recording) for a decision per *state key*; when every row of the
batch may skip, no block body runs and each block passes its inputs through; the last block's hook then adds
the residual ``blocks_out - blocks_in`` stored the last time the rows were computed. When only some rows may
skip, the batch is computed and those rows still receive their stored residual, so a request's output never
depends on which other requests shared its batch.

State key: (guidance branch, request id). The branch label comes from the forward context ("cond",
"uncond"); a second call within the same step and branch (a pipeline that runs its own guidance passes) or a
batch that stacks several copies of each request (guidance concatenated in one call) gets its own label, so
each pass keeps its own history. Rows of one request (several outputs) decide together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ditserve.cache.spec import BlockIO, CacheSpec
from ditserve.engine.context import ForwardContext, current_forward_context

HOOK_NAME = "ditserve_residual_cache"

StateKey = tuple[str, str]  # (branch label, request id)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous|, in float32 whatever the model dtype."""
    current, previous = current.float(), previous.float()
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))


@dataclass
class Decision:
    skip: bool
    #: the quantity compared with the threshold (None when no comparison was made)
    distance: float | None
    reason: str


class SkipPolicy(ABC):
    """Decides per step and state key whether the block loop may be skipped."""

    #: whether ``decide`` needs the first block's modulated input
    needs_modulated_input: ClassVar[bool] = False

    @abstractmethod
    def new_state(self, label: str) -> Any:
        """Fresh state for a new (branch ``label``, request) key."""

    @abstractmethod
    def decide(self, state: Any, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        """Whether this step may reuse the stored residual; updates ``state``."""

    def observe_computed(self, state: Any, step: int, blocks_in: torch.Tensor, blocks_out: torch.Tensor) -> None:
        """Called after rows of ``state`` were computed (calibration records here)."""
        return None



@dataclass
class KeyRecord:
    policy_state: Any
    residual: torch.Tensor | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CallState:
    """One transformer call: which rows belong to which key, and what was decided."""

    step: int
    rows: dict[StateKey, list[int]]
    skipped: set[StateKey]
    blocks_in: torch.Tensor

    @property
    def skip_all(self) -> bool:
        return len(self.skipped) == len(self.rows)


def _row_index(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    # a contiguous run is a view (no copy); otherwise an index tensor
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


class ResidualReuseController:
    """The state of one transformer's residual cache for the running batch."""

    def __init__(self, transformer_name: str, spec: CacheSpec, policy: SkipPolicy) -> None:
        self.transformer_name = transformer_name
        self.spec = spec
        self.policy = policy
        self.records: dict[StateKey, KeyRecord] = {}
        self._calls_in_step: dict[tuple[str, int], int] = defaultdict(int)
        self.current: CallState | None = None
        #: transformer calls whose block bodies ran (used to check the statistics against real work)
        self.block_loop_runs = 0

    def reset(self) -> None:
        self.records.clear()
        self._calls_in_step.clear()
        self.current = None
        self.block_loop_runs = 0

    # ------------------------------------------------------------------ per call
    def _row_keys(self, ctx: ForwardContext, batch_size: int) -> dict[StateKey, list[int]]:
        row_ids = ctx.row_request_ids
        if not row_ids or batch_size % len(row_ids):
            raise RuntimeError(
                f"{self.transformer_name}: batch of {batch_size} rows does not match the forward context's "
                f"{len(row_ids)} request rows; the family's adapter must set row_request_ids")
        slot = self._calls_in_step[(ctx.branch, ctx.step_index)]
        self._calls_in_step[(ctx.branch, ctx.step_index)] += 1
        base = ctx.branch if slot == 0 else f"{ctx.branch}/call{slot}"
        rows: dict[StateKey, list[int]] = {}
        for row in range(batch_size):
            copy, position = divmod(row, len(row_ids))
            label = base if copy == 0 else f"{base}/copy{copy}"
            rows.setdefault((label, row_ids[position]), []).append(row)
        return rows

    def begin_call(self, first_block: torch.nn.Module, io: BlockIO, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> CallState:
        ctx = current_forward_context()
        if ctx is None:
            raise RuntimeError(f"{self.transformer_name} was called outside ditserve's denoising loop: the cache "
                               "needs the forward context (step, branch, request of each row)")
        blocks_in = io.hidden_in(args, kwargs)
        rows = self._row_keys(ctx, blocks_in.shape[0])
        modulated = None
        if self.policy.needs_modulated_input:
            modulated = self.spec.modulated_input(first_block, args, kwargs)
        skipped = set()
        for key, key_rows in rows.items():
            record = self.records.get(key)
            if record is None:
                record = self.records[key] = KeyRecord(self.policy.new_state(key[0]))
            index = _row_index(key_rows, blocks_in.device)
            signal = modulated[index] if modulated is not None else None
            decision = self.policy.decide(record.policy_state, ctx.step_index, ctx.num_steps, signal)
            expected_shape = blocks_in[index].shape
            if decision.skip and (record.residual is None or record.residual.shape != expected_shape):
                decision = Decision(False, decision.distance, "no stored residual")
            if decision.skip:
                skipped.add(key)
            record.decisions.append({"step": ctx.step_index, "decision": "skip" if decision.skip else "compute",
                                     "distance": decision.distance, "reason": decision.reason})
        self.current = CallState(ctx.step_index, rows, skipped, blocks_in)
        if not self.current.skip_all:
            self.block_loop_runs += 1
        return self.current

    def finish_call(self, io: BlockIO, output: Any) -> Any:
        call = self.current
        self.current = None
        assert call is not None, "finish_call without begin_call"
        blocks_out = io.hidden_out(output)
        if call.skip_all:
            return io.with_hidden_out(output, self._apply_stored(call, call.blocks_in.clone(), call.rows))
        residual = blocks_out - call.blocks_in
        for key, key_rows in call.rows.items():
            if key in call.skipped:
                continue
            record = self.records[key]
            index = _row_index(key_rows, residual.device)
            record.residual = residual if len(call.rows) == 1 else residual[index]
            self.policy.observe_computed(record.policy_state, call.step, call.blocks_in[index], blocks_out[index])
        if not call.skipped:
            # untouched output: a cache that skips nothing is bitwise the uncached model
            return output
        skipped_rows = {k: v for k, v in call.rows.items() if k in call.skipped}
        patched = blocks_out.clone()
        for key_rows in skipped_rows.values():
            index = _row_index(key_rows, patched.device)
            patched[index] = call.blocks_in[index]
        return io.with_hidden_out(output, self._apply_stored(call, patched, skipped_rows))

    def _apply_stored(self, call: CallState, target: torch.Tensor, rows: dict[StateKey, list[int]]) -> torch.Tensor:
        """Add each key's stored residual to its rows of ``target`` (which holds the loop's input there)."""
        for key, key_rows in rows.items():
            index = _row_index(key_rows, target.device)
            target[index] += self.records[key].residual
        return target

    # ------------------------------------------------------------------ statistics
    def request_records(self, request_id: str) -> dict[str, KeyRecord]:
        return {label: record for (label, rid), record in self.records.items() if rid == request_id}


class LoopBlockHook(ModelHook):
    """Wraps one block of the loop: runs it or passes its inputs through, and applies the residual at the end."""

    def __init__(self, controller: ResidualReuseController, io: BlockIO, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.controller = controller
        self.io = io
        self.is_first = is_first
        self.is_last = is_last

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        controller = self.controller
        call = controller.begin_call(module, self.io, args, kwargs) if self.is_first else controller.current
        if call is None:
            raise RuntimeError(f"{controller.transformer_name}: a cached block ran before the first block")
        if call.skip_all:
            output = self.io.passthrough(args, kwargs)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            output = controller.finish_call(self.io, output)
        return output


def install_loop_hooks(transformer: torch.nn.Module, controller: ResidualReuseController) -> None:
    blocks = controller.spec.blocks(transformer)
    for index, (block, io) in enumerate(blocks):
        hook = LoopBlockHook(controller, io, is_first=index == 0, is_last=index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)


def remove_loop_hooks(transformer: torch.nn.Module, spec: CacheSpec) -> None:
    for block, _ in spec.blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
