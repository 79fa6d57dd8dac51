"""Cache-DiT through the cache-dit library: DBCache, TaylorSeer and SCM (we configure it, never rewrite it).

cache-dit is enabled on the transformer itself ("transformer-only" mode), since our own loop calls the
transformer and never the pipeline's ``__call__``. cache-dit decides per transformer call for the whole batch
and keeps one step counter, so requests under it share a running batch only as a cohort: they start together
into an empty running set, with the same step count, and none joins until all have left (the scheduler does
this for backends with ``decides_per_request = False``). Every request of a cohort therefore shares its
decisions, unlike tea_cache / mag_cache, which decide per request. At a cohort's first transformer call, the
library's context is rebuilt for its step count (and its step-computation mask when SCM is on) and for its
guidance; after a failed step the hooks are removed and put back, so no half-updated context survives.

Guidance: with ``enable_separate_cfg`` the library keeps the unconditional pass's state apart from the
conditional one's, telling them apart by the parity of its call counter (cond, uncond, cond, ...). That is
right only for a cohort whose requests run both passes at every step; without it both passes share one state,
which mixes two predictions and fails outright when the two prompts' text lengths differ (Qwen-Image's true
CFG with a negative prompt). The setting therefore follows each cohort: the requests of a cohort have equal
params but prompt and seed, so they all guide or none does, and the adapter says which from the first call's
forward context. Pipelines run through their own ``__call__`` (the generic path) decide their guidance passes
out of our sight, so cache-dit is refused there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ditserve.cache.base import CacheBackend, boolean, integer_in, number_in, one_of
from ditserve.cache.residual_backend import branch_label, denoising_transformers
from ditserve.cache.search import Knob
from ditserve.cache.spec import CacheSpec, cache_spec_for
from ditserve.errors import CacheConfigError
from ditserve.forward_context import current_forward_context
from ditserve.models.base import LoopAdapter

logger = logging.getLogger(__name__)

SCM_POLICIES = ("slow", "medium", "fast", "ultra")
DBCACHE_OPTIONS = ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps", "residual_diff_threshold",
                   "max_continuous_cached_steps", "max_cached_steps", "enable_separate_cfg")


class CacheDiTBackend(CacheBackend):
    name = "cache_dit"
    decides_per_request = False
    main_knob = "residual_diff_threshold"
    # DBCache F1B0 with a short warm-up: valid on a 2-block model as on a 60-block one (the library
    # asserts Fn_compute_blocks < number of blocks; its own default Fn=8 is not)
    defaults = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4,
                "residual_diff_threshold": 0.24, "max_continuous_cached_steps": 3, "max_cached_steps": -1,
                "enable_separate_cfg": None, "enable_taylorseer": False, "taylorseer_order": 1,
                "scm_steps_mask_policy": None, "scm_steps_policy": "dynamic"}
    checks = {"Fn_compute_blocks": integer_in(0, 1000), "Bn_compute_blocks": integer_in(0, 1000),
              "max_warmup_steps": integer_in(0, 10000), "residual_diff_threshold": number_in(0.0, 100.0),
              "max_continuous_cached_steps": integer_in(-1, 10000), "max_cached_steps": integer_in(-1, 10000),
              "enable_separate_cfg": boolean, "enable_taylorseer": boolean, "taylorseer_order": integer_in(1, 4),
              "scm_steps_mask_policy": one_of(None, *SCM_POLICIES), "scm_steps_policy": one_of("dynamic", "static")}
    # every DBCache / TaylorSeer / SCM option that trades speed for quality; Fn/Bn ladders beyond the model's
    # block count are refused at enable and recorded as infeasible by the search
    search_knobs = (Knob("residual_diff_threshold", (0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48, 0.64)),
                    Knob("max_warmup_steps", (0, 1, 2, 4, 6, 8)),
                    Knob("max_continuous_cached_steps", (1, 2, 3, 4, 6, 8, 12, -1)),
                    Knob("Fn_compute_blocks", (1, 2, 3)),
                    Knob("Bn_compute_blocks", (0, 1, 2)),
                    Knob("enable_taylorseer", (False, True)),
                    Knob("taylorseer_order", (1, 2, 3), depends_on="enable_taylorseer"),
                    Knob("scm_steps_mask_policy", (None, *SCM_POLICIES)),
                    Knob("scm_steps_policy", ("dynamic", "static"), depends_on="scm_steps_mask_policy"))
    search_seeds = (0.08, 0.12, 0.24)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._transformers: list[tuple[str, torch.nn.Module]] = []
        self._spec: CacheSpec | None = None
        self._num_blocks = 0
        self._num_steps = 0
        self._request_ids: tuple[str, ...] = ()
        self._adapter: Any = None
        #: transformers whose library context still has to be rebuilt for the cohort that started
        self._pending: set[str] = set()
        #: the cohort's denoising steps each transformer ran, in order (two experts split the steps between them)
        self._steps_run: dict[str, list[int]] = {}
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ lifecycle
    def enable(self, pipeline: Any, adapter: Any) -> None:
        if not isinstance(adapter, LoopAdapter):
            # the library must be told whether each batch runs an unconditional pass; a pipeline running its own
            # loop decides that inside its __call__, out of our sight
            raise CacheConfigError(
                f"cache_backend='cache_dit' cannot serve {adapter.pipeline_class_name} on the generic path (its "
                "own __call__ decides its guidance passes, which cache-dit must know); use 'tea_cache' or "
                "'mag_cache' where its transformer has a cache spec", param="cache_backend")
        transformers = denoising_transformers(pipeline, adapter)
        spec = cache_spec_for(transformers[0][1], self.name)
        if spec.cache_dit_refusal is not None:
            raise CacheConfigError(f"cache_backend='cache_dit' cannot serve {spec.transformer_class}: "
                                   f"{spec.cache_dit_refusal}", param="cache_backend")
        from ditserve.cache.calibration import model_path_of

        self.resolve_quality_target(model_path_of(pipeline))
        self._spec = spec
        self._adapter = adapter
        self._num_blocks = len(spec.blocks(transformers[0][1]))
        if self.config["enable_separate_cfg"] is None:
            self.config["enable_separate_cfg"] = self._default_runs_guidance(adapter)
        self._check_block_counts()
        if len(transformers) > 1 and self.config["scm_steps_mask_policy"] is not None:
            # each expert's library context counts only the steps it runs, so a mask over the request's steps
            # would fall on the wrong ones
            raise CacheConfigError(
                f"scm_steps_mask_policy cannot serve {adapter.pipeline_class_name}: its transformers "
                f"({', '.join(n for n, _ in transformers)}) split the steps between them, and cache-dit's steps "
                "mask counts one transformer's steps", param="scm_steps_mask_policy")
        self._transformers = transformers
        self._attach(num_inference_steps=None)
        for name, module in transformers:
            self._hooks.append(module.register_forward_pre_hook(self._before_call_hook(name)))
        self.enabled = True

    @staticmethod
    def _default_runs_guidance(adapter: Any) -> bool:
        """Whether a request with the model's default params runs an unconditional pass (the demo model runs
        true CFG by default, FLUX.1-dev does not): the setting until a cohort says otherwise."""
        from ditserve.config import OmniDiffusionSamplingParams
        from ditserve.request import Request

        defaults = adapter.resolve_params(OmniDiffusionSamplingParams())
        return bool(adapter.uses_guidance(Request(prompt="", params=defaults)))

    def _cohort_runs_guidance(self) -> bool:
        """Whether the requests of the call running now run an unconditional pass."""
        ctx = current_forward_context()
        if ctx is None:
            raise RuntimeError("cache_dit: the transformer was called outside ditserve's denoising loop; the cache "
                               "needs the forward context to know the batch's guidance")
        guided = {bool(self._adapter.uses_guidance(owner.request)) for owner in ctx.owners}
        if len(guided) > 1:
            raise RuntimeError("cache_dit: a cohort mixes requests with and without guidance; the scheduler "
                               "must batch only requests of equal params under cache-dit")
        return guided.pop()

    def _before_call_hook(self, name: str) -> Any:
        def before_call(module: torch.nn.Module, _args: Any) -> None:
            if name in self._pending:
                self._pending.discard(name)
                self._refresh_for_cohort(module)
            ctx = current_forward_context()
            if ctx is not None and ctx.owners:
                steps = self._steps_run.setdefault(name, [])
                if not steps or steps[-1] != ctx.owners[0].step_index:
                    steps.append(ctx.owners[0].step_index)

        return before_call

    def _refresh_for_cohort(self, module: torch.nn.Module) -> None:
        import cache_dit

        guided = self._cohort_runs_guidance()
        fixed = self.user_options.get("enable_separate_cfg")
        if fixed is not None and fixed != guided:
            raise CacheConfigError(
                f"cache_config enable_separate_cfg={fixed}, but these requests "
                f"{'run' if guided else 'do not run'} an unconditional pass: cache-dit would "
                f"{'share one state between the two passes' if guided else 'count every other step as one'}; "
                "leave enable_separate_cfg unset to follow each batch's guidance", param="enable_separate_cfg")
        self.config["enable_separate_cfg"] = guided
        # two experts (Wan2.2 A14B) each run a part of the steps: told the request's step count, the library would
        # wait for a last step that expert never reaches before it publishes its statistics (so none would show);
        # told none, it publishes them after every call, and the context rebuilt here restarts its counters
        steps = self._num_steps if len(self._transformers) == 1 else None
        cache_config, calibrator = self._library_configs(steps)
        refresh = {"cache_config": cache_config}
        if calibrator is not None:
            refresh["calibrator_config"] = calibrator
        cache_dit.refresh_context(module, **refresh)

    def _check_block_counts(self) -> None:
        fn, bn = self.config["Fn_compute_blocks"], self.config["Bn_compute_blocks"]
        if fn + bn >= self._num_blocks:
            raise CacheConfigError(
                f"Fn_compute_blocks + Bn_compute_blocks = {fn + bn} must be < the model's {self._num_blocks} "
                f"transformer blocks (cache-dit caches the blocks in between)", param="Fn_compute_blocks")

    def _library_configs(self, num_inference_steps: int | None) -> tuple[Any, Any]:
        import cache_dit

        options = {k: self.config[k] for k in DBCACHE_OPTIONS}
        mask = None
        if self.config["scm_steps_mask_policy"] is not None and num_inference_steps:
            mask = cache_dit.steps_mask(total_steps=num_inference_steps,
                                        mask_policy=self.config["scm_steps_mask_policy"])
        cache_config = cache_dit.DBCacheConfig(
            **options, num_inference_steps=num_inference_steps, steps_computation_mask=mask,
            steps_computation_policy=self.config["scm_steps_policy"])
        calibrator = None
        if self.config["enable_taylorseer"]:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.config["taylorseer_order"])
        return cache_config, calibrator

    def _attach(self, num_inference_steps: int | None) -> None:
        import cache_dit

        cache_config, calibrator = self._library_configs(num_inference_steps)
        for _, module in self._transformers:
            cache_dit.enable_cache(self._library_target(module), cache_config=cache_config,
                                   calibrator_config=calibrator)

    def _library_target(self, module: torch.nn.Module) -> Any:
        """The transformer itself where cache-dit knows its class; else a ``BlockAdapter`` describing its blocks
        from the family's cache spec."""
        import cache_dit

        pattern = self._spec.cache_dit_forward_pattern
        if pattern is None:
            return module
        names = [name for name, _ in self._spec.block_lists]
        return cache_dit.BlockAdapter(
            transformer=module, blocks=[getattr(module, name) for name in names], blocks_name=names,
            forward_pattern=[cache_dit.ForwardPattern[pattern]] * len(names),
            has_separate_cfg=self.config["enable_separate_cfg"])

    def start(self, pipeline: Any, request_ids: Sequence[str], num_inference_steps: int) -> None:
        """A new cohort (the running set is empty when one starts): each transformer's library context is rebuilt
        at its first call, when the forward context names the cohort's requests and so their guidance."""
        self._num_steps = num_inference_steps
        self._request_ids = tuple(request_ids)
        self._pending = {name for name, _ in self._transformers}
        self._steps_run = {}

    def recover(self, pipeline: Any) -> None:
        """After a failed run: take the library's hooks off and put fresh ones on."""
        self._detach()
        self._attach(num_inference_steps=None)

    def _detach(self) -> None:
        import cache_dit

        for _, module in self._transformers:
            cache_dit.disable_cache(module)

    def disable(self, pipeline: Any) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._detach()
        self._transformers = []
        self.enabled = False

    # ------------------------------------------------------------------ statistics
    def _library_stats(self, module: torch.nn.Module) -> Any:
        import cache_dit

        for stats in cache_dit.summary(module, logging=False):
            if stats.cache_options:
                return stats
        return None

    def _collect_stats(self, request_id: str) -> dict[str, Any]:
        branches: dict[str, Any] = {}
        computed_blocks = cached_blocks = 0
        cached_per_step = self._num_blocks - self.config["Fn_compute_blocks"] - self.config["Bn_compute_blocks"]
        for name, module in self._transformers:
            stats = self._library_stats(module)
            if stats is None:
                continue
            # the library numbers a transformer's own calls; map them to the request's steps
            steps_run = self._steps_run.get(name, [] if len(self._transformers) > 1 else list(range(self._num_steps)))
            series = [("cond", stats.cached_steps, stats.residual_diffs)]
            if self.config["enable_separate_cfg"]:
                series.append(("uncond", stats.cfg_cached_steps, stats.cfg_residual_diffs))
            for label, cached_steps, diffs in series:
                full_label = branch_label(name, label)
                cached = {i for i in cached_steps if i < len(steps_run)}
                decisions = [{"step": step, "decision": "skip" if i in cached else "compute",
                              "distance": diffs.get(str(i))} for i, step in enumerate(steps_run)]
                branches[full_label] = {"computed": len(steps_run) - len(cached), "skipped": len(cached),
                                        "decisions": decisions}
                computed_blocks += len(steps_run) * self._num_blocks - len(cached) * cached_per_step
                cached_blocks += len(cached) * cached_per_step
        computed = sum(b["computed"] for b in branches.values())
        skipped = sum(b["skipped"] for b in branches.values())
        total_blocks = computed_blocks + cached_blocks
        return {"num_steps": self._num_steps, "computed_steps": computed, "skipped_steps": skipped,
                "computed_blocks": computed_blocks, "cached_blocks": cached_blocks,
                "work_fraction": computed_blocks / total_blocks if total_blocks else 1.0,
                "shared_with_batch": [r for r in self._request_ids if r != request_id], "branches": branches}
