"""The residual-reuse hooks on blocks that carry two streams to the output (LTX-2's video and audio): a skipped
loop adds each stream's own stored residual, for the whole batch and for the skipping rows of a sub-batch; with
forecasting, the residual extrapolated from the key's last two computed ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ditserve.cache.hooks import (
    Decision,
    ForecastOrder,
    ResidualReuseController,
    SkipPolicy,
    install_loop_hooks,
)
from ditserve.cache.spec import BlockIO, CacheSpec
from ditserve.forward_context import ForwardContext, RowOwner, forward_context

TWO_STREAMS = BlockIO(hidden_name="hidden_states", hidden_position=0, output_index=0,
                      passthrough_names=(("hidden_states", 0), ("audio_hidden_states", 1)),
                      extra_streams=(("audio_hidden_states", 1, 1),))


class SquaringBlock(torch.nn.Module):
    """Not additive, so that reusing a residual differs from computing: video x -> x^2 + 1, audio a -> 3a."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.runs += hidden_states.shape[0]
        return hidden_states**2 + 1, 3 * audio_hidden_states


class TwoStreamModel(torch.nn.Module):
    def __init__(self, blocks: list[torch.nn.Module] | None = None) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks or [SquaringBlock(), SquaringBlock()])

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            video, audio = block(hidden_states=video, audio_hidden_states=audio)
        return video, audio


class SkipAfterFirstStep(SkipPolicy):
    """Computes each request's step 0 and skips its later steps."""

    def new_state(self, label: str) -> Any:
        return None

    def decide(self, state: Any, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        return Decision(step > 0, None, "test")


def _model() -> TwoStreamModel:
    model = TwoStreamModel()
    spec = CacheSpec(transformer_class="TwoStreamModel", block_lists=(("blocks", TWO_STREAMS),),
                     modulated_input=lambda block, args, kwargs: kwargs["hidden_states"])
    install_loop_hooks(model, ResidualReuseController("transformer", spec, SkipAfterFirstStep()))
    return model


def _run(model: TwoStreamModel, rows: dict[str, tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """One call: request id -> (its step, its video row, its audio row)."""
    owners = tuple(RowOwner(rid, step, 3) for rid, (step, _, _) in rows.items())
    with forward_context(ForwardContext(owners)):
        return model(torch.cat([v for _, v, _ in rows.values()]), torch.cat([a for _, _, a in rows.values()]))


def exact(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (video**2 + 1) ** 2 + 1, 9 * audio


def test_a_skipped_loop_adds_each_streams_own_residual() -> None:
    model = _model()
    first = (torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, -1.0, 4.0]]))
    computed = _run(model, {"a": (0, *first)})
    assert all(torch.equal(c, e) for c, e in zip(computed, exact(*first), strict=True))
    runs = model.blocks[0].runs
    later = (torch.tensor([[0.25, 2.0]]), torch.tensor([[1.0, 1.0, -2.0]]))
    skipped = _run(model, {"a": (1, *later)})
    assert model.blocks[0].runs == runs  # no block body ran
    residuals = [e - i for e, i in zip(exact(*first), first, strict=True)]
    for out, into, residual, recomputed in zip(skipped, later, residuals, exact(*later), strict=True):
        assert torch.equal(out, into + residual)
        assert not torch.equal(out, recomputed)


def test_skipping_rows_of_a_sub_batch_get_both_residuals_and_the_others_compute() -> None:
    model = _model()
    first = (torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, -1.0, 4.0]]))
    _run(model, {"a": (0, *first)})
    later = (torch.tensor([[0.25, 2.0]]), torch.tensor([[1.0, 1.0, -2.0]]))
    joining = (torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 2.0, 3.0]]))
    runs = model.blocks[0].runs
    # a at its step 1 skips, b joins at its step 0 and computes
    video, audio = _run(model, {"a": (1, *later), "b": (0, *joining)})
    assert model.blocks[0].runs == runs + 1  # b's row alone ran
    residuals = [e - i for e, i in zip(exact(*first), first, strict=True)]
    assert torch.equal(video[:1], later[0] + residuals[0])
    assert torch.equal(audio[:1], later[1] + residuals[1])
    b_video, b_audio = exact(*joining)
    assert torch.equal(video[1:], b_video) and torch.equal(audio[1:], b_audio)


class ShiftBlock(torch.nn.Module):
    """Adds the model's current shift to the video and subtracts twice it from the audio: a residual that the
    test sets per step, so that it can be made exactly linear in the step."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return hidden_states + self.shift, audio_hidden_states - 2 * self.shift


class SkipSteps(SkipPolicy):
    def __init__(self, skipped: set[int]) -> None:
        self.skipped = skipped

    def new_state(self, label: str) -> Any:
        return None

    def decide(self, state: Any, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        return Decision(step in self.skipped, None, "test")


def _shift_model(skipped: set[int], order: ForecastOrder,
                 dtype: torch.dtype) -> tuple[TwoStreamModel, torch.Tensor, ResidualReuseController]:
    shift = torch.zeros((), dtype=dtype)
    model = TwoStreamModel([ShiftBlock(shift), ShiftBlock(shift)])
    spec = CacheSpec(transformer_class="TwoStreamModel", block_lists=(("blocks", TWO_STREAMS),),
                     modulated_input=lambda block, args, kwargs: kwargs["hidden_states"])
    controller = ResidualReuseController("transformer", spec, SkipSteps(skipped), order)
    install_loop_hooks(model, controller)
    return model, shift, controller


def _linear_shift(step: int) -> float:
    return 0.5 + 0.25 * step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_forecast_is_exact_on_a_residual_linear_in_the_step(dtype: torch.dtype) -> None:
    """Computed at 0, 1 and 4: skip 2, 3 extend the line through 0 and 1, skips 5, 6 the line through 1 and 4;
    each equals the computed output (both blocks add the shift: residual 2 * shift, audio -4 * shift)."""
    skipped = {2, 3, 5, 6}
    model, shift, controller = _shift_model(skipped, ForecastOrder.LINEAR, dtype)
    video, audio = torch.tensor([[1.0, -2.0]], dtype=dtype), torch.tensor([[4.0, 0.0, 8.0]], dtype=dtype)
    for step in range(7):
        shift.fill_(_linear_shift(step))
        out_video, out_audio = _run(model, {"a": (step, video, audio)})
        assert out_video.dtype == dtype
        expected = 2 * _linear_shift(step)
        torch.testing.assert_close(out_video, video + expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_audio, audio - 2 * expected, rtol=0, atol=1e-6)
    decisions = controller.records[("cond", "a")].decisions
    assert [d["forecast"] for d in decisions] == [step in skipped for step in range(7)]


def test_with_one_residual_computed_a_forecasting_skip_reuses_it() -> None:
    model, shift, controller = _shift_model({1}, ForecastOrder.LINEAR, torch.float32)
    video, audio = torch.tensor([[1.0, -2.0]]), torch.tensor([[4.0, 0.0, 8.0]])
    shift.fill_(_linear_shift(0))
    _run(model, {"a": (0, video, audio)})
    shift.fill_(_linear_shift(1))
    out_video, _ = _run(model, {"a": (1, video, audio)})
    assert torch.equal(out_video, video + 2 * _linear_shift(0))
    assert controller.records[("cond", "a")].decisions[1]["forecast"] is False


def test_reuse_keeps_no_previous_residual_and_forecasts_nothing() -> None:
    model, shift, controller = _shift_model({2, 3}, ForecastOrder.REUSE, torch.float32)
    video, audio = torch.tensor([[1.0, -2.0]]), torch.tensor([[4.0, 0.0, 8.0]])
    for step in range(4):
        shift.fill_(_linear_shift(step))
        out_video, _ = _run(model, {"a": (step, video, audio)})
    assert torch.equal(out_video, video + 2 * _linear_shift(1))
    record = controller.records[("cond", "a")]
    assert record.previous_residuals is None and not any(d["forecast"] for d in record.decisions)


def test_a_forecast_in_a_sub_batch_uses_each_keys_own_history() -> None:
    """a forecasts its skip from its own two residuals while b, at another step, computes beside it."""
    model, shift, _ = _shift_model({2}, ForecastOrder.LINEAR, torch.float32)
    video, audio = torch.tensor([[1.0, -2.0]]), torch.tensor([[4.0, 0.0, 8.0]])
    for step in (0, 1):
        shift.fill_(_linear_shift(step))
        _run(model, {"a": (step, video, audio)})
    shift.fill_(_linear_shift(0))
    out_video, out_audio = _run(model, {"a": (2, video, audio), "b": (0, 2 * video, 2 * audio)})
    assert torch.equal(out_video[:1], video + 2 * _linear_shift(2))
    assert torch.equal(out_audio[:1], audio - 4 * _linear_shift(2))
    assert torch.equal(out_video[1:], 2 * video + 2 * _linear_shift(0))
