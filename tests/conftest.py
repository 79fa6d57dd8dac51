"""Session-wide fixtures: tiny pipelines are built once per test run and shared."""

from __future__ import annotations

import pytest
import torch

from ditserve.testing import tiny_pipeline_dir


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    # Tiny models gain nothing from a second thread, and when the machine is shared a spinning OpenMP
    # thread made a 10-step run 8x slower than one thread (measured: 1.3 s vs 10.5 s). Set before every test:
    # code under test that takes a thread count (benches, parallel runners) may leave another one behind.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_flux_dir() -> str:
    return tiny_pipeline_dir("flux")


@pytest.fixture(scope="session")
def flux_omni(tiny_flux_dir: str):
    from ditserve import Omni

    omni = Omni(model=tiny_flux_dir, max_batch_size=4)
    yield omni
    omni.close()



@pytest.fixture(scope="session")
def ltx2_omni():
    """The tiny 2-block LTX2Pipeline (diffusers' default STG block is absent, so no STG pass runs)."""
    from ditserve import Omni

    omni = Omni(model=tiny_pipeline_dir("ltx2"), max_batch_size=4)
    yield omni
    omni.close()
