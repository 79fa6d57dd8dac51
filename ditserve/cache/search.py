"""Search of a cache's knobs for its Pareto front of work against worst-prompt quality.

Every point of the knob space costs one generation per prompt, so the space (ladders of a few values per knob,
thousands of combinations for Cache-DiT) is never swept. A Pareto local search instead: evaluate the seeds (the
backend's defaults with its main threshold at a few values), then, round after round, the neighbours of every
point on the current front (one knob moved one step along its ladder), until no front point has a neighbour left
to try or the budget is spent. The budget counts denoising work, not generations: a generation costs its work
fraction (what it costs in time, up to the text encoder and the VAE), so cheap configs, which skip much, do not
stop a search before it reaches them. Dominated points are never expanded, nor are points that no quality
target can resolve to: those whose worst prompt falls below ``floor_db`` (too damaged for any preset), and those
slower than a front point already above ``ceiling_db`` (every target up to the ceiling prefers that one). So
the budget goes where targets resolve.

A candidate is measured prompt by prompt, the prompt that has been hardest so far first, and dropped as soon as
the front already beats it: its worst PSNR can only fall as prompts are added, so only its work (a mean over
prompts) is still uncertain, by at most how much work has differed between the prompts of one point so far
(nothing for MagCache, whose decisions do not depend on the prompt). Most neighbours of a good point are worse, and this
way they cost about one generation instead of one per prompt (successive halving with one rung per prompt).

An evaluator that can tell when two configs give the same outputs (``outcome_key``: MagCache's decisions follow from
its knobs and ratios alone) has each outcome measured once: a config whose outcome was measured takes those
figures and costs no generation.

Nothing here runs a model: an ``Evaluator`` does (ours through ``Omni``, the peers through diffusers), so the
search logic is tested on a cheap fake.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ditserve.errors import CacheConfigError, InvalidParameterError

logger = logging.getLogger(__name__)

Config = dict[str, Any]
#: worst-prompt PSNR (dB) under which a point is neither expanded nor measured further: the presets are 25-35 dB
DEFAULT_FLOOR_DB = 20.0
#: the highest target the search serves: of the points at or above it only the fastest is expanded
DEFAULT_CEILING_DB = 45.0


@dataclass(frozen=True)
class Knob:
    """One option a search moves: ``values`` in order, so a move is one step to either side.

    ``depends_on``: the option is read only while that knob is on (not None / False), like TaylorSeer's order
    without TaylorSeer; while it is off the knob is held at its first value, so equal configs are measured once.
    """

    name: str
    values: tuple[Any, ...]
    depends_on: str | None = None

    def __post_init__(self) -> None:
        if len(self.values) < 2 or len(set(map(repr, self.values))) != len(self.values):
            raise InvalidParameterError(f"knob {self.name}: needs at least 2 distinct values, got {self.values}",
                                        param=self.name)

    def index_of(self, value: Any) -> int | None:
        """The ladder position of ``value`` (a value between two rungs counts as the nearer one below)."""
        for index, rung in enumerate(self.values):
            if rung == value and type(rung) is type(value):
                return index
        numbers = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(numbers) == len(self.values):
            below = [i for i, rung in enumerate(self.values) if rung <= value]
            return below[-1] if below else 0
        return None


@dataclass(frozen=True)
class SearchSpace:
    knobs: tuple[Knob, ...]
    #: the starting points (complete for the knobs)
    seeds: tuple[Config, ...]

    def __post_init__(self) -> None:
        names = [k.name for k in self.knobs]
        for knob in self.knobs:
            if knob.depends_on is not None and knob.depends_on not in names:
                raise InvalidParameterError(f"knob {knob.name} depends on {knob.depends_on}, which is not a knob",
                                            param=knob.name)
        for seed in self.seeds:
            missing = set(names) - set(seed)
            if missing:
                raise InvalidParameterError(f"search seed {seed} lacks knobs {sorted(missing)}", param="seeds")

    def canonical(self, config: Mapping[str, Any]) -> Config:
        """``config`` with every knob that is switched off by another held at its first value."""
        result = dict(config)
        for knob in self.knobs:
            if knob.depends_on is not None and not result[knob.depends_on]:
                result[knob.name] = knob.values[0]
        return result

    def neighbours(self, config: Mapping[str, Any]) -> list[Config]:
        """Every config one knob, one step away (canonical, without ``config`` itself and duplicates)."""
        found: dict[str, Config] = {}
        own = config_key(self.canonical(config))
        for knob in self.knobs:
            index = knob.index_of(config[knob.name])
            if index is None:
                continue
            for step in (-1, 1):
                if 0 <= index + step < len(knob.values):
                    moved = self.canonical({**config, knob.name: knob.values[index + step]})
                    key = config_key(moved)
                    if key != own:
                        found.setdefault(key, moved)
        return list(found.values())


def config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


@dataclass(frozen=True)
class PromptMeasurement:
    """One generation of a candidate: the share of the transformer work it ran and its PSNR against the
    uncached image of the same prompt and seed."""

    work_fraction: float
    psnr_db: float


class EvaluationStatus(enum.Enum):
    #: measured on every prompt
    COMPLETE = "complete"
    #: stopped early: the front already beat it on the prompts measured
    PRUNED = "pruned"
    #: stopped early: the budget ran out
    OUT_OF_BUDGET = "out_of_budget"
    #: the backend refused the config on this model (e.g. more compute blocks than the model has)
    INFEASIBLE = "infeasible"


@dataclass
class Evaluation:
    config: Config
    #: by prompt index
    measurements: dict[int, PromptMeasurement] = field(default_factory=dict)
    status: EvaluationStatus = EvaluationStatus.COMPLETE
    reason: str = ""
    #: the config measured before whose figures this one took (same ``outcome_key``), else None
    same_as: Config | None = None

    @property
    def work_fraction(self) -> float:
        return statistics.fmean(m.work_fraction for m in self.measurements.values())

    @property
    def psnr_min(self) -> float:
        return min(m.psnr_db for m in self.measurements.values())

    @property
    def psnr_mean(self) -> float:
        return statistics.fmean(m.psnr_db for m in self.measurements.values())


class Evaluator(ABC):
    """Runs a cache config over a fixed prompt set, one prompt at a time."""

    @property
    @abstractmethod
    def num_prompts(self) -> int:
        """How many prompts ``session`` can measure (indices 0 .. num_prompts - 1)."""

    @abstractmethod
    def session(self, config: Config) -> AbstractContextManager[Callable[[int], PromptMeasurement]]:
        """The cache set up with ``config`` for the block: yields a function measuring one prompt by index.
        Raises ``CacheConfigError`` on entering when the config cannot run on this model."""

    def outcome_key(self, config: Config) -> str | None:
        """Equal for configs that give the same output on every prompt; None where that is not known ahead."""
        return None


def dominates(a: Evaluation, b: Evaluation) -> bool:
    """``a`` is at least as fast and as good as ``b`` on worst-prompt PSNR, and better on one of the two."""
    at_least = a.work_fraction <= b.work_fraction and a.psnr_min >= b.psnr_min
    return at_least and (a.work_fraction < b.work_fraction or a.psnr_min > b.psnr_min)


def pareto_front(evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    """The complete evaluations no other one dominates, least work first. Of points with equal figures (knobs that
    changed nothing) only the first one given stays: the others add nothing and would each be expanded."""
    complete = [e for e in evaluations if e.status is EvaluationStatus.COMPLETE]
    front: list[Evaluation] = []
    for e in complete:
        tie = any(f.work_fraction == e.work_fraction and f.psnr_min == e.psnr_min for f in front)
        if not tie and not any(dominates(other, e) for other in complete):
            front.append(e)
    return sorted(front, key=lambda e: (e.work_fraction, -e.psnr_min))


@dataclass
class SearchResult:
    evaluations: list[Evaluation]
    #: generations run (one per prompt measured)
    generations: int
    #: their denoising work, in uncached generations (the sum of their work fractions)
    work_spent: float

    def front(self) -> list[Evaluation]:
        return pareto_front(self.evaluations)

    def useful_front(self, floor_db: float = DEFAULT_FLOOR_DB, ceiling_db: float = DEFAULT_CEILING_DB) -> list[Evaluation]:
        return target_front(self.front(), floor_db, ceiling_db)

    def count(self, status: EvaluationStatus) -> int:
        return sum(e.status is status for e in self.evaluations)

    def count_reused(self) -> int:
        """Configs that took the figures of one measured before (same outcome), at no generation."""
        return sum(e.same_as is not None for e in self.evaluations)


def target_front(front: Sequence[Evaluation], floor_db: float, ceiling_db: float) -> list[Evaluation]:
    """The points of a front (least work first) that some target between ``floor_db`` and ``ceiling_db`` resolves
    to: not under the floor, and none slower than the fastest point at or above the ceiling."""
    useful = []
    for e in front:
        if e.psnr_min >= floor_db:
            useful.append(e)
            if e.psnr_min >= ceiling_db:
                break
    return useful


class ParetoSearch:
    def __init__(self, space: SearchSpace, evaluator: Evaluator, budget: float, prune: bool = True,
                 floor_db: float = DEFAULT_FLOOR_DB, ceiling_db: float = DEFAULT_CEILING_DB) -> None:
        """``budget``: the denoising work the search may spend, in uncached generations (a generation of work
        fraction 0.25 spends 0.25)."""
        if not budget > 0:
            raise InvalidParameterError(f"search budget={budget} must be > 0 (uncached generations of work)",
                                        param="budget")
        if not floor_db < ceiling_db:
            raise InvalidParameterError(f"floor_db={floor_db} must be under ceiling_db={ceiling_db}", param="floor_db")
        self.floor_db, self.ceiling_db = floor_db, ceiling_db
        self.space = space
        self.evaluator = evaluator
        self.budget = budget
        self.prune = prune
        self.evaluations: dict[str, Evaluation] = {}
        #: the evaluation measured for each outcome key (complete or pruned ones: their verdict holds for a twin)
        self._outcomes: dict[str, Evaluation] = {}
        self.generations = 0
        self.work_spent = 0.0
        #: the front of the complete evaluations so far
        self._front: list[Evaluation] = []
        #: the largest relative range of work over the prompts of one complete evaluation so far
        self._spread = 0.0

    def run(self) -> SearchResult:
        pending = self._unseen([self.space.canonical(seed) for seed in self.space.seeds])
        expanded: set[str] = set()
        while pending and self.work_spent < self.budget:
            for config in pending:
                if self.work_spent >= self.budget:
                    break
                self._evaluate(config)
            useful = target_front(self._front, self.floor_db, self.ceiling_db)
            front = [e for e in useful if config_key(e.config) not in expanded]
            expanded.update(config_key(e.config) for e in front)
            # round robin over the front's points, so a budget that runs out mid-round has explored all of it evenly
            per_point = [self.space.neighbours(e.config) for e in front]
            pending = self._unseen([c for group in itertools.zip_longest(*per_point) for c in group if c is not None])
        return SearchResult(list(self.evaluations.values()), self.generations, self.work_spent)

    def _unseen(self, configs: Sequence[Config]) -> list[Config]:
        unique: dict[str, Config] = {}
        for config in configs:
            key = config_key(config)
            if key not in self.evaluations:
                unique.setdefault(key, config)
        return list(unique.values())

    def _prompt_order(self) -> list[int]:
        """Hardest prompt first: lowest mean PSNR over the complete evaluations so far (index order at first)."""
        complete = [e for e in self.evaluations.values() if e.status is EvaluationStatus.COMPLETE]

        def mean_psnr(index: int) -> float:
            return statistics.fmean(e.measurements[index].psnr_db for e in complete) if complete else 0.0

        return sorted(range(self.evaluator.num_prompts), key=lambda i: (mean_psnr(i), i))

    def _beaten(self, partial: Evaluation) -> bool:
        """``partial`` is already below the floor, or some front point certainly dominates what it will be once
        measured on every prompt. Strictly: a tie would be on the front too, and expanded, as without pruning."""
        psnr = partial.psnr_min
        if psnr < self.floor_db:
            return True  # its worst prompt is already below the floor, and can only fall
        bound = partial.work_fraction * (1 - self._spread)
        return any(f.psnr_min >= psnr and f.work_fraction <= bound and (f.psnr_min > psnr or f.work_fraction < bound)
                   for f in self._front)

    def _evaluate(self, config: Config) -> None:
        try:
            outcome = self.evaluator.outcome_key(config)
        except CacheConfigError:
            outcome = None  # the session below records the refusal
        twin = self._outcomes.get(outcome) if outcome is not None else None
        if twin is not None:
            # a pruned twin was beaten by an earlier front, and fronts only improve: this one is beaten too
            self._record(Evaluation(config, dict(twin.measurements), twin.status, twin.reason, same_as=twin.config))
            return
        evaluation = Evaluation(config)
        order = self._prompt_order()
        try:
            with self.evaluator.session(config) as measure:
                for position, index in enumerate(order):
                    if self.work_spent >= self.budget:
                        evaluation.status = EvaluationStatus.OUT_OF_BUDGET
                        break
                    measurement = evaluation.measurements[index] = measure(index)
                    self.generations += 1
                    self.work_spent += measurement.work_fraction
                    last = position == len(order) - 1
                    if self.prune and not last and self._beaten(evaluation):
                        evaluation.status = EvaluationStatus.PRUNED
                        break
        except CacheConfigError as error:
            evaluation.status, evaluation.reason = EvaluationStatus.INFEASIBLE, str(error)
        if outcome is not None and evaluation.status in (EvaluationStatus.COMPLETE, EvaluationStatus.PRUNED):
            self._outcomes[outcome] = evaluation
        # recorded only now: while measured it must not count as a front point beating itself
        self._record(evaluation)

    def _record(self, evaluation: Evaluation) -> None:
        self.evaluations[config_key(evaluation.config)] = evaluation
        if evaluation.status is EvaluationStatus.COMPLETE:
            self._front = pareto_front([*self._front, evaluation])
            works = [m.work_fraction for m in evaluation.measurements.values()]
            if evaluation.work_fraction > 0:
                self._spread = max(self._spread, (max(works) - min(works)) / evaluation.work_fraction)
        figures = (f"work={evaluation.work_fraction:.3f} psnr_min={evaluation.psnr_min:.2f}"
                   if evaluation.measurements else evaluation.reason)
        if evaluation.same_as is not None:
            figures += f" (the same outcome as {evaluation.same_as}: not generated again)"
        logger.info("%s %s: %s", evaluation.status.value, evaluation.config, figures)


def remeasure(evaluator: Evaluator, configs: Sequence[Config]) -> Iterator[Evaluation]:
    """Each config measured on every prompt of ``evaluator`` (held-out prompts: no pruning, no budget)."""
    for config in configs:
        evaluation = Evaluation(config)
        with evaluator.session(config) as measure:
            for index in range(evaluator.num_prompts):
                evaluation.measurements[index] = measure(index)
        yield evaluation
