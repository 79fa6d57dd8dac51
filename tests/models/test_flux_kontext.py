"""FLUX.1-Kontext: ditserve's shared loop equals diffusers' own FluxKontextPipeline on the same weights, prompt,
input image and seed; requests with different images and guidance batch and equal their solo runs; caches skip
on it; edits over HTTP; bad input is refused by name.

The tiny folder's ``ditserve_defaults.json`` sets ``max_area`` to 64x64 and turns ``auto_resize`` off (diffusers'
defaults would VAE-encode every input at about a megapixel); diffusers is called with the same settings. The
default sizing is checked on the pixels diffusers hands its VAE, stopped before the megapixel encode.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.flux.kontext import FluxKontextAdapter
from ditserve.request import Request
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff
from ditserve.testing.flux import TINY_KONTEXT_SIZING
from tests.cache.helpers import count_block_work, media

BASE = {"num_inference_steps": 3, "max_sequence_length": 64}
#: the tiny folder's sizing, as diffusers' __call__ takes it
DIFFUSERS_SIZING = {"max_area": TINY_KONTEXT_SIZING["max_area"], "_auto_resize": TINY_KONTEXT_SIZING["auto_resize"]}
PROMPT_A = "turn this into a painting"
PROMPT_B = "a small green circle at the top left"
GUIDED = {"guidance_scale": 5.0, "true_cfg_scale": 3.0, "negative_prompt": "blue"}


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGE_A, IMAGE_B = random_image(0), random_image(1)


def edit(prompt: str, image: Image.Image) -> dict[str, Any]:
    return {"prompt": prompt, "multi_modal_data": {"image": image}}


@pytest.fixture(scope="module")
def kontext_dir() -> str:
    return tiny_pipeline_dir("flux_kontext")


@pytest.fixture(scope="module")
def pipe(kontext_dir: str) -> FluxKontextPipeline:
    pipeline = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def omni(kontext_dir: str) -> Iterator[Omni]:
    with Omni(model=kontext_dir, max_batch_size=4) as instance:
        yield instance


def reference(pipe: FluxKontextPipeline, prompt: str = PROMPT_A, image: Image.Image = IMAGE_A, seed: int = 0,
              **overrides: Any) -> list[Image.Image]:
    kwargs = {**BASE, **DIFFUSERS_SIZING, **overrides}
    return pipe(image=image, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


# ---------------------------------------------------------------------------------------------- parity
CASES = {
    "distilled-guidance": ({"guidance_scale": 2.5}, {}),
    "true-cfg": (GUIDED, {}),
    # a 4:3 request is rescaled to 64x64 pixels' area (72x52), as diffusers does; two outputs of one prompt
    "wide-two-outputs": ({"height": 48, "width": 64, "num_outputs_per_prompt": 2},
                         {"height": 48, "width": 64, "num_images_per_prompt": 2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(omni: Omni, pipe: FluxKontextPipeline, case: str) -> None:
    ours_params, theirs_params = CASES[case]
    theirs_params = {**{k: v for k, v in ours_params.items() if k != "num_outputs_per_prompt"}, **theirs_params}
    ours = omni.generate(edit(PROMPT_A, IMAGE_A), seed=7, **BASE, **ours_params)[0]
    theirs = reference(pipe, seed=7, **theirs_params)
    assert len(ours.images) == len(theirs)
    for a, b in zip(ours.images, theirs, strict=True):
        assert a.size == b.size
        assert max_abs_diff(a, b) <= 3
    expected_size = (72, 52) if case == "wide-two-outputs" else (64, 64)
    assert ours.images[0].size == expected_size
    assert (ours.params.width, ours.params.height) == expected_size  # the output reports the size that ran
    # what the bench hands diffusers' pipeline is what this parity needed
    assert omni.engine.adapter.diffusers_call_arguments() == DIFFUSERS_SIZING


def test_parity_oracle_detects_a_wrong_image_prompt_seed_or_guidance(omni: Omni, pipe: FluxKontextPipeline) -> None:
    ours = omni.generate(edit(PROMPT_A, IMAGE_A), seed=7, guidance_scale=2.5, **BASE)[0].images[0]
    assert max_abs_diff(ours, reference(pipe, image=IMAGE_B, seed=7, guidance_scale=2.5)[0]) > 10
    assert max_abs_diff(ours, reference(pipe, prompt=PROMPT_B, seed=7, guidance_scale=2.5)[0]) > 10
    assert max_abs_diff(ours, reference(pipe, seed=8, guidance_scale=2.5)[0]) > 10
    assert max_abs_diff(ours, reference(pipe, seed=7, guidance_scale=5.0)[0]) > 10


def test_default_sizing_hands_the_vae_what_diffusers_hands_it(pipe: FluxKontextPipeline) -> None:
    """diffusers' defaults (auto_resize, max_area 1024x1024): the input goes to the preferred Kontext resolution
    nearest its aspect ratio. The pixels diffusers gives its VAE are caught there (the megapixel encode is not
    run) and equal ours; the default output is 1024x1024."""
    captured: list[torch.Tensor] = []

    class Caught(Exception):
        pass

    def catch(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise Caught

    adapter = FluxKontextAdapter(pipe, {})
    handle = pipe.vae.encoder.register_forward_pre_hook(catch)
    try:
        for image in (random_image(0, (64, 48)), random_image(1, (30, 90)), random_image(2, (500, 500))):
            with pytest.raises(Caught):
                pipe(image=image, prompt=PROMPT_A, num_inference_steps=1, max_sequence_length=64)
            ours = adapter.input_pixels(image)
            assert ours.shape == captured[-1].shape and torch.equal(ours, captured[-1])
    finally:
        handle.remove()
    # 4:3 -> 1184x880, 1:3 -> 672x1568 (the tallest), 1:1 -> 1024x1024
    assert [tuple(c.shape[2:]) for c in captured] == [(880, 1184), (1568, 672), (1024, 1024)]
    defaults = adapter.resolve_params(OmniDiffusionSamplingParams())
    assert (defaults.height, defaults.width) == (1024, 1024)


def test_inputs_that_become_the_same_size_share_steps_and_others_do_not(pipe: FluxKontextPipeline) -> None:
    def step_key(adapter: FluxKontextAdapter, image: Image.Image) -> tuple[Any, ...]:
        request = Request(prompt="x", params=adapter.resolve_params(OmniDiffusionSamplingParams()), images=[image])
        request.params = adapter.complete_params(request)
        return adapter.step_key(request)

    resizing = FluxKontextAdapter(pipe, {})
    # both 4:3: the same preferred resolution, so the same token shapes
    assert step_key(resizing, random_image(0, (64, 48))) == step_key(resizing, random_image(1, (128, 96)))
    assert step_key(resizing, random_image(0, (64, 48))) != step_key(resizing, random_image(0, (48, 64)))
    as_given = FluxKontextAdapter(pipe, dict(TINY_KONTEXT_SIZING))
    assert step_key(as_given, random_image(0, (64, 48))) != step_key(as_given, random_image(1, (128, 96)))


# ---------------------------------------------------------------------------------------------- batching
def test_batch_with_different_images_prompts_seeds_and_guidance_equals_solo(omni: Omni) -> None:
    requests = [edit(PROMPT_A, IMAGE_A), edit(PROMPT_B, IMAGE_B)]
    params = [{"seed": 0, "guidance_scale": 2.5, **BASE}, {"seed": 5, **GUIDED, **BASE}]
    solo = [omni.generate(request, p)[0] for request, p in zip(requests, params, strict=True)]
    together = omni.generate(requests, params)
    assert [o.timings["batch_size"] for o in together] == [2, 2]
    for alone, batched in zip(solo, together, strict=True):
        assert max_abs_diff(alone.images[0], batched.images[0]) <= 1
    assert max_abs_diff(together[0].images[0], together[1].images[0]) > 10


def test_inputs_of_different_sizes_run_apart_and_equal_solo(omni: Omni) -> None:
    tall = random_image(2, (48, 64))
    requests = [edit(PROMPT_A, IMAGE_A), edit(PROMPT_A, tall)]
    solo = [omni.generate(request, seed=1, **BASE)[0] for request in requests]
    together = omni.generate(requests, seed=1, **BASE)
    # 64x48 and 48x64 inputs make different token counts: never one step batch
    assert [o.timings["batch_size"] for o in together] == [1, 1]
    for alone, apart in zip(solo, together, strict=True):
        assert max_abs_diff(alone.images[0], apart.images[0]) <= 1


# ---------------------------------------------------------------------------------------------- caches
#: settings under which each backend skips every step it may (MagCache with flat ratios: no drift at all)
SKIPPING = {
    "tea_cache": {"rel_l1_thresh": 10.0},
    "mag_cache": {"mag_ratios": [1.0, 1.0], "magcache_thresh": 1.0, "retention_ratio": 0.0},
    "cache_dit": {"residual_diff_threshold": 10.0, "max_warmup_steps": 1, "max_continuous_cached_steps": -1},
}


@pytest.mark.parametrize("backend", sorted(SKIPPING))
def test_cache_backend_skips_on_kontext(kontext_dir: str, omni: Omni, backend: str) -> None:
    """The image tokens are part of the blocks' sequence: a skipped step reuses the residual of the whole
    sequence, and only the noisy tokens are kept. Exact where it may not skip (TeaCache at 0), and where it
    skips the block work follows its statistics and the output changes."""
    params = {"num_inference_steps": 6, "max_sequence_length": 64, "seed": 2, **GUIDED}
    request = edit(PROMPT_A, IMAGE_A)
    reference = omni.generate(request, params)[0]
    with Omni(kontext_dir, cache_backend=backend, cache_config=SKIPPING[backend]) as cached:
        transformer = cached.engine.runner.model.pipeline.transformer
        with count_block_work(transformer, backend) as one_step:
            cached.generate(request, {**params, "num_inference_steps": 1})
        with count_block_work(transformer, backend) as counter:
            skipping = cached.generate(request, params)[0]
    stats = skipping.cache_stats
    assert stats["skipped_steps"] > 0
    assert set(stats["branches"]) == {"cond", "uncond"}
    if backend != "cache_dit":  # cache-dit always runs its first block: its counted work is not whole steps
        assert counter.calls == stats["computed_steps"] * one_step.calls // len(stats["branches"])
    assert max_abs_diff(media(skipping), media(reference)) > 3
    if backend == "tea_cache":
        with Omni(kontext_dir, cache_backend=backend, cache_config={"rel_l1_thresh": 0.0}) as exact:
            assert np.array_equal(media(exact.generate(request, params)[0]), media(reference))


# ---------------------------------------------------------------------------------------------- HTTP
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def server(kontext_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = DiffusionEngine(OmniDiffusionConfig(model=kontext_dir, max_batch_size=4,
                                                 limits={"max_image_size": 64}))
    settings = ServerSettings(output_dir=Path(tmp_path_factory.mktemp("kontext-server")),
                              served_model_name="tiny-kontext")
    thread = ServerThread(create_app(engine, settings))
    yield thread
    thread.stop()
    engine.close()


def test_http_edit_and_chat_with_an_image_equal_offline(server: ServerThread, omni: Omni) -> None:
    offline = omni.generate(edit(PROMPT_A, IMAGE_A), seed=4, guidance_scale=2.5, **BASE)[0].images[0]
    fields = {"prompt": PROMPT_A, "seed": "4", "guidance_scale": "2.5", "num_inference_steps": "3",
              "max_sequence_length": "64"}
    parts = [(name, (None, value)) for name, value in fields.items()]
    response = httpx.post(f"{server.url}/v1/images/edits", timeout=60,
                          files=[*parts, ("image", ("in.png", png_bytes(IMAGE_A), "image/png"))])
    assert response.status_code == 200, response.text[:300]
    assert response.json()["seed"] == 4
    over_http = decoded(response.json()["data"][0]["b64_json"])
    assert over_http.size == (64, 64) and max_abs_diff(over_http, offline) == 0

    url = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE_A)).decode("ascii")
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT_A},
                                                  {"type": "image_url", "image_url": {"url": url}}]}],
        "seed": 4, "guidance_scale": 2.5, "num_inference_steps": 3, "max_sequence_length": 64})
    assert chat.status_code == 200, chat.text[:300]
    part = chat.json()["choices"][0]["message"]["content"][0]
    assert max_abs_diff(decoded(part["image_url"]["url"].split(",", 1)[1]), offline) == 0


def test_http_routes_know_kontext_is_an_edit_model(server: ServerThread) -> None:
    no_image = httpx.post(f"{server.url}/v1/images/edits", timeout=60,
                          files=[("prompt", (None, PROMPT_A)), ("num_inference_steps", (None, "1"))])
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    generation = httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={"prompt": PROMPT_A})
    assert generation.status_code == 400
    assert "POST /v1/images/edits" in generation.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- bad input
def test_a_request_without_an_image_is_refused_naming_the_field(omni: Omni) -> None:
    with pytest.raises(InvalidParameterError, match=r"FluxKontextPipeline edits images: pass "
                                                    r"multi_modal_data=\{'image': \.\.\.\}") as error:
        omni.generate(PROMPT_A, **BASE)
    assert error.value.param == "image"


def test_more_images_or_one_too_small_are_refused(omni: Omni) -> None:
    with pytest.raises(InvalidParameterError, match="takes 1 input image, got 2") as error:
        omni.generate({"prompt": PROMPT_A, "multi_modal_data": {"image": [IMAGE_A, IMAGE_B]}}, **BASE)
    assert error.value.param == "image"
    # inputs are not resized here (auto_resize off): 3x3 pixels floor to no pixels at the size multiple 4
    with pytest.raises(InvalidParameterError, match="is 3x3 pixels; FluxKontextPipeline needs at least 4x4") as error:
        omni.generate(edit(PROMPT_A, random_image(0, (3, 3))), **BASE)
    assert error.value.param == "image"


def test_model_level_sizing_is_checked(pipe: FluxKontextPipeline) -> None:
    with pytest.raises(InvalidTypeError, match="max_area must be a positive whole number") as error:
        FluxKontextAdapter(pipe, {"max_area": "big"})
    assert error.value.param == "max_area"
    with pytest.raises(InvalidTypeError, match="auto_resize must be true or false") as error:
        FluxKontextAdapter(pipe, {"auto_resize": 1})
    assert error.value.param == "auto_resize"
    # taken out of the defaults: they are not sampling params
    adapter = FluxKontextAdapter(pipe, {"max_area": 128 * 128, "auto_resize": False, "num_inference_steps": 4})
    assert adapter.model_defaults == {"num_inference_steps": 4}
    assert adapter.output_size(64, 64) == (128, 128)


def test_an_aspect_ratio_that_leaves_no_rows_is_refused(omni: Omni) -> None:
    # 8 x 4096 at 64x64 pixels' area: 3 rows, under the size multiple 4
    with pytest.raises(InvalidParameterError, match="leaves a height under 4") as error:
        omni.generate(edit(PROMPT_A, IMAGE_A), height=8, width=4096, **BASE)
    assert error.value.param == "height"
