"""The bench's outputs: results.json for machines, results.md for people, pareto.png for the trade-off."""

from __future__ import annotations

import enum
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


class QualityMeasure(enum.Enum):
    """Which PSNR of a setting a frontier reads: over the prompts, the mean or the worst prompt's."""

    WORST = "psnr_min_db"
    MEAN = "psnr_db"

    @property
    def label(self) -> str:
        return "worst-prompt PSNR" if self is QualityMeasure.WORST else "mean PSNR"


class SpeedBasis(enum.Enum):
    """Which speed-up a frontier reads: wall time against diffusers uncached, or counted work (1 / compute
    fraction), which a busy machine cannot skew."""

    WALL = "speedup"
    WORK = "work_speedup"


def best_at(records: Sequence[dict[str, Any]], which: str, level_db: float,
            measure: QualityMeasure = QualityMeasure.MEAN, basis: SpeedBasis = SpeedBasis.WALL) -> dict[str, Any] | None:
    """The fastest setting of one side whose ``measure`` reaches ``level_db`` (uncached counts: it is a setting)."""
    eligible = [r for r in ok_records(records) if side(r) == which and r[measure.value] >= level_db]
    return max(eligible, key=lambda r: r[basis.value], default=None)


def summary_lines(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per quality measure (worst prompt first) and level: each side's best setting by wall time and by work."""
    lines = []
    for measure in QualityMeasure:
        for level in QUALITY_LEVELS_DB:
            line: dict[str, Any] = {"quality": measure.name.lower(), "psnr_at_least_db": level}
            for basis, prefix in ((SpeedBasis.WALL, ""), (SpeedBasis.WORK, "work_")):
                ours, peer = (best_at(records, which, level, measure, basis) for which in ("ours", "peers"))
                line |= {f"ours_{prefix}speedup": ours and ours[basis.value], f"ours_{prefix}setting": ours and ours["label"],
                         f"peer_{prefix}speedup": peer and peer[basis.value], f"peer_{prefix}setting": peer and peer["label"],
                         f"{prefix}ratio": ours[basis.value] / peer[basis.value] if ours and peer else None}
            lines.append(line)
    return lines


def summary_text(line: dict[str, Any]) -> str:
    def speed(value: float | None) -> str:
        return "none" if value is None else f"{value:.2f}x"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    measure = QualityMeasure[line["quality"].upper()]
    return (f"{measure.label} >= {line['psnr_at_least_db']:.0f} dB: ours {speed(line['ours_speedup'])} "
            f"[{line['ours_setting']}], best peer {speed(line['peer_speedup'])} [{line['peer_setting']}], "
            f"ratio {ratio(line['ratio'])}; by counted work: ours {speed(line['ours_work_speedup'])} "
            f"[{line['ours_work_setting']}], best peer {speed(line['peer_work_speedup'])} "
            f"[{line['peer_work_setting']}], ratio {ratio(line['work_ratio'])}")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(psnr, speedup) points no other point beats on both, from high quality to high speed."""
    front: list[tuple[float, float]] = []
    for psnr, speedup in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or speedup > front[-1][1]:
            front.append((psnr, speedup))
    return front


def write_pareto(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per quality measure (worst prompt, mean): each side's settings and frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axes, measure in zip(panels, QualityMeasure, strict=True):
        for which, colour, marker in (("ours", "tab:blue", "o"), ("peers", "tab:orange", "s")):
            points = [(r[measure.value], r["speedup"]) for r in ok_records(records) if side(r) == which]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            axes.scatter(xs, ys, c=colour, marker=marker, label=f"{which} (settings)", alpha=0.7)
            front = pareto_front(points)
            axes.step([p[0] for p in front], [p[1] for p in front], where="post", c=colour, lw=1.8,
                      label=f"{which} frontier")
        for level in QUALITY_LEVELS_DB:
            axes.axvline(level, c="grey", ls=":", lw=0.8)
        axes.set_xlabel(f"{measure.label} vs uncached, same seed (dB; {PSNR_IDENTICAL_DB:.0f} = identical)")
        axes.invert_xaxis()
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    panels[0].set_ylabel("speed-up vs diffusers uncached (wall time per image)")
    figure.suptitle(title, fontsize=10)
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
        "Times are medians per image or video (warm-up excluded); speed-ups are wall-time ratios; compute fraction is",
        "the share of block attention/MLP bodies that really ran (counted with forward pre-hooks), and the speed-up by",
        "work is its inverse; quality is against the uncached output of the same seed made by the same system (a",
        "video's PSNR over all of its frames, its SSIM the mean of its frames').",
        f"Adherence: {results.get('adherence_measure') or 'none for this model'}.",
        "", "## Summary", "",
    ]
    lines += [f"- {summary_text(line)}" for line in results["summary"]]
    lines += ["", "## Runs", "",
              "| system | method | config | s/img | denoise s | speed-up vs diffusers | vs ditserve | compute "
              "counted | by work | compute reported | PSNR dB (min) | SSIM | adherence |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok_records(records):
        counted = _fmt(r["compute_fraction"], 3) + ("" if r.get("counted_reliably", True) else " (unreliable)")
        lines.append(
            f"| {r['system']} | {r['method']} | {_config_text(r['config'])} | {_fmt(r['median_s'], 3)} | "
            f"{_fmt(r['denoise_median_s'], 3)} | {_fmt(r['speedup_vs_diffusers_uncached'], 2, 'x')} | "
            f"{_fmt(r['speedup_vs_ditserve_uncached'], 2, 'x')} | {counted} | {_fmt(r.get('work_speedup'), 2, 'x')} | "
            f"{_fmt(r.get('reported_work_fraction'), 3)} | "
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
