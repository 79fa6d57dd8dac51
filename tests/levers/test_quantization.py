"""Quantization levers: GGUF files we write load through diffusers and run; int8 weight-only (torchao) on CPU;
FP8 refused without a capable GPU, its layer math checked on CPU, and the whole path run on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditserve import Omni
from ditserve.errors import InvalidParameterError, ModelNotFoundError
from ditserve.levers.fp8 import Fp8Linear, quantize_linears_fp8
from ditserve.levers.gguf import is_gguf_quantized, write_gguf_transformer
from ditserve.models.loader import load_model
from ditserve.testing.compare import max_abs_diff
from tests.levers.conftest import BASE, PROMPT, requires_cuda

#: Q8_0 / int8 weights move the tiny model's 8-bit images by a few levels (measured: at most 7 /255)
QUANTIZED_MAX_DIFF = 24


@pytest.fixture(scope="module")
def gguf_file(tiny_flux_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    return write_gguf_transformer(transformer, tmp_path_factory.mktemp("gguf") / "transformer-Q8_0.gguf")


def transformer_of(omni: Omni) -> torch.nn.Module:
    return omni.engine.runner.model.pipeline.transformer


def test_gguf_file_is_a_quarter_of_fp32(tiny_flux_dir: str, gguf_file: Path) -> None:
    fp32_bytes = sum(p.numel() * 4 for p in load_model(tiny_flux_dir, device="cpu").pipeline.transformer.parameters())
    assert gguf_file.stat().st_size < 0.35 * fp32_bytes


def test_loader_reads_the_gguf_transformer(tiny_flux_dir: str, gguf_file: Path) -> None:
    model = load_model(tiny_flux_dir, device="cpu", gguf_model=str(gguf_file))
    assert is_gguf_quantized(model.pipeline.transformer)
    assert not is_gguf_quantized(model.pipeline.vae)


def test_engine_runs_the_gguf_transformer(tiny_flux_dir: str, gguf_file: Path, plain_flux_images: list) -> None:
    with Omni(model=tiny_flux_dir, quantization="gguf", gguf_model=str(gguf_file)) as omni:
        assert is_gguf_quantized(transformer_of(omni))
        images = omni.generate(PROMPT, seed=5, **BASE)[0].images
    assert 0 < max_abs_diff(images[0], plain_flux_images[0]) <= QUANTIZED_MAX_DIFF


def test_gguf_writer_refuses_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="quant_type"):
        write_gguf_transformer(torch.nn.Linear(32, 32), tmp_path / "x.gguf", quant_type="Q3_K")


def test_missing_gguf_file_is_an_error(tiny_flux_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="gguf_model"):
        Omni(model=tiny_flux_dir, quantization="gguf", gguf_model=str(tmp_path / "absent.gguf"))


def test_int8_weight_only_quantizes_all_but_ignored_layers(tiny_flux_dir: str, plain_flux_images: list) -> None:
    with Omni(model=tiny_flux_dir, quantization="int8", ignored_layers=["proj_out", "*.ff.*"]) as omni:
        transformer = transformer_of(omni)
        images = omni.generate(PROMPT, seed=5, **BASE)[0].images
    linears = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    ignored = {name for name in linears if name == "proj_out" or ".ff." in name}
    assert ignored and len(ignored) < len(linears)
    for name, linear in linears.items():
        # torchao's Int8Tensor keeps the float dtype for the outside world and holds int8 values in qdata
        packed = getattr(linear.weight, "qdata", None)
        assert (packed is None) == (name in ignored), name
        assert packed is None or packed.dtype == torch.int8
    assert 0 < max_abs_diff(images[0], plain_flux_images[0]) <= QUANTIZED_MAX_DIFF


def test_ignored_layers_that_match_nothing_are_an_error(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError, match="name no layer"):
        Omni(model=tiny_flux_dir, quantization="int8", ignored_layers=["proj_outt"])


def test_ignored_layers_without_quantization_are_an_error(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError, match="ignored_layers only applies"):
        Omni(model=tiny_flux_dir, ignored_layers=["proj_out"])


def test_fp8_on_cpu_is_an_error(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError, match="compute capability >= 8.9"):
        Omni(model=tiny_flux_dir, device="cpu", quantization="fp8")


def test_fp8_layers_replace_eligible_linears_and_stay_close() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32),
                                torch.nn.Linear(32, 10), torch.nn.Linear(10, 32))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = model(x)
        quantized = quantize_linears_fp8(model, ignored_layers=["2"])
        actual = model(x)
    # "2" ignored by name; "3" and "4" have a size FP8 GEMMs cannot take (10 is not a multiple of 16)
    assert quantized == ["0"]
    assert isinstance(model[0], Fp8Linear) and model[0].weight.dtype == torch.float8_e4m3fn
    assert all(isinstance(model[i], torch.nn.Linear) for i in (2, 3, 4))
    relative_error = (actual - expected).norm() / expected.norm()
    assert 0 < relative_error < 0.05


@requires_cuda
def test_fp8_on_gpu_stays_close_to_bf16(tiny_flux_dir: str) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    results = {}
    for quantization in (None, "fp8"):
        with Omni(model=tiny_flux_dir, device="cuda", dtype="bfloat16", quantization=quantization,
                  ignored_layers=["proj_out"] if quantization else None) as omni:
            transformer = transformer_of(omni)
            results[quantization] = omni.generate(PROMPT, seed=5, **BASE)[0].images[0]
            fp8_layers = sum(isinstance(m, Fp8Linear) for m in transformer.modules())
    assert fp8_layers > 0 and isinstance(transformer.proj_out, torch.nn.Linear)
    difference = max_abs_diff(results["fp8"], results[None])
    print(f"fp8 vs bf16 max abs diff: {difference}/255")
    assert 0 < difference <= 64
