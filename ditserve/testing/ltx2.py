"""Tiny random LTX-2 pipelines (LTX2Pipeline, LTX2ImageToVideoPipeline), built locally with no download.

Every component the pipelines run is there, tiny: a Gemma3 text encoder (with the vision tower its class
requires, never run) and an in-memory Gemma tokenizer, the text connectors, the audio-video transformer, the
causal video VAE (4x in space, 2x in time), the audio VAE (mel spectrogram latents) and the vocoder (16 kHz
stereo). The transformer has perturbed self-attention (LTX-2.3's spatio-temporal guidance). The ``ltx2_stg``
pipeline's transformer has as many blocks as it takes to reach diffusers' default STG block (28), so its STG pass
perturbs and runs (it moves the sound track by ~3e-4, the video by a few /255 at most: the block is the last one);
the other pipelines have 2 blocks, far quicker to run, where block 28 is absent: their STG pass would perturb
nothing, so ditserve skips it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import LETTERS, TEST_WORDS, sensitize

#: diffusers' default ``spatio_temporal_guidance_blocks`` is [28]: the STG pipeline's transformer reaches it
STG_NUM_LAYERS = 29
#: the other tiny pipelines' transformer blocks: diffusers' default STG block is absent
TINY_NUM_LAYERS = 2
#: width of the tiny Gemma3's hidden states (the connectors' and the transformer's caption channels)
TEXT_WIDTH = 32
TEXT_LAYERS = 2


def tiny_gemma_tokenizer(max_length: int = 1024):
    """A Gemma BPE tokenizer ("▁"-prefixed words) whose test words are single tokens."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    merges: list[tuple[str, str]] = []
    for letter in LETTERS:
        vocab.setdefault(letter, len(vocab))
        merges.append(("\u2581", letter))
        vocab.setdefault("\u2581" + letter, len(vocab))
    for word in TEST_WORDS:
        prefix = "\u2581" + word[0]
        for letter in word[1:]:
            if (prefix, letter) not in merges:
                merges.append((prefix, letter))
            prefix += letter
            vocab.setdefault(prefix, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _tiny_gemma3(vocab_size: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config={"vocab_size": vocab_size, "hidden_size": TEXT_WIDTH, "intermediate_size": 64,
                     "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
                     "max_position_embeddings": 2048},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).eval()


def _components(seed: int, num_layers: int) -> dict:
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    tokenizer = tiny_gemma_tokenizer()
    text_encoder = _tiny_gemma3(len(tokenizer))
    connectors = LTX2TextConnectors(
        caption_channels=TEXT_WIDTH, text_proj_in_factor=TEXT_LAYERS + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
        rope_double_precision=False, rope_type="split").eval()
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=num_layers, caption_channels=TEXT_WIDTH,
        rope_double_precision=False, rope_type="split", perturbed_attn=True).eval()
    sensitize(transformer)
    # 2x2 pixel patches then one spatio-temporal down-sampling: 4x in space, 2x in time (5 frames -> 3)
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8,), decoder_block_out_channels=(8,), layers_per_block=(1,),
        decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False), downsample_type=("spatiotemporal",),
        upsample_type=("spatiotemporal",), upsample_residual=(False,), upsample_factor=(1,), patch_size=2,
        patch_size_t=1, timestep_conditioning=False).eval()
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, resolution=32, latent_channels=1,
        mel_bins=16, sample_rate=16000, mel_hop_length=160).eval()
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins, hidden_channels=16,
        out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3]], output_sampling_rate=16000).eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "audio_vae": audio_vae,
            "text_encoder": text_encoder, "tokenizer": tokenizer, "connectors": connectors,
            "transformer": transformer, "vocoder": vocoder}


def build_tiny_ltx2(path: Path, seed: int = 0, num_layers: int = TINY_NUM_LAYERS) -> Path:
    from diffusers import LTX2Pipeline

    LTX2Pipeline(**_components(seed, num_layers)).save_pretrained(path)
    return path


def build_tiny_ltx2_stg(path: Path) -> Path:
    """The text-to-video pipeline whose transformer reaches diffusers' default STG block."""
    return build_tiny_ltx2(path, num_layers=STG_NUM_LAYERS)


def build_tiny_ltx2_i2v(path: Path, seed: int = 0) -> Path:
    from diffusers import LTX2ImageToVideoPipeline

    LTX2ImageToVideoPipeline(**_components(seed, TINY_NUM_LAYERS)).save_pretrained(path)
    return path
