"""Tiny Qwen2.5-VL text side for the Qwen-Image test pipelines: tokenizer, text encoder and the edit models'
processor folder, built locally with no download.

The Qwen-Image pipelines drop a fixed number of leading template tokens (34 for text-to-image, 64 for edit),
counted with the real tokenizer. The tiny tokenizer learns one BPE merge chain per word of the pipelines' own
templates, so each word is one token as in the real vocabulary and the templates cut at the same offsets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ditserve.testing.common import TEST_WORDS

#: Qwen2.5-VL's special tokens the pipelines and the processor use, in the real vocabulary's order
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
#: pixels the tiny image processor lets through to the vision tower: a handful of patches keeps it fast
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 56 * 56


def pipeline_templates() -> list[tuple[str, int]]:
    """(prompt template, dropped leading tokens) of every Qwen-Image pipeline, read from diffusers itself."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    components = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "transformer"))
    pipelines = [QwenImagePipeline(**components), QwenImageEditPipeline(**components, processor=None),
                 QwenImageEditPlusPipeline(**components, processor=None)]
    return [(p.prompt_template_encode, p.prompt_template_encode_start_idx) for p in pipelines]


def _learn_word_merges(vocab: dict[str, int], pieces: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that turn every pre-tokenized piece into a single token (adds the merged tokens to vocab)."""
    from tokenizers.models import BPE

    merges: list[tuple[str, str]] = []
    pending = list(pieces)
    while pending:
        model = BPE(vocab=vocab, merges=merges)
        still_split = []
        for piece in pending:
            tokens = [t.value for t in model.tokenize(piece)]
            if len(tokens) > 1:
                # merging the first pair shortens this piece; repeat until it is one token
                pair = (tokens[0], tokens[1])
                if pair not in merges:
                    merges.append(pair)
                    vocab.setdefault(pair[0] + pair[1], len(vocab))
                still_split.append(piece)
        pending = still_split
    return merges


def tiny_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer whose template words are single tokens, like the real one's."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    pre_tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=[]).backend_tokenizer.pre_tokenizer
    special = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS) + r"|\{\}")
    texts = [part for template, _ in pipeline_templates() for part in special.split(template)]
    texts += ["Picture 1: ", " ".join(TEST_WORDS)]
    pieces = dict.fromkeys(piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    merges = _learn_word_merges(vocab, pieces)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def tiny_qwen25_vl_encoder(tokenizer, hidden_size: int = 32):
    """A 2-layer Qwen2.5-VL with a 1-block vision tower; token ids point into the tiny tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    token_ids = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                 "pad_token_id": ids["<|endoftext|>"]}
    text_config = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # mrope splits head_dim / 2 = 4 rotary frequencies over (time, height, width)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [1, 1, 2]},
        **token_ids}
    vision_config = {"depth": 1, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_heads": 2,
                     "out_hidden_size": hidden_size, "fullatt_block_indexes": [0], "window_size": 56}
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, vocab_size=vocab_size,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **token_ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_image_processor():
    """The PIL Qwen2-VL image processor (no torchvision needed), with few pixels let through."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


def write_processor_folder(folder: Path, tokenizer) -> None:
    """The edit pipelines' ``processor/`` folder in the real layout: tokenizer files, the image processor's
    ``preprocessor_config.json`` and ``video_preprocessor_config.json``. Written by hand because
    transformers cannot build a Qwen2VLProcessor's video part without torchvision."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    image_processor = tiny_image_processor()
    image_processor.save_pretrained(folder)
    image_config = json.loads((folder / "preprocessor_config.json").read_text())
    image_config |= {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, sort_keys=True))
    video_keys = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                  "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")
    video_config = {key: image_config[key] for key in video_keys if key in image_config}
    video_config |= {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2, sort_keys=True))
