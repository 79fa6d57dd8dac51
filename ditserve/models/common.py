"""Helpers several families share (flow-matching shift, per-batch schedulers, splitting outputs per request)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ditserve.engine.request import Request
from ditserve.models.base import RequestMedia


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
    """A scheduler of its own for each batch: schedulers are stateful (step index), the pipeline's is shared."""
    return type(pipeline.scheduler).from_config(pipeline.scheduler.config)


def split_rows(images: Sequence[Any], requests: Sequence[Request]) -> list[RequestMedia]:
    """Cut a flat list of outputs (rows in request order) back into one list per request."""
    media, start = [], 0
    for request in requests:
        media.append(list(images[start:start + request.num_outputs]))
        start += request.num_outputs
    return media
