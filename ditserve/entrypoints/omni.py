"""``Omni``: offline generation, the same engine the server uses.

    from ditserve import Omni, OmniDiffusionSamplingParams
    with Omni(model="path/or/hub-id", cache_backend="tea_cache") as omni:
        outputs = omni.generate("a cat", OmniDiffusionSamplingParams(num_inference_steps=50, seed=0))
        outputs[0].images[0].save("cat.png")

LoRAs are chosen per request and batched together; ``lora_dir`` limits where their paths may point:

    with Omni(model=..., lora_dir="/loras", max_loras=8) as omni:
        omni.generate(["a cat", "a dog"], lora_request=[LoRARequest("ink", 1, "/loras/ink"), None], lora_scale=0.8)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.errors import InvalidParameterError, InvalidTypeError, check_keys
from ditserve.lora.request import LoRARequest
from ditserve.models.base import ImageMode, ModelKind
from ditserve.request import Request, RequestOutput

PROMPT_KEYS = ("prompt", "negative_prompt", "multi_modal_data")
MULTI_MODAL_KEYS = ("image",)


def as_pil_images(value: Any, mode: ImageMode) -> list[Image.Image]:
    """``multi_modal_data["image"]``: a PIL image, an HxWx3 (or x4) uint8 array, a file path, or a list of those,
    as PIL images in ``mode`` (the model's)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    images = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert(mode.value))
        elif isinstance(item, np.ndarray):
            images.append(Image.fromarray(np.asarray(item, dtype=np.uint8)).convert(mode.value))
        elif isinstance(item, str):
            images.append(Image.open(item).convert(mode.value))
        else:
            raise InvalidTypeError(f"image must be a PIL image, a uint8 array or a path, got {type(item).__name__}",
                                   param="image")
    return images


def as_sampling_params(value: Any) -> OmniDiffusionSamplingParams:
    if value is None:
        return OmniDiffusionSamplingParams()
    if isinstance(value, OmniDiffusionSamplingParams):
        return value
    if isinstance(value, Mapping):
        return OmniDiffusionSamplingParams.from_dict(value)
    raise InvalidTypeError(
        f"sampling params must be an OmniDiffusionSamplingParams or a dict, got {type(value).__name__}",
        param="sampling_params")


def _per_prompt(name: str, value: Any, count: int) -> list[Any]:
    """``value`` for each of ``count`` prompts: a list is one per prompt, anything else is shared."""
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise InvalidParameterError(f"got {len(values)} {name} for {count} prompts", param=name)
    return values


def _bar_updater(bar: tqdm) -> Callable[[int, int], None]:
    """A request's progress callback that moves ``bar`` by the steps it did since its last report."""
    last = [0]

    def update(done: int, _total: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    return update


class Omni:
    def __init__(self, model: str | None = None, *, od_config: OmniDiffusionConfig | None = None,
                 **kwargs: Any) -> None:
        if od_config is not None:
            if kwargs or model is not None:
                raise InvalidParameterError("pass either od_config or model/keyword options, not both",
                                            param="od_config")
            self.config = od_config
        else:
            self.config = OmniDiffusionConfig.from_kwargs({"model": model, **kwargs})
        self.engine = DiffusionEngine(self.config)

    @property
    def model_kind(self) -> ModelKind:
        return self.engine.adapter.kind

    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 lora_scale: float | list[float | None] | None = None, **overrides: Any) -> list[RequestOutput]:
        """One RequestOutput per prompt. ``prompts``: a string, a dict with ``prompt`` / ``negative_prompt`` /
        ``multi_modal_data``, or a list of those. ``sampling_params``: one for all, or a list (one per prompt).
        ``lora_request`` / ``lora_scale`` (default 1.0): one for all, or a list (one per prompt, None for no
        LoRA); prompts with different LoRAs run in one batch. Keyword overrides (``num_inference_steps=20``...)
        apply to every prompt. ``use_tqdm`` shows one progress bar over the denoising steps of all the prompts
        (default: the engine's ``show_progress``)."""
        items = prompts if isinstance(prompts, list) else [prompts]
        if not items:
            raise InvalidParameterError("prompts is empty", param="prompt")
        params_list = _per_prompt("sampling_params", sampling_params, len(items))
        loras = _per_prompt("lora_request", lora_request, len(items))
        scales = _per_prompt("lora_scale", lora_scale, len(items))
        if isinstance(lora_request, list) and not isinstance(lora_scale, list):
            # a shared scale is for the prompts that have a LoRA
            scales = [scale if lora is not None else None for scale, lora in zip(scales, loras, strict=True)]
        requests: list[Request] = []
        try:
            for item, params, lora, scale in zip(items, params_list, loras, scales, strict=True):
                requests.append(self._request(item, as_sampling_params(params), overrides, lora, scale))
        except BaseException:
            for request in requests:
                request.future.cancel()  # releases the LoRAs the requests made so far pinned
            raise
        if not (self.config.show_progress if use_tqdm is None else use_tqdm):
            return self.engine.generate(requests)
        total = sum(r.params.num_inference_steps or 0 for r in requests)
        with tqdm(total=total, desc=f"denoising {len(requests)} prompt(s)", unit="step") as bar:
            for request in requests:
                request.progress_callback = _bar_updater(bar)
            return self.engine.generate(requests)

    def _request(self, item: Any, params: OmniDiffusionSamplingParams, overrides: Mapping[str, Any],
                 lora: LoRARequest | None, lora_scale: float | None) -> Request:
        if overrides:
            params = params.replace(**overrides)
        images: list[Image.Image] = []
        if isinstance(item, Mapping):
            check_keys("prompt dict", item.keys(), PROMPT_KEYS)
            if "prompt" not in item:
                raise InvalidParameterError("a prompt dict needs a 'prompt' key", param="prompt")
            if item.get("negative_prompt") is not None:
                params = params.replace(negative_prompt=item["negative_prompt"])
            multi_modal = item.get("multi_modal_data") or {}
            if not isinstance(multi_modal, Mapping):
                raise InvalidTypeError("multi_modal_data must be a dict", param="multi_modal_data")
            check_keys("multi_modal_data", multi_modal.keys(), MULTI_MODAL_KEYS)
            if "image" in multi_modal:
                images = as_pil_images(multi_modal["image"], self.engine.adapter.input_image_mode)
            prompt = item["prompt"]
        else:
            prompt = item
        return self.engine.make_request(prompt, params, images, lora=lora, lora_scale=lora_scale)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
