"""Helpers several families share (flow-matching shift, per-request schedulers, video frame counts and pixels)."""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ditserve.errors import InvalidParameterError


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


def fresh_scheduler(pipeline: Any, flow_shift: float | None = None) -> Any:
    """A scheduler of its own for each request: schedulers are stateful (step index, multistep history), the
    pipeline's is shared. ``flow_shift``: the request's own fixed shift (``scheduler_with_flow_shift``)."""
    if flow_shift is not None:
        return scheduler_with_flow_shift(pipeline.scheduler, flow_shift)
    return type(pipeline.scheduler).from_config(pipeline.scheduler.config)


#: the config keys that hold a flow-matching scheduler's fixed shift: UniPC / DPM-Solver with flow sigmas (Wan),
#: then FlowMatchEulerDiscrete (FLUX, SD3, Qwen-Image, LTX-2, ...)
FLOW_SHIFT_KEYS = ("flow_shift", "shift")


def scheduler_with_flow_shift(scheduler: Any, shift: float) -> Any:
    """``scheduler`` remade with the fixed timestep shift ``shift``; a resolution-dependent shift (dynamic
    shifting from the image's token count) is turned off, since a fixed shift is what was asked for."""
    config = scheduler.config
    for key in FLOW_SHIFT_KEYS:
        if key in config:
            overrides: dict[str, Any] = {key: shift}
            if "use_dynamic_shifting" in config:
                overrides["use_dynamic_shifting"] = False
            return type(scheduler).from_config(config, **overrides)
    raise InvalidParameterError(
        f"flow_shift: {type(scheduler).__name__} is not a flow-matching scheduler with a shift "
        f"(its config has none of {list(FLOW_SHIFT_KEYS)})", param="flow_shift")


def check_num_frames(num_frames: int, temporal: int) -> None:
    """A causal video VAE keeps the first frame and folds every ``temporal`` further frames into one latent frame:
    any other count would come back shorter than asked."""
    if (num_frames - 1) % temporal:
        examples = ", ".join(str(temporal * k + 1) for k in range(1, 4))
        raise InvalidParameterError(
            f"num_frames={num_frames} must be {temporal}k+1 (e.g. {examples}, ...): the VAE compresses time by "
            f"{temporal}", param="num_frames")


def to_uint8_video(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (frames x H x W x 3) to uint8, rounded as diffusers rounds PIL images."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
