"""A backend's quality table in the calibration file: measured configs, their work and PSNR, and its front.

Format 2 (``ditserve calibrate`` since the knob search) stores per backend the knobs searched, what the search
cost, and the points measured on the held-out calibration prompts, each with its whole config (every knob the
search moved), its work fraction, mean and worst-prompt PSNR there, the same figures on the search prompts, and
whether it is on the front. A point is judged by its worst prompt over both sets: four held-out prompts alone
can be easier than the prompts a user sends (the demo's held-out set was, by up to 6 dB), and the search prompts
can only flatter a point chosen on them, so the minimum of the two is the cautious figure a target is met by.
Format 1 (one main knob swept, ``{"knob", "rows": [{"value", ...}]}``) is still read: each row becomes a point
whose config is that one knob.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ditserve.errors import CacheConfigError

#: the calibration file formats this code reads; it writes the last
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class QualityPoint:
    #: the knobs of the point, as ``cache_config`` takes them
    config: dict[str, Any]
    #: on the held-out calibration prompts
    work_fraction: float
    psnr_mean: float
    psnr_min: float
    #: on the prompts the search steered by (None in format 1, which had one prompt set)
    search_work_fraction: float | None = None
    search_psnr_min: float | None = None
    on_front: bool = False

    @property
    def worst_db(self) -> float:
        """The worst prompt over the held-out and the search prompts (held-out only in format 1)."""
        return self.psnr_min if self.search_psnr_min is None else min(self.psnr_min, self.search_psnr_min)

    @property
    def work(self) -> float:
        """The work fraction over both prompt sets (equal in size), held-out only in format 1."""
        if self.search_work_fraction is None:
            return self.work_fraction
        return (self.work_fraction + self.search_work_fraction) / 2

    def dominates(self, other: QualityPoint) -> bool:
        at_least = self.work <= other.work and self.worst_db >= other.worst_db
        return at_least and (self.work < other.work or self.worst_db > other.worst_db)


def mark_front(points: Sequence[QualityPoint]) -> list[QualityPoint]:
    """The points with ``on_front`` set from their figures over both prompt sets, least work first."""
    marked = [QualityPoint(**{**asdict(p), "on_front": not any(o.dominates(p) for o in points)}) for p in points]
    return sorted(marked, key=lambda p: (p.work, -p.worst_db))


@dataclass(frozen=True)
class QualityTable:
    backend: str
    #: the knobs the search moved, main threshold first
    knobs: tuple[str, ...]
    points: tuple[QualityPoint, ...]
    #: what the search did: prompts, generations, points by outcome (empty in format 1)
    search: dict[str, Any] = field(default_factory=dict)

    def front(self) -> list[QualityPoint]:
        return [p for p in self.points if p.on_front]

    def to_json(self) -> dict[str, Any]:
        return {"knobs": list(self.knobs), "search": self.search, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, backend: str, data: Mapping[str, Any], file_format: int) -> QualityTable:
        if file_format == 1:
            knob = data["knob"]
            points = [QualityPoint({knob: row["value"]}, row["work_fraction"], row["psnr_mean"], row["psnr_min"])
                      for row in data["rows"]]
            return cls(backend, (knob,), tuple(mark_front(points)))
        # the front is marked again on reading: it is this code's rule that a target resolves by
        points = [QualityPoint(**p) for p in data["points"]]
        return cls(backend, tuple(data["knobs"]), tuple(mark_front(points)), dict(data.get("search", {})))


def quality_table(calibration: Mapping[str, Any], backend: str) -> QualityTable | None:
    """The backend's table in a loaded calibration file, or None when it has none."""
    file_format = calibration.get("format", 1)
    if file_format not in READABLE_FORMATS:
        raise CacheConfigError(
            f"calibration file {calibration.get('_file')} has format {file_format}; this ditserve reads "
            f"{list(READABLE_FORMATS)}: run 'ditserve calibrate' again", param="format")
    data = calibration.get("quality_table", {}).get(backend)
    if not data:
        return None
    return QualityTable.from_json(backend, data, file_format)


@dataclass(frozen=True)
class Resolution:
    """How a quality target became a config: the point chosen and where its figures come from."""

    target_psnr: float
    config: dict[str, Any]
    #: worst prompt over both calibration prompt sets, and the work over both
    table_psnr_min: float
    #: mean PSNR over the held-out prompts
    table_psnr_mean: float
    table_work_fraction: float
    table_file: str | None

    def to_stats(self) -> dict[str, Any]:
        return asdict(self)


def choose_point(table: QualityTable, target_psnr: float, fixed: Mapping[str, Any]) -> QualityPoint:
    """The fastest point whose worst calibration prompt meets ``target_psnr``: on the front, or, when the user fixed
    some knobs by hand, among every measured point that has those values (a hand-given value always wins)."""
    tuned_fixed = {k: v for k, v in fixed.items() if k in table.knobs}
    candidates = [p for p in table.points if all(p.config.get(k) == v for k, v in tuned_fixed.items())]
    if not tuned_fixed:
        candidates = table.front()
    if not candidates:
        name = next(iter(tuned_fixed))
        measured = sorted({repr(p.config.get(name)) for p in table.points})
        raise CacheConfigError(
            f"no calibrated point of {table.backend} has {tuned_fixed}; measured values of {name}: {measured}. "
            f"Drop {name} from cache_config to let the target choose it, or drop the target", param=name)
    meeting = [p for p in candidates if p.worst_db >= target_psnr]
    if not meeting:
        best = max(candidates, key=lambda p: p.worst_db)
        raise CacheConfigError(
            f"target_psnr={target_psnr} dB is out of reach for {table.backend} on this model: the best calibrated "
            f"setting ({best.config}) reached {best.worst_db:.2f} dB on its worst prompt", param="target_psnr")
    return min(meeting, key=lambda p: (p.work, -p.worst_db))
