"""The ``ditserve`` command: generate, serve, bench, calibrate, demo.

Each sub-command lives with the part of the system it drives and registers itself here through a
``register(subparsers)`` function; modules are imported lazily so ``ditserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ditserve.errors import DitServeError

#: modules providing ``register(subparsers)``; a missing one is skipped so partial installs still work
SUBCOMMAND_MODULES = (
    "ditserve.entrypoints.server.cli",
    "ditserve.bench.cli",
    "ditserve.cache.calibrate_cli",
    "ditserve.demo.cli",
)


def json_object(text: str) -> dict[str, Any]:
    """argparse type for ``--cache-config '{"rel_l1_thresh": 0.2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds an engine (generate, serve, bench, calibrate)."""
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--cache-backend", default=None, help="tea_cache, mag_cache or cache_dit")
    parser.add_argument("--cache-config", type=json_object, default=None, help="JSON object of cache options")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="skip regional torch.compile; default: compile on CUDA, eager on CPU "
                             "(--no-enforce-eager compiles on CPU too)")
    parser.add_argument("--enable-cpu-offload", action="store_true")
    parser.add_argument("--enable-layerwise-offload", action="store_true")
    parser.add_argument("--vae-use-slicing", action="store_true")
    parser.add_argument("--vae-use-tiling", action="store_true")
    parser.add_argument("--quantization", default=None, choices=["fp8", "gguf", "int8"])
    parser.add_argument("--gguf-model", default=None, help="pre-quantized transformer file (with --quantization gguf)")
    parser.add_argument("--ignored-layers", default=None,
                        help="comma-separated layer-name substrings left unquantized (fp8, int8)")
    parser.add_argument("--scheduling", default="step", choices=["step", "request"],
                        help="step: requests join and leave a running batch between denoising steps (default); "
                             "request: a batch forms when the engine is idle and runs to its end")
    parser.add_argument("--flow-shift", type=float, default=None,
                        help="a fixed timestep shift for the model's flow-matching scheduler (default: its own)")
    parser.add_argument("--boundary-ratio", type=float, default=None,
                        help="default boundary between the two experts (Wan2.2 A14B)")
    parser.add_argument("--cfg-parallel-size", type=int, default=1)
    parser.add_argument("--usp", "--ulysses-degree", dest="ulysses_degree", type=int, default=1)
    parser.add_argument("--ring", "--ring-degree", dest="ring_degree", type=int, default=1)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--vae-patch-parallel-size", type=int, default=1)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``Omni(**engine_kwargs(args))`` from the options of ``add_engine_arguments``."""
    return {
        "model": args.model, "dtype": args.dtype, "device": args.device,
        "cache_backend": args.cache_backend, "cache_config": args.cache_config,
        "enforce_eager": args.enforce_eager, "enable_cpu_offload": args.enable_cpu_offload,
        "enable_layerwise_offload": args.enable_layerwise_offload, "vae_use_slicing": args.vae_use_slicing,
        "vae_use_tiling": args.vae_use_tiling, "quantization": args.quantization, "gguf_model": args.gguf_model,
        "ignored_layers": args.ignored_layers.split(",") if args.ignored_layers else None,
        "scheduling": args.scheduling, "flow_shift": args.flow_shift, "boundary_ratio": args.boundary_ratio,
        "parallel_config": {
            "cfg_parallel_size": args.cfg_parallel_size, "ulysses_degree": args.ulysses_degree,
            "ring_degree": args.ring_degree, "tensor_parallel_size": args.tensor_parallel_size,
            "vae_patch_parallel_size": args.vae_patch_parallel_size,
        },
    }


def _register_generate(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="generate one image or video from a prompt")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", required=True,
                        help="out.png / out.jpg / out.webp (several images: out-0.png, ...), or out.mp4 for video")
    parser.add_argument("--model", default=None, help="diffusers folder or hub id (default: the bundled demo)")
    parser.add_argument("--steps", dest="num_inference_steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--true-cfg-scale", type=float, default=None)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--fps", type=int, default=None)
    parser.add_argument("--image", action="append", default=[], help="input image (edit models); repeatable")
    parser.add_argument("--layers", type=int, default=None,
                        help="RGBA layers to split the image into (Qwen-Image-Layered): out-0.png, out-1.png, ...")
    parser.add_argument("--resolution", type=int, default=None, help="layer resolution, 640 or 1024 "
                        "(Qwen-Image-Layered)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar over denoising steps")
    add_engine_arguments(parser)
    parser.set_defaults(func=_run_generate)


SAMPLING_OPTIONS = ("num_inference_steps", "seed", "height", "width", "guidance_scale", "true_cfg_scale",
                    "negative_prompt", "num_frames", "fps", "layers", "resolution")


def _run_generate(args: argparse.Namespace) -> int:
    from ditserve.entrypoints.media import save_output
    from ditserve.entrypoints.omni import Omni

    sampling = {k: getattr(args, k) for k in SAMPLING_OPTIONS if getattr(args, k) is not None}
    prompt: Any = args.prompt
    if args.image:
        prompt = {"prompt": args.prompt, "multi_modal_data": {"image": args.image}}
    with Omni(**engine_kwargs(args), show_progress=args.progress) as omni:
        output = omni.generate(prompt, sampling)[0]
    summary = {"outputs": save_output(output, args.output), "seed": output.seed, "timings": output.timings,
               "cache_stats": output.cache_stats}
    print(json.dumps(summary, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description="Fast serving of diffusion transformers")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _register_generate(subparsers)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # only the sub-command's own module may be absent; a missing dependency inside it is a real error
            if error.name is None or not (module_name + ".").startswith(error.name + "."):
                raise
            continue
        module.register(subparsers)
    return parser


def run_command(args: argparse.Namespace, log_level: str = "WARNING") -> int:
    """Run a parsed sub-command: its exit code, or 2 with one clear line for a user's mistake."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DitServeError as error:
        # a user's mistake: one clear line, no stack trace
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from ditserve.bench.cli import route_bench_subcommand

        argv = route_bench_subcommand(argv)
    args = build_parser().parse_args(argv)
    return run_command(args, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
