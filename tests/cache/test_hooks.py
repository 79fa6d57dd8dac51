"""The residual-reuse hooks on blocks that carry two streams to the output (LTX-2's video and audio): a skipped
loop adds each stream's own stored residual, for the whole batch and for the skipping rows of a sub-batch."""

from __future__ import annotations

from typing import Any

import torch

from ditserve.cache.hooks import Decision, ResidualReuseController, SkipPolicy, install_loop_hooks
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
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([SquaringBlock(), SquaringBlock()])

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
