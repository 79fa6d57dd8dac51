"""The parallel plan of a pipeline class, as its model family declares it (``ditserve/models/<family>/family.py``)."""

from __future__ import annotations

from ditserve.lazy import load_object
from ditserve.models.registry import parallel_plans
from ditserve.parallel.families.base import FamilyPlan


def parallel_families() -> list[str]:
    return sorted(parallel_plans())


def plan_for(pipeline_class_name: str) -> FamilyPlan | None:
    target = parallel_plans().get(pipeline_class_name)
    if target is None:
        return None
    return load_object(target)()
