"""Fixtures of the lever tests: one eager engine on the tiny FLUX pipeline, shared by every lever test."""

from __future__ import annotations

import pytest
import torch

PROMPT = "a small red circle at the top left"
#: small enough to keep each run well under a second, large enough (32x32 latents) for VAE tiles to overlap
BASE = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 64}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def plain_flux_images(flux_omni) -> list:
    """The eager, unlevered output every lever is compared with."""
    return flux_omni.generate(PROMPT, seed=5, **BASE)[0].images
