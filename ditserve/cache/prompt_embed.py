"""Prompt-embedding cache: a thread-safe LRU over the encode step.

Text encoders are a fixed cost per request; serving the same prompt again (a retry, a seed sweep, a template)
need not pay it. The key holds everything the embedding depends on (the adapter's ``prompt_cache_key``:
prompt, negative prompt, max sequence length, guidance mode, dtype, device) plus the model, so a hit can never
return another request's embedding. Cached tensors are never handed out for in-place modification: the loop
only reads them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from ditserve.errors import InvalidParameterError

ENV_ENABLE = "OMNI_DIFFUSION_PROMPT_EMBED_CACHE"
ENV_SIZE = "OMNI_DIFFUSION_PROMPT_EMBED_CACHE_SIZE"
DEFAULT_SIZE = 32
#: per-request outcomes kept for statistics (the oldest are dropped: a server runs forever)
MAX_TRACKED_REQUESTS = 4096


def _env_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise InvalidParameterError(f"{name}={raw!r}: use 1/0/true/false", param=name)


def resolve_prompt_embed_cache_config(enable: bool | None = None, max_size: int | None = None) -> tuple[bool, int]:
    """Explicit arguments win; otherwise the environment variables; otherwise on, 32 entries."""
    if enable is None:
        raw = os.environ.get(ENV_ENABLE)
        enable = True if raw is None else _env_bool(ENV_ENABLE, raw)
    if max_size is None:
        raw = os.environ.get(ENV_SIZE)
        try:
            max_size = DEFAULT_SIZE if raw is None else int(raw)
        except ValueError:
            raise InvalidParameterError(f"{ENV_SIZE}={raw!r} must be a positive integer", param=ENV_SIZE) from None
    if max_size < 1:
        raise InvalidParameterError(f"prompt embed cache size must be >= 1, got {max_size}",
                                    param="prompt_embed_cache_size")
    return enable, max_size


class PromptEmbedCache:
    def __init__(self, max_size: int = DEFAULT_SIZE, enabled: bool = True, model_tag: str = "") -> None:
        self.max_size = max_size
        self.enabled = enabled
        self.model_tag = model_tag
        self.hits = self.misses = self.bypassed = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._outcomes: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def _note(self, owner: str | None, outcome: str) -> None:
        # called with the lock held
        if owner is None:
            return
        self._outcomes[owner] = outcome
        self._outcomes.move_to_end(owner)
        while len(self._outcomes) > MAX_TRACKED_REQUESTS:
            self._outcomes.popitem(last=False)

    def lookup(self, key: Hashable | None, compute: Callable[[], Any], owner: str | None = None) -> Any:
        """The cached value for ``key``, or ``compute()`` stored under it. ``key=None`` bypasses the cache.
        ``owner`` (a request id) records whether that request hit, missed or bypassed."""
        if not self.enabled or key is None:
            with self._lock:
                self.bypassed += 1
                self._note(owner, "bypassed")
            return compute()
        full_key = (self.model_tag, key)
        with self._lock:
            if full_key in self._entries:
                self._entries.move_to_end(full_key)
                self.hits += 1
                self._note(owner, "hit")
                return self._entries[full_key]
            self.misses += 1
            self._note(owner, "miss")
        # compute outside the lock: encoders are slow and other threads may look up other prompts
        value = compute()
        with self._lock:
            self._entries[full_key] = value
            self._entries.move_to_end(full_key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def request_stats(self, owner: str) -> dict[str, Any]:
        """This request's outcome ("hit", "miss", "bypassed", or None if it never looked up) and the totals."""
        with self._lock:
            outcome = self._outcomes.get(owner)
        return {"outcome": outcome, **self.stats()}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bypassed": self.bypassed,
                    "size": len(self._entries), "max_size": self.max_size}
