"""The cache statistics of one request, as ``RequestOutput.cache_stats`` carries them."""

from __future__ import annotations

from typing import Any

from ditserve.cache.base import CacheBackend
from ditserve.cache.prompt_embed import PromptEmbedCache


def request_cache_stats(backend: CacheBackend | None, prompt_cache: PromptEmbedCache,
                        request_id: str) -> dict[str, Any]:
    """The backend's per-request statistics (when one is enabled) and the prompt-embedding cache's outcome."""
    stats = backend.request_stats(request_id) if backend is not None else {"backend": None}
    stats["prompt_embed"] = prompt_cache.request_stats(request_id)
    return stats
