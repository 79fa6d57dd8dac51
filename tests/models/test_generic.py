"""The generic path: a real diffusers pipeline (Ovis-Image, which has an adapter of its own, served here through the
generic adapter) runs its own ``__call__``, with per-request seeds, clear errors for params it does not take, and
abort between steps."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import OvisImagePipeline

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.errors import InvalidParameterError, RequestAbortedError
from ditserve.models.generic import GenericAdapter
from ditserve.request import RequestOutput
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff
from ditserve.testing.generic import generic_engine

PROMPT = "a small red circle at the top left"
# Ovis drops its system prompt's first 28 tokens and keeps max_sequence_length after them: the tiny tokenizer
# spells the system prompt letter by letter, so the user prompt only fits with room to spare
BASE = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 128}


@pytest.fixture(scope="module")
def ovis_dir() -> str:
    return tiny_pipeline_dir("ovis_image")


@pytest.fixture(scope="module")
def diffusers_ovis(ovis_dir: str) -> OvisImagePipeline:
    pipe = OvisImagePipeline.from_pretrained(ovis_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ovis_engine(ovis_dir: str):
    pipe = OvisImagePipeline.from_pretrained(ovis_dir)
    pipe.set_progress_bar_config(disable=True)
    engine = generic_engine(pipe, max_batch_size=4)
    yield engine
    engine.close()


def generate(engine: DiffusionEngine, prompts: str | list[str], params: dict | list[dict]) -> list[RequestOutput]:
    prompts = prompts if isinstance(prompts, list) else [prompts]
    params = params if isinstance(params, list) else [params] * len(prompts)
    return engine.generate([engine.make_request(prompt, OmniDiffusionSamplingParams(**p))
                            for prompt, p in zip(prompts, params, strict=True)])


def reference(pipe: OvisImagePipeline, prompt: str = PROMPT, seed: int = 0, **overrides):
    kwargs = {**BASE, **overrides}
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def test_runs_on_the_generic_adapter(ovis_engine: DiffusionEngine) -> None:
    assert type(ovis_engine.adapter) is GenericAdapter
    assert ovis_engine.adapter.kind == "image"


@pytest.mark.parametrize("options", [{}, {"negative_prompt": "a blue dog", "guidance_scale": 3.0}],
                         ids=["defaults", "negative-prompt"])
def test_matches_diffusers(ovis_engine: DiffusionEngine, diffusers_ovis: OvisImagePipeline, options: dict) -> None:
    ours = generate(ovis_engine, PROMPT, {"seed": 5, **BASE, **options})[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_ovis, seed=5, **options)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(ovis_engine: DiffusionEngine,
                                                           diffusers_ovis: OvisImagePipeline) -> None:
    ours = generate(ovis_engine, PROMPT, {"seed": 5, **BASE})[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_ovis, prompt="a blue dog", seed=5)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_ovis, seed=6)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_ovis, seed=5, num_inference_steps=4)[0]) > 15


def test_each_request_runs_alone_with_its_own_seed(ovis_engine: DiffusionEngine, diffusers_ovis: OvisImagePipeline) -> None:
    prompts = [PROMPT, "a green triangle"]
    outputs = generate(ovis_engine, prompts, [{**BASE, "seed": 11}, {**BASE, "seed": 12}])
    assert [o.timings["batch_size"] for o in outputs] == [1, 1]
    for output, prompt, seed in zip(outputs, prompts, (11, 12), strict=True):
        assert max_abs_diff(output.images[0], reference(diffusers_ovis, prompt=prompt, seed=seed)[0]) <= 3


@pytest.mark.parametrize("bad", [{"guidance_scale_2": 2.0}, {"true_cfg_scale": 4.0}, {"num_frames": 5}])
def test_param_the_pipeline_does_not_take_is_an_error(ovis_engine: DiffusionEngine, bad: dict) -> None:
    (name,) = bad
    with pytest.raises(InvalidParameterError, match="OvisImagePipeline") as error:
        generate(ovis_engine, PROMPT, {**BASE, **bad})
    assert error.value.param == name


def test_abort_stops_between_steps_and_the_engine_goes_on(ovis_engine: DiffusionEngine,
                                                          diffusers_ovis: OvisImagePipeline) -> None:
    steps = 6
    progress: list[tuple[int, int]] = []
    batch_done = threading.Event()

    def abort_after_first_step(done: int, total: int) -> None:
        progress.append((done, total))
        ovis_engine.abort(request.request_id)

    def on_batch(*_args: object) -> None:
        batch_done.set()

    params = OmniDiffusionSamplingParams(**{**BASE, "num_inference_steps": steps}, seed=5)
    request = ovis_engine.make_request(PROMPT, params, progress_callback=abort_after_first_step)
    ovis_engine.observers.append(on_batch)
    try:
        future = ovis_engine.submit(request)
        with pytest.raises(RequestAbortedError):
            future.result(timeout=60)
        assert batch_done.wait(timeout=60)
    finally:
        ovis_engine.observers.remove(on_batch)
    assert progress == [(1, steps)]
    ours = generate(ovis_engine, PROMPT, {"seed": 5, **BASE})[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_ovis, seed=5)[0]) <= 3


def test_sizes_diffusers_would_round_are_refused(ovis_engine: DiffusionEngine) -> None:
    multiple = ovis_engine.adapter.size_multiple
    with pytest.raises(InvalidParameterError, match="height") as info:
        generate(ovis_engine, PROMPT, {**BASE, "height": 64 + multiple // 2})
    assert info.value.param == "height"
    with pytest.raises(InvalidParameterError, match="fps"):
        generate(ovis_engine, PROMPT, {"fps": 8, **BASE})
