"""LoRA on FLUX: ditserve's per-row adapters equal diffusers' own pipeline with the same LoRA, batches mixing LoRAs
equal each request alone, and a request without LoRA is the base model."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from ditserve import LoRARequest, Omni, OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
BASE = {"height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 64}
SCALES = [1.0, 0.5]


@pytest.fixture(scope="module")
def omni(tiny_flux_dir: str, lora_root) -> Omni:
    with Omni(model=tiny_flux_dir, max_batch_size=4, lora_dir=str(lora_root), max_loras=4) as omni:
        yield omni


def diffusers_reference(pipe: FluxPipeline, seed: int, prompt: str = PROMPT):
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **BASE).images[0]


@pytest.fixture(scope="module")
def base_pipe(tiny_flux_dir: str) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe_with_peft_lora(tiny_flux_dir: str, peft_lora) -> FluxPipeline:
    """diffusers with the PEFT folder's adapter, loaded by diffusers' own model loader with the folder's config
    (``load_lora_weights`` reads PEFT-prefixed FLUX keys as a fal-Kontext file, so the model-level loader it
    calls is used directly)."""
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.load_lora_adapter(dict(peft_lora.state_dict), prefix=None, adapter_name="peft_style",
                                       metadata=dict(peft_lora.fields))
    return pipe


@pytest.fixture(scope="module")
def pipe_with_file_lora(tiny_flux_dir: str, file_lora) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(file_lora.path.parent), weight_name=file_lora.path.name, adapter_name="file_style")
    return pipe


@pytest.mark.parametrize("scale", SCALES)
def test_peft_folder_matches_diffusers(omni: Omni, pipe_with_peft_lora: FluxPipeline, base_pipe: FluxPipeline,
                                       peft_lora, scale: float) -> None:
    lora = LoRARequest("peft_style", 1, str(peft_lora.path))
    ours = omni.generate(PROMPT, lora_request=lora, lora_scale=scale, seed=5, **BASE)[0].images[0]
    pipe_with_peft_lora.set_adapters("peft_style", scale)
    assert max_abs_diff(ours, diffusers_reference(pipe_with_peft_lora, seed=5)) <= 3
    # the oracle can fail: the adapter moves the image far beyond the bar
    assert max_abs_diff(ours, diffusers_reference(base_pipe, seed=5)) > 15


@pytest.mark.parametrize("scale", SCALES)
def test_single_file_matches_diffusers(omni: Omni, pipe_with_file_lora: FluxPipeline, base_pipe: FluxPipeline,
                                       file_lora, scale: float) -> None:
    lora = LoRARequest("file_style", 2, file_lora.path.name)  # relative: looked up in the lora_dir
    ours = omni.generate(PROMPT, lora_request=lora, lora_scale=scale, seed=6, **BASE)[0].images[0]
    pipe_with_file_lora.set_adapters("file_style", scale)
    assert max_abs_diff(ours, diffusers_reference(pipe_with_file_lora, seed=6)) <= 3
    assert max_abs_diff(ours, diffusers_reference(base_pipe, seed=6)) > 15


@pytest.fixture(scope="module")
def kohya_file(lora_root):
    """A kohya/sd-scripts FLUX file (``lora_unet_double_blocks_*`` keys, fused qkv, ``.alpha``): diffusers' converter
    splits it into per-projection LoRAs with the alpha folded into the weights."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(31)
    inner, rank = 64, 4
    tensors = {}
    for block in range(2):
        for stream in ("img", "txt"):
            for part, out_features in (("attn_qkv", 3 * inner), ("attn_proj", inner)):
                key = f"lora_unet_double_blocks_{block}_{stream}_{part}"
                tensors[f"{key}.lora_down.weight"] = torch.randn(rank, inner, generator=generator) * 0.3
                tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
                tensors[f"{key}.alpha"] = torch.tensor(8.0)
    path = lora_root / "kohya_style.safetensors"
    save_file(tensors, str(path))
    return path


def test_kohya_file_matches_diffusers(omni: Omni, tiny_flux_dir: str, base_pipe: FluxPipeline, kohya_file) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name, adapter_name="kohya_style")
    pipe.set_adapters("kohya_style", 0.5)
    ours = omni.generate(PROMPT, lora_request=LoRARequest("kohya_style", 3, kohya_file.name), lora_scale=0.5, seed=8,
                         **BASE)[0].images[0]
    assert max_abs_diff(ours, diffusers_reference(pipe, seed=8)) <= 3
    assert max_abs_diff(ours, diffusers_reference(base_pipe, seed=8)) > 15
    listed = {entry.name: entry for entry in omni.engine.runner.loras.loaded()}
    assert listed["kohya_style"].num_modules == 16  # 2 blocks x 2 streams x (q, k, v, out)


def test_bad_lora_arguments_name_the_field(omni: Omni, peft_lora) -> None:
    lora = LoRARequest("peft_style", 1, str(peft_lora.path))
    with pytest.raises(InvalidParameterError) as no_lora:
        omni.generate(PROMPT, lora_scale=0.5, **BASE)
    assert no_lora.value.param == "lora_scale"
    with pytest.raises(InvalidTypeError) as not_a_request:
        omni.generate(PROMPT, lora_request="peft_style", **BASE)
    assert not_a_request.value.param == "lora_request"
    with pytest.raises(InvalidParameterError, match="lora_scale=inf"):
        omni.generate(PROMPT, lora_request=lora, lora_scale=float("inf"), **BASE)
    with pytest.raises(InvalidParameterError, match="got 2 lora_request for 1 prompts"):
        omni.generate(PROMPT, lora_request=[lora, None], **BASE)
    with pytest.raises(InvalidParameterError, match="lora_name"):
        LoRARequest("../etc", 1, "x")
    assert all(entry.pins == 0 for entry in omni.engine.runner.loras.loaded())  # nothing left pinned


def test_scale_changes_the_output(omni: Omni, peft_lora) -> None:
    lora = LoRARequest("peft_style", 1, str(peft_lora.path))
    full, half = (omni.generate(PROMPT, lora_request=lora, lora_scale=s, seed=5, **BASE)[0].images[0] for s in SCALES)
    assert max_abs_diff(full, half) > 15


def test_batch_mixing_two_loras_and_none_equals_each_alone(omni: Omni, peft_lora, file_lora) -> None:
    base_before = omni.generate("a blue square", seed=9, **BASE)[0].images[0]
    loras = [LoRARequest("peft_style", 1, str(peft_lora.path)), LoRARequest("file_style", 2, str(file_lora.path)),
             None, LoRARequest("peft_style", 1)]
    prompts = [PROMPT, "a green triangle", "a blue square", "two yellow circles"]
    scales = [1.0, 0.5, None, 0.7]
    batched = omni.generate(prompts, lora_request=loras, lora_scale=scales, seed=9, **BASE)
    assert [out.timings["batch_size"] for out in batched] == [4] * 4
    for prompt, lora, scale, out in zip(prompts, loras, scales, batched, strict=True):
        alone = omni.generate(prompt, lora_request=lora, lora_scale=scale, seed=9, **BASE)[0]
        assert alone.timings["batch_size"] == 1
        assert max_abs_diff(out.images[0], alone.images[0]) <= 1
    # the request without LoRA shared its steps with two adapters and still is the base model, bit for bit
    assert max_abs_diff(batched[2].images[0], base_before) == 0
    after = omni.generate("a blue square", seed=9, **BASE)[0].images[0]
    assert max_abs_diff(after, base_before) == 0


def test_lora_with_teacache_keeps_its_own_rows(tiny_flux_dir: str, lora_root, peft_lora) -> None:
    """A cache that computes some rows only (others reuse their residual) still gives each row its own LoRA."""
    options = {"cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": 0.6}}
    loras = [LoRARequest("peft_style", 1, str(peft_lora.path)), None]
    # different step counts: the two requests are at different timesteps and decide differently
    params = [OmniDiffusionSamplingParams(**{**BASE, "num_inference_steps": steps}, seed=3) for steps in (8, 5)]
    with Omni(model=tiny_flux_dir, max_batch_size=2, lora_dir=str(lora_root), **options) as cached:
        both = cached.generate([PROMPT, PROMPT], params, lora_request=loras)
        alone = [cached.generate(PROMPT, p, lora_request=r)[0] for p, r in zip(params, loras, strict=True)]

    def decisions(output) -> list[str]:
        return [d["decision"] for d in output.cache_stats["branches"]["cond"]["decisions"]]

    assert both[0].timings["batch_size"] == 2
    for out, solo in zip(both, alone, strict=True):
        assert decisions(out) == decisions(solo)
        assert max_abs_diff(out.images[0], solo.images[0]) <= 1
    # at some shared step one request skipped while its mate computed: the blocks ran on a sub-batch of one row
    shared = len(decisions(both[1]))
    assert decisions(both[0])[:shared] != decisions(both[1])
    assert "skip" in decisions(both[0])


def test_distill_backend_fuses_at_start(tiny_flux_dir: str, pipe_with_file_lora: FluxPipeline, file_lora) -> None:
    with Omni(model=tiny_flux_dir, lora_path=str(file_lora.path), lora_backend="distill") as fused:
        ours = fused.generate(PROMPT, seed=4, **BASE)[0].images[0]
        with pytest.raises(ValueError, match="distill"):
            fused.generate(PROMPT, lora_request=LoRARequest("file_style", 1, str(file_lora.path)), **BASE)
    pipe_with_file_lora.set_adapters("file_style", 1.0)
    assert max_abs_diff(ours, diffusers_reference(pipe_with_file_lora, seed=4)) <= 3
