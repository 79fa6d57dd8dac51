"""Residual reuse over a transformer's block loop, through diffusers' hook machinery (the model is untouched).

One ``LoopBlockHook`` wraps each block of the loop a ``CacheSpec`` describes. The first block's hook asks the
skip policy (TeaCache, MagCache, calibration recording) for a decision per *state key*; when every row of the
batch may skip, no block body runs and each block passes its inputs through; the last block's hook then adds
the residual ``blocks_out - blocks_in`` stored the last time the rows were computed. When only some rows may
skip, every block runs on the computing rows alone (a sub-batch) while the skipping rows pass through and then
receive their own stored residual (one per stream where the blocks carry several to the output: LTX-2's video
and audio), so a request's output never depends on which other requests shared its
batch, and a request's skip saves its share of the work even when its mates compute.

Forecasting (``forecast_order`` 1): a skipped step gets, instead of the last residual as it was, the line through
the key's last two computed residuals extended to the step (as TaylorSeer extrapolates features, first order
here). The residual drifts smoothly between steps, so the line errs less than a constant the longer the run of
skips; with one residual computed so far the step reuses it.

State key: (guidance branch, request id). The branch label comes from the forward context ("cond",
"uncond"); a second call within the same step and branch (a pipeline that runs its own guidance passes) or a
batch that stacks several copies of each request (guidance concatenated in one call) gets its own label, so
each pass keeps its own history. Rows of one request (several outputs) decide together.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ditserve.cache.spec import BlockIO, CacheSpec
from ditserve.forward_context import ForwardContext, RowOwner, current_forward_context, forward_context

HOOK_NAME = "ditserve_residual_cache"

StateKey = tuple[str, str]  # (branch label, request id)


class ForecastOrder(enum.IntEnum):
    """What a skipped step adds to its rows: ``cache_config["forecast_order"]``."""

    #: the residual of the last computed step, as it is
    REUSE = 0
    #: extrapolated along the line through the last two computed residuals
    LINEAR = 1


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

    def computed_instead(self, state: Any) -> None:
        """The hooks computed a step this policy let skip (no stored residual of the rows' shape, e.g. a Wan2.2
        expert's first step): a policy whose state runs between computed steps resets it as a compute does."""
        return None


@dataclass
class KeyRecord:
    policy_state: Any
    #: the loop's output minus its input the last time the key's rows were computed, per stream (main first)
    residuals: tuple[torch.Tensor, ...] | None = None
    #: the request's step those residuals were computed at
    residual_step: int | None = None
    #: the residuals and step computed before those, kept only while forecasting (they cost the memory of one
    #: more residual per key)
    previous_residuals: tuple[torch.Tensor, ...] | None = None
    previous_step: int | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CallState:
    """One transformer call: which rows belong to which key, and what was decided."""

    #: the step index of each key's request
    steps: dict[StateKey, int]
    rows: dict[StateKey, list[int]]
    skipped: set[StateKey]
    #: the loop's input streams: the main one, then the spec's extra streams
    streams_in: tuple[torch.Tensor, ...]

    @property
    def blocks_in(self) -> torch.Tensor:
        return self.streams_in[0]

    @property
    def skip_all(self) -> bool:
        return len(self.skipped) == len(self.rows)

    def computed_rows(self) -> list[int]:
        """The rows whose keys compute at this call, in order."""
        return sorted(row for key, rows in self.rows.items() if key not in self.skipped for row in rows)


def _skip_residuals(record: KeyRecord, step: int) -> tuple[torch.Tensor, ...]:
    """What a key skipping ``step`` adds: its last residuals, or their line through the ones before extended to
    ``step`` (the key's own history only, so a request's output does not depend on its batch mates)."""
    assert record.residuals is not None and record.residual_step is not None, "a skip needs a stored residual"
    if record.previous_residuals is None:
        return record.residuals
    assert record.previous_step is not None
    weight = (step - record.residual_step) / (record.residual_step - record.previous_step)
    return tuple(_extrapolate(last, before, weight)
                 for last, before in zip(record.residuals, record.previous_residuals, strict=True))


def _extrapolate(last: torch.Tensor, before: torch.Tensor, weight: float) -> torch.Tensor:
    """``last + (last - before) * weight`` computed in float32 (in bf16 the product and the sum would each round
    to 8 bits of mantissa), returned in ``last``'s dtype."""
    last32 = last.float()
    return (last32 + (last32 - before.float()) * weight).to(last.dtype)


def _row_index(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    # a contiguous run is a view (no copy); otherwise an index tensor
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


class ResidualReuseController:
    """The state of one transformer's residual cache for the running batch."""

    def __init__(self, transformer_name: str, spec: CacheSpec, policy: SkipPolicy,
                 forecast_order: ForecastOrder = ForecastOrder.REUSE) -> None:
        self.transformer_name = transformer_name
        self.spec = spec
        self.policy = policy
        self.forecast_order = ForecastOrder(forecast_order)
        self.records: dict[StateKey, KeyRecord] = {}
        self._calls_in_step: dict[tuple[str, str, int], int] = defaultdict(int)
        self.current: CallState | None = None

    def reset(self) -> None:
        self.records.clear()
        self._calls_in_step.clear()
        self.current = None

    def forget(self, request_id: str) -> None:
        """Drop one request's residuals, policy state and call counts."""
        for key in [key for key in self.records if key[1] == request_id]:
            del self.records[key]
        for key in [key for key in self._calls_in_step if key[1] == request_id]:
            del self._calls_in_step[key]

    # ------------------------------------------------------------------ per call
    def _row_keys(self, ctx: ForwardContext, batch_size: int) -> dict[StateKey, tuple[RowOwner, list[int]]]:
        """Each state key of the call with its owner (step, step count) and its rows of the batch."""
        request_rows = sum(owner.num_rows for owner in ctx.owners)
        if not request_rows or batch_size % request_rows:
            raise RuntimeError(
                f"{self.transformer_name}: batch of {batch_size} rows does not match the forward context's "
                f"{request_rows} request rows; the runner must name the requests of every transformer call")
        keys: dict[StateKey, tuple[RowOwner, list[int]]] = {}
        start = 0
        for owner in ctx.owners:
            # a second call in the same step and branch (a pipeline running its own guidance passes) gets its
            # own label, and so does every further copy of the rows (guidance concatenated in one call)
            call_key = (ctx.branch, owner.request_id, owner.step_index)
            slot = self._calls_in_step[call_key]
            self._calls_in_step[call_key] += 1
            base = ctx.branch if slot == 0 else f"{ctx.branch}/call{slot}"
            for copy in range(batch_size // request_rows):
                label = base if copy == 0 else f"{base}/copy{copy}"
                first = copy * request_rows + start
                keys[(label, owner.request_id)] = (owner, list(range(first, first + owner.num_rows)))
            start += owner.num_rows
        return keys

    def begin_call(self, first_block: torch.nn.Module, io: BlockIO, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> CallState:
        ctx = current_forward_context()
        if ctx is None:
            raise RuntimeError(f"{self.transformer_name} was called outside ditserve's denoising loop: the cache "
                               "needs the forward context (step, branch, request of each row)")
        streams_in = io.streams_in(args, kwargs)
        blocks_in = streams_in[0]
        keys = self._row_keys(ctx, blocks_in.shape[0])
        modulated = None
        if self.policy.needs_modulated_input:
            modulated = self.spec.modulated_input(first_block, args, kwargs)
        skipped = set()
        for key, (owner, key_rows) in keys.items():
            record = self.records.get(key)
            if record is None:
                record = self.records[key] = KeyRecord(self.policy.new_state(key[0]))
            index = _row_index(key_rows, blocks_in.device)
            signal = modulated[index] if modulated is not None else None
            decision = self.policy.decide(record.policy_state, owner.step_index, owner.num_steps, signal)
            expected = [stream[index].shape for stream in streams_in]
            if decision.skip and (record.residuals is None or [r.shape for r in record.residuals] != expected):
                self.policy.computed_instead(record.policy_state)
                decision = Decision(False, decision.distance, "no stored residual")
            if decision.skip:
                skipped.add(key)
            # previous residuals exist only while forecasting: a skip with them is forecast
            record.decisions.append({"step": owner.step_index, "decision": "skip" if decision.skip else "compute",
                                     "distance": decision.distance, "reason": decision.reason,
                                     "forecast": decision.skip and record.previous_residuals is not None})
        rows = {key: key_rows for key, (_, key_rows) in keys.items()}
        steps = {key: owner.step_index for key, (owner, _) in keys.items()}
        self.current = CallState(steps, rows, skipped, streams_in)
        return self.current

    def finish_call(self, io: BlockIO, output: Any) -> Any:
        call = self.current
        self.current = None
        assert call is not None, "finish_call without begin_call"
        if call.skip_all:
            return io.with_streams_out(output, self._apply_stored(
                call, tuple(stream.clone() for stream in call.streams_in), call.rows))
        streams_out = io.streams_out(output)
        residuals = tuple(out - into for out, into in zip(streams_out, call.streams_in, strict=True))
        for key, key_rows in call.rows.items():
            if key in call.skipped:
                continue
            record = self.records[key]
            index = _row_index(key_rows, call.blocks_in.device)
            stored = residuals if len(call.rows) == 1 else tuple(r[index] for r in residuals)
            if self.forecast_order is ForecastOrder.LINEAR:
                # a line needs two residuals of the same rows (a key whose shapes changed starts over)
                same = record.residuals is not None and [r.shape for r in record.residuals] == [
                    r.shape for r in stored]
                record.previous_residuals = record.residuals if same else None
                record.previous_step = record.residual_step if same else None
            record.residuals, record.residual_step = stored, call.steps[key]
            self.policy.observe_computed(record.policy_state, call.steps[key], call.blocks_in[index],
                                         streams_out[0][index])
        if not call.skipped:
            # untouched output: a cache that skips nothing is bitwise the uncached model
            return output
        skipped_rows = {k: v for k, v in call.rows.items() if k in call.skipped}
        patched = tuple(stream.clone() for stream in streams_out)
        for key_rows in skipped_rows.values():
            index = _row_index(key_rows, call.blocks_in.device)
            for target, into in zip(patched, call.streams_in, strict=True):
                target[index] = into[index]
        return io.with_streams_out(output, self._apply_stored(call, patched, skipped_rows))

    def _apply_stored(self, call: CallState, targets: tuple[torch.Tensor, ...],
                      rows: dict[StateKey, list[int]]) -> tuple[torch.Tensor, ...]:
        """Add each key's stored (or forecast) residuals to its rows of ``targets`` (which hold the loop's input
        there)."""
        for key, key_rows in rows.items():
            index = _row_index(key_rows, call.blocks_in.device)
            for target, residual in zip(targets, _skip_residuals(self.records[key], call.steps[key]), strict=True):
                target[index] += residual
        return targets

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
        elif call.skipped:
            output = self._run_sub_batch(call, args, kwargs)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            output = controller.finish_call(self.io, output)
        return output


    def _run_sub_batch(self, call: CallState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the block on the computing rows only; the skipping rows pass their inputs through (their stored
        residual is added after the last block). A skip is thus never paid for by a batch mate's compute."""
        batch = call.blocks_in.shape[0]
        computed_rows = call.computed_rows()
        index = _row_index(computed_rows, call.blocks_in.device)
        sub_args = tuple(_take_rows(a, index, batch) for a in args)
        sub_kwargs = {k: v if k in self.io.shared_names else _take_rows(v, index, batch) for k, v in kwargs.items()}
        ctx = current_forward_context()
        assert ctx is not None, "begin_call checked the forward context"
        # layers that select per row (LoRA) must know which rows of the call the sub-batch holds
        with forward_context(ctx.narrowed(computed_rows)):
            computed = self.fn_ref.original_forward(*sub_args, **sub_kwargs)
        passed = self.io.passthrough(args, kwargs)
        if self.io.output_index is None:
            output = passed.clone()
            output[index] = computed
            return output
        items = []
        for full, part in zip(passed, computed, strict=True):
            if part is None:  # a stream the block no longer returns (SD3's last block: no text stream)
                items.append(None)
                continue
            full = full.clone()
            full[index] = part
            items.append(full)
        return tuple(items)


def _take_rows(value: Any, index: slice | torch.Tensor, batch: int) -> Any:
    """``value`` cut to the rows ``index`` where it has one entry per batch row (tensors whose first dimension is
    the batch, also inside tuples, lists and dicts); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take_rows(v, index, batch) for k, v in value.items()}
    return value


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
