"""A tiny random Z-Image pipeline (ZImagePipeline), built locally: Qwen3 text encoder, single-stream DiT.

The tiny Qwen tokenizer and Qwen3 encoder are also used by other Qwen3-conditioned pipelines' test builders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import TEST_WORDS, sensitize, tiny_image_vae

#: ChatML, the layout of Qwen's own template: ZImagePipeline formats every prompt with ``apply_chat_template``
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``word`` from its characters."""
    merges, prefix = [], word[0]
    for char in word[1:]:
        merges.append((prefix, char))
        prefix += char
    return merges


def tiny_qwen_tokenizer(max_length: int = 1024):
    """A byte-level BPE tokenizer in Qwen2's format: every byte is a token, the test words are whole tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = {char: index for index, char in enumerate(byte_chars)}
    merges: list[tuple[str, str]] = []
    # "\u0120" is the byte-level form of a space: words after a space are "\u0120word" tokens
    for word in [w for base in TEST_WORDS for w in (base, "\u0120" + base)]:
        for pair in _word_merges(word):
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault("".join(pair), len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_encoder(tokenizer, hidden_size: int = 32):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()


def build_tiny_z_image(path: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = tiny_qwen3_encoder(tokenizer)
    # head dim 64 / 2 = 32 = sum(axes_dims); axis 0 numbers caption tokens, so it must outlast the longest caption
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64]).eval()
    sensitize(transformer)
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                  max_image_seq_len=256, base_shift=0.5, max_shift=1.15),
        vae=tiny_image_vae(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipeline.save_pretrained(path)
    return path
