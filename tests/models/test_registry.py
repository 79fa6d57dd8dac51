"""The family declarations: every name resolves, each part is declared once, and the README's support table says
what the registry serves."""

from __future__ import annotations

import re
from pathlib import Path

from ditserve.cache.spec import cache_spec_for
from ditserve.lazy import load_object
from ditserve.models.base import ModelAdapter
from ditserve.models.registry import adapters, cache_spec_modules, families, parallel_plans, tiny_pipelines
from ditserve.parallel.families.base import FamilyPlan

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_declared_part_resolves() -> None:
    assert len({family.name for family in families()}) == len(families())
    for pipeline_class, target in adapters().items():
        adapter = load_object(target)
        assert issubclass(adapter, ModelAdapter) and pipeline_class in adapter.pipeline_class_names
    for target in parallel_plans().values():
        assert issubclass(load_object(target), FamilyPlan)
    for target in tiny_pipelines().values():
        assert callable(load_object(target))


def test_every_declared_cache_spec_registers_its_transformer() -> None:
    for transformer_class in cache_spec_modules():
        stand_in = type(transformer_class, (), {})()  # the lookup goes by class name
        assert cache_spec_for(stand_in, "tea_cache").transformer_class == transformer_class


def test_the_readme_support_table_lists_exactly_the_adapters() -> None:
    rows = re.findall(r"^\| [^|]+ \| `(\w+Pipeline)` \| (adapter|generic)", README.read_text(), flags=re.MULTILINE)
    in_readme = {pipeline for pipeline, path in rows if path == "adapter"}
    assert in_readme == set(adapters())
    assert not {pipeline for pipeline, path in rows if path == "generic"} & set(adapters())
