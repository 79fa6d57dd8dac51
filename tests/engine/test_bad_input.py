"""Bad input gets our own error (a ValueError/TypeError subclass) that names the field: never silently ignored."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.errors import (
    CacheConfigError,
    DitServeError,
    InvalidParameterError,
    InvalidTypeError,
    ModelNotFoundError,
    UnknownKeyError,
    UnsupportedModelError,
)

BASE = {"height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 64}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"height": 66}, "height"),
        ({"width": 102}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 10_000}, "num_inference_steps"),
        ({"num_outputs_per_prompt": 0}, "num_outputs_per_prompt"),
        ({"num_outputs_per_prompt": 100}, "num_outputs_per_prompt"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale"),
        ({"seed": -1}, "seed"),
        ({"num_frames": 9}, "num_frames"),
        ({"max_sequence_length": 600}, "max_sequence_length"),
    ],
)
def test_out_of_range_params_name_the_field(flux_omni: Omni, overrides: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        flux_omni.generate("a cat", **{**BASE, **overrides})
    assert field in str(info.value)
    assert info.value.param == field


def test_wrong_types_raise_type_errors(flux_omni: Omni) -> None:
    with pytest.raises(InvalidTypeError, match="num_inference_steps"):
        flux_omni.generate("a cat", **{**BASE, "num_inference_steps": "many"})
    with pytest.raises(InvalidTypeError, match="prompt"):
        flux_omni.generate(123, **BASE)
    with pytest.raises(TypeError):  # our errors stay catchable as the built-in kinds
        flux_omni.generate("a cat", **{**BASE, "height": 64.5})


def test_unknown_keys_list_the_allowed_ones(flux_omni: Omni) -> None:
    with pytest.raises(UnknownKeyError, match="num_inference_steps") as info:
        flux_omni.generate("a cat", num_inference_stepz=3)
    assert "num_inference_stepz" in str(info.value)
    with pytest.raises(UnknownKeyError):
        OmniDiffusionSamplingParams.from_dict({"guidance": 3})
    with pytest.raises(UnknownKeyError, match="prompt dict"):
        flux_omni.generate({"prompt": "a cat", "negative": "dog"}, **BASE)
    with pytest.raises(UnknownKeyError, match="Omni"):
        Omni(model="unused", cache_backnd="tea_cache")


def test_input_image_on_a_text_to_image_model_is_refused(flux_omni: Omni) -> None:
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InvalidParameterError, match="takes no input image"):
        flux_omni.generate({"prompt": "a cat", "multi_modal_data": {"image": image}}, **BASE)


def test_unknown_model_folder_and_unrunnable_class(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        Omni(model=str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="neither an existing folder"):
        Omni(model="./no/such/folder")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(UnsupportedModelError, match="NoSuchPipeline"):
        Omni(model=str(tmp_path))


def test_config_errors_are_clear() -> None:
    with pytest.raises(InvalidParameterError, match="mutually exclusive"):
        Omni(model="x", enable_cpu_offload=True, enable_layerwise_offload=True)
    with pytest.raises(InvalidParameterError, match="dtype"):
        Omni(model="x", dtype="float8")
    with pytest.raises(InvalidParameterError, match="cache_backend"):
        Omni(model="x", cache_config={"rel_l1_thresh": 0.2})
    with pytest.raises(InvalidParameterError, match="cfg_parallel_size"):
        Omni(model="x", parallel_config={"cfg_parallel_size": 3})


def test_unknown_cache_backend_lists_the_allowed_ones(tiny_flux_dir: str) -> None:
    with pytest.raises(CacheConfigError, match="unknown"):
        Omni(model=tiny_flux_dir, cache_backend="warp_drive")


def test_every_error_is_a_ditserve_error() -> None:
    for error_type in (InvalidParameterError, InvalidTypeError, ModelNotFoundError, UnsupportedModelError):
        assert issubclass(error_type, DitServeError)
        assert issubclass(error_type, (ValueError, TypeError))


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_unencodable_or_overlong_text_is_refused_naming_the_field(flux_omni, field: str) -> None:
    engine = flux_omni.engine
    limit = engine.config.limits.max_prompt_chars if field == "prompt" else \
        engine.config.limits.max_negative_prompt_chars
    for text in ("a \ud800 b", "x" * (limit + 1)):
        prompt, params = ("p", OmniDiffusionSamplingParams(negative_prompt=text)) if field == "negative_prompt" \
            else (text, None)
        with pytest.raises(InvalidParameterError) as error:
            engine.make_request(prompt, params)
        assert error.value.param == field
