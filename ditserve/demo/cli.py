"""``ditserve demo ...`` (and ``python -m ditserve.demo ...``): train, eval, gallery, redundancy."""

from __future__ import annotations

import argparse
import enum
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from ditserve.demo.language import ALL_SIZES, NEW_SIZE, SHAPES, heldout_prompts, new_size_prompts
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.errors import InvalidParameterError

DOCS_DIR = Path("docs/demo")
EVAL_STEPS = (50, 20)


class Task(str, enum.Enum):
    """Which demo model a command is about: the text-to-image one, the instruction-editing one or the
    text-to-video one."""

    IMAGE = "image"
    EDIT = "edit"
    VIDEO = "video"


class PromptSet(str, enum.Enum):
    """Which held-out prompts ``eval`` scores: the base language's, or those with the LoRA's new size."""

    HELDOUT = "heldout"
    NEW_SIZE = "new-size"


PROMPT_SETS = {PromptSet.HELDOUT: heldout_prompts, PromptSet.NEW_SIZE: new_size_prompts}


def _model_path(args: argparse.Namespace) -> Path:
    from ditserve.demo import demo_model_path

    return Path(args.model) if args.model else demo_model_path()


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="diffusers folder (default: the bundled ditserve-shapes)")
    parser.add_argument("--device", default="cpu", help="torch device to sample on (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: prompt i uses seed + i")


def _parse_scales(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError as error:
        raise InvalidParameterError(f"--cfg-sweep must be comma-separated numbers, got {text!r}", param="cfg_sweep") from error


def _parse_steps(text: str | None) -> list[int]:
    """``--steps``: comma-separated step counts, each >= 1 (default EVAL_STEPS)."""
    if not text:
        return list(EVAL_STEPS)
    try:
        steps = [int(part) for part in text.split(",") if part]
    except ValueError as error:
        raise InvalidParameterError(f"--steps must be comma-separated whole numbers, got {text!r}", param="steps") from error
    if not steps or min(steps) < 1:
        raise InvalidParameterError(f"--steps must name step counts >= 1, got {text!r}", param="steps")
    return steps


def write_defaults(model_dir: Path, true_cfg_scale: float) -> None:
    """The sampling defaults the engine reads for this model."""
    defaults = {
        "sampling_defaults": {
            "height": 128,
            "width": 128,
            "num_inference_steps": 50,
            "true_cfg_scale": true_cfg_scale,
            "negative_prompt": "",
            # Trained at this T5 length; FluxPipeline's default (512) works but runs about 5x slower.
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
    }
    (model_dir / "ditserve_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")


def _given_options(args: argparse.Namespace, config_class) -> dict:
    """The config fields given on the command line; an option of another task's config is refused by name."""
    own = {f.name for f in fields(config_class)}
    for field in {f.name for c in _train_configs().values() for f in fields(c)} - own:
        if getattr(args, field, None) is not None:
            raise InvalidParameterError(f"--{field.replace('_', '-')} is not an option of --task {args.task}",
                                        param=field)
    return {name: getattr(args, name) for name in own if getattr(args, name, None) is not None}


def _train_configs() -> dict[Task, type]:
    """Every task's training config, the image model's first (its options' types come first)."""
    from ditserve.demo.edit_train import EditTrainConfig
    from ditserve.demo.train import TrainConfig
    from ditserve.demo.video_train import VideoTrainConfig

    return {Task.IMAGE: TrainConfig, Task.EDIT: EditTrainConfig, Task.VIDEO: VideoTrainConfig}


def _cmd_train(args: argparse.Namespace) -> None:
    if Task(args.task) is Task.EDIT:
        _cmd_train_edit(args)
        return
    if Task(args.task) is Task.VIDEO:
        _cmd_train_video(args)
        return
    from ditserve.demo.train import TrainConfig, train

    config = TrainConfig(**_given_options(args, TrainConfig))
    run_dir = Path(config.run_dir)
    has_checkpoint = (run_dir / "vae.pt").exists() or (run_dir / "transformer.pt").exists()
    if has_checkpoint and not args.resume:
        raise InvalidParameterError(
            f"{run_dir} holds checkpoints: pass --resume to continue them, or choose another --run-dir", param="resume"
        )
    output = Path(args.output or "runs/ditserve-shapes/final")
    if output.exists():
        shutil.rmtree(output)
    train(config, output)
    write_defaults(output, args.cfg_scale)
    print(f"trained pipeline written to {output}")


def _run_launched(train: Callable[[], object], fresh_output: Path | None = None) -> bool:
    """Run ``train`` alone or as one process of a launched data-parallel run (torchrun; ``data_parallel``), first
    emptying ``fresh_output``; returns whether this process is rank 0, the one that writes."""
    from ditserve.demo.data_parallel import launched_rank, leave

    main_process = launched_rank() == 0
    if main_process and fresh_output is not None and fresh_output.exists():
        shutil.rmtree(fresh_output)
    try:
        train()
    finally:
        leave()
    return main_process


def _cmd_train_edit(args: argparse.Namespace) -> None:
    from ditserve.demo.edit_evaluation import write_edit_defaults
    from ditserve.demo.edit_train import EditTrainConfig, train_edit

    config = EditTrainConfig(**_given_options(args, EditTrainConfig))
    if (Path(config.run_dir) / "edit.pt").exists() and not args.resume:
        raise InvalidParameterError(
            f"{config.run_dir} holds a checkpoint: pass --resume to continue it, or choose another --run-dir",
            param="resume")
    output = Path(args.output or "runs/ditserve-shapes-edit/final")
    if _run_launched(lambda: train_edit(config, output), fresh_output=output):
        write_edit_defaults(output, args.cfg_scale)
        print(f"trained edit pipeline written to {output}")


def _cmd_train_video(args: argparse.Namespace) -> None:
    from ditserve.demo.video_evaluation import write_video_defaults
    from ditserve.demo.video_train import VaeStage, VideoTrainConfig, train_video

    config = VideoTrainConfig(**_given_options(args, VideoTrainConfig))
    run_dir = Path(config.run_dir)
    checkpoints = [run_dir / f"{stage.value}.pt" for stage in VaeStage] + [run_dir / "text_encoder.pt",
                                                                          run_dir / "transformer.pt"]
    if any(path.exists() for path in checkpoints) and not args.resume:
        raise InvalidParameterError(
            f"{run_dir} holds checkpoints: pass --resume to continue them, or choose another --run-dir", param="resume")
    output = Path(args.output or "runs/ditserve-shapes-video/final")
    if _run_launched(lambda: train_video(config, output), fresh_output=output):
        write_video_defaults(output, args.cfg_scale, config.frames)
        print(f"trained video pipeline written to {output}")


def _cmd_train_lora(args: argparse.Namespace) -> None:
    from ditserve.demo.lora_train import LoRATrainConfig, train_lora

    overrides = {f.name: getattr(args, f.name) for f in fields(LoRATrainConfig) if getattr(args, f.name, None) is not None}
    if _run_launched(lambda: train_lora(LoRATrainConfig(**overrides), args.output)):
        print(f"LoRA written to {args.output}")


def _refuse_image_eval_options(args: argparse.Namespace) -> None:
    """--lora and --prompt-set are about the image model's prompts."""
    for option in ("lora", "prompt_set"):
        if getattr(args, option) not in (None, PromptSet.HELDOUT.value):
            raise InvalidParameterError(f"--{option.replace('_', '-')} is not an option of --task {args.task}",
                                        param=option)


def _cmd_eval(args: argparse.Namespace) -> None:
    if Task(args.task) is Task.EDIT:
        _cmd_eval_edit(args)
        return
    if Task(args.task) is Task.VIDEO:
        _cmd_eval_video(args)
        return
    from ditserve.demo.checker import evaluate, kind_accuracy_key
    from ditserve.demo.evaluation import (
        adherence,
        decoded_ground_truth,
        load_pipeline,
        load_sampling_defaults,
    )

    if args.select_cfg and args.lora:
        raise InvalidParameterError("--select-cfg writes the base model's defaults; it cannot be combined with --lora",
                                    param="select_cfg")
    model_dir = _model_path(args)
    defaults = load_sampling_defaults(model_dir)
    pipe = load_pipeline(model_dir, args.device, args.lora)
    prompts = PROMPT_SETS[PromptSet(args.prompt_set)](args.prompts or 64, args.prompt_seed)
    scales = _parse_scales(args.cfg_sweep) if args.cfg_sweep else [defaults["true_cfg_scale"], 1.0]
    steps = _parse_steps(args.steps)
    settings = [(n, scale) for n in steps for scale in scales]
    results = adherence(pipe, prompts, settings, seed=args.seed, max_sequence_length=defaults.get("max_sequence_length"))
    print(f"{'steps':>5} {'cfg':>5} {'object':>7} {'prompt':>7} {'heldout-obj':>11} {'shape':>6} {'size':>6}")
    for r in results:
        print(f"{r['num_inference_steps']:>5} {r['true_cfg_scale']:>5.2f} {r['object_accuracy']:>7.3f} "
              f"{r['prompt_accuracy']:>7.3f} {r['heldout_object_accuracy']:>11.3f} {r['shape_accuracy']:>6.3f} "
              f"{r['size_accuracy']:>6.3f}")
    print("object accuracy by kind, per setting above:")
    for size in ALL_SIZES:
        for shape in SHAPES:
            key = kind_accuracy_key(size, shape)
            print(f"  {size + ' ' + shape:>14}: " + " ".join(f"{r[key]:.3f}" for r in results))
    ceiling = evaluate(decoded_ground_truth(pipe, prompts), prompts)
    print(f"decoded ground truth (the checker's ceiling for this VAE): object {ceiling['object_accuracy']:.3f} "
          f"prompt {ceiling['prompt_accuracy']:.3f}")
    report = {"model": str(model_dir), "lora": args.lora, "prompt_set": args.prompt_set,
              "heldout_prompts": len(prompts), "prompt_seed": args.prompt_seed,
              "seed": args.seed, "results": results, "decoded_ground_truth": ceiling}
    if args.select_cfg:
        best = max((r for r in results if r["num_inference_steps"] == max(steps)),
                   key=lambda r: (r["prompt_accuracy"], r["object_accuracy"]))
        write_defaults(model_dir, best["true_cfg_scale"])
        print(f"true_cfg_scale {best['true_cfg_scale']} written to {model_dir / 'ditserve_defaults.json'}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def _cmd_eval_edit(args: argparse.Namespace) -> None:
    from ditserve.demo import demo_edit_model_path
    from ditserve.demo.edit_checker import evaluate_edits
    from ditserve.demo.edit_evaluation import (
        decoded_edit_targets,
        edit_adherence,
        load_edit_pipeline,
        write_edit_defaults,
    )
    from ditserve.demo.edit_language import EditKind, heldout_edits
    from ditserve.demo.evaluation import load_sampling_defaults

    _refuse_image_eval_options(args)
    model_dir = Path(args.model) if args.model else demo_edit_model_path()
    defaults = load_sampling_defaults(model_dir)
    pipe = load_edit_pipeline(model_dir, args.device)
    edits = heldout_edits(args.prompts or 100, args.prompt_seed)
    scales = _parse_scales(args.cfg_sweep) if args.cfg_sweep else [defaults["true_cfg_scale"]]
    steps = _parse_steps(args.steps)
    results = edit_adherence(pipe, edits, [(n, scale) for n in steps for scale in scales], seed=args.seed)
    kinds = [kind.value for kind in EditKind]
    print(f"{'steps':>5} {'cfg':>5} {'pass':>6} {'applied':>7} {'kept':>6} " + " ".join(f"{k:>10}" for k in kinds))
    for r in results:
        print(f"{r['num_inference_steps']:>5} {r['true_cfg_scale']:>5.2f} {r['pass_rate']:>6.3f} "
              f"{r['applied_rate']:>7.3f} {r['kept_rate']:>6.3f} "
              + " ".join(f"{r[k + '_pass_rate']:>10.3f}" for k in kinds))
    ceiling = evaluate_edits(decoded_edit_targets(pipe, edits), edits)
    print(f"decoded true targets (the checker's ceiling for this VAE): pass {ceiling['pass_rate']:.3f}")
    report = {"model": str(model_dir), "task": Task.EDIT.value, "heldout_edits": len(edits),
              "edit_seed": args.prompt_seed, "seed": args.seed, "results": results, "decoded_targets": ceiling}
    if args.select_cfg:
        best = max((r for r in results if r["num_inference_steps"] == max(steps)),
                   key=lambda r: (r["pass_rate"], r["applied_rate"]))
        write_edit_defaults(model_dir, best["true_cfg_scale"])
        print(f"true_cfg_scale {best['true_cfg_scale']} written to {model_dir / 'ditserve_defaults.json'}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def _cmd_eval_video(args: argparse.Namespace) -> None:
    from ditserve.demo.evaluation import load_sampling_defaults
    from ditserve.demo.video_checker import evaluate_clips
    from ditserve.demo.video_evaluation import (
        clip_adherence,
        decoded_ground_truth_clips,
        load_video_pipeline,
        write_video_defaults,
    )
    from ditserve.demo.video_language import ClipKind, heldout_clips

    _refuse_image_eval_options(args)
    if not args.model:
        raise InvalidParameterError("--task video needs --model: no video model is bundled", param="model")
    model_dir = Path(args.model)
    defaults = load_sampling_defaults(model_dir)
    frames = defaults["num_frames"]
    pipe = load_video_pipeline(model_dir, args.device)
    clips = heldout_clips(args.prompts or 64, args.prompt_seed)
    scales = _parse_scales(args.cfg_sweep) if args.cfg_sweep else [defaults["guidance_scale"], 1.0]
    steps = _parse_steps(args.steps)
    results = clip_adherence(pipe, clips, [(n, scale) for n in steps for scale in scales], frames=frames,
                             seed=args.seed, max_sequence_length=defaults["max_sequence_length"])
    kinds = [kind.value for kind in ClipKind]
    print(f"{'steps':>5} {'cfg':>5} {'clip':>6} {'object':>7} {'frame':>6} {'event':>6} "
          + " ".join(f"{k:>12}" for k in kinds))
    for r in results:
        print(f"{r['num_inference_steps']:>5} {r['guidance_scale']:>5.2f} {r['prompt_accuracy']:>6.3f} "
              f"{r['object_accuracy']:>7.3f} {r['frame_accuracy']:>6.3f} {r['event_accuracy']:>6.3f} "
              + " ".join(f"{r[k + '_pass_rate']:>12.3f}" for k in kinds))
    ceiling = evaluate_clips(decoded_ground_truth_clips(pipe, clips, frames), clips)
    print(f"decoded ground truth (the checker's ceiling for this VAE): clip {ceiling['prompt_accuracy']:.3f} "
          f"object {ceiling['object_accuracy']:.3f}")
    report = {"model": str(model_dir), "task": Task.VIDEO.value, "heldout_clips": len(clips), "frames": frames,
              "clip_seed": args.prompt_seed, "seed": args.seed, "results": results, "decoded_ground_truth": ceiling}
    if args.select_cfg:
        best = max((r for r in results if r["num_inference_steps"] == max(steps)),
                   key=lambda r: (r["prompt_accuracy"], r["object_accuracy"]))
        write_video_defaults(model_dir, best["guidance_scale"], frames)
        print(f"guidance_scale {best['guidance_scale']} written to {model_dir / 'ditserve_defaults.json'}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def _cmd_gallery(args: argparse.Namespace) -> None:
    from ditserve.demo.evaluation import gallery, generate, load_pipeline, load_sampling_defaults
    from ditserve.demo.language import heldout_prompts, sample_prompts

    model_dir = _model_path(args)
    defaults = load_sampling_defaults(model_dir)
    pipe = load_pipeline(model_dir, args.device)
    half = args.count // 2
    prompts = sample_prompts(args.count - half, args.prompt_seed) + heldout_prompts(half, args.prompt_seed)
    images = generate(pipe, prompts, num_inference_steps=defaults["num_inference_steps"],
                      true_cfg_scale=defaults["true_cfg_scale"], seed=args.seed,
                      max_sequence_length=defaults.get("max_sequence_length"))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    gallery(images, prompts).save(output)
    print(f"gallery of {len(prompts)} prompts (first {args.count - half} train split, then held-out) -> {output}")


def _cmd_redundancy(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ditserve.demo.evaluation import load_pipeline, load_sampling_defaults, step_changes
    from ditserve.demo.language import heldout_prompts

    model_dir = _model_path(args)
    defaults = load_sampling_defaults(model_dir)
    pipe = load_pipeline(model_dir, args.device)
    prompts = heldout_prompts(args.prompts, args.prompt_seed)
    steps = defaults["num_inference_steps"]
    changes = step_changes(pipe, prompts, num_inference_steps=steps, true_cfg_scale=defaults["true_cfg_scale"],
                           seed=args.seed, max_sequence_length=defaults.get("max_sequence_length"))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model_dir), "num_inference_steps": steps, "true_cfg_scale": defaults["true_cfg_scale"],
              "prompts": len(prompts), "relative_l1_change": changes}
    (output_dir / "step_change.json").write_text(json.dumps(record, indent=2) + "\n")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(range(1, len(changes) + 1), changes, marker=".")
    axis.set_xlabel("step")
    axis.set_ylabel("relative L1 change of transformer output")
    axis.set_title(f"{model_dir.name}: step-to-step change ({steps} steps, conditional branch)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output_dir / "step_change.png", dpi=120)
    print(f"median change {sorted(changes)[len(changes) // 2]:.4f}; wrote {output_dir}/step_change.png and .json")


# The annotations (strings, with postponed evaluation) of config fields that default to None.
OPTIONAL_FIELD_TYPES: dict[str, type] = {"float | None": float, "int | None": int, "str | None": str}


def _add_config_arguments(parser: argparse.ArgumentParser, configs: dict[str, type]) -> None:
    """One option per field of the training config dataclasses (``configs``: task name -> class; a field several
    tasks share is one option), left None unless given. The help shows each task's own default."""
    defaults: dict[str, dict[str, object]] = {}
    optional: dict[str, type] = {}  # fields whose default is None: the type they take when given
    for task, config_class in configs.items():
        for field in fields(config_class):
            defaults.setdefault(field.name, {})[task] = field.default
            if field.default is None:
                optional[field.name] = OPTIONAL_FIELD_TYPES[str(field.type)]
    for name, by_task in defaults.items():
        first = next(iter(by_task.values()))
        # booleans read as --flag / --no-flag; type=bool would take any text, "0" included, as True
        parsing = ({"action": argparse.BooleanOptionalAction} if isinstance(first, bool)
                   else {"type": optional.get(name) or type(first)})
        shown = (f"default {first!r}" if len(configs) == 1 else
                 "default " + ", ".join(f"{value!r} ({task})" for task, value in by_task.items()))
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=shown, **parsing)


def _add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train the demo model (VAE, decoder, text encoders, transformer, "
                                   "decoder adaptation), with --task edit the edit model from it, or with --task "
                                   "video the text-to-video model (WanPipeline) from scratch")
    parser.add_argument("--task", choices=[t.value for t in Task], default=Task.IMAGE.value,
                        help="image: ditserve-shapes from scratch; edit: ditserve-shapes-edit from --init-from "
                        "(default the bundled ditserve-shapes); video: ditserve-shapes-video from scratch, or with --init-from "
                        "a video folder its transformer alone on that folder's trained VAE and text encoder")
    _add_config_arguments(parser, {task.value: config for task, config in _train_configs().items()})
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --run-dir")
    parser.add_argument("--output", default=None, help="where to write the diffusers folder (default "
                        "runs/ditserve-shapes/final, or runs/ditserve-shapes-<task>/final with --task edit or video)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="true_cfg_scale (guidance_scale with --task "
                        "video) written to ditserve_defaults.json")
    parser.set_defaults(handler=_cmd_train)


def _add_train_lora_parser(subparsers) -> None:
    from ditserve.demo.lora_train import LoRATrainConfig

    parser = subparsers.add_parser("train-lora", help=f"train a LoRA that teaches the demo model the size {NEW_SIZE!r}")
    _add_config_arguments(parser, {"lora": LoRATrainConfig})
    parser.add_argument("--output", default=f"runs/ditserve-shapes-lora-{NEW_SIZE}",
                        help="where to write the PEFT folder")
    parser.set_defaults(handler=_cmd_train_lora)


def register(subparsers) -> None:
    """Add the ``demo`` command (with its sub-commands) to an argparse sub-parser collection."""
    demo = subparsers.add_parser("demo", help="the bundled demo model ditserve-shapes")
    commands = demo.add_subparsers(dest="demo_command", required=True)
    _add_train_parser(commands)
    _add_train_lora_parser(commands)

    evaluate = commands.add_parser("eval", help="prompt adherence on held-out prompts (50/20 steps, with/without CFG)")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--task", choices=[t.value for t in Task], default=Task.IMAGE.value,
                          help="image: prompt adherence of ditserve-shapes; edit: held-out edits of "
                          "ditserve-shapes-edit (FluxKontextPipeline), pass = instruction applied and the rest kept; "
                          "video: held-out clips of a WanPipeline folder given by --model, pass = every frame and "
                          "the event right")
    evaluate.add_argument("--prompts", type=int, default=None,
                          help="number of held-out prompts (default 64), of held-out edits (default 100) or of "
                          "held-out clips (default 64)")
    evaluate.add_argument("--steps", default=None,
                          help="comma-separated step counts (default 50,20)")
    evaluate.add_argument("--prompt-set", choices=[s.value for s in PromptSet], default=PromptSet.HELDOUT.value,
                          help=f"held-out prompts of the base language, or with one {NEW_SIZE!r} object each")
    evaluate.add_argument("--lora", default=None, help="fuse this LoRA (PEFT folder or file) into the transformer")
    evaluate.add_argument("--prompt-seed", type=int, default=0, help="seed of the held-out prompts, edits or clips")
    evaluate.add_argument("--cfg-sweep", default=None, help="comma-separated true_cfg_scale (video: guidance_scale) "
                          "values to compare")
    evaluate.add_argument("--select-cfg", action="store_true",
                          help="write the best scale at the most steps evaluated (50 by default) into the defaults")
    evaluate.add_argument("--output", default=None, help="also write the figures as JSON here")
    evaluate.set_defaults(handler=_cmd_eval)

    gallery = commands.add_parser("gallery", help="write a grid of samples with their prompts")
    _add_model_arguments(gallery)
    gallery.add_argument("--count", type=int, default=12)
    gallery.add_argument("--prompt-seed", type=int, default=1)
    gallery.add_argument("--output", default=str(DOCS_DIR / "gallery.png"))
    gallery.set_defaults(handler=_cmd_gallery)

    redundancy = commands.add_parser("redundancy", help="plot the step-to-step change of the transformer output")
    _add_model_arguments(redundancy)
    redundancy.add_argument("--prompts", type=int, default=8)
    redundancy.add_argument("--prompt-seed", type=int, default=0)
    redundancy.add_argument("--output-dir", default=str(DOCS_DIR))
    redundancy.set_defaults(handler=_cmd_redundancy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ditserve.demo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    args.handler(args)
