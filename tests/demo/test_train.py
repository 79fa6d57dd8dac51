import argparse
import json

import pytest
import torch
from diffusers import FluxPipeline

from ditserve.demo.cli import register
from ditserve.demo.model import build_pipeline
from ditserve.demo.train import (
    TrainConfig,
    _autocast,
    _Logger,
    _reconstruction_loss,
    _regenerated_latents,
    _training_images,
    finetune_decoder,
    train,
    train_transformer,
)
from ditserve.errors import InvalidParameterError


def test_decoder_fine_tuning_leaves_the_latent_space_alone(tmp_path):
    pipe = build_pipeline()
    encoder_before = {k: v.clone() for k, v in pipe.vae.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in pipe.vae.decoder.state_dict().items()}
    config = TrainConfig(decoder_steps=2, vae_batch=2, warmup_steps=1, log_every=1)
    finetune_decoder(pipe, config, torch.device("cpu"), _Logger(tmp_path / "log.jsonl"))
    assert all(torch.equal(v, encoder_before[k]) for k, v in pipe.vae.encoder.state_dict().items())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in pipe.vae.decoder.state_dict().items())
    assert not pipe.vae.training and not any(p.requires_grad for p in pipe.vae.parameters())
    assert (tmp_path / "log.jsonl").read_text().count('"stage": "decoder"') == 2


def test_decoder_adaptation_trains_the_decoder_alone(tmp_path):
    pipe = build_pipeline()
    frozen = {"encoder": pipe.vae.encoder, "transformer": pipe.transformer}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in frozen.items()}
    decoder_before = {k: v.clone() for k, v in pipe.vae.decoder.state_dict().items()}
    config = TrainConfig(decoder_adapt_steps=2, vae_batch=2, warmup_steps=1, log_every=1)
    finetune_decoder(pipe, config, torch.device("cpu"), _Logger(tmp_path / "log.jsonl"), adapt=True)
    for name, module in frozen.items():
        assert all(torch.equal(v, before[name][k]) for k, v in module.state_dict().items()), name
    assert any(not torch.equal(v, decoder_before[k]) for k, v in pipe.vae.decoder.state_dict().items())
    assert (tmp_path / "log.jsonl").read_text().count('"stage": "decoder_adapt"') == 2


def test_regenerated_latents_redraw_the_same_picture(demo_pipeline):
    # Re-generated from part way, a latent must stay nearer its own picture's latent than to any other.
    prompts, images = _training_images(6, seed=0, stage=9, step=0, device=torch.device("cpu"))
    with torch.no_grad():
        latents = demo_pipeline.vae.encode(images * 2 - 1).latent_dist.mode()
    regenerated = _regenerated_latents(demo_pipeline, latents, prompts, torch.Generator().manual_seed(0))
    assert regenerated.shape == latents.shape
    distances = torch.cdist(regenerated.flatten(1), latents.flatten(1))
    assert torch.equal(distances.argmin(dim=1), torch.arange(6))
    assert not torch.allclose(regenerated, latents, atol=1e-3)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_training_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native_bf16):
    # Emulated bf16 (an AVX2-only CPU) made a VAE step 15x slower than fp32: there autocast must stay off.
    monkeypatch.setattr("ditserve.demo.train._cpu_has_native_bf16", lambda: native_bf16)
    with _autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") is native_bf16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native_bf16 else torch.float32)


def test_edge_weight_counts_errors_at_colour_edges_more_than_in_flat_areas():
    target = torch.zeros(1, 3, 16, 16)
    target[:, :, 4:12, 4:12] = 1.0
    at_edge, in_flat = target.clone(), target.clone()
    at_edge[:, :, 4, 4] += 0.5  # a square's corner
    in_flat[:, :, 14, 14] += 0.5  # background, far from the square
    assert _reconstruction_loss(at_edge, target) == _reconstruction_loss(in_flat, target)
    assert _reconstruction_loss(at_edge, target, edge_weight=4.0) > 2 * _reconstruction_loss(in_flat, target, edge_weight=4.0)


def test_continuing_a_finished_model_keeps_its_text_encoders_and_text_inputs(tmp_path):
    # keep_text_encoders: no parsing stage, frozen encoders, and the transformer's text-input layers go on
    # from their trained weights (without the flag they would be rebuilt at random for new encoders).
    build_pipeline().save_pretrained(tmp_path / "start")
    start = FluxPipeline.from_pretrained(tmp_path / "start")
    config = TrainConfig(run_dir=str(tmp_path / "run"), init_from=str(tmp_path / "start"), keep_text_encoders=True,
                         steps=2, batch=2, lr=1e-6, warmup_steps=1, log_every=1, long_padding_fraction=0.0,
                         decoder_steps=0, decoder_adapt_steps=0)
    result = FluxPipeline.from_pretrained(train(config, tmp_path / "out"))
    for name in ("text_encoder", "text_encoder_2"):
        before, after = getattr(start, name).state_dict(), getattr(result, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), name
    embedder_before = start.transformer.context_embedder.weight
    embedder_after = result.transformer.context_embedder.weight
    assert not torch.equal(embedder_before, embedder_after)
    assert torch.allclose(embedder_before, embedder_after, atol=1e-4)
    assert '"stage": "text_encoders"' not in (tmp_path / "run" / "log.jsonl").read_text()


def test_a_resumed_run_goes_on_with_the_time_budget_its_checkpoint_had_spent(tmp_path):
    # 570 of 600 s spent: the resumed step's learning rate must be near the end of the cosine (about 0.11 x
    # lr), not where its step count alone would put it (step 2 of 4: 0.55 x lr).
    pipe = build_pipeline()
    config = TrainConfig(run_dir=str(tmp_path), steps=2, batch=2, warmup_steps=1, log_every=1, max_minutes=10.0,
                         long_padding_fraction=0.0)
    logger = _Logger(tmp_path / "log.jsonl")
    train_transformer(pipe, config, torch.device("cpu"), logger)
    state = torch.load(tmp_path / "transformer.pt")
    assert 0 < state["seconds"] < 60
    state["seconds"] = 570.0
    torch.save(state, tmp_path / "transformer.pt")
    config.steps = 4
    train_transformer(pipe, config, torch.device("cpu"), logger)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    resumed = next(r for r in records if r.get("step") == 2)
    assert resumed["lr"] < 0.15 * config.lr


@pytest.mark.parametrize("written_with, resumed_with", [(0.0, 0.3), (0.3, 0.0)])
def test_resuming_with_another_probe_setting_than_the_checkpoint_names_probe_weight(tmp_path, written_with, resumed_with):
    pipe = build_pipeline()
    config = TrainConfig(run_dir=str(tmp_path), steps=1, batch=2, warmup_steps=1, log_every=1,
                         long_padding_fraction=0.0, probe_weight=written_with)
    logger = _Logger(tmp_path / "log.jsonl")
    train_transformer(pipe, config, torch.device("cpu"), logger)
    config.steps, config.probe_weight = 2, resumed_with
    with pytest.raises(InvalidParameterError, match="probe") as raised:
        train_transformer(pipe, config, torch.device("cpu"), logger)
    assert raised.value.param == "probe_weight"


def test_keeping_text_encoders_needs_a_model_to_keep_them_from(tmp_path):
    with pytest.raises(InvalidParameterError, match="init_from"):
        train(TrainConfig(run_dir=str(tmp_path / "run"), keep_text_encoders=True), tmp_path / "out")


def test_train_command_reads_boolean_options_both_ways():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo", "train", "--keep-text-encoders"]).keep_text_encoders is True
    assert parser.parse_args(["demo", "train", "--no-keep-text-encoders"]).keep_text_encoders is False
    assert parser.parse_args(["demo", "train"]).keep_text_encoders is None
