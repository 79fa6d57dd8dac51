"""The knob search on a cheap fake model: fronts, pruning, budget, infeasible configs, switched-off knobs, configs
known to give the same outputs."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import pytest

from ditserve.cache.search import (
    DEFAULT_CEILING_DB,
    DEFAULT_FLOOR_DB,
    Config,
    Evaluation,
    EvaluationStatus,
    Evaluator,
    Knob,
    ParetoSearch,
    PromptMeasurement,
    SearchResult,
    SearchSpace,
    config_key,
    pareto_front,
    target_front,
)
from ditserve.errors import CacheConfigError, InvalidParameterError

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
CAPS = (1, 2, 3, 4, 6, 8)
RETENTIONS = (0.0, 0.1, 0.2)
#: prompt 2 is the hard one: it loses the most quality to skipping
HARDNESS = (1.0, 1.5, 3.0, 1.2)


def fake_work(config: Config) -> float:
    """A cache that skips more with a higher threshold, a higher cap on skips in a row and less retention."""
    retained = config["retention"]
    by_threshold = 1.0 - config["t"]
    by_cap = 1.0 / (1 + config["k"])
    return retained + (1 - retained) * max(by_threshold, by_cap)


def fake_psnr(config: Config, prompt: int) -> float:
    # skipping costs quality, long runs of skips cost extra, early (retained) steps protect it
    loss = (1 - fake_work(config)) * 40 * HARDNESS[prompt] + 0.5 * config["k"] - 10 * config["retention"]
    return 60.0 - loss


class FakeEvaluator(Evaluator):
    def __init__(self, num_prompts: int = 4, refuse: Callable[[Config], bool] = lambda c: False) -> None:
        self._num_prompts = num_prompts
        self.refuse = refuse
        self.measured: list[tuple[str, int]] = []

    @property
    def num_prompts(self) -> int:
        return self._num_prompts

    @contextlib.contextmanager
    def session(self, config: Config) -> Iterator[Callable[[int], PromptMeasurement]]:
        if self.refuse(config):
            raise CacheConfigError("refused", param="k")

        def measure(index: int) -> PromptMeasurement:
            self.measured.append((config_key(config), index))
            return PromptMeasurement(fake_work(config), fake_psnr(config, index))

        yield measure


def space(seeds: tuple[Config, ...] = ({"t": 0.1, "k": 3, "retention": 0.2},)) -> SearchSpace:
    return SearchSpace((Knob("t", THRESHOLDS), Knob("k", CAPS), Knob("retention", RETENTIONS)), seeds)


def grid_front() -> list[tuple[float, float]]:
    """The true front of the fake, from every point of the grid."""
    everything = []
    for t, k, r in itertools.product(THRESHOLDS, CAPS, RETENTIONS):
        config = {"t": t, "k": k, "retention": r}
        everything.append(Evaluation(config, {i: PromptMeasurement(fake_work(config), fake_psnr(config, i))
                                              for i in range(4)}))
    return [(round(e.work_fraction, 9), round(e.psnr_min, 9))
            for e in target_front(pareto_front(everything), DEFAULT_FLOOR_DB, DEFAULT_CEILING_DB)]


def test_dominance_needs_both_axes_at_least_as_good_and_one_better() -> None:
    def point(work: float, psnr: float, name: str = "") -> Evaluation:
        return Evaluation({"w": work, "p": psnr, "name": name}, {0: PromptMeasurement(work, psnr)})

    fast_good, slow_good, fast_bad = point(0.3, 40), point(0.5, 40), point(0.3, 30)
    same = point(0.3, 40, "same figures")
    # of two points with equal figures the first given stays
    assert [e.config for e in pareto_front([slow_good, fast_bad, fast_good, same])] == [fast_good.config]
    assert [e.config for e in pareto_front([same, fast_good])] == [same.config]
    # a pruned (incomplete) point is never on the front, however good it looks on the prompts it ran
    pruned = point(0.1, 90)
    pruned.status = EvaluationStatus.PRUNED
    assert pruned not in pareto_front([fast_good, pruned])


def test_search_from_the_defaults_finds_the_grid_front_with_under_half_the_generations() -> None:
    evaluator = FakeEvaluator()
    result = ParetoSearch(space(), evaluator, budget=10_000).run()
    found = [(round(e.work_fraction, 9), round(e.psnr_min, 9)) for e in result.useful_front()]
    assert found == grid_front() and len(found) > 5
    grid_generations = len(THRESHOLDS) * len(CAPS) * len(RETENTIONS) * 4
    assert result.generations == len(evaluator.measured) < grid_generations / 2
    # each config measured at most once per prompt
    assert len(set(evaluator.measured)) == len(evaluator.measured)


def test_pruning_drops_beaten_candidates_after_their_hardest_prompt_and_keeps_the_front() -> None:
    pruned_search = ParetoSearch(space(), FakeEvaluator(), budget=10_000).run()
    full_search = ParetoSearch(space(), FakeEvaluator(), budget=10_000, prune=False).run()
    pruned = [e for e in pruned_search.evaluations if e.status is EvaluationStatus.PRUNED]
    assert pruned and pruned_search.generations < full_search.generations
    # the hardest prompt (index 2) is learnt from the seed and measured first, so most pruned points stop there
    assert sum(list(e.measurements) == [2] for e in pruned) > len(pruned) / 2
    def kept(result: SearchResult) -> list[Config]:
        return [e.config for e in result.useful_front()]

    assert kept(pruned_search) == kept(full_search)


def test_points_under_the_floor_are_dropped_after_one_prompt_and_never_expanded() -> None:
    evaluator = FakeEvaluator()
    result = ParetoSearch(space(), evaluator, budget=10_000, floor_db=35.0).run()
    under = [e for e in result.evaluations if e.psnr_min < 35.0]
    assert under and all(e.status is EvaluationStatus.PRUNED and len(e.measurements) == 1 for e in under)
    expanded_from = [e for e in result.evaluations if e.status is EvaluationStatus.COMPLETE]
    reachable = {config_key(n) for e in expanded_from for n in space().neighbours(e.config)}
    seeds = {config_key(seed) for seed in space().seeds}
    assert {config_key(e.config) for e in result.evaluations} <= reachable | seeds


def test_only_points_a_target_can_resolve_to_are_expanded() -> None:
    def point(work: float, psnr: float) -> Evaluation:
        return Evaluation({"w": work}, {0: PromptMeasurement(work, psnr)})

    front = [point(0.1, 15.0), point(0.2, 30.0), point(0.3, 46.0), point(0.5, 50.0)]
    # under the floor: too damaged; slower than a point above the ceiling: every target prefers that point
    assert [e.work_fraction for e in target_front(front, 20.0, 45.0)] == [0.2, 0.3]
    low_ceiling = ParetoSearch(space(), FakeEvaluator(), budget=10_000, ceiling_db=30.0).run()
    high_ceiling = ParetoSearch(space(), FakeEvaluator(), budget=10_000, ceiling_db=100.0).run()
    assert low_ceiling.generations < high_ceiling.generations
    assert low_ceiling.useful_front(ceiling_db=30.0)[-1].psnr_min >= 30.0
    with pytest.raises(InvalidParameterError, match="floor_db"):
        ParetoSearch(space(), FakeEvaluator(), budget=1, floor_db=50.0, ceiling_db=40.0)


def test_the_budget_counts_work_and_stops_the_search_mid_point() -> None:
    result = ParetoSearch(space(), FakeEvaluator(), budget=5.0, prune=False).run()
    spent = [m.work_fraction for e in result.evaluations for m in e.measurements.values()]
    assert result.work_spent == pytest.approx(sum(spent))
    # the generation that reaches the budget is the last one; each cost its work fraction (under 1 here), so
    # more generations ran than the budget's number
    assert sum(spent[:-1]) < 5.0 <= sum(spent) and result.generations == len(spent) > 5
    statuses = [e.status for e in result.evaluations]
    assert statuses == [EvaluationStatus.COMPLETE, EvaluationStatus.OUT_OF_BUDGET]
    assert 0 < len(result.evaluations[1].measurements) < 4
    for budget in (0, -1.0):
        with pytest.raises(InvalidParameterError, match="budget"):
            ParetoSearch(space(), FakeEvaluator(), budget=budget)


def test_configs_the_backend_refuses_are_recorded_and_cost_nothing() -> None:
    evaluator = FakeEvaluator(refuse=lambda c: c["retention"] == 0.0)
    result = ParetoSearch(space(), evaluator, budget=10_000).run()
    refused = [e for e in result.evaluations if e.status is EvaluationStatus.INFEASIBLE]
    assert refused and all(not e.measurements and e.reason == "refused" for e in refused)
    assert all(e.config["retention"] == 0.0 for e in refused)
    assert result.generations == len(evaluator.measured)
    assert all(e.config["retention"] > 0.0 for e in result.front())


def test_a_switched_off_knob_is_held_still_so_equal_configs_are_measured_once() -> None:
    knobs = (Knob("t", (0.1, 0.2)), Knob("taylor", (False, True)), Knob("order", (1, 2, 3), depends_on="taylor"))
    space_ = SearchSpace(knobs, ({"t": 0.1, "taylor": False, "order": 1},))
    off = {"t": 0.1, "taylor": False, "order": 1}
    assert space_.neighbours(off) == [{"t": 0.2, "taylor": False, "order": 1}, {"t": 0.1, "taylor": True, "order": 1}]
    assert space_.canonical({"t": 0.1, "taylor": False, "order": 3}) == off
    assert {"t": 0.1, "taylor": True, "order": 2} in space_.neighbours({"t": 0.1, "taylor": True, "order": 1})


def test_a_value_between_rungs_moves_to_the_rungs_around_it() -> None:
    knob = Knob("t", (0.1, 0.2, 0.4))
    space_ = SearchSpace((knob,), ({"t": 0.25},))
    assert space_.neighbours({"t": 0.25}) == [{"t": 0.1}, {"t": 0.4}]


def test_bad_spaces_are_refused_naming_the_knob() -> None:
    with pytest.raises(InvalidParameterError, match="order"):
        Knob("order", (1,))
    with pytest.raises(InvalidParameterError, match="taylor"):
        SearchSpace((Knob("order", (1, 2), depends_on="taylor"),), ())
    with pytest.raises(InvalidParameterError, match="lacks knobs"):
        SearchSpace((Knob("t", (1, 2)),), ({},))


class CappedThresholdEvaluator(FakeEvaluator):
    """A fake whose thresholds above 0.3 all act as 0.3 (as MagCache's do once its cap on skips in a row binds),
    and that says so through ``outcome_key`` when it ``knows``."""

    def __init__(self, knows: bool) -> None:
        super().__init__()
        self.knows = knows

    @staticmethod
    def effective(config: Config) -> Config:
        return {**config, "t": min(config["t"], 0.3)}

    @contextlib.contextmanager
    def session(self, config: Config) -> Iterator[Callable[[int], PromptMeasurement]]:
        with super().session(self.effective(config)) as measure:
            yield measure

    def outcome_key(self, config: Config) -> str | None:
        return config_key(self.effective(config)) if self.knows else None


def test_configs_with_the_same_outcome_are_generated_once() -> None:
    blind, knowing = CappedThresholdEvaluator(knows=False), CappedThresholdEvaluator(knows=True)
    plain = ParetoSearch(space(), blind, budget=10_000).run()
    keyed = ParetoSearch(space(), knowing, budget=10_000).run()
    figures = [[(round(e.work_fraction, 9), round(e.psnr_min, 9)) for e in r.useful_front()] for r in (plain, keyed)]
    assert figures[0] == figures[1]
    # every effective config and prompt generated at most once, and fewer generations than without the key
    assert len(set(knowing.measured)) == len(knowing.measured) == keyed.generations < plain.generations
    reused = [e for e in keyed.evaluations if e.same_as is not None]
    assert reused and keyed.count_reused() == len(reused)
    by_config = {config_key(e.config): e for e in keyed.evaluations}
    for e in reused:
        twin = by_config[config_key(e.same_as)]
        assert e.config["t"] > 0.3 and e.same_as == {**e.config, "t": twin.config["t"]}
        assert e.measurements == twin.measurements and e.status is twin.status
