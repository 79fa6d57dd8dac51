import torch

from ditserve.demo.model import build_pipeline
from ditserve.demo.train import TrainConfig, _Logger, finetune_decoder


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
