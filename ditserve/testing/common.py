"""Pieces every tiny test pipeline shares: in-memory tokenizers and weights that react to their inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ditserve.models.loader import DEFAULTS_FILE

#: words the tiny tokenizers know as whole tokens; anything else falls back to single letters
TEST_WORDS = ("a cat dog red blue green sitting on the windowsill small large circle square triangle "
              "at top bottom left right center in and of background turn this into painting").split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    for word in TEST_WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    # merges that build every known word from its letters, so whole words become one token
    merges: list[tuple[str, str]] = []
    for word in TEST_WORDS:
        prefix = word[0]
        for i, letter in enumerate(word[1:], start=1):
            suffix = letter + ("</w>" if i == len(word) - 1 else "")
            merged = prefix + suffix
            if (prefix, suffix) not in merges:
                merges.append((prefix, suffix))
            vocab.setdefault(merged, len(vocab))
            prefix = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in TEST_WORDS]
    pieces += [("\u2581", -4.0)] + [(c, -5.0) for c in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


@torch.no_grad()
def sensitize(module: torch.nn.Module, linear_scale: float = 2.0, qk_norm_scale: float = 3.0) -> None:
    """Make a random denoiser react to its inputs: with default init, tiny pipelines barely move when the
    prompt or the step count changes (a few /255), so a broken engine could pass a parity test. Scaling the
    Linear weights and the attention q/k norm weights makes such changes move outputs by 15-255 /255."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            sub.weight.mul_(linear_scale)
        elif name.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")) and getattr(sub, "weight", None) is not None:
            sub.weight.mul_(qk_norm_scale)


def tiny_t5_encoder(tokenizer):
    """A 2-layer, 32-wide T5 encoder (FLUX's and SD3's second/third text encoder)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def tiny_image_vae():
    """A 4-channel AutoencoderKL with 2x down-sampling (64x64 images -> 32x32 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.5, shift_factor=0.1,
        use_quant_conv=False, use_post_quant_conv=False).eval()


def declare_processor(folder: Path, component: str) -> None:
    """Name ``component`` as a Qwen2VLProcessor in the folder's model_index.json: the tiny pipeline saves it as
    None (it was built without torchvision), and the loader must know to build it."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index[component] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))


def folder_with_defaults(source: str, destination: Path, defaults: dict[str, Any]) -> str:
    """A copy of the pipeline folder ``source`` whose ``ditserve_defaults.json`` holds ``defaults`` (its
    ``sampling_defaults``: defaults of the sampling params, and the model-level options some families read)."""
    shutil.copytree(source, destination)
    (destination / DEFAULTS_FILE).write_text(json.dumps({"sampling_defaults": defaults}))
    return str(destination)
