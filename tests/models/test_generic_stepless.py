"""The generic path on a pipeline whose ``__call__`` has no step callback (as LongCat-Image's) and returns several
images per output (as Qwen-Image-Layered's): it runs, says what it cannot do, and flattens the layers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.errors import CacheConfigError, RequestAbortedError, UnsupportedModelError
from ditserve.models.generic import GenericAdapter
from ditserve.testing.generic import generic_engine, generic_runner, stepless_pipeline

PROMPT = "a red cat"


@pytest.fixture(scope="module")
def pipeline():
    return stepless_pipeline()


@pytest.fixture()
def engine(pipeline):
    engine = generic_engine(pipeline)
    yield engine
    engine.close()


def _generate(engine: DiffusionEngine, prompt: str = PROMPT, seed: int = 3, **kwargs):
    request = engine.make_request(prompt, OmniDiffusionSamplingParams(seed=seed), **kwargs)
    return engine.generate([request])[0]


def _theirs(pipeline, prompt: str = PROMPT, seed: int = 3) -> list[np.ndarray]:
    images = pipeline(prompt, generator=torch.Generator("cpu").manual_seed(seed)).images
    return [np.asarray(layer) for output in images for layer in output]


def test_runs_and_flattens_the_layers_of_each_output_in_order(engine: DiffusionEngine, pipeline) -> None:
    assert engine.adapter.reports_steps is False
    ours = [np.asarray(image) for image in _generate(engine).images]
    theirs = _theirs(pipeline)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, b)
    # the layers differ, so their order is checked; another prompt or seed gives other pixels
    assert not np.array_equal(ours[0], ours[1])
    assert not np.array_equal(ours[0], _theirs(pipeline, prompt="a blue dog")[0])
    assert not np.array_equal(ours[0], _theirs(pipeline, seed=4)[0])


def test_progress_is_reported_once_when_the_request_finishes(engine: DiffusionEngine) -> None:
    progress: list[tuple[int, int]] = []
    _generate(engine, progress_callback=lambda done, total: progress.append((done, total)))
    steps = engine.adapter.family_defaults()["num_inference_steps"]
    assert progress == [(steps, steps)]


def test_abort_of_a_running_request_answers_at_once_and_the_engine_goes_on(engine: DiffusionEngine,
                                                                           pipeline) -> None:
    started = threading.Event()
    request = engine.make_request(PROMPT, OmniDiffusionSamplingParams(seed=3))

    def abort_once_running(_module, _args) -> None:
        if not started.is_set():
            started.set()
            engine.abort(request.request_id)

    handle = pipeline.transformer.register_forward_pre_hook(abort_once_running)
    try:
        with pytest.raises(RequestAbortedError):
            engine.generate([request])
    finally:
        handle.remove()
    assert started.is_set()
    assert np.array_equal(np.asarray(_generate(engine).images[0]), _theirs(pipeline)[0])


def test_step_caches_are_refused_at_start_up(pipeline) -> None:
    with pytest.raises(CacheConfigError, match="callback_on_step_end"):
        generic_runner(pipeline, cache_backend="tea_cache")


def test_a_pipeline_without_a_generator_is_refused_when_loaded() -> None:
    from diffusers import DiffusionPipeline

    class Unseeded(DiffusionPipeline):
        def __call__(self, prompt: str, num_inference_steps: int = 4):
            raise AssertionError("never called")

    with pytest.raises(UnsupportedModelError, match=r"Unseeded.__call__ takes no generator") as error:
        GenericAdapter(Unseeded())
    assert error.value.param == "model"
