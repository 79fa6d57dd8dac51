"""The prompt-embedding cache: a repeated prompt skips the text encoders and gives the same result."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import Omni
from ditserve.cache.prompt_embed import (
    ENV_ENABLE,
    ENV_SIZE,
    PromptEmbedCache,
    resolve_prompt_embed_cache_config,
)
from ditserve.errors import InvalidParameterError
from tests.cache.helpers import media

PARAMS = {"num_inference_steps": 3, "height": 64, "width": 64, "max_sequence_length": 64, "seed": 5}


def _count_encoder_calls(omni: Omni) -> list[int]:
    calls = [0]
    pipeline = omni.engine.runner.model.pipeline
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        encoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_repeated_prompt_skips_the_encoders_and_is_identical(tiny_flux_dir: str) -> None:
    with Omni(tiny_flux_dir) as omni:
        calls = _count_encoder_calls(omni)
        first = omni.generate("a red cat", PARAMS)[0]
        after_first = calls[0]
        second = omni.generate("a red cat", PARAMS)[0]
        other = omni.generate("a blue dog", PARAMS)[0]
        totals = omni.engine.runner.prompt_cache.stats()
    assert (totals["hits"], totals["misses"], totals["size"]) == (1, 2, 2)
    assert after_first == 2 and calls[0] == 4  # CLIP + T5 once per distinct prompt
    assert np.array_equal(media(first), media(second))
    assert not np.array_equal(media(first), media(other))


def test_env_vars_turn_it_off_and_size_it(tiny_flux_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_ENABLE, "0")
    monkeypatch.setenv(ENV_SIZE, "3")
    assert resolve_prompt_embed_cache_config() == (False, 3)
    with Omni(tiny_flux_dir) as omni:
        calls = _count_encoder_calls(omni)
        omni.generate("a red cat", PARAMS)
        repeated = omni.generate("a red cat", PARAMS)[0]
        assert omni.engine.runner.prompt_cache.stats()["bypassed"] == 2
    assert calls[0] == 4
    monkeypatch.setenv(ENV_ENABLE, "maybe")
    with pytest.raises(InvalidParameterError, match=ENV_ENABLE):
        resolve_prompt_embed_cache_config()
    assert repeated.images


def test_lru_evicts_the_oldest_and_never_mixes_keys() -> None:
    cache = PromptEmbedCache(max_size=2, model_tag="m")
    for prompt in ("a", "b", "c"):
        assert cache.lookup(prompt, lambda p=prompt: p.upper(), owner=prompt) == prompt.upper()
    assert cache.lookup("a", lambda: "recomputed", owner="again") == "recomputed"
    assert cache.request_stats("again")["outcome"] == "miss"
    assert cache.lookup("c", lambda: "wrong") == "C"
    assert cache.stats()["size"] == 2
