"""The LoRA manager: the allow-list, the size limit, validation against the model, the LRU and its pins."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from ditserve import LoRARequest
from ditserve.errors import InvalidParameterError, LoRACapacityError, LoRAError, LoRAInUseError, LoRAPathError
from ditserve.lora.manager import LoRAManager
from ditserve.testing.lora import lora_state_dict, write_peft_folder


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir: str) -> FluxPipeline:
    return FluxPipeline.from_pretrained(tiny_flux_dir)


@pytest.fixture()
def allowed(tmp_path: Path, peft_lora, file_lora) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    shutil.copytree(peft_lora.path, folder / "a")
    shutil.copytree(peft_lora.path, folder / "b")
    shutil.copy(file_lora.path, folder / "c.safetensors")
    return folder


def manager_for(pipe: FluxPipeline, allowed: Path, **options) -> LoRAManager:
    return LoRAManager(pipe, {"transformer": pipe.transformer}, lora_dirs=[str(allowed)], **options)


def hooked_linears(pipe: FluxPipeline) -> int:
    return sum(1 for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear) and m._forward_hooks)


def test_paths_outside_the_allowed_folders_are_refused(pipe: FluxPipeline, allowed: Path, tmp_path: Path,
                                                       peft_lora) -> None:
    manager = manager_for(pipe, allowed)
    outside = tmp_path / "outside"
    shutil.copytree(peft_lora.path, outside)
    os.symlink(outside, allowed / "link")
    for path in (str(outside), "../outside", str(allowed / ".." / "outside"), "link", str(allowed / "link")):
        with pytest.raises(LoRAPathError, match="outside the allowed"):
            manager.acquire(LoRARequest("x", None, path))
    with pytest.raises(LoRAError, match="does not exist"):
        manager.acquire(LoRARequest("x", None, "missing"))
    assert manager.loaded() == [] and hooked_linears(pipe) == 0
    # a symlink that stays inside the folder is followed
    os.symlink(allowed / "a", allowed / "inside_link")
    assert manager.acquire(LoRARequest("inside", None, "inside_link")) == "inside"
    manager.close()


def test_no_lora_dir_means_no_path(pipe: FluxPipeline, allowed: Path) -> None:
    manager = LoRAManager(pipe, {"transformer": pipe.transformer}, lora_dirs=[])
    with pytest.raises(LoRAPathError, match="no lora_dir"):
        manager.acquire(LoRARequest("a", None, str(allowed / "a")))


def test_size_limit_and_pickles(pipe: FluxPipeline, allowed: Path) -> None:
    manager = manager_for(pipe, allowed, max_bytes=1000)
    with pytest.raises(LoRAError, match="the limit is 1000"):
        manager.acquire(LoRARequest("a", None, "a"))
    (allowed / "evil.bin").write_bytes(b"\x80\x04not a tensor")
    with pytest.raises(LoRAError, match="pickle"):
        manager_for(pipe, allowed).acquire(LoRARequest("evil", None, "evil.bin"))


def test_a_lora_that_does_not_fit_is_refused_whole(pipe: FluxPipeline, allowed: Path, tiny_flux_dir: str) -> None:
    state_dict, fields = lora_state_dict(f"{tiny_flux_dir}/transformer", seed=1)
    wrong_shape = dict(state_dict)
    key = next(k for k in wrong_shape if k.endswith("to_q.lora_A.weight"))
    wrong_shape[key] = torch.zeros(4, 7)
    write_peft_folder(allowed / "wrong_shape", wrong_shape, fields)
    missing = {k.replace("transformer_blocks.1.", "transformer_blocks.9."): v for k, v in state_dict.items()}
    write_peft_folder(allowed / "missing", missing, fields)
    manager = manager_for(pipe, allowed)
    with pytest.raises(LoRAError, match=r"'wrong_shape' does not fit this model: .*to_q: the LoRA maps 7"):
        manager.acquire(LoRARequest("wrong_shape", None, "wrong_shape"))
    with pytest.raises(LoRAError, match=r"'missing' does not fit .*transformer_blocks.9.attn.add_k_proj: no such module"):
        manager.acquire(LoRARequest("missing", None, "missing"))
    assert manager.loaded() == [] and hooked_linears(pipe) == 0  # nothing was half-applied


def test_lru_never_evicts_an_adapter_in_use(pipe: FluxPipeline, allowed: Path) -> None:
    manager = manager_for(pipe, allowed, max_loras=2)
    assert manager.acquire(LoRARequest("a", 1, "a")) == "a"  # pinned
    manager.register("b", str(allowed / "b"), trusted=False)  # resident, unpinned
    manager.acquire(LoRARequest("c", 3, "c.safetensors"))  # needs a slot: b goes, a stays
    assert [entry.name for entry in manager.loaded()] == ["a", "c"]
    with pytest.raises(LoRACapacityError, match="all 2 LoRA slots"):
        manager.acquire(LoRARequest("b"))  # a and c are both in use
    manager.release("a")
    assert manager.acquire(LoRARequest("b")) == "b"  # evicted adapters reload by name alone
    assert [entry.name for entry in manager.loaded()] == ["c", "b"]
    manager.release("b")
    manager.release("c")
    manager.close()
    assert hooked_linears(pipe) == 0


def test_hot_unload(pipe: FluxPipeline, allowed: Path) -> None:
    manager = manager_for(pipe, allowed)
    manager.acquire(LoRARequest("a", None, "a"))
    assert hooked_linears(pipe) > 0
    with pytest.raises(LoRAInUseError, match="used by 1"):
        manager.unload("a")
    manager.release("a")
    manager.unload("a")
    assert manager.loaded() == [] and hooked_linears(pipe) == 0
    with pytest.raises(LoRAError, match="not loaded; give its path"):
        manager.acquire(LoRARequest("a"))  # unloaded means forgotten
    with pytest.raises(LoRAError, match="not loaded"):
        manager.unload("a")


def test_a_name_keeps_its_path(pipe: FluxPipeline, allowed: Path) -> None:
    manager = manager_for(pipe, allowed)
    manager.acquire(LoRARequest("a", None, "a"))
    with pytest.raises(LoRAError, match="another path"):
        manager.acquire(LoRARequest("a", None, "b"))
    manager.release("a")
    manager.close()


def test_formats_ditserve_cannot_apply_are_named(pipe: FluxPipeline, allowed: Path, file_lora) -> None:
    from safetensors.torch import load_file, save_file

    loha = allowed / "loha"
    loha.mkdir()
    (loha / "adapter_config.json").write_text('{"peft_type": "LOHA", "r": 4}')
    (loha / "adapter_model.safetensors").write_bytes((allowed / "a" / "adapter_model.safetensors").read_bytes())
    with_text_encoder = load_file(str(file_lora.path))
    with_text_encoder["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    with_text_encoder["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(with_text_encoder, str(allowed / "te.safetensors"))
    manager = manager_for(pipe, allowed)
    with pytest.raises(LoRAError, match="'loha': a LOHA adapter"):
        manager.acquire(LoRARequest("loha", None, "loha"))
    with pytest.raises(LoRAError, match=r"'te' also adapts \['text_encoder'\]"):
        manager.acquire(LoRARequest("te", None, "te.safetensors"))
    (allowed / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoRAError, match="'garbage': garbage.safetensors is not a readable safetensors file"):
        manager.acquire(LoRARequest("garbage", None, "garbage.safetensors"))
    assert manager.loaded() == [] and hooked_linears(pipe) == 0


def test_config_checks_lora_options() -> None:
    from ditserve.config import OmniDiffusionConfig
    from ditserve.errors import InvalidTypeError, ParallelConfigError

    assert OmniDiffusionConfig(lora_path="a.safetensors", lora_dir="/srv").lora_dir == ["/srv"]
    fused = OmniDiffusionConfig(lora_backend="distill", lora_path={"transformer": "h", "transformer_2": ["l"]})
    assert fused.lora_path == {"transformer": ["h"], "transformer_2": ["l"]}
    cases = [({"lora_path": {"transformer": "x"}}, InvalidParameterError, "lora_path"),
             ({"lora_backend": "fused"}, InvalidParameterError, "lora_backend"),
             ({"lora_dir": 3}, InvalidTypeError, "lora_dir"),
             ({"lora_backend": "distill", "loras": {"a": "b"}}, InvalidParameterError, "loras"),
             ({"max_loras": 0}, InvalidParameterError, "max_loras"),
             ({"lora_path": "a", "parallel_config": {"cfg_parallel_size": 2}}, ParallelConfigError, "lora_path")]
    for options, error, param in cases:
        with pytest.raises(error) as raised:
            OmniDiffusionConfig(**options)
        assert raised.value.param == param


def test_a_reload_by_name_checks_the_folder_again(pipe: FluxPipeline, allowed: Path, tmp_path: Path) -> None:
    manager = manager_for(pipe, allowed, max_loras=1)
    manager.acquire(LoRARequest("a", None, "a"))
    manager.release("a")
    manager.acquire(LoRARequest("c", None, "c.safetensors"))  # evicts a
    manager.release("c")
    shutil.move(allowed / "a", tmp_path / "moved_out")
    os.symlink(tmp_path / "moved_out", allowed / "a")  # the name's folder now leads outside
    with pytest.raises(LoRAPathError, match="outside the allowed"):
        manager.acquire(LoRARequest("a"))
    manager.close()
