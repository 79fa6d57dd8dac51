"""CPU offload: keep weights in CPU memory and bring to the device only what is about to run.

Two granularities, both built on diffusers' hooks rather than rewritten:

* model-level (``enable_cpu_offload``): accelerate hooks move one whole component (text encoder, transformer,
  VAE) to the device when it is called and the previous one back, in the pipeline's ``model_cpu_offload_seq``
  order. Costs one transfer of each component per request; the device holds only the largest component.
* layerwise (``enable_layerwise_offload``): the transformers' blocks stay in (pinned) CPU memory and diffusers'
  group offloading streams each block to the device one block ahead of its use, the copy overlapped with the
  previous block's compute on a side CUDA stream. The device holds about two blocks of each transformer, the
  other components stay on the device.

Both only make sense with an accelerator: on a CPU device the weights already live in CPU memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ditserve.errors import InvalidParameterError

logger = logging.getLogger(__name__)


def require_accelerator(device: torch.device, flag: str) -> None:
    """Offloading to CPU memory needs a separate device memory to save: refuse it on a CPU device."""
    if device.type == "cpu":
        raise InvalidParameterError(
            f"{flag}=True needs a CUDA device (device resolved to 'cpu', where the weights already live in CPU "
            "memory, so offloading would only add copies); drop the flag or run on a GPU", param=flag)


def enable_model_offload(pipeline: Any, device: torch.device) -> None:
    """Model-level offload through diffusers' ``enable_model_cpu_offload``."""
    if getattr(pipeline, "model_cpu_offload_seq", None) is None:
        raise InvalidParameterError(
            f"enable_cpu_offload: {type(pipeline).__name__} declares no model_cpu_offload_seq, so diffusers "
            "cannot offload it model by model; try enable_layerwise_offload", param="enable_cpu_offload")
    pipeline.enable_model_cpu_offload(device=device)
    logger.info("model-level CPU offload on %s in the order %s", device, pipeline.model_cpu_offload_seq)


def enable_layerwise_offload(pipeline: Any, transformers: Sequence[torch.nn.Module], device: torch.device) -> None:
    """Stream each transformer's blocks to ``device`` one ahead of use; everything else goes to ``device``."""
    from diffusers.hooks import apply_group_offloading

    streamed = {id(t) for t in transformers}
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and id(component) not in streamed:
            component.to(device)
            logger.debug("layerwise offload: %s placed on %s", name, device)
    use_stream = device.type == "cuda"
    for transformer in transformers:
        transformer.to("cpu")
        apply_group_offloading(transformer, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)
    logger.info("layerwise offload of %d transformer(s) to %s (side-stream prefetch: %s)", len(transformers),
                device, use_stream)
