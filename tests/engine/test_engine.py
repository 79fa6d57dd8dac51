"""Engine behaviour: batching never changes a request's output, requests are repeatable, abort is prompt."""

from __future__ import annotations

import threading

import pytest

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.errors import RequestAbortedError
from ditserve.testing.compare import max_abs_diff

PARAMS = OmniDiffusionSamplingParams(height=64, width=64, num_inference_steps=3, max_sequence_length=64)


def _blocking_request(omni: Omni, release: threading.Event):
    """A request that holds the engine thread until ``release`` is set, so later requests queue up."""
    started = threading.Event()

    def hold(_done: int, _total: int) -> None:
        started.set()
        release.wait(timeout=30)

    request = omni.engine.make_request("hold", PARAMS.replace(seed=0), progress_callback=hold)
    future = omni.engine.submit(request)
    assert started.wait(timeout=30)
    return future


def test_batched_output_equals_solo(flux_omni: Omni) -> None:
    prompts = ["a red circle", "a blue square on the left", "a green triangle"]
    params = [PARAMS.replace(seed=s) for s in (11, 12, 13)]
    solo = [flux_omni.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert all(o.timings["batch_size"] == 1 for o in solo)

    release = threading.Event()
    blocker = _blocking_request(flux_omni, release)
    requests = [flux_omni.engine.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    futures = [flux_omni.engine.submit(r) for r in requests]
    release.set()
    blocker.result(timeout=60)
    batched = [f.result(timeout=60) for f in futures]

    # they joined the blocker's running batch after its first step
    assert [o.timings["batch_size"] for o in batched] == [4, 4, 4]
    for one, many in zip(solo, batched, strict=True):
        assert max_abs_diff(one.images[0], many.images[0]) <= 1
    assert max_abs_diff(batched[0].images[0], batched[1].images[0]) > 15


def test_same_request_twice_is_identical_and_seed_is_reported(flux_omni: Omni) -> None:
    first = flux_omni.generate("a prompt no other test uses", PARAMS)[0]
    assert first.seed is not None
    again = flux_omni.generate("a prompt no other test uses", PARAMS.replace(seed=first.seed))[0]
    assert max_abs_diff(first.images[0], again.images[0]) == 0
    assert set(first.timings) >= {"encode_s", "denoise_s", "decode_s", "total_s"}
    # no cache backend: the stats say so, and report the prompt-embedding cache's outcome
    assert first.cache_stats["backend"] is None
    assert first.cache_stats["prompt_embed"]["outcome"] == "miss"
    assert again.cache_stats["prompt_embed"]["outcome"] == "hit"


def test_abort_stops_within_one_step(flux_omni: Omni) -> None:
    steps_done: list[int] = []
    params = PARAMS.replace(num_inference_steps=20, seed=1)
    holder: dict = {}

    def on_step(done: int, _total: int) -> None:
        steps_done.append(done)
        if done == 2:
            flux_omni.engine.abort(holder["id"])

    request = flux_omni.engine.make_request("a red circle", params, progress_callback=on_step)
    holder["id"] = request.request_id
    future = flux_omni.engine.submit(request)
    with pytest.raises(RequestAbortedError):
        future.result(timeout=60)
    # wait for the engine to finish the batch, then check how far it went
    flux_omni.generate("after abort", PARAMS.replace(seed=2))
    assert max(steps_done) <= 3


def test_abort_of_one_request_leaves_its_batch_mate_intact(flux_omni: Omni) -> None:
    expected = flux_omni.generate("a blue square", PARAMS.replace(seed=5))[0].images[0]
    release = threading.Event()
    blocker = _blocking_request(flux_omni, release)
    doomed = flux_omni.engine.make_request("a red circle", PARAMS.replace(seed=4))
    kept = flux_omni.engine.make_request("a blue square", PARAMS.replace(seed=5))
    doomed_future, kept_future = flux_omni.engine.submit(doomed), flux_omni.engine.submit(kept)
    flux_omni.engine.abort(doomed.request_id)
    release.set()
    blocker.result(timeout=60)
    with pytest.raises(RequestAbortedError):
        doomed_future.result(timeout=60)
    assert max_abs_diff(kept_future.result(timeout=60).images[0], expected) <= 1
