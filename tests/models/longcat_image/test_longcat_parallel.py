"""CFG-parallel on LongCat-Image (2 gloo ranks on this CPU): a step batch of requests with different guidance, one of
them unguided, equals the single-process run; the methods without a plan are refused at start-up by name."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import Omni
from ditserve.config import DiffusionParallelConfig, OmniDiffusionConfig
from ditserve.engine.runner import ModelRunner
from ditserve.errors import ParallelConfigError
from ditserve.parallel.install import check_model
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.common import folder_with_defaults

REQUESTS = [{"prompt": "a red circle at top left"}, {"prompt": "a blue square", "negative_prompt": "red"},
            {"prompt": "a green triangle"}]
PARAMS = [{"seed": 1}, {"seed": 2, "guidance_scale": 2.5}, {"seed": 3, "guidance_scale": 1.0}]
BASE = {"height": 64, "width": 64, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return folder_with_defaults(tiny_pipeline_dir("longcat_image"), tmp_path_factory.mktemp("longcat") / "plain",
                                {"enable_prompt_rewrite": False})


def run(folder: str, **config) -> list[np.ndarray]:
    with Omni(model=folder, **config) as omni:
        outputs = omni.generate(REQUESTS, [{**BASE, **p} for p in PARAMS])
    assert [o.timings["batch_size"] for o in outputs] == [3, 3, 3]
    return [np.asarray(o.images[0], dtype=np.int16) for o in outputs]


def test_cfg_parallel_equals_one_process(folder: str) -> None:
    single = run(folder)
    parallel = run(folder, parallel_config={"cfg_parallel_size": 2, "timeout_s": 30})
    for image, expected in zip(parallel, single, strict=True):
        assert np.abs(image - expected).max() <= 1
    assert np.abs(single[0] - single[1]).max() > 20  # different requests: the comparison can fail


@pytest.mark.parametrize("pipeline", ["longcat_image", "longcat_image_edit"])
def test_only_cfg_parallel_has_a_plan(pipeline: str) -> None:
    adapter = ModelRunner(OmniDiffusionConfig(model=tiny_pipeline_dir(pipeline), device="cpu")).adapter
    assert check_model(adapter, DiffusionParallelConfig(cfg_parallel_size=2)) is not None
    with pytest.raises(ParallelConfigError, match=r"sequence parallelism \(Ulysses, ring\) has no plan for "
                                                  "LongCatImageTransformer2DModel"):
        check_model(adapter, DiffusionParallelConfig(ulysses_degree=2))
    with pytest.raises(ParallelConfigError, match="tensor parallelism has no plan for LongCatImageTransformer2DModel"):
        check_model(adapter, DiffusionParallelConfig(tensor_parallel_size=2))
