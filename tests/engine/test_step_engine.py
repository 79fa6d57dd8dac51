"""Step scheduling end to end: requests join a running batch between steps, leave it the step they finish, are
dropped within a step when aborted, fail alone when their prompt cannot be encoded, and their outputs never
depend on who shared their steps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.engine.engine import StepReport
from ditserve.errors import RequestAbortedError
from ditserve.testing.compare import max_abs_diff

BASE = OmniDiffusionSamplingParams(height=64, width=64, max_sequence_length=64)
LONG = BASE.replace(num_inference_steps=8, seed=1)
#: differs from LONG in prompt, seed, step count and guidance (true CFG with a negative prompt)
SHORT_GUIDED = BASE.replace(num_inference_steps=3, seed=2, true_cfg_scale=2.0, negative_prompt="green")


def submit_at_step(omni: Omni, at_step: int, action: Callable[[], Any]) -> tuple[Future, list[int]]:
    """Submit a LONG request that runs ``action`` on the engine thread right after its step ``at_step``;
    returns its future and the steps it reported."""
    steps: list[int] = []

    def on_step(done: int, _total: int) -> None:
        steps.append(done)
        if done == at_step:
            action()

    request = omni.engine.make_request("a red circle in the middle", LONG, progress_callback=on_step)
    return omni.engine.submit(request), steps


def test_a_request_joins_mid_run_leaves_first_and_both_equal_their_solo_runs(flux_omni: Omni) -> None:
    long_solo = flux_omni.generate("a red circle in the middle", LONG)[0]
    short_solo = flux_omni.generate("a blue square", SHORT_GUIDED)[0]
    joined: dict[str, Any] = {}

    def join() -> None:
        request = flux_omni.engine.make_request("a blue square", SHORT_GUIDED)
        joined["future"] = flux_omni.engine.submit(request)
        joined["future"].add_done_callback(lambda _f: joined.setdefault("long_steps_then", list(long_steps)))

    long_future, long_steps = submit_at_step(flux_omni, 2, join)
    long_out = long_future.result(timeout=120)
    short_out = joined["future"].result(timeout=120)

    # the short request ran steps 3-5 of the long one and was answered before the long one finished
    assert joined["long_steps_then"] == [1, 2, 3, 4, 5]
    assert long_out.timings["batch_size"] == short_out.timings["batch_size"] == 2
    assert short_out.cache_stats["shared_with"] == [long_out.request_id]
    assert max_abs_diff(long_out.images[0], long_solo.images[0]) <= 1
    assert max_abs_diff(short_out.images[0], short_solo.images[0]) <= 1


def test_an_aborted_mate_is_dropped_within_one_step_and_frees_its_slot(flux_omni: Omni) -> None:
    solo = flux_omni.generate("a red circle in the middle", LONG)[0]
    mate_steps: list[int] = []
    batch_sizes: list[int] = []
    mate: dict[str, Any] = {}

    def join() -> None:
        request = flux_omni.engine.make_request(
            "a doomed mate", BASE.replace(num_inference_steps=8, seed=3),
            progress_callback=lambda done, _total: mate_steps.append(done))
        mate["request"] = request
        mate["future"] = flux_omni.engine.submit(request)

    def abort_mate() -> None:
        flux_omni.engine.abort(mate["request"].request_id)

    def observe(report: StepReport) -> None:
        batch_sizes.append(report.batch_size)

    flux_omni.engine.observers.append(observe)
    try:
        long_future, _ = submit_at_step(flux_omni, 1, join)
        # the mate ran steps 2-4 of the long request; abort it after the long one's step 4
        flux_omni.engine.observers.append(lambda r: abort_mate() if len(batch_sizes) == 4 else None)
        out = long_future.result(timeout=120)
    finally:
        flux_omni.engine.observers[:] = []
    with pytest.raises(RequestAbortedError):
        mate["future"].result(timeout=60)
    assert max(mate_steps) <= 3  # aborted after its third step, it ran no further step
    assert batch_sizes[:4] == [1, 2, 2, 2] and set(batch_sizes[4:]) == {1}  # the slot was freed at once
    assert max_abs_diff(out.images[0], solo.images[0]) <= 1


def test_a_request_whose_prompt_cannot_be_encoded_fails_alone(flux_omni: Omni, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    solo = flux_omni.generate("a blue square", SHORT_GUIDED)[0]
    adapter = flux_omni.engine.adapter
    encode = adapter.encode_request

    def poisoned(request: Any) -> Any:
        if request.prompt == "poison":
            raise TypeError("the tokenizer cannot read this text")
        return encode(request)

    monkeypatch.setattr(adapter, "encode_request", poisoned)
    futures: dict[str, Future] = {}

    def join_both() -> None:
        for prompt in ("poison", "a blue square"):
            futures[prompt] = flux_omni.engine.submit(flux_omni.engine.make_request(prompt, SHORT_GUIDED))

    long_future, _ = submit_at_step(flux_omni, 1, join_both)
    long_future.result(timeout=120)
    with pytest.raises(TypeError, match="cannot read"):
        futures["poison"].result(timeout=60)
    mate = futures["a blue square"].result(timeout=60)
    assert max_abs_diff(mate.images[0], solo.images[0]) <= 1


def test_request_scheduling_runs_a_late_request_after_the_running_batch(tiny_flux_dir: str) -> None:
    with Omni(model=tiny_flux_dir, scheduling="request") as omni:
        finished: list[str] = []
        late: dict[str, Future] = {}
        started = threading.Event()

        def join() -> None:
            late["future"] = omni.engine.submit(omni.engine.make_request("a blue square", SHORT_GUIDED))
            late["future"].add_done_callback(lambda _f: finished.append("late"))
            started.set()

        long_future, _ = submit_at_step(omni, 2, join)
        long_future.add_done_callback(lambda _f: finished.append("long"))
        long_out = long_future.result(timeout=120)
        late_out = late["future"].result(timeout=120)
    assert started.is_set()
    assert finished == ["long", "late"]
    assert long_out.timings["batch_size"] == late_out.timings["batch_size"] == 1


@pytest.mark.parametrize("cache", [None, "tea_cache"])
def test_a_short_request_preempts_a_long_one_which_resumes_unchanged(tiny_flux_dir: str, cache: str | None) -> None:
    """One batch slot: the short request pauses the long one (its latents, scheduler and cache state kept) and
    finishes first; the long one resumes where it was. Both equal their solo runs, cache decisions included."""
    options = {"cache_backend": cache, "cache_config": {"rel_l1_thresh": 5.0}} if cache else {}
    with Omni(model=tiny_flux_dir, max_batch_size=1, **options) as omni:
        long_solo = omni.generate("a red circle in the middle", LONG)[0]
        short_solo = omni.generate("a blue square", SHORT_GUIDED)[0]
        finished: list[str] = []
        joined: dict[str, Future] = {}

        def join() -> None:
            joined["future"] = omni.engine.submit(omni.engine.make_request("a blue square", SHORT_GUIDED))
            joined["future"].add_done_callback(lambda _f: finished.append("short"))

        long_future, long_steps = submit_at_step(omni, 2, join)
        long_future.add_done_callback(lambda _f: finished.append("long"))
        long_out = long_future.result(timeout=120)
        short_out = joined["future"].result(timeout=120)
    assert finished == ["short", "long"]
    assert long_steps == list(range(1, 9))
    assert long_out.timings["batch_size"] == short_out.timings["batch_size"] == 1
    for solo, preempted in ((long_solo, long_out), (short_solo, short_out)):
        assert max_abs_diff(solo.images[0], preempted.images[0]) == 0
        if cache:
            assert solo.cache_stats["branches"] == preempted.cache_stats["branches"]


def test_a_request_whose_decode_fails_fails_alone(flux_omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = flux_omni.engine.adapter
    decode = adapter.decode

    def failing_decode(state: Any) -> Any:
        if state.request.prompt == "undecodable":
            raise RuntimeError("out of memory in the VAE")
        return decode(state)

    monkeypatch.setattr(adapter, "decode", failing_decode)
    futures: dict[str, Future] = {}

    def join() -> None:
        futures["bad"] = flux_omni.engine.submit(flux_omni.engine.make_request("undecodable", SHORT_GUIDED))

    long_future, long_steps = submit_at_step(flux_omni, 1, join)
    long_out = long_future.result(timeout=120)
    with pytest.raises(RuntimeError, match="out of memory in the VAE"):
        futures["bad"].result(timeout=120)
    assert long_out.images and long_steps[-1] == LONG.num_inference_steps


def test_a_step_that_fails_because_of_one_request_fails_only_that_request(
        flux_omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    solo = flux_omni.generate("a red circle in the middle", LONG)[0]
    runner = flux_omni.engine.runner
    predict = runner.predictor
    batch_sizes: list[int] = []

    def predict_failing_on_poison(batch: Any) -> Any:
        batch_sizes.append(len(batch.states))
        if any(state.request.prompt == "poison" for state in batch.states):
            raise RuntimeError("a shape this request's input made impossible")
        return predict(batch)

    monkeypatch.setattr(runner, "predictor", predict_failing_on_poison)
    futures: dict[str, Future] = {}

    def join() -> None:
        futures["poison"] = flux_omni.engine.submit(flux_omni.engine.make_request("poison", SHORT_GUIDED))

    long_future, long_steps = submit_at_step(flux_omni, 2, join)
    out = long_future.result(timeout=120)
    with pytest.raises(RuntimeError, match="impossible"):
        futures["poison"].result(timeout=60)
    assert batch_sizes[:4] == [1, 1, 2, 1]  # the failed batch of two, then each alone...
    assert long_steps == list(range(1, 9))  # ...and the long request lost no step
    assert max_abs_diff(out.images[0], solo.images[0]) <= 1
