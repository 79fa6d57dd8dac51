"""The demo LoRA: ``train-lora`` writes a PEFT folder ditserve reads, and the shipped one changes what the model
draws for the new size word, per request, while a request without it stays the base model."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from ditserve import LoRARequest, Omni
from ditserve.demo import NEW_SIZE, demo_lora_path, demo_model_path
from ditserve.demo.cli import main
from ditserve.demo.language import SHAPES
from ditserve.demo.lora_train import (
    TARGET_MODULES,
    TRAINING_RECORD_FILE,
    LoRATargets,
    LoRATrainConfig,
    add_lora,
    train_lora,
)
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.errors import InvalidParameterError
from ditserve.lora.files import PEFT_WEIGHTS_FILE, read_adapter

PROMPT = f"a {NEW_SIZE} red square in the center"
FAST = {"num_inference_steps": 4, "height": 128, "width": 128, "seed": 0}
# "A few hundred KB": small enough to ship in git beside the 40 MB model.
MAX_SHIPPED_BYTES = 1 << 20


def test_a_fresh_lora_leaves_the_model_unchanged_and_trains_only_itself(demo_pipeline):
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    pipe.set_progress_bar_config(disable=True)
    parameters = add_lora(pipe, LoRATrainConfig(rank=4, alpha=4.0))
    trainable = [p for p in pipe.transformer.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in parameters}
    assert not any(p.requires_grad for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    run = {"num_inference_steps": 2, "max_sequence_length": MAX_SEQUENCE_LENGTH, "height": 64, "width": 64}
    ours = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **run).images
    base = demo_pipeline(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **run).images
    assert np.array_equal(ours, base)  # PEFT starts lora_B at zero


def test_train_lora_writes_a_peft_folder_ditserve_reads(tmp_path, demo_pipeline):
    folder = train_lora(LoRATrainConfig(steps=2, batch=2, rank=4, alpha=4.0, max_minutes=0), tmp_path / "lora")
    adapter = read_adapter("trained", folder, demo_pipeline)
    assert adapter.rank == 4
    names = adapter.modules["transformer"]
    assert list(names) == ["context_embedder"]  # the default targets: the text input projection alone
    record = json.loads((folder / TRAINING_RECORD_FILE).read_text())
    assert record["steps"] == 2 and record["pictures"] == 4


@pytest.mark.parametrize("targets", list(LoRATargets))
def test_text_input_targets_leave_every_other_layer_alone_and_all_targets_reach_them(targets):
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    add_lora(pipe, LoRATrainConfig(targets=targets.value))
    suffix = ".lora_A.default"
    adapted = {n.removesuffix(suffix) for n, _ in pipe.transformer.named_modules() if n.endswith(suffix)}
    image_path = {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                  "single_transformer_blocks.0.proj_mlp", "proj_out"}
    assert "context_embedder" in adapted
    assert adapted & image_path == (image_path if targets is LoRATargets.ALL else set())
    assert all(any(name.endswith(t) for t in TARGET_MODULES[targets]) for name in adapted)


def test_unknown_targets_are_refused():
    with pytest.raises(InvalidParameterError, match="targets"):
        train_lora(LoRATrainConfig(targets="image", steps=1, max_minutes=0), "unused")


def test_shipped_lora_is_small_and_rank_8():
    folder = demo_lora_path()
    assert (folder / PEFT_WEIGHTS_FILE).stat().st_size < MAX_SHIPPED_BYTES
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"


@pytest.fixture(scope="module")
def omni():
    with Omni(model=str(demo_model_path()), max_batch_size=2) as omni:
        yield omni


def test_shipped_lora_changes_the_new_size_and_a_request_without_it_is_the_base(omni):
    lora = LoRARequest(NEW_SIZE, 1, str(demo_lora_path()))
    base, with_lora = omni.generate([PROMPT, PROMPT], lora_request=[None, lora], **FAST)
    alone = omni.generate(PROMPT, **FAST)[0]
    base_pixels, lora_pixels = (np.asarray(o.images[0], dtype=float) for o in (base, with_lora))
    assert np.abs(base_pixels - lora_pixels).mean() > 1.0
    # batch of two against batch of one: the same computation up to float summation order (README: <= 1/255)
    assert np.abs(base_pixels - np.asarray(alone.images[0], dtype=float)).max() <= 1.0


def test_eval_command_fuses_a_lora_and_scores_new_size_prompts(tmp_path):
    output = tmp_path / "eval.json"
    main(["eval", "--prompts", "2", "--prompt-set", "new-size", "--cfg-sweep", "1", "--lora", str(demo_lora_path()),
          "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["lora"] == str(demo_lora_path()) and report["prompt_set"] == "new-size"
    kinds = [report["results"][0][f"{NEW_SIZE}_{shape}_accuracy"] for shape in SHAPES]
    assert not all(np.isnan(kinds))  # every prompt of the set has one new-size object


def test_select_cfg_refuses_a_lora_before_touching_the_model_defaults():
    with pytest.raises(InvalidParameterError, match="select-cfg"):
        main(["eval", "--select-cfg", "--lora", str(demo_lora_path())])
