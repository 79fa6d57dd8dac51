"""Find a model, pick device and dtype, load the diffusers pipeline and wrap it in its family adapter."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.demo import DEMO_MODEL_NAME, bundled_model_path
from ditserve.errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError
from ditserve.models.base import ModelAdapter
from ditserve.models.common import scheduler_with_flow_shift
from ditserve.models.registry import adapter_class_for, supported_pipelines

logger = logging.getLogger(__name__)

#: a model folder may carry this file: {"sampling_defaults": {...}} overriding the family's defaults
DEFAULTS_FILE = "ditserve_defaults.json"


@dataclass
class LoadedModel:
    name: str
    path: str
    pipeline: Any
    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype
    #: levers applied after loading, in order (``ditserve.levers.apply_levers`` fills it)
    levers: list[str] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidParameterError(f"device={device!r} is not a torch device (e.g. 'auto', 'cpu', 'cuda:0')",
                                    param="device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device='cuda' was asked for but CUDA is not available", param="device")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 where the hardware runs it well; CPU stays fp32 (exact parity, and bf16 gains little there)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_model_path(model: str | None) -> str:
    """A local diffusers folder, a bundled demo model (by name), or a hub id (left to diffusers to fetch)."""
    bundled = bundled_model_path(model or DEMO_MODEL_NAME)
    if bundled is not None:
        if not (bundled / "model_index.json").is_file():
            raise ModelNotFoundError(f"the bundled model {bundled.name} is missing at {bundled}", param="model")
        return str(bundled)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{model!r} has no model_index.json: not a diffusers-format folder",
                                     param="model")
        return str(path)
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ModelNotFoundError(
            f"model {model!r} is neither an existing folder nor a hub id of the form 'org/name'", param="model")
    return model


def read_pipeline_class_name(path: str) -> str:
    local = Path(path) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())["_class_name"]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(path)["_class_name"]


def read_model_defaults(path: str) -> dict[str, Any]:
    file = Path(path) / DEFAULTS_FILE
    if not file.is_file():
        return {}
    return dict(json.loads(file.read_text()).get("sampling_defaults", {}))


def apply_schedule_settings(model: LoadedModel, flow_shift: float | None, boundary_ratio: float | None) -> None:
    """The engine's schedule settings on a loaded model. Every request's scheduler is made from the pipeline's,
    so a shift set there holds for all of them; ``boundary_ratio`` becomes a model default, checked now so that a
    model without a second expert refuses it at start-up rather than at each request."""
    if flow_shift is not None:
        model.pipeline.scheduler = scheduler_with_flow_shift(model.pipeline.scheduler, flow_shift)
    if boundary_ratio is not None:
        model.adapter.model_defaults["boundary_ratio"] = boundary_ratio
        model.adapter.resolve_params(OmniDiffusionSamplingParams())


def load_model(model: str | None, device: str = "auto", dtype: str = "auto", *, keep_on_cpu: bool = False,
               gguf_model: str | None = None) -> LoadedModel:
    """Load a pipeline and place it on ``device``.

    ``keep_on_cpu``: leave the weights in CPU memory for an offload lever to place (moving a model that does not
    fit the device there first would fail before offloading could help). ``gguf_model``: load the transformer
    from this pre-quantized GGUF file instead of the folder's weights, which are then never read.
    """
    import diffusers

    path = resolve_model_path(model)
    class_name = read_pipeline_class_name(path)
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        raise UnsupportedModelError(
            f"{class_name} (from {path}/model_index.json) is not a pipeline class of diffusers "
            f"{diffusers.__version__}; family adapters exist for {supported_pipelines()}", param="model")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    adapter_class = adapter_class_for(class_name)
    # components the family must build itself (e.g. a processor diffusers cannot load on this machine)
    components: dict[str, Any] = adapter_class.preloaded_components(path)
    if gguf_model is not None:
        from ditserve.levers.gguf import load_gguf_transformer

        components["transformer"] = load_gguf_transformer(path, gguf_model, torch_dtype)
    pipeline = pipeline_class.from_pretrained(path, dtype=torch_dtype, **components)
    if not keep_on_cpu:
        pipeline.to(torch_device)
    pipeline.set_progress_bar_config(disable=True)
    adapter = adapter_class(pipeline, read_model_defaults(path))
    name = DEMO_MODEL_NAME if model in (None, DEMO_MODEL_NAME) else model
    logger.info("loaded %s (%s, %s adapter) for %s in %s%s", name, class_name, type(adapter).__name__,
                torch_device, torch_dtype, " (weights kept in CPU memory until placed)" if keep_on_cpu else "")
    return LoadedModel(name=name, path=path, pipeline=pipeline, adapter=adapter, device=torch_device,
                       dtype=torch_dtype)
