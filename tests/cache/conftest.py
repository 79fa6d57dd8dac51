"""Fixtures of the cache tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture()
def private_flux_dir(tiny_flux_dir: str, tmp_path: Path) -> str:
    """A copy of tiny FLUX that a test may give its own calibration file."""
    target = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, target)
    return str(target)
