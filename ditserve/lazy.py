"""Registries name their entries as "module:attribute" strings so that importing a registry does not import
every family or method it lists; this resolves one entry when it is needed."""

from __future__ import annotations

import importlib
from typing import Any


def load_object(target: str) -> Any:
    """The attribute named by ``"package.module:attribute"``, importing its module."""
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)
