"""Step scheduling on every adapter family: a request that joins a running one mid-run (other prompt, seed, step
count and guidance) leaves first, and both equal their solo runs."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.testing import tiny_pipeline_dir
from tests.cache.helpers import media

#: per tiny pipeline: size params, the long request's guidance, the short one's (off or other), input images
FAMILIES: dict[str, dict[str, Any]] = {
    "flux_kontext": {"size": {"height": 64, "width": 64, "max_sequence_length": 64}, "images": True,
                     "long": {"true_cfg_scale": 3.0, "negative_prompt": "blurry", "guidance_scale": 5.0},
                     "short": {"guidance_scale": 2.0}},
    "qwen_image": {"size": {"height": 64, "width": 64},
                   "long": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, "short": {"true_cfg_scale": 1.0}},
    "qwen_image_edit": {"size": {"height": 64, "width": 64}, "images": True,
                        "long": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, "short": {"true_cfg_scale": 1.0}},
    "sd3": {"size": {"height": 64, "width": 64}, "long": {"guidance_scale": 7.0}, "short": {"guidance_scale": 1.0}},
    "z_image": {"size": {"height": 64, "width": 64}, "long": {"guidance_scale": 5.0}, "short": {"guidance_scale": 2.0}},
    "wan": {"size": {"height": 32, "width": 32, "num_frames": 5},
            "long": {"guidance_scale": 5.0}, "short": {"guidance_scale": 1.0}},
    "wan_a14b": {"size": {"height": 32, "width": 32, "num_frames": 5},
                 "long": {"guidance_scale": 5.0, "guidance_scale_2": 3.0}, "short": {"guidance_scale": 4.0}},
    "wan_i2v_a14b": {"size": {"height": 32, "width": 32, "num_frames": 5}, "images": True,
                     "long": {"guidance_scale": 5.0, "guidance_scale_2": 3.0}, "short": {"guidance_scale": 1.0}},
    "wan_ti2v_i2v": {"size": {"height": 64, "width": 64, "num_frames": 5}, "images": True,
                     "long": {"guidance_scale": 5.0}, "short": {"guidance_scale": 1.0}},
    "longcat_image": {"size": {"height": 64, "width": 64}, "long": {"guidance_scale": 4.5}, "short": {"guidance_scale": 1.0}},
    "longcat_image_edit": {"size": {"height": 128, "width": 128}, "images": True, "long": {"guidance_scale": 4.5}, "short": {"guidance_scale": 2.0}},
}


def input_images() -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_request_joining_mid_run_equals_its_solo_run(family: str) -> None:
    spec = FAMILIES[family]
    images = input_images() if spec.get("images") else []
    long_params = OmniDiffusionSamplingParams(**spec["size"], **spec["long"], num_inference_steps=6, seed=1)
    short_params = OmniDiffusionSamplingParams(**spec["size"], **spec["short"], num_inference_steps=3, seed=2)
    with Omni(model=tiny_pipeline_dir(family)) as omni:
        engine = omni.engine
        long_solo = engine.generate([engine.make_request("a red cat", long_params, images)])[0]
        short_solo = engine.generate([engine.make_request("a blue dog", short_params, images)])[0]
        joined: dict[str, Future] = {}
        order: list[str] = []

        def join_after_step_2(done: int, _total: int) -> None:
            if done == 2:
                joined["short"] = engine.submit(engine.make_request("a blue dog", short_params, images))
                joined["short"].add_done_callback(lambda _f: order.append("short"))

        long_future = engine.submit(engine.make_request("a red cat", long_params, images,
                                                        progress_callback=join_after_step_2))
        long_future.add_done_callback(lambda _f: order.append("long"))
        long_out, short_out = long_future.result(timeout=120), joined["short"].result(timeout=120)
    assert order == ["short", "long"]
    assert long_out.timings["batch_size"] == short_out.timings["batch_size"] == 2
    for solo, batched in ((long_solo, long_out), (short_solo, short_out)):
        assert np.abs(media(solo).astype(int) - media(batched).astype(int)).max() <= 1
    assert np.abs(media(long_out).astype(int) - media(short_out).astype(int)).max() > 3  # they differ
