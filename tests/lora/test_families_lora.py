"""LoRA parity beyond FLUX: Qwen-Image, Wan and Z-Image with the same adapter as diffusers' own pipeline (a PEFT folder at
scale 1.0, a diffusers single file at scale 0.5), and a Wan batch mixing a LoRA and none equal to each alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from ditserve import LoRARequest, Omni
from ditserve.models.common import to_uint8_video
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff
from ditserve.testing.lora import lora_state_dict, write_diffusers_file, write_peft_folder

PROMPT = "a small red circle at the top left"


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    transformer_class: str
    targets: tuple[str, ...]
    base: dict[str, Any]

    def media(self, output: Any) -> Any:
        return output.videos[0] if output.videos else output.images[0]

    def reference(self, pipe: Any, seed: int) -> Any:
        result = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **self.base)
        return to_uint8_video(result.frames[0]) if hasattr(result, "frames") else np.asarray(result.images[0])


FAMILIES = [
    Family("qwen_image", "QwenImagePipeline", "QwenImageTransformer2DModel",
           ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"),
           {"height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 64}),
    Family("wan", "WanPipeline", "WanTransformer3DModel", ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"),
           {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "max_sequence_length": 32}),
    Family("z_image", "ZImagePipeline", "ZImageTransformer2DModel", ("to_q", "to_k", "to_v", "to_out.0", "w2"),
           {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 64}),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request: pytest.FixtureRequest) -> Family:
    return request.param


@pytest.fixture(scope="module")
def setup(family: Family, tmp_path_factory: pytest.TempPathFactory):
    folder = tiny_pipeline_dir(family.name)
    root = tmp_path_factory.mktemp(f"{family.name}_loras")
    peft_sd, peft_fields = lora_state_dict(f"{folder}/transformer", seed=21, r=4, alpha=8.0, targets=family.targets,
                                           model_class=family.transformer_class)
    file_sd, _ = lora_state_dict(f"{folder}/transformer", seed=22, r=4, targets=family.targets,
                                 model_class=family.transformer_class)
    peft_path = write_peft_folder(root / "peft_style", peft_sd, peft_fields)
    file_path = write_diffusers_file(root / "file_style.safetensors", file_sd, pipeline_class=family.pipeline_class)
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.load_lora_adapter(dict(peft_sd), prefix=None, adapter_name="peft_style",
                                       metadata=dict(peft_fields))
    pipe.load_lora_weights(str(root), weight_name=file_path.name, adapter_name="file_style")
    with Omni(model=folder, max_batch_size=2, lora_dir=str(root)) as omni:
        yield omni, pipe, peft_path, file_path


def test_matches_diffusers(family: Family, setup) -> None:
    omni, pipe, peft_path, file_path = setup
    pipe.disable_lora()
    base = family.reference(pipe, seed=3)
    pipe.enable_lora()
    for name, path, scale in (("peft_style", peft_path, 1.0), ("file_style", file_path, 0.5)):
        ours = family.media(omni.generate(PROMPT, lora_request=LoRARequest(name, None, str(path)), lora_scale=scale,
                                          seed=3, **family.base)[0])
        pipe.set_adapters(name, scale)
        assert max_abs_diff(ours, family.reference(pipe, seed=3)) <= 3, name
        assert max_abs_diff(ours, base) > 15, name


def test_mixed_batch_equals_alone(family: Family, setup) -> None:
    omni, _, peft_path, _ = setup
    loras = [LoRARequest("peft_style", None, str(Path(peft_path))), None]
    batched = omni.generate([PROMPT, PROMPT], lora_request=loras, seed=4, **family.base)
    # a family whose layers are not known to see rows first keeps requests of different LoRAs apart
    together = 2 if omni.engine.adapter.lora_per_row else 1
    assert [out.timings["batch_size"] for out in batched] == [together, together]
    for lora, out in zip(loras, batched, strict=True):
        alone = omni.generate(PROMPT, lora_request=lora, seed=4, **family.base)[0]
        assert max_abs_diff(family.media(out), family.media(alone)) <= 1


def test_distill_fuses_each_expert_of_wan_a14b(tmp_path: Path) -> None:
    """Wan2.2 A14B: the high-noise file fused into ``transformer``, the low-noise one into ``transformer_2``,
    equal to diffusers with ``load_lora_weights(..., load_into_transformer_2=True)``."""
    folder = tiny_pipeline_dir("wan_a14b")
    wan = FAMILIES[1]
    files = {}
    for seed, expert in ((41, "transformer"), (42, "transformer_2")):
        state_dict, _ = lora_state_dict(f"{folder}/{expert}", seed=seed, targets=wan.targets,
                                        model_class=wan.transformer_class)
        files[expert] = write_diffusers_file(tmp_path / f"{expert}.safetensors", state_dict,
                                             pipeline_class=wan.pipeline_class)
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path), weight_name=files["transformer"].name, adapter_name="high")
    pipe.load_lora_weights(str(tmp_path), weight_name=files["transformer_2"].name, adapter_name="low",
                           load_into_transformer_2=True)
    reference = wan.reference(pipe, seed=6)
    paths = {expert: str(path) for expert, path in files.items()}
    with Omni(model=folder, lora_backend="distill", lora_path=paths) as fused:
        ours = fused.generate(PROMPT, seed=6, **wan.base)[0].videos[0]
    assert max_abs_diff(ours, reference) <= 3
    with Omni(model=folder, lora_backend="distill", lora_path=paths["transformer"]) as high_only:
        assert max_abs_diff(high_only.generate(PROMPT, seed=6, **wan.base)[0].videos[0], reference) > 15
