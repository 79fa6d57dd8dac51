"""Tiny random-weight pipelines of every family, built locally (no download) for tests, benchmarks and docs.

``tiny_pipeline_dir(family)`` builds the family's folder once per process (in a temp dir) and returns it.
Each model family declares its tiny pipelines in its ``family.py`` (``ditserve.models.registry.tiny_pipelines``).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from ditserve.lazy import load_object
from ditserve.models.registry import tiny_pipelines

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="ditserve-tiny-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def families() -> list[str]:
    return sorted(tiny_pipelines())


@functools.cache
def tiny_pipeline_dir(family: str) -> str:
    builders = tiny_pipelines()
    if family not in builders:
        raise KeyError(f"no tiny builder for {family!r}; known: {families()}")
    build = load_object(builders[family])
    return str(build(_root() / family))
