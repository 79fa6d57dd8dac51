"""Runs denoising steps on one device: the loaded pipeline, its adapter, its cache, and the resident requests.

The engine calls ``step(plan)`` once per denoising step: the runner drops the aborted requests, admits the new
ones as residents (each encoded and prepared on its own, so a request whose prompt cannot be encoded fails
alone), runs one step for the residents the plan names (each at its own step of its own schedule; the others
keep their state, paused) through the family's ``predict``, steps each request's scheduler, and decodes and
returns the requests that finished. A multi-device runner
offers the same interface, so ``Omni`` and the server never know the difference.

Families without a step loop (the generic adapter runs diffusers' own ``__call__``) are served by ``execute``,
one request at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.cache.base import CacheBackend
from ditserve.cache.prompt_embed import PromptEmbedCache, resolve_prompt_embed_cache_config
from ditserve.cache.stats import request_cache_stats
from ditserve.config import OmniDiffusionConfig
from ditserve.engine.scheduler import StepPlan
from ditserve.errors import RequestAbortedError
from ditserve.forward_context import ForwardContext, forward_context
from ditserve.levers import apply_levers, load_options
from ditserve.lora.manager import LoRAManager, build_lora_manager, fuse_startup_loras
from ditserve.models.base import LoopAdapter, ModelKind, RequestMedia, RequestState, StageTimings, StepBatch
from ditserve.models.loader import LoadedModel, apply_schedule_settings, load_model
from ditserve.request import AudioTrack, Request, RequestOutput

logger = logging.getLogger(__name__)

#: what turns a step batch into its model output (the adapter's ``predict``, or a multi-device wrapper of it)
Predictor = Callable[[StepBatch], torch.Tensor]


@dataclass
class StepOutcome:
    """What one step did: who finished (with outputs), who failed alone, and where every running request is."""

    finished: list[RequestOutput] = field(default_factory=list)
    #: requests that failed on their own (their prompt could not be encoded...), by id
    failed: dict[str, BaseException] = field(default_factory=dict)
    #: request id -> (steps done, steps in all), for every request that ran this step
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: how many requests ran this step
    batch_size: int = 0


@dataclass
class _Resident:
    """A resident request: its tensors and its own timings."""

    state: RequestState
    admitted_at: float
    encode_s: float
    first_step_at: float | None = None
    last_step_end: float = 0.0
    max_batch_size: int = 0
    #: requests that shared at least one step with this one
    mates: set[str] = field(default_factory=set)
    #: aborted, but kept in its cohort (see ``step``)
    abandoned: bool = False


def _synchronize(device: torch.device) -> None:
    # stage timings must measure finished work, not queued kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelRunner:
    def __init__(self, config: OmniDiffusionConfig, model: LoadedModel | None = None) -> None:
        """``model``: an already loaded model to run as it is (its levers are the caller's); else the config's
        model is loaded and its levers applied."""
        self.config = config
        if model is None:
            model = load_model(config.model, device=config.device, dtype=config.dtype, **self._load_options())
            # fused LoRAs before the levers: a quantizer then converts the fused weights
            fuse_startup_loras(config, model)
            apply_levers(model, config)
        else:
            fuse_startup_loras(config, model)
        apply_schedule_settings(model, config.flow_shift, config.boundary_ratio)
        self.model: LoadedModel = model
        self.loras: LoRAManager | None = build_lora_manager(config, model)
        self.adapter = self.model.adapter
        enabled, size = resolve_prompt_embed_cache_config(config.enable_prompt_embed_cache,
                                                          config.prompt_embed_cache_size)
        self.prompt_cache = PromptEmbedCache(max_size=size, enabled=enabled, model_tag=self.model.path)
        self.cache: CacheBackend | None = self._build_cache()
        self.predictor: Predictor | None = self.adapter.predict if isinstance(self.adapter, LoopAdapter) else None
        self.decodes = True
        self._residents: dict[str, _Resident] = {}
        #: collated conditioning of the current members (``StepBatch.memo``), dropped when membership changes
        self._memo: dict[Any, Any] = {}
        self._memo_members: tuple[str, ...] = ()

    def _load_options(self) -> dict[str, Any]:
        return load_options(self.config)

    def _build_cache(self) -> CacheBackend | None:
        if self.config.cache_backend is None:
            return None
        from ditserve.cache.selector import build_cache_backend

        backend = build_cache_backend(self.config.cache_backend, self.config.cache_config)
        backend.enable(self.model.pipeline, self.adapter)
        return backend

    @property
    def steps_in_loop(self) -> bool:
        """Whether this model runs in the step loop (else: whole runs through ``execute``)."""
        return self.predictor is not None

    @property
    def joins_running_batch(self) -> bool:
        """Whether requests may join and leave a running batch at any step: the model runs in the step loop and
        its cache (if any) keeps its decisions per request."""
        return self.steps_in_loop and (self.cache is None or self.cache.decides_per_request)

    def validate_request(self, request: Request) -> None:
        """Checks that depend on how this runner runs the model (a multi-device split); raises on a bad request."""
        return None

    # ------------------------------------------------------------------ the step loop
    def call_transformer(self, branch: str, states: Sequence[RequestState], transformer_name: str = "transformer",
                         **kwargs: Any) -> torch.Tensor:
        """Call a transformer for ``states`` inside their forward context, so caches keep per-request state."""
        module = getattr(self.model.pipeline, transformer_name)
        owners = tuple(state.owner() for state in states)
        with forward_context(ForwardContext(owners, branch, transformer_name)):
            output = module(**kwargs, return_dict=False)
        # a transformer with several output streams (LTX-2: video and audio) answers all of them
        return output[0] if len(output) == 1 else output

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutcome:
        """Apply the plan, run one denoising step for its run set, return what finished. A failure of the step
        itself raises, after every resident was dropped (all of them fail with it)."""
        outcome = StepOutcome()
        for request_id in plan.drop:
            entry = self._residents.get(request_id)
            if entry is not None and self.cache is not None and not self.cache.decides_per_request:
                # the library keeps state for the whole cohort's rows: the request's rows run to the end of
                # the cohort, and its output is dropped
                entry.abandoned = True
            else:
                self._leave(request_id)
        if all(entry.abandoned for entry in self._residents.values()):
            for request_id in list(self._residents):  # nobody is left who needs the cohort's rows
                self._leave(request_id)
        self._admit(plan.admit, outcome)
        # the plan's run set (the others stay resident, paused), and abandoned cohort rows that must keep pace
        run = [entry for rid, entry in self._residents.items()
               if plan.run is None or rid in plan.run or entry.abandoned]
        if not run:
            return outcome
        try:
            self._run_step(run, outcome)
        except BaseException:
            for request_id in list(self._residents):
                self._leave(request_id)
            if self.cache is not None:
                # a failed step must not leave half-updated state for the next requests
                self.cache.recover(self.model.pipeline)
            raise
        return outcome

    def _admit(self, requests: Sequence[Request], outcome: StepOutcome) -> None:
        started: dict[int, list[str]] = {}
        for request in requests:
            start = time.perf_counter()
            try:
                embeddings = self._encode(request)
                state = self.adapter.prepare(request, embeddings)
                _synchronize(state.latents.device)
            except Exception as error:  # noqa: BLE001 - the request's own input failed: it fails alone
                logger.warning("request %s failed while encoding: %s", request.request_id, error)
                outcome.failed[request.request_id] = error
                continue
            self._residents[request.request_id] = _Resident(state, start, time.perf_counter() - start)
            started.setdefault(state.num_steps, []).append(request.request_id)
        if self.cache is not None:
            for num_steps, request_ids in started.items():
                self.cache.start(self.model.pipeline, request_ids, num_steps)

    def _encode(self, request: Request) -> Any:
        key = self.adapter.prompt_cache_key(request)
        return self.prompt_cache.lookup(key, lambda: self.adapter.encode_request(request), owner=request.request_id)

    def _run_step(self, running: list[_Resident], outcome: StepOutcome) -> None:
        members = tuple(entry.state.request_id for entry in running)
        if self._memo_members != members:
            self._memo, self._memo_members = {}, members
        batch = StepBatch([entry.state for entry in running], self.call_transformer, self._memo)
        start = time.perf_counter()
        try:
            output = self.predictor(batch)
        except Exception as error:  # noqa: BLE001 - find who caused it, if anyone alone did
            running, output = self._retry_alone(running, error, outcome)
            members = tuple(entry.state.request_id for entry in running)
        for entry, rows in zip(running, output.split([e.state.num_rows for e in running]), strict=True):
            state = entry.state
            state.latents = self.adapter.scheduler_step(state, rows)
            state.step_index += 1
        _synchronize(self.model.device)
        end = time.perf_counter()
        outcome.batch_size = len(running)
        for entry in running:
            entry.first_step_at = entry.first_step_at if entry.first_step_at is not None else start
            entry.last_step_end = end
            entry.max_batch_size = max(entry.max_batch_size, len(running))
            entry.mates.update(m for m in members if m != entry.state.request_id)
            if not entry.abandoned:
                outcome.progress[entry.state.request_id] = (entry.state.step_index, entry.state.num_steps)
        for entry in running:
            if entry.state.finished and entry.abandoned:
                self._leave(entry.state.request_id)
            elif entry.state.finished:
                try:
                    outcome.finished.append(self._finish(entry))
                except Exception as error:  # noqa: BLE001 - a request's own decode failed: it fails alone
                    logger.warning("request %s failed while decoding: %s", entry.state.request_id, error)
                    outcome.failed[entry.state.request_id] = error
                    self._leave(entry.state.request_id)

    def _retry_alone(self, running: list[_Resident], error: Exception,
                     outcome: StepOutcome) -> tuple[list[_Resident], torch.Tensor]:
        """The step failed for the batch: run each request's step alone, so that the requests that fail alone
        fail (with their own error) and the others go on. No request's state has moved yet (the schedulers step
        after ``predict``). Where that cannot help, the error is the whole batch's: a single request, a cache
        that keeps state for the whole cohort, or every request failing alone."""
        if len(running) == 1 or (self.cache is not None and not self.cache.decides_per_request):
            raise error
        logger.warning("a step of %d requests failed (%s); running each alone", len(running), error)
        if self.cache is not None:
            self.cache.recover(self.model.pipeline)  # the failed call may have half-updated its state
        survivors, outputs = [], []
        for entry in running:
            try:
                outputs.append(self.predictor(StepBatch([entry.state], self.call_transformer)))
            except Exception as own_error:  # noqa: BLE001 - this request fails alone
                outcome.failed[entry.state.request_id] = own_error
                self._leave(entry.state.request_id)
            else:
                survivors.append(entry)
        if not survivors:
            raise error
        return survivors, torch.cat(outputs)

    def _finish(self, entry: _Resident) -> RequestOutput:
        state = entry.state
        start = time.perf_counter()
        media = self.adapter.decode(state) if self.decodes else []
        audio = self.adapter.decode_audio(state) if self.decodes else []
        _synchronize(self.model.device)
        end = time.perf_counter()
        timings = StageTimings(encode_s=entry.encode_s, denoise_s=entry.last_step_end - (entry.first_step_at or end),
                               decode_s=end - start)
        output = self._output(state.request, media, timings, end - entry.admitted_at, entry.max_batch_size, audio)
        if output.cache_stats is not None:
            output.cache_stats["shared_with"] = sorted(entry.mates)
        self._leave(state.request_id)
        return output

    def _leave(self, request_id: str) -> None:
        if self._residents.pop(request_id, None) is not None and self.cache is not None:
            self.cache.finish(request_id)

    # ------------------------------------------------------------------ whole runs
    def execute(self, batch: Sequence[Request]) -> list[RequestOutput]:
        """Run ``batch`` from start to end as one cohort and return its outputs in order (the generic path, and
        tests). A request that fails raises its error."""
        if not self.steps_in_loop:
            return [self._run_whole(request) for request in batch]
        return run_cohort(self.step, batch)

    def _run_whole(self, request: Request) -> RequestOutput:
        """One request through the generic adapter's own pipeline call (progress and abort between its steps)."""
        def check_abort(step_index: int, num_steps: int) -> None:
            if request.aborted:
                raise RequestAbortedError(f"aborted before step {step_index + 1} of {num_steps}")

        def report(step_index: int, num_steps: int) -> None:
            if request.progress_callback is not None:
                request.progress_callback(step_index + 1, num_steps)

        start = time.perf_counter()
        if self.cache is not None:
            self.cache.start(self.model.pipeline, [request.request_id], request.params.num_inference_steps or 0)
        try:
            media, timings = self.adapter.run(request, (check_abort, report))
            return self._output(request, media, timings, time.perf_counter() - start, 1)
        except BaseException:
            if self.cache is not None:
                self.cache.recover(self.model.pipeline)
            raise
        finally:
            if self.cache is not None:
                self.cache.finish(request.request_id)

    def _output(self, request: Request, media: RequestMedia, timings: StageTimings, total_s: float,
                batch_size: int, audio: Sequence[AudioTrack] = ()) -> RequestOutput:
        is_video = self.adapter.kind is ModelKind.VIDEO
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, seed=request.seed, params=request.params,
            images=[] if is_video else media, videos=media if is_video else [],
            fps=request.params.fps if is_video else None, audio=list(audio),
            timings={"encode_s": timings.encode_s, "denoise_s": timings.denoise_s, "decode_s": timings.decode_s,
                     "total_s": total_s, "batch_size": batch_size},
            cache_stats=self._cache_stats(request.request_id))

    def _cache_stats(self, request_id: str) -> dict[str, Any] | None:
        """None only when no cache of any kind is on (no backend, prompt-embedding cache disabled)."""
        if self.cache is None and not self.prompt_cache.enabled:
            return None
        return request_cache_stats(self.cache, self.prompt_cache, request_id)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.disable(self.model.pipeline)
        if self.loras is not None:
            self.loras.close()
        self.prompt_cache.clear()
        self.model = None  # type: ignore[assignment]
        self.adapter = None  # type: ignore[assignment]


def run_cohort(step: Callable[[StepPlan], StepOutcome], batch: Sequence[Request]) -> list[RequestOutput]:
    """Admit ``batch`` at once and step until every request has finished; outputs in the order of ``batch``.
    The first request that fails on its own raises its error, after the others were dropped."""
    outputs: dict[str, RequestOutput] = {}
    pending = {r.request_id for r in batch}
    outcome = step(StepPlan(admit=list(batch)))
    while True:
        if outcome.failed:
            survivors = pending - set(outcome.failed) - {o.request_id for o in outcome.finished}
            if survivors:
                step(StepPlan(drop=sorted(survivors)))
            raise next(iter(outcome.failed.values()))
        for output in outcome.finished:
            outputs[output.request_id] = output
            pending.discard(output.request_id)
        if not pending:
            return [outputs[r.request_id] for r in batch]
        outcome = step(StepPlan())
