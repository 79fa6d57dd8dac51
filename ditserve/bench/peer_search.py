"""The peers get the knob search our backends get in ``ditserve calibrate``, where their libraries expose knobs.

Same search (``ditserve.cache.search``), same budget, same prompts and seeds as our calibration's search prompts
(never the bench's own prompts, so both sides are measured on prompts their search did not see), the same floor,
and the same quality measure: worst-prompt PSNR against the uncached image of the same system. Work is counted
with the bench's counter (forward pre-hooks on each block's attention and MLP projections) against the uncached
run of the same prompt, the way every bench row is counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ditserve.bench import peers
from ditserve.bench.metrics import psnr_db
from ditserve.bench.systems import BenchItem, DiffusersSystem, SampleResult
from ditserve.cache.cache_dit import CacheDiTBackend
from ditserve.cache.calibrate import DEFAULT_BUDGET, default_budget
from ditserve.cache.magcache import MagCacheBackend
from ditserve.cache.search import (
    Config,
    Evaluator,
    Knob,
    ParetoSearch,
    PromptMeasurement,
    SearchResult,
    SearchSpace,
)
from ditserve.config import OmniDiffusionSamplingParams

_MAG = {knob.name: knob.values for knob in MagCacheBackend.search_knobs}


def _seeded(knob: str, values: Sequence[Any], defaults: Mapping[str, Any]) -> tuple[Config, ...]:
    return tuple({**defaults, knob: value} for value in values)


#: (system, method) -> the peer's knobs with the same ladders as ours where the knob is the same, seeded from the
#: library's defaults
PEER_SPACES: dict[tuple[str, str], SearchSpace] = {
    ("diffusers", "FirstBlockCache"): SearchSpace(
        (Knob("threshold", (0.03, 0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)),),
        _seeded("threshold", (0.05, 0.1, 0.2, 0.3, 0.4), {})),
    ("diffusers", "MagCache"): SearchSpace(
        (Knob("threshold", _MAG["magcache_thresh"]), Knob("max_skip_steps", _MAG["magcache_K"]),
         Knob("retention_ratio", _MAG["retention_ratio"])),
        # ours start from a cap alone too (MagCacheBackend.search_start_points); the peer's cap does not grow, so
        # its start is the cap it searched its way to before (K 6 at 0.1)
        _seeded("threshold", (0.03, 0.06, 0.12, 0.24), {"max_skip_steps": 3, "retention_ratio": 0.2})
        + ({"threshold": 8.0, "max_skip_steps": 6, "retention_ratio": 0.1},)),
    # diffusers' TaylorSeer predicts from its last computed step, so at least the first step must compute
    # (disable_cache_before_step=0 raises "Cannot predict without prior initialization" on step 0)
    ("diffusers", "TaylorSeerCache"): SearchSpace(
        (Knob("cache_interval", (2, 3, 4, 5, 6, 8, 10)), Knob("disable_cache_before_step", (1, 2, 3, 5, 8)),
         Knob("max_order", (1, 2, 3))),
        _seeded("cache_interval", (3, 5, 8), {"disable_cache_before_step": 3, "max_order": 1})),
    ("cache-dit", "DBCache"): SearchSpace(
        CacheDiTBackend.search_knobs,
        _seeded("residual_diff_threshold", CacheDiTBackend.search_seeds,
                {k.name: CacheDiTBackend.defaults[k.name] for k in CacheDiTBackend.search_knobs})),
}


@dataclass
class PeerSetup:
    """What a peer's search runs on: its pipeline, the prompts with their seeded params, and the uncached run of
    each on the same pipeline (image and counted work)."""

    system: DiffusersSystem
    prompts: list[BenchItem]
    params: list[OmniDiffusionSamplingParams]
    uncached: list[SampleResult]


class PeerEvaluator(Evaluator):
    """A peer applied with a config to its pipeline: each prompt's counted work against its uncached run, and its
    PSNR against the uncached image."""

    def __init__(self, setup: PeerSetup, applied: Callable[[Config], contextlib.AbstractContextManager[Any]]) -> None:
        self.setup, self.applied = setup, applied

    @property
    def num_prompts(self) -> int:
        return len(self.setup.prompts)

    @contextlib.contextmanager
    def session(self, config: Config) -> Iterator[Callable[[int], PromptMeasurement]]:
        with self.applied(config):
            yield self._measure

    def _measure(self, index: int) -> PromptMeasurement:
        setup = self.setup
        result = setup.system.generate(setup.prompts[index], setup.params[index])
        return PromptMeasurement(result.work_units / setup.uncached[index].work_units,
                                 psnr_db(result.media, setup.uncached[index].media))


def search_peer(setup: PeerSetup, system: str, method: str, budget: float,
                applied: Callable[[Config], contextlib.AbstractContextManager[Any]]) -> SearchResult:
    """The peer's search with ``budget`` scaled as ours is for its number of knobs (``default_budget``)."""
    space = PEER_SPACES[(system, method)]
    scaled = budget * default_budget(space) / DEFAULT_BUDGET
    return ParetoSearch(space, PeerEvaluator(setup, applied), scaled).run()


def front_configs(result: SearchResult) -> list[Config]:
    """The configs of the search's front that a target can resolve to, as ours keep."""
    return [e.config for e in result.useful_front()]


def diffusers_hooks(pipeline: Any, method: str, num_steps: int,
                    mag_ratios: Callable[[], list[float]]) -> Callable[[Config], contextlib.AbstractContextManager[Any]]:
    """Applies one of diffusers' cache hooks with a config, for the block."""

    def applied(config: Config) -> contextlib.AbstractContextManager[Any]:
        ratios = mag_ratios() if method == "MagCache" else None
        return peers.diffusers_cache(pipeline, peers.diffusers_hook_config(method, config, pipeline, num_steps, ratios))

    return applied


def cache_dit_library(pipeline: Any, num_steps: int,
                      separate_cfg: bool) -> Callable[[Config], contextlib.AbstractContextManager[Any]]:
    def applied(config: Config) -> contextlib.AbstractContextManager[Any]:
        options = {**config, "enable_separate_cfg": separate_cfg}
        return peers.cache_dit_library(pipeline, peers.cache_dit_arguments(options, num_steps))

    return applied
