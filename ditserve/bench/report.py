"""The bench's outputs: results.json for machines, results.md for people, pareto.png for the trade-off."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditserve.bench.metrics import PSNR_IDENTICAL_DB

QUALITY_LEVELS_DB = (25.0, 30.0, 35.0)
#: which side of the comparison a system is on
OURS_SYSTEMS = ("ditserve",)


def side(record: dict[str, Any]) -> str:
    return "ours" if record["system"] in OURS_SYSTEMS else "peers"


def ok_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok"]


def best_at(records: Sequence[dict[str, Any]], which: str, level_db: float) -> dict[str, Any] | None:
    """The fastest setting of one side whose mean PSNR reaches ``level_db`` (uncached counts: it is a setting)."""
    eligible = [r for r in ok_records(records) if side(r) == which and r["psnr_db"] >= level_db]
    return max(eligible, key=lambda r: r["speedup"], default=None)


def summary_lines(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = []
    for level in QUALITY_LEVELS_DB:
        ours, peer = best_at(records, "ours", level), best_at(records, "peers", level)
        ratio = ours["speedup"] / peer["speedup"] if ours and peer else None
        lines.append({"psnr_at_least_db": level, "ours_speedup": ours and ours["speedup"],
                      "ours_setting": ours and ours["label"], "peer_speedup": peer and peer["speedup"],
                      "peer_setting": peer and peer["label"], "ratio": ratio})
    return lines


def summary_text(line: dict[str, Any]) -> str:
    def speed(value: float | None) -> str:
        return "none" if value is None else f"{value:.2f}x"

    ratio = "n/a" if line["ratio"] is None else f"{line['ratio']:.2f}"
    return (f"PSNR >= {line['psnr_at_least_db']:.0f} dB: ours {speed(line['ours_speedup'])} "
            f"[{line['ours_setting']}], best peer {speed(line['peer_speedup'])} [{line['peer_setting']}], "
            f"ratio {ratio}")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(psnr, speedup) points no other point beats on both, from high quality to high speed."""
    front: list[tuple[float, float]] = []
    for psnr, speedup in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or speedup > front[-1][1]:
            front.append((psnr, speedup))
    return front


def write_pareto(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for which, colour, marker in (("ours", "tab:blue", "o"), ("peers", "tab:orange", "s")):
        points = [(r["psnr_db"], r["speedup"]) for r in ok_records(records) if side(r) == which]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        axes.scatter(xs, ys, c=colour, marker=marker, label=f"{which} (settings)", alpha=0.7)
        front = pareto_front(points)
        axes.step([p[0] for p in front], [p[1] for p in front], where="post", c=colour, lw=1.8,
                  label=f"{which} frontier")
    for level in QUALITY_LEVELS_DB:
        axes.axvline(level, c="grey", ls=":", lw=0.8)
    axes.set_xlabel(f"PSNR vs uncached, same seed (dB; {PSNR_IDENTICAL_DB:.0f} = identical)")
    axes.set_ylabel("speed-up vs diffusers uncached (wall time per image)")
    axes.invert_xaxis()
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "-"


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    records = results["records"]
    lines = [f"# ditserve bench: {results['model']}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [
        f"- device: {results['device']}, {results['cpu_count']} CPU cores available, dtype {results['dtype']}",
        f"- torch {results['torch_version']}, diffusers {results['diffusers_version']}, "
        f"cache-dit {results['cache_dit_version']}; {results['platform']}",
        f"- {results['steps']} steps, {len(results['prompts'])} prompts x {results['repeats']} repeats "
        f"(seeds {results['seeds']}), sampling {results['sampling']}",
        f"- started {results['started']}, took {results['duration_s'] / 60:.1f} min",
        f"- uncached parity (ditserve vs diffusers, same seeds): PSNR {_fmt(results['uncached_parity']['psnr_db'], 1)} dB, "
        f"SSIM {_fmt(results['uncached_parity']['ssim'], 4)}",
        "- baseline median s/img per timing pass (one per round, then a final one): "
        + "; ".join(f"{k} " + " / ".join(f"{v:.3f}" for v in values)
                    for k, values in results["baseline_median_s_per_pass"].items()),
        "",
        "Times are medians per image (warm-up excluded); speed-ups are wall-time ratios; compute fraction is the",
        "share of block attention/MLP bodies that really ran (counted with forward pre-hooks); quality is against",
        "the uncached image of the same seed made by the same system.",
        "", "## Summary", "",
    ]
    lines += [f"- {summary_text(line)}" for line in results["summary"]]
    lines += ["", "## Runs", "",
              "| system | method | config | s/img | denoise s | speed-up vs diffusers | vs ditserve | compute "
              "counted | compute reported | PSNR dB (min) | SSIM | adherence |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok_records(records):
        counted = _fmt(r["compute_fraction"], 3) + ("" if r.get("counted_reliably", True) else " (unreliable)")
        lines.append(
            f"| {r['system']} | {r['method']} | {_config_text(r['config'])} | {_fmt(r['median_s'], 3)} | "
            f"{_fmt(r['denoise_median_s'], 3)} | {_fmt(r['speedup_vs_diffusers_uncached'], 2, 'x')} | "
            f"{_fmt(r['speedup_vs_ditserve_uncached'], 2, 'x')} | {counted} | {_fmt(r.get('reported_work_fraction'), 3)} | "
            f"{_fmt(r['psnr_db'], 1)} ({_fmt(r['psnr_min_db'], 1)}) | {_fmt(r['ssim'], 3)} | {_fmt(r['adherence'], 3)} |")
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        lines += ["", "## Not run", "", "| system | method | config | status | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['method']} | {_config_text(r['config'])} | {r['status']} | {r['reason']} |"
                  for r in skipped]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir: Path, command: str | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["summary"] = summary_lines(results["records"])
    if command:
        results["command"] = command
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "pareto.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(results, command))
    title = f"{results['model']}, {results['steps']} steps, {results['device']}, {results['dtype']}"
    write_pareto(results["records"], paths["plot"], title)
    return paths
