"""The model families, one folder each: adding a family is its folder (with a ``family.py``) and one line here.

Each family's ``family.py`` declares, by name, its pipelines' adapters, its transformers' cache specs, its parallel
plans and its tiny test pipelines (``ditserve.models.family.ModelFamily``); the lookups below are derived from those
declarations, so nothing else keeps a list of families. Reading them imports no model code.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from ditserve.lazy import load_object
from ditserve.models.family import ModelFamily

if TYPE_CHECKING:
    from ditserve.models.base import ModelAdapter

#: the family folders under ditserve/models/ (the generic path, generic/, serves every other pipeline)
FAMILY_FOLDERS = ("flux", "qwen_image", "sd3", "wan", "z_image", "ovis_image", "longcat_image", "ltx2")


@functools.cache
def families() -> tuple[ModelFamily, ...]:
    return tuple(importlib.import_module(f"ditserve.models.{folder}.family").FAMILY for folder in FAMILY_FOLDERS)


def _merged(part: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for family in families():
        for key, target in getattr(family, part).items():
            if key in merged:
                raise RuntimeError(f"{key} is declared by two model families ({part})")
            merged[key] = target
    return merged


def adapters() -> dict[str, str]:
    """Pipeline class name -> "module:AdapterClass"."""
    return _merged("adapters")


def cache_spec_modules() -> dict[str, str]:
    """Transformer class name -> module that registers its cache spec."""
    return _merged("cache_specs")


def parallel_plans() -> dict[str, str]:
    """Pipeline class name -> "module:PlanClass"."""
    return _merged("parallel_plans")


def tiny_pipelines() -> dict[str, str]:
    """Tiny pipeline name -> "module:builder"."""
    return _merged("tiny_pipelines")


def supported_pipelines() -> list[str]:
    return sorted(adapters())


def adapter_class_for(pipeline_class_name: str) -> type[ModelAdapter]:
    """The family adapter for a pipeline class, or the generic adapter that runs diffusers' ``__call__``."""
    target = adapters().get(pipeline_class_name)
    if target is None:
        from ditserve.models.generic import GenericAdapter

        return GenericAdapter
    return load_object(target)
