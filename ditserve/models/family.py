"""What a model family declares, in one place: its folder's ``family.py`` holds one ``ModelFamily``.

Everything is named by "module:object" strings, so that reading the declarations imports no model code: the
registry lists the family folders, and the engine, the caches, the parallel runner and the tests look their
parts up through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelFamily:
    name: str
    #: ``model_index.json`` ``_class_name`` -> "module:AdapterClass" (none: the pipelines run on the generic path)
    adapters: Mapping[str, str] = field(default_factory=dict)
    #: transformer class name -> module whose import registers its ``CacheSpec`` (TeaCache, MagCache, Cache-DiT)
    cache_specs: Mapping[str, str] = field(default_factory=dict)
    #: pipeline class name -> "module:PlanClass" of its multi-device plan
    parallel_plans: Mapping[str, str] = field(default_factory=dict)
    #: tiny random pipeline name -> "module:builder(path) -> path" (tests, benchmarks, docs)
    tiny_pipelines: Mapping[str, str] = field(default_factory=dict)
