"""Regenerate the lever figures of the docs: each lever against the plain run, one JSON line per measurement.

    python -m ditserve.levers.figures --device cpu --models demo,wide_flux --levers compile,int8

Models: the bundled demo model, the tiny test FLUX, and a wider tiny-random FLUX (hidden 256, 1024 image tokens
at 128x128) where the demo is too small to show a lever. ``ditserve bench --levers`` measures the same way on
one model, with a report; this module exists to reproduce the closing figures of the levers issue.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ditserve.levers.gguf import write_gguf_transformer
from ditserve.levers.measure import measure_lever

CPU_LEVERS = ("compile", "vae_slicing", "vae_tiling", "gguf_q8_0", "int8")
CUDA_LEVERS = ("compile", "vae_slicing", "vae_tiling", "gguf_q8_0", "cpu_offload", "layerwise_offload", "fp8")


def build_wide_flux(root: Path) -> str:
    """The tiny FLUX pipeline with a hidden-256 transformer (2 double + 4 single blocks, 9 M parameters)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from ditserve.testing import tiny_pipeline_dir

    folder = root / "wide_flux"
    torch.manual_seed(0)
    pipeline = FluxPipeline.from_pretrained(tiny_pipeline_dir("flux"))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)).eval()
    pipeline.register_modules(transformer=transformer)
    pipeline.save_pretrained(folder)
    return str(folder)


def model_folders(names: list[str], root: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each model's folder and sampling params (the demo keeps its own defaults: true CFG, 32 text tokens)."""
    from ditserve.demo import demo_model_path
    from ditserve.testing import tiny_pipeline_dir

    small = {"num_inference_steps": 4, "max_sequence_length": 64}
    known = {"demo": lambda: (str(demo_model_path()), {"num_inference_steps": 8}),
             "tiny_flux": lambda: (tiny_pipeline_dir("flux"), {**small, "height": 64, "width": 64}),
             "wide_flux": lambda: (build_wide_flux(root), {**small, "height": 128, "width": 128})}
    return {name: known[name]() for name in names}


def lever_options(name: str, gguf_file: Path) -> dict[str, Any]:
    return {"compile": {"enforce_eager": False}, "vae_slicing": {"vae_use_slicing": True},
            "vae_tiling": {"vae_use_tiling": True},
            "gguf_q8_0": {"quantization": "gguf", "gguf_model": str(gguf_file)},
            "int8": {"quantization": "int8"}, "fp8": {"quantization": "fp8"},
            "cpu_offload": {"enable_cpu_offload": True},
            "layerwise_offload": {"enable_layerwise_offload": True}}[name]


def summary(model: str, lever: str, result: dict[str, Any]) -> dict[str, Any]:
    plain, levered = result["plain"], result["levered"]
    return {"model": model, "lever": lever, "speedup": round(result["speedup"], 3),
            "memory_ratio": round(result["memory_ratio"], 3), "weight_ratio": round(result["weight_ratio"], 3),
            "psnr_db": result["psnr_db"], "max_abs_diff": result["max_abs_diff"],
            "plain_s": round(plain["median_s"], 4), "lever_s": round(levered["median_s"], 4),
            "plain_peak_mib": plain["peak_memory_bytes"] >> 20, "lever_peak_mib": levered["peak_memory_bytes"] >> 20,
            "memory_kind": plain["memory_kind"], "lever_warmup_s": round(levered["warmup_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="demo,wide_flux")
    parser.add_argument("--levers", default=None, help="comma-separated; default: every lever of the device")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from diffusers import DiffusionPipeline

    from ditserve.demo import heldout_prompts

    levers = args.levers.split(",") if args.levers else list(CUDA_LEVERS if args.device == "cuda" else CPU_LEVERS)
    base = {"device": args.device, "dtype": "bfloat16" if args.device == "cuda" else "float32"}
    with tempfile.TemporaryDirectory(prefix="lever-figures-") as tmp:
        root = Path(tmp)
        for model, (folder, params) in model_folders(args.models.split(","), root).items():
            transformer = DiffusionPipeline.from_pretrained(folder).transformer
            gguf_file = write_gguf_transformer(transformer, root / f"{model}-Q8_0.gguf")
            for lever in levers:
                result = measure_lever(folder, lever_options(lever, gguf_file), prompt=heldout_prompts()[0],
                                       params={**params, "seed": 3}, runs=args.runs, warmup=1, base_kwargs=base)
                print(json.dumps(summary(model, lever, result)), flush=True)


if __name__ == "__main__":
    main()
