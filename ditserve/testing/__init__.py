"""Tiny random-weight pipelines of every family, built locally (no download) for tests, benchmarks and docs.

``tiny_pipeline_dir(family)`` builds the family's folder once per process (in a temp dir) and returns it.
Adding a family is one line in ``BUILDERS``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from ditserve.lazy import load_object

#: family name -> "module:function(path) -> path"
BUILDERS: dict[str, str] = {
    "sd3": "ditserve.testing.sd3:build_tiny_sd3",
    "z_image": "ditserve.testing.z_image:build_tiny_z_image",
    "wan": "ditserve.testing.wan:build_tiny_wan",
    "wan_a14b": "ditserve.testing.wan:build_tiny_wan_a14b",
    "wan_ti2v": "ditserve.testing.wan:build_tiny_wan_ti2v",
    "ovis_image": "ditserve.testing.generic:build_tiny_ovis_image",
    "flux": "ditserve.testing.flux:build_tiny_flux",
    "flux_dev": "ditserve.testing.flux:build_tiny_flux_dev",
    "qwen_image": "ditserve.testing.qwen_image:build_tiny_qwen_image",
    "qwen_image_edit": "ditserve.testing.qwen_image:build_tiny_qwen_image_edit",
    "qwen_image_edit_plus": "ditserve.testing.qwen_image:build_tiny_qwen_image_edit_plus",
}

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="ditserve-tiny-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def families() -> list[str]:
    return sorted(BUILDERS)


@functools.cache
def tiny_pipeline_dir(family: str) -> str:
    if family not in BUILDERS:
        raise KeyError(f"no tiny builder for {family!r}; known: {families()}")
    build = load_object(BUILDERS[family])
    return str(build(_root() / family))
