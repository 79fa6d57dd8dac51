"""What a LoRA does to the cache quality that the base model's calibration promises (issue 20).

Calibration is per base model: ``target_psnr`` resolves to a front point measured without any LoRA. This runs the
demo model with each cache backend at its calibrated 30 and 35 dB points, with and without the shipped demo LoRA
(per request, as served), on ordinary held-out prompts and on prompts with the LoRA's new size, and scores every
cached image against the uncached image made with the same LoRA, seed and prompt. Not a test: about 10 minutes
on one CPU thread.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/lora_cache_quality.py --out docs/benchmarks/DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ditserve import LoRARequest, Omni
from ditserve.bench.metrics import mean, psnr_db
from ditserve.demo import demo_lora_path, demo_model_path, heldout_prompts
from ditserve.demo.language import new_size_prompts

BACKENDS = ("tea_cache", "mag_cache", "cache_dit")
TARGETS_DB = (30, 35)
STEPS = 50


def generate(omni: Omni, prompts: list[str], lora: LoRARequest | None) -> list:
    """One image per prompt, prompt i with seed i, one request at a time (as the bench's rows)."""
    return [omni.generate(prompt, {"num_inference_steps": STEPS, "seed": index}, lora_request=lora)[0]
            for index, prompt in enumerate(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts of each set")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, lora_path = str(demo_model_path()), str(demo_lora_path())
    lora = LoRARequest("medium", 1, lora_path)
    prompt_sets = {"ordinary": heldout_prompts(args.prompts, seed=0), "new-size": new_size_prompts(args.prompts, seed=0)}
    started = time.time()
    with Omni(model) as omni:
        references = {(name, with_lora): [o.images[0] for o in generate(omni, prompts, lora if with_lora else None)]
                      for name, prompts in prompt_sets.items() for with_lora in (False, True)}
    rows = []
    for backend in BACKENDS:
        for target in TARGETS_DB:
            with Omni(model, cache_backend=backend, cache_config={"target_psnr": target}) as omni:
                for (name, with_lora), reference in references.items():
                    outputs = generate(omni, prompt_sets[name], lora if with_lora else None)
                    psnrs = [psnr_db(o.images[0], r) for o, r in zip(outputs, reference, strict=True)]
                    rows.append({"backend": backend, "target_psnr": target, "prompts": name, "lora": with_lora,
                                 "psnr_mean": mean(psnrs), "psnr_min": min(psnrs),
                                 "work_fraction": mean([o.cache_stats["work_fraction"] for o in outputs]),
                                 "config": outputs[0].cache_stats["resolved_from"]["config"]})
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"model": "ditserve-shapes", "lora": "ditserve-shapes-lora-medium", "steps": STEPS,
              "prompts_per_set": args.prompts, "minutes": round((time.time() - started) / 60, 1), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Cache quality with a LoRA on the base model's calibration", "",
             f"`OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/lora_cache_quality.py --prompts {args.prompts} --out "
             f"{args.out}`: the demo model, {STEPS} steps, true CFG 3, 128x128, prompt i with seed i; "
             f"{args.prompts} ordinary held-out prompts and {args.prompts} with the new size; the LoRA "
             f"`ditserve-shapes-lora-medium` per request; each backend at `target_psnr` 30 and 35 (resolved from the "
             f"base model's calibration); PSNR against the uncached image with the same LoRA (or none). "
             f"{record['minutes']} min.", "",
             "| backend | target dB (config) | prompts | PSNR mean / worst, no LoRA | with the LoRA | work fraction (no LoRA / LoRA) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for base in (r for r in rows if not r["lora"]):
        with_lora = next(r for r in rows if r["lora"] and all(r[k] == base[k] for k in ("backend", "target_psnr", "prompts")))
        lines.append(f"| {base['backend']} | {base['target_psnr']} ({base['config']}) | {base['prompts']} | "
                     f"{base['psnr_mean']:.1f} / {base['psnr_min']:.1f} | {with_lora['psnr_mean']:.1f} / "
                     f"{with_lora['psnr_min']:.1f} | {base['work_fraction']:.3f} / {with_lora['work_fraction']:.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
