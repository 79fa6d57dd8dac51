"""Helpers several families share (flow-matching shift, per-request schedulers)."""

from __future__ import annotations

from typing import Any

from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def flow_match_shift(pipeline: Any, image_seq_len: int) -> float:
    """The resolution-dependent timestep shift ``mu`` of FLUX-style schedulers."""
    config = pipeline.scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def fresh_scheduler(pipeline: Any) -> Any:
    """A scheduler of its own for each request: schedulers are stateful (step index, multistep history), the
    pipeline's is shared."""
    return type(pipeline.scheduler).from_config(pipeline.scheduler.config)
