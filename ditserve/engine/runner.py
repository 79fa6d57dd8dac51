"""Executes batches on one device: the loaded pipeline, its adapter, its cache, and the prompt cache.

The engine only ever calls ``execute(batch)``; a multi-device runner (one worker process per rank) offers the
same interface, so ``Omni`` and the server never know the difference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ditserve.cache.base import CacheBackend
from ditserve.cache.prompt_embed import PromptEmbedCache, resolve_prompt_embed_cache_config
from ditserve.cache.stats import request_cache_stats
from ditserve.config import OmniDiffusionConfig
from ditserve.engine.request import Request, RequestOutput
from ditserve.errors import RequestAbortedError
from ditserve.levers import apply_levers, load_options
from ditserve.models.base import BatchResult
from ditserve.models.loader import LoadedModel, load_model

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: OmniDiffusionConfig) -> None:
        self.config = config
        self.model: LoadedModel = load_model(config.model, device=config.device, dtype=config.dtype,
                                             **self._load_options())
        apply_levers(self.model, config)
        self.adapter = self.model.adapter
        enabled, size = resolve_prompt_embed_cache_config(config.enable_prompt_embed_cache,
                                                          config.prompt_embed_cache_size)
        self.prompt_cache = PromptEmbedCache(max_size=size, enabled=enabled, model_tag=self.model.path)
        self.cache: CacheBackend | None = self._build_cache()

    def _load_options(self) -> dict[str, Any]:
        return load_options(self.config)

    def _build_cache(self) -> CacheBackend | None:
        if self.config.cache_backend is None:
            return None
        from ditserve.cache.selector import build_cache_backend

        backend = build_cache_backend(self.config.cache_backend, self.config.cache_config)
        backend.enable(self.model.pipeline, self.adapter)
        return backend

    def _encode(self, request: Request) -> Any:
        key = self.adapter.prompt_cache_key(request)
        return self.prompt_cache.lookup(key, lambda: self.adapter.encode_request(request),
                                        owner=request.request_id)

    def _step_hooks(self, batch: Sequence[Request], progress_bar: Any) -> tuple[Any, Any]:
        def before_step(step_index: int, num_steps: int) -> None:
            if all(r.aborted for r in batch):
                raise RequestAbortedError(f"aborted before step {step_index + 1} of {num_steps}")

        def after_step(step_index: int, num_steps: int) -> None:
            if progress_bar is not None:
                progress_bar.total = num_steps
                progress_bar.update(1)
            for request in batch:
                if request.progress_callback is not None:
                    request.progress_callback(step_index + 1, num_steps)

        return before_step, after_step

    def execute(self, batch: Sequence[Request]) -> list[RequestOutput]:
        start = time.perf_counter()
        if self.cache is not None:
            self.cache.refresh(self.model.pipeline, batch[0].params.num_inference_steps,
                               [r.request_id for r in batch])
        progress_bar = tqdm(desc=f"denoising x{len(batch)}", unit="step") if self.config.show_progress else None
        try:
            result = self.adapter.generate(batch, self._step_hooks(batch, progress_bar), self._encode)
        except BaseException:
            if self.cache is not None:
                # a failed run must not leave half-updated state for the next request
                self.cache.recover(self.model.pipeline)
            raise
        finally:
            if progress_bar is not None:
                progress_bar.close()
        total = time.perf_counter() - start
        return [self._output(request, result, index, total, len(batch)) for index, request in enumerate(batch)]

    def _output(self, request: Request, result: BatchResult, index: int, total_s: float,
                batch_size: int) -> RequestOutput:
        media = result.media[index]
        timings = {"encode_s": result.timings.encode_s, "denoise_s": result.timings.denoise_s,
                   "decode_s": result.timings.decode_s, "total_s": total_s, "batch_size": batch_size}
        is_video = self.adapter.kind == "video"
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, seed=request.seed, params=request.params,
            images=[] if is_video else media, videos=media if is_video else [],
            fps=request.params.fps if is_video else None, timings=timings,
            cache_stats=self._cache_stats(request.request_id))

    def _cache_stats(self, request_id: str) -> dict[str, Any] | None:
        """None only when no cache of any kind is on (no backend, prompt-embedding cache disabled)."""
        if self.cache is None and not self.prompt_cache.enabled:
            return None
        return request_cache_stats(self.cache, self.prompt_cache, request_id)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.disable(self.model.pipeline)
        self.prompt_cache.clear()
        self.model = None  # type: ignore[assignment]
        self.adapter = None  # type: ignore[assignment]
