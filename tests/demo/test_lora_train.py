"""The demo LoRA: ``train-lora`` writes a PEFT folder ditserve reads, and the shipped one changes what the model
draws for the new size word, per request, while a request without it stays the base model."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from ditserve import LoRARequest, Omni
from ditserve.demo import NEW_SIZE, demo_lora_path, demo_model_path
from ditserve.demo.cli import main
from ditserve.demo.data_parallel import DataShard
from ditserve.demo.language import SHAPES, parse_prompt
from ditserve.demo.lora_train import (
    TARGET_MODULES,
    TRAINING_RECORD_FILE,
    LoRATargets,
    LoRATrainConfig,
    _base_preserving_target,
    _preserved_rows,
    _training_batch,
    add_lora,
    new_size_token_weights,
    seeds_drawn,
    step_losses,
    train_lora,
)
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.render import lay_out, rasterize
from ditserve.demo.train import _flow_matching_batch, _velocity
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


def test_train_lora_writes_a_peft_folder_ditserve_reads_and_a_file_diffusers_loads(tmp_path, demo_pipeline):
    folder = train_lora(LoRATrainConfig(steps=2, batch=2, rank=4, alpha=2.0, max_minutes=0), tmp_path / "lora")
    adapter = read_adapter("trained", folder, demo_pipeline)
    assert adapter.rank == 4
    names = adapter.modules["transformer"]
    assert {"context_embedder", "transformer_blocks.0.attn.to_q", "proj_out"} <= set(names)  # default: every Linear
    record = json.loads((folder / TRAINING_RECORD_FILE).read_text())
    assert record["steps"] == 2 and record["pictures"] == 4
    # diffusers' own loader, given only the folder, gets the same weights and scaling as the PEFT folder
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    pipe.load_lora_weights(str(folder), adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    peft_file = load_file(str(folder / PEFT_WEIGHTS_FILE))
    assert set(loaded) == {k.removeprefix("base_model.model.") for k in peft_file}
    assert all(torch.equal(v.half(), peft_file["base_model.model." + k]) for k, v in loaded.items())
    assert pipe.transformer.context_embedder.scaling["trained"] == 0.5  # alpha / rank


def test_train_lora_with_probe_size_weights_and_base_preservation(tmp_path, demo_pipeline):
    config = LoRATrainConfig(steps=2, batch=4, rank=4, alpha=4.0, max_minutes=0, probe_weight=0.3, size_weight=4.0,
                             preserve_base=True, log_every=1)
    folder = train_lora(config, tmp_path / "lora")
    record = json.loads((folder / TRAINING_RECORD_FILE).read_text())
    assert record["config"]["preserve_base"] and np.isfinite(record["final_loss"])
    assert read_adapter("trained", folder, demo_pipeline).rank == 4  # the probe is not part of the adapter


def test_a_run_continues_from_a_saved_lora_of_its_targets_and_grows_its_rank_only(tmp_path, caplog):
    from safetensors.torch import load_file

    shipped = demo_lora_path()
    # learning rate 0: the continued run writes back exactly the weights it started from
    with caplog.at_level(logging.WARNING, logger="ditserve.demo.lora_train"):
        folder = train_lora(LoRATrainConfig(steps=1, batch=2, lr=0.0, max_minutes=0, init_lora=str(shipped)),
                            tmp_path / "same")
    # the shipped LoRA's earlier runs drew with seed 0: continuing them with it replays their batches, and says so
    assert 0 in seeds_drawn(json.loads((shipped / TRAINING_RECORD_FILE).read_text()))
    assert any("replays their batches" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ditserve.demo.lora_train"):
        train_lora(LoRATrainConfig(seed=7, steps=1, batch=2, lr=0.0, max_minutes=0, init_lora=str(shipped)),
                   tmp_path / "new-seed")
    assert not any("replays their batches" in r.getMessage() for r in caplog.records)
    before, after = (load_file(str(f / PEFT_WEIGHTS_FILE)) for f in (shipped, folder))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # its record carries the record of the run it continued
    shipped_record = json.loads((shipped / TRAINING_RECORD_FILE).read_text())
    assert json.loads((folder / TRAINING_RECORD_FILE).read_text())["continues"] == shipped_record
    # a larger rank grows the saved LoRA: the same update to start from (the new directions' B columns are 0), at
    # this run's alpha / rank
    grown = load_file(str(train_lora(LoRATrainConfig(seed=7, steps=1, batch=2, lr=0.0, rank=16, alpha=32.0,
                                                     max_minutes=0, init_lora=str(shipped)), tmp_path / "grown")
                          / PEFT_WEIGHTS_FILE))
    assert grown.keys() == before.keys()
    a_keys = [k for k in before if "lora_A" in k]
    for a_key in a_keys:
        b_key = a_key.replace("lora_A", "lora_B")
        assert grown[a_key].shape[0] == grown[b_key].shape[1] == 16
        update_before = before[b_key].float() @ before[a_key].float()
        update_grown = 2.0 * grown[b_key].float() @ grown[a_key].float()  # alpha / rank 32 / 16, against 8 / 8
        assert torch.allclose(update_grown, update_before, atol=2e-3, rtol=2e-3)
    with pytest.raises(InvalidParameterError) as error:
        train_lora(LoRATrainConfig(steps=1, batch=2, rank=4, alpha=4.0, max_minutes=0, init_lora=str(shipped)),
                   tmp_path / "other")
    assert error.value.param == "init_lora"


def test_size_weights_cover_only_the_tokens_around_a_new_size_object():
    layout = lay_out([parse_prompt(f"a {NEW_SIZE} red square at the top left and a small blue circle in the center"),
                      parse_prompt("a large green triangle at the bottom right")])
    weights = new_size_token_weights(layout, tokens_per_side=8, extra=4.0).view(2, 8, 8)
    assert weights[1].eq(1).all()  # no new-size object: uniform
    heavy = weights[0] == 5
    # a large box around the top-left cell's centre reaches the first three token rows and columns, nothing else
    assert heavy[:3, :3].all() and heavy.sum() == 9


def test_preserving_the_base_targets_its_velocity_on_ordinary_and_dropped_prompts(demo_pipeline):
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    config = LoRATrainConfig(batch=4, new_size_fraction=0.5, rank=4, alpha=4.0, preserve_base=True)
    add_lora(pipe, config)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    prompts, layout = _training_batch(config, 0, torch.device("cpu"))
    prompts[1] = ""  # a dropped new-size prompt: true CFG's negative branch, which stays the base model's
    with torch.no_grad():
        fm = _flow_matching_batch(pipe, prompts, rasterize(layout, 128), torch.Generator().manual_seed(0),
                                  MAX_SEQUENCE_LENGTH)
        target = _base_preserving_target(pipe, fm, _preserved_rows(config, prompts, torch.device("cpu")))
        base = _velocity(demo_pipeline, fm.noisy, fm.sigma, fm.text, fm.image_ids)
        again = _velocity(pipe, fm.noisy, fm.sigma, fm.text, fm.image_ids)
    torch.testing.assert_close(target[0], fm.target[0])  # the new-size prompt learns the rendered picture
    torch.testing.assert_close(target[1:], base[1:].float(), rtol=1e-4, atol=1e-4)
    assert (fm.prediction[1:] - base[1:]).abs().max() > 1e-2  # the LoRA does change them
    torch.testing.assert_close(again, fm.prediction)  # and is switched on again afterwards


def test_the_shares_of_a_batch_average_to_its_loss_and_gradients():
    """Data parallel: two processes' shares of a step (their rows, the noise drawn for the whole batch) give, averaged,
    the whole batch's loss and gradients (with uniform token weights, where the mean of the shares is the mean)."""
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    config = LoRATrainConfig(batch=4, rank=4, alpha=4.0, size_weight=0.0, preserve_weight=1.0)
    parameters = add_lora(pipe, config)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:  # then lora_A gets gradients too
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(1))

    def share(rows: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for parameter in parameters:
            parameter.grad = None
        loss, _ = step_losses(pipe, config, None, 3, rows, torch.device("cpu"))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in parameters]

    whole_loss, whole_grads = share(slice(None))
    shares = [share(DataShard(rank, 2).rows(config.batch)) for rank in range(2)]
    torch.testing.assert_close((shares[0][0] + shares[1][0]) / 2, whole_loss, rtol=1e-5, atol=1e-6)
    for whole, first, second in zip(whole_grads, shares[0][1], shares[1][1], strict=True):
        torch.testing.assert_close((first + second) / 2, whole, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(shares[0][1][0], shares[1][1][0])  # the shares saw different rows


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


def test_shipped_lora_is_small_rank_8_and_diffusers_loads_the_same_weights():
    folder = demo_lora_path()
    assert (folder / PEFT_WEIGHTS_FILE).stat().st_size < MAX_SHIPPED_BYTES
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    pipe.load_lora_weights(str(folder), adapter_name=NEW_SIZE)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=NEW_SIZE)
    peft_file = load_file(str(folder / PEFT_WEIGHTS_FILE))
    assert {"base_model.model." + k for k in loaded} == set(peft_file)
    assert all(torch.equal(v.half(), peft_file["base_model.model." + k]) for k, v in loaded.items())


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
    main(["eval", "--prompts", "2", "--prompt-set", "new-size", "--cfg-sweep", "1", "--steps", "3", "--lora",
          str(demo_lora_path()), "--output", str(output)])
    report = json.loads(output.read_text())
    assert [r["num_inference_steps"] for r in report["results"]] == [3]
    assert report["lora"] == str(demo_lora_path()) and report["prompt_set"] == "new-size"
    kinds = [report["results"][0][f"{NEW_SIZE}_{shape}_accuracy"] for shape in SHAPES]
    assert not all(np.isnan(kinds))  # every prompt of the set has one new-size object


@pytest.mark.parametrize("steps", ["0", "twenty", ","])
def test_eval_refuses_step_counts_that_are_not_whole_numbers_of_at_least_one(steps):
    with pytest.raises(InvalidParameterError) as error:
        main(["eval", "--steps", steps])
    assert error.value.param == "steps"


def test_select_cfg_refuses_a_lora_before_touching_the_model_defaults():
    with pytest.raises(InvalidParameterError, match="select-cfg"):
        main(["eval", "--select-cfg", "--lora", str(demo_lora_path())])


def test_train_lora_takes_the_share_of_pairs_as_a_number_and_leaves_it_unset_by_default(monkeypatch, tmp_path):
    from ditserve.demo import lora_train

    seen = []
    monkeypatch.setattr(lora_train, "train_lora", lambda config, output: seen.append(config))
    main(["train-lora", "--new-size-pairs", "0.8", "--output", str(tmp_path)])
    main(["train-lora", "--output", str(tmp_path)])
    assert [config.new_size_pairs for config in seen] == [0.8, None]
