"""Construction of the demo model: a FLUX-architecture pipeline small enough to train and run on a CPU.

Every component is a stock diffusers / transformers class, so ``diffusers.FluxPipeline.from_pretrained`` loads
the saved folder unchanged. Tokenizers are built from the language's own vocabulary (no files, no download).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ditserve.demo.language import vocabulary

# The longest sentence of the language is 30 words; one more for the end token, rounded up.
MAX_SEQUENCE_LENGTH = 32
TEXT_HIDDEN = 64
LATENT_CHANNELS = 16
# Reserved ids shared by both tokenizers' configs (CLIP: start/end, T5: pad/end/unknown).
CLIP_BOS, CLIP_EOS = 0, 1


def _bpe_segment(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair segmentation: repeatedly merge the best-ranked adjacent pair, as the tokenizer does."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols[:-1], symbols[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _add_bpe_words(words: list[str], vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> None:
    """Add the words' new letters, then the merges that spell each word as one token, after everything in
    ``vocab`` and ``ranks`` already."""
    known = set(vocab)
    for char in sorted(set("".join(words))):
        if char not in known:
            vocab.setdefault(char, len(vocab))
            vocab.setdefault(char + "</w>", len(vocab))
    for word in words:
        symbols = _bpe_segment([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = _bpe_segment(symbols, ranks)


def build_clip_tokenizer(extra_words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """Byte-pair tokenizer whose merges spell every word of the language as one token.

    A word's merges are appended until it segments into one token; merges added later rank below every
    earlier one, so they never change the segmentation of words already done. ``extra_words`` (the edit
    model's instruction words) come after the whole base vocabulary, letters included, so every base token
    keeps its id and the trained text encoders read base prompts as before.
    """
    words = vocabulary()
    vocab: dict[str, int] = {"<|startoftext|>": CLIP_BOS, "<|endoftext|>": CLIP_EOS}
    ranks: dict[tuple[str, str], int] = {}
    _add_bpe_words(words, vocab, ranks)
    _add_bpe_words([w for w in extra_words if w not in words], vocab, ranks)
    merges = sorted(ranks, key=ranks.__getitem__)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_SEQUENCE_LENGTH)


def build_t5_tokenizer(extra_words: tuple[str, ...] = ()) -> T5Tokenizer:
    """Unigram tokenizer with one piece per word; letters as low-score fallback pieces. ``extra_words`` and
    their new letters are appended after every base piece, so base pieces keep their ids."""
    words = vocabulary()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -1.0) for word in words]
    pieces += [("\u2581", -5.0)] + [(char, -10.0) for char in sorted(set("".join(words)))]
    pieces += [("\u2581" + word, -1.0) for word in extra_words]
    pieces += [(char, -10.0) for char in sorted(set("".join(extra_words)) - set("".join(words)))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def build_clip_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_SEQUENCE_LENGTH,
        attention_dropout=0.0,
        # The pooled output is read at the first end token: its id must be the tokenizer's.
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=CLIP_EOS,
    )
    return CLIPTextModel(config).eval()


def t5_text_config(config_class: type[T5Config], vocab_size: int) -> T5Config:
    """The demo's T5 encoder size, as ``config_class`` (T5Config, or UMT5Config for the video model's UMT5)."""
    return config_class(
        vocab_size=vocab_size,
        d_model=TEXT_HIDDEN,
        d_kv=16,
        d_ff=2 * TEXT_HIDDEN,
        # four layers: with two, the parsing stage (text_pretrain.py) had not learnt which words form one
        # object's phrase after 600 steps; four read 99.8 % of held-out prompts right after 1500
        num_layers=4,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_t5_text_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(t5_text_config(T5Config, vocab_size)).eval()


def build_vae() -> AutoencoderKL:
    """8x downsampling (four blocks), 16 latent channels as FLUX; narrow, since the pictures are flat colours."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=128,
        use_quant_conv=False,
        use_post_quant_conv=False,
        # Training replaces these with the trained latents' statistics (FluxPipeline reads both).
        scaling_factor=1.0,
        shift_factor=0.0,
    ).eval()


def build_transformer() -> FluxTransformer2DModel:
    """Hidden 256 (4 heads of 64), 2 double-stream + 4 single-stream blocks: about 9 M parameters."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(16, 24, 24),
    ).eval()


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX's own scheduler settings, resolution-dependent shift included."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_pipeline() -> FluxPipeline:
    """A fresh, untrained demo pipeline."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    return FluxPipeline(
        scheduler=build_scheduler(),
        vae=build_vae(),
        text_encoder=build_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=build_t5_text_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=build_transformer(),
    )


def encode_prompts(pipe: FluxPipeline, prompts: list[str], device: torch.device, max_sequence_length: int):
    """The pipeline's own prompt encoding (same tokenizers, padding and pooled output), with gradients when the
    encoders require them: (T5 token features, pooled CLIP feature, text ids)."""
    return pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length)
