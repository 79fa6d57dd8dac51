"""Construction of the video demo model ``ditserve-shapes-video``: a text-to-video pipeline in Wan2.2's architecture,
small enough to train and run on a CPU.

Every component is a stock diffusers / transformers class, so ``diffusers.WanPipeline.from_pretrained`` loads the
saved folder unchanged and the engine serves it as any Wan folder: one ``WanTransformer3DModel`` (one expert: the
A14B split into a high- and a low-noise transformer does not pay at this size), the causal video VAE
``AutoencoderKLWan`` (16 latent channels, one latent frame per frame, 8x in space: 9 frames of 128x128 are 9 x 16 x
16 latents, 576 tokens after the transformer's 1x2x2 patches), a ``UMT5EncoderModel`` and UniPC with flow sigmas. The
tokenizer is the image demo's word-level T5 tokenizer (``model.py``) with the clip words added.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from ditserve.demo.model import LATENT_CHANNELS, TEXT_HIDDEN, build_t5_tokenizer, t5_text_config
from ditserve.demo.video_language import VIDEO_WORDS
from ditserve.errors import InvalidParameterError

VIDEO_SIZE = 128
VIDEO_FRAMES = 9
# The VAE's compression: none in time (a latent frame per frame), 8x8 pixels a latent. Wan's own VAEs take 4 frames
# a latent frame; here clip training at 4x reached 44 % decoded ground-truth object accuracy, at 2x 81 %, while the
# frame-trained VAE applied frame by frame gave 86 % with no clip training (docs/demo/video_first_run.md): a latent
# pixel that holds several frames must learn an object's colour change or its motion, which the flat shapes'
# frames do not teach fast enough on a CPU. The transformer carries the time instead.
TEMPORAL_COMPRESSION = 1
# AutoencoderKLWan encodes the first frame, then chunks of this many frames (whatever its compression): a clip
# it encodes whole has ENCODER_CHUNK * k + 1 frames.
ENCODER_CHUNK = 4
SPATIAL_COMPRESSION = 8
# The untrained VAE's posterior log-variance (std 0.05), see build_video_vae.
POSTERIOR_LOG_VARIANCE = -6.0
# WanPipeline's own T5 padding when a caller gives no max_sequence_length (ditserve_defaults.json gives
# MAX_SEQUENCE_LENGTH, which the longest clip prompt, 27 tokens, fits).
PIPELINE_PADDING = 226
# UniPC's fixed shift of the flow sigmas (Wan: 3.0 at 480p). FLUX's resolution rule would give 1.6 for 192
# tokens; a clip's latent frames mostly repeat one scene, so a little more of the schedule goes to high noise,
# where the layout is decided. A choice, not a tuned value.
FLOW_SHIFT = 2.0


def build_video_tokenizer() -> T5Tokenizer:
    """The image demo's T5 tokenizer with the clip words appended: every word of a clip prompt is one token."""
    return build_t5_tokenizer(VIDEO_WORDS)


def build_video_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    """The image demo's T5 encoder size, as UMT5."""
    return UMT5EncoderModel(t5_text_config(UMT5Config, vocab_size)).eval()


def per_frame(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Zero the taps of every causal convolution that read earlier frames, so that the VAE encodes and decodes each
    frame on its own. Training on single frames keeps them zero: a one-frame clip's earlier taps read the causal
    zero padding, so their gradient is zero."""
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanCausalConv3d) and module.weight.shape[2] > 1:
                module.weight[:, :, :-1] = 0
    return vae


def build_video_vae() -> AutoencoderKLWan:
    """Per frame (``per_frame``, TEMPORAL_COMPRESSION) and narrow, since the frames are flat colours. The encoder
    (base 8 channels) is half as wide as the decoder (16): the transformer stage encodes every training clip, and with
    a base-16 encoder that took 2.1 s of a step for 8 clips (base 8: 1.0 s; one shared CPU thread). The decoder draws
    the shapes' edges and runs once per generated clip.

    The posterior's log-variance starts at POSTERIOR_LOG_VARIANCE (its bias in ``quant_conv``): at the default 0
    the untrained posterior means (spread about 0.14) drown in unit noise, and the decoder of the first run, which
    started there, learnt from little but noise."""
    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=16,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, False, False],
        scale_factor_temporal=TEMPORAL_COMPRESSION,
        # Training replaces these with the trained latents' statistics (WanPipeline reads both).
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    ).eval()
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] = POSTERIOR_LOG_VARIANCE
    return per_frame(vae)


def build_video_transformer() -> WanTransformer3DModel:
    """Hidden 192 (6 heads of 32), 4 blocks of self-attention, cross-attention to the text and a feed-forward of
    768: about 2.8 M parameters."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=6,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_HIDDEN,
        freq_dim=256,
        ffn_dim=768,
        num_layers=4,
        rope_max_seq_len=64,
    ).eval()


def build_video_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT)


def video_pipeline_from(folder: str | Path) -> WanPipeline:
    """A video demo pipeline with the trained tokenizer, text encoder and VAE of ``folder`` (an exported video demo
    folder, or one that holds only those three), and its transformer when it has one, else a fresh one."""
    folder = Path(folder)
    missing = [name for name in ("tokenizer", "text_encoder", "vae") if not (folder / name).is_dir()]
    if missing:
        raise InvalidParameterError(f"init_from {str(folder)!r} has no {', '.join(missing)} folder: give an exported "
                                    "video demo folder, or one with its tokenizer, text_encoder and vae folders",
                                    param="init_from")
    has_transformer = (folder / "transformer").is_dir()
    return WanPipeline(
        tokenizer=T5Tokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae").eval(),
        transformer=(WanTransformer3DModel.from_pretrained(folder / "transformer").eval() if has_transformer
                     else build_video_transformer()),
        scheduler=build_video_scheduler(),
    )


def build_video_pipeline() -> WanPipeline:
    """A fresh, untrained video demo pipeline."""
    tokenizer = build_video_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_video_text_encoder(len(tokenizer)),
        vae=build_video_vae(),
        transformer=build_video_transformer(),
        scheduler=build_video_scheduler(),
    )


def text_embeddings(pipe: WanPipeline, prompts: list[str], device: torch.device, max_sequence_length: int) -> torch.Tensor:
    """The pipeline's own prompt encoding (its tokenizer, padding, and zeros after each prompt's last token), with
    gradients when the encoder requires them."""
    embeddings, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
                                       device=device)
    return embeddings


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL_COMPRESSION + 1


def wan_pipeline_num_frames(frames: int) -> int:
    """The ``num_frames`` to ask ``diffusers.WanPipeline`` for, to get ``frames`` frames from this model. WanPipeline
    rounds a count to k * scale_factor_temporal + 1 by ``num_frames % factor != 1``, which at this VAE's factor of 1
    is always true, so it makes one frame more than asked: ask for one fewer. (ditserve's Wan adapter makes the count
    it is asked for.)"""
    assert TEMPORAL_COMPRESSION == 1, "the rounding only adds a frame at a temporal factor of 1"
    return frames - 1


def tokens_per_side(size: int = VIDEO_SIZE) -> int:
    """Transformer tokens along a side of a latent frame (1x2x2 patches of the 8x-downsampled latent)."""
    return size // SPATIAL_COMPRESSION // 2


def check_frames(frames: int, param: str = "frames") -> None:
    """Refuse a frame count the causal VAE would not encode whole: 4k + 1 (ENCODER_CHUNK), at least 5."""
    if frames < ENCODER_CHUNK + 1 or (frames - 1) % ENCODER_CHUNK:
        raise InvalidParameterError(f"{param} must be 4k + 1 and at least 5 (9, 17, ...), got {frames}", param=param)

