import json

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline

from ditserve.demo import demo_model_path
from ditserve.demo.cli import main
from ditserve.demo.edit_evaluation import KONTEXT_CALL_KWARGS, source_images
from ditserve.demo.edit_language import heldout_edits
from ditserve.demo.edit_train import (
    EditTrainConfig,
    _as_pipeline_input,
    _scaled_latents,
    changed_cells,
    changed_token_weights,
    kontext_ids,
    load_edit_pipeline,
    train_edit,
)
from ditserve.demo.model import build_clip_tokenizer, build_t5_tokenizer
from ditserve.demo.render import render_batch
from ditserve.demo.train import TrainConfig, _shifted_sigmas
from ditserve.demo.video_train import VideoTrainConfig
from ditserve.errors import InvalidParameterError


@pytest.fixture(scope="module")
def edit_pipe() -> FluxKontextPipeline:
    return load_edit_pipeline(demo_model_path())


def test_training_inputs_are_what_the_pipeline_feeds_the_transformer(edit_pipe):
    """Input-picture tokens, position ids and timesteps of training equal those of FluxKontextPipeline at 128 px."""
    edit = heldout_edits(1)[0]
    calls = []
    hook = edit_pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        edit_pipe(image=source_images([edit]), prompt=edit.instruction, num_inference_steps=2, height=128, width=128,
                  max_sequence_length=32, generator=torch.Generator().manual_seed(0), **KONTEXT_CALL_KWARGS)
    finally:
        hook.remove()
    first = calls[0]
    assert first["hidden_states"].shape == (1, 128, 64)  # 64 noisy tokens, then 64 input-picture tokens
    with torch.no_grad():
        context = _scaled_latents(edit_pipe, _as_pipeline_input(render_batch([edit.source])))
    packed = edit_pipe._pack_latents(context, 1, 16, 16, 16)
    # equal up to float rounding (the pipeline divides by 255 in numpy, training in torch)
    torch.testing.assert_close(first["hidden_states"][:, 64:], packed, rtol=0, atol=1e-3)
    assert torch.equal(first["img_ids"], kontext_ids(edit_pipe, 16, 16, torch.device("cpu"), torch.float32))
    # the second of two steps is at u = 0.5 before the scheduler's shift for 64 noisy tokens
    expected = _shifted_sigmas(edit_pipe, torch.tensor([0.5]), 64)
    torch.testing.assert_close(calls[1]["timestep"], expected, rtol=1e-5, atol=1e-5)


def test_two_steps_train_and_export_a_kontext_folder(tmp_path):
    config = EditTrainConfig(run_dir=str(tmp_path / "run"), steps=2, batch=2, warmup_steps=1, log_every=1)
    output = train_edit(config, tmp_path / "out")
    assert json.loads((output / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    losses = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses if "loss" in r)
    trained = FluxKontextPipeline.from_pretrained(str(output))
    base = FluxPipeline.from_pretrained(str(demo_model_path()))
    # new-words mode: the base token embeddings are exactly the image model's, the new ones learnt
    for name, size in (("text_encoder", len(build_clip_tokenizer())), ("text_encoder_2", len(build_t5_tokenizer()))):
        new = getattr(trained, name).get_input_embeddings().weight
        old = getattr(base, name).get_input_embeddings().weight
        assert torch.equal(new[:size], old)
        assert new.shape[0] > size
    assert not torch.equal(trained.transformer.x_embedder.weight, base.transformer.x_embedder.weight)


def test_change_weight_lands_on_the_tokens_whose_pixels_the_edit_changed():
    sources = torch.zeros(2, 3, 128, 128)
    targets = sources.clone()
    targets[0, 1, 40, 100] = 0.5  # one pixel of token (row 2, column 6)
    targets[1, :, :, :] = 1.0 / 255  # under an 8-bit step: unchanged
    weights = changed_token_weights(sources, targets, 8, 4.0)
    assert weights.shape == (2, 64)
    assert weights[0, 2 * 8 + 6] == 5.0
    assert weights[0].sum() == 64 + 4.0
    assert torch.equal(weights[1], torch.ones(64))


def test_changed_cells_split_each_token_as_the_object_probe_does():
    sources = torch.zeros(1, 3, 128, 128)
    targets = sources.clone()
    targets[0, 2, 40, 100] = 0.5  # token (row 2, column 6); within it pixel row 8, column 4: cell (2, 1)
    changed = changed_cells(sources, targets, 8, 4)
    assert changed.shape == (1, 64, 16)
    assert changed.nonzero().tolist() == [[0, 2 * 8 + 6, 2 * 4 + 1]]


def test_a_negative_change_weight_is_refused(tmp_path):
    with pytest.raises(InvalidParameterError, match="change_weight"):
        train_edit(EditTrainConfig(run_dir=str(tmp_path / "run"), change_weight=-1.0), tmp_path / "out")


@pytest.mark.parametrize(("setting", "logged_loss", "read_outs", "other_setting"), [
    ({"probe_weight": 0.3}, "probe_loss", {"read_out"}, {"probe_weight": 0.0}),
    ({"change_probe_weight": 0.5}, "change_loss", {"read_out", "change_read_out"}, {"probe_weight": 0.3}),
])
def test_the_probes_learn_beside_the_transformer_and_resume_only_with_their_setting(
        tmp_path, setting, logged_loss, read_outs, other_setting):
    # the probes read the 64 edited-picture tokens of a 128-token (edited + input picture) image stream, the change
    # read-out the input picture's too
    config = EditTrainConfig(run_dir=str(tmp_path / "run"), steps=2, batch=4, warmup_steps=1, log_every=1, **setting)
    train_edit(config, tmp_path / "out")
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r[logged_loss] > 0 for r in logged if logged_loss in r)
    # the read-outs learn beside the transformer: their parameters are a group of the optimizer
    state = torch.load(tmp_path / "run" / "edit.pt", map_location="cpu")
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 3  # transformer, the new words' embeddings, the probe
    assert set(state["probe"]) == {f"{name}.{part}" for name in read_outs for part in ("weight", "bias")}
    assert len(groups[-1]["params"]) == len(state["probe"])
    with pytest.raises(InvalidParameterError) as error:
        train_edit(EditTrainConfig(run_dir=str(tmp_path / "run"), steps=3, batch=2, **other_setting), tmp_path / "o2")
    assert error.value.param == next(iter(setting))


def test_cli_refuses_options_of_the_other_task(tmp_path):
    with pytest.raises(InvalidParameterError) as error:
        main(["train", "--task", "edit", "--vae-steps", "3", "--output", str(tmp_path / "x")])
    assert error.value.param == "vae_steps"
    with pytest.raises(InvalidParameterError) as error:
        main(["train", "--task", "image", "--text-training", "full", "--output", str(tmp_path / "x")])
    assert error.value.param == "text_training"
    with pytest.raises(InvalidParameterError) as error:
        main(["train", "--task", "edit", "--text-training", "most", "--run-dir", str(tmp_path / "r"),
              "--output", str(tmp_path / "x")])
    assert error.value.param == "text_training"
    with pytest.raises(InvalidParameterError) as error:
        main(["eval", "--task", "edit", "--lora", "some-folder"])
    assert error.value.param == "lora"


def test_train_help_shows_each_tasks_own_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    image, edit, video = TrainConfig().batch, EditTrainConfig().batch, VideoTrainConfig().batch
    assert f"--batch BATCH default {image} (image), {edit} (edit), {video} (video)" in text
    assert f"default {EditTrainConfig().change_weight!r} (edit)" in text
