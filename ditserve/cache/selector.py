"""Build a CacheBackend from ``cache_backend`` + ``cache_config``. Adding a method is one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ditserve.cache.base import CacheBackend
from ditserve.errors import CacheConfigError
from ditserve.lazy import load_object

#: ``cache_backend`` name -> "module:Class"
BACKENDS: dict[str, str] = {
    "tea_cache": "ditserve.cache.teacache:TeaCacheBackend",
    "mag_cache": "ditserve.cache.magcache:MagCacheBackend",
    "cache_dit": "ditserve.cache.cache_dit:CacheDiTBackend",
}


def available_backends() -> list[str]:
    return sorted(BACKENDS)


def backend_class(name: str) -> type[CacheBackend]:
    target = BACKENDS.get(name)
    if target is None:
        raise CacheConfigError(f"cache_backend={name!r} is unknown; choose one of {available_backends()}",
                               param="cache_backend")
    return load_object(target)


def build_cache_backend(name: str, config: Mapping[str, Any] | None = None) -> CacheBackend:
    return backend_class(name)(config or {})
