"""GGUF transformers: load a pre-quantized transformer file through diffusers, and write one from a model.

Loading uses diffusers' single-file loader with ``GGUFQuantizationConfig``: the weights stay packed in memory
(Q8_0 is about 1.06 bytes a weight, Q4_0 about 0.56) and are dequantized to the compute dtype layer by layer
as the transformer runs. Files from the community (original, non-diffusers key layout) are converted by
diffusers on load; files written by :func:`write_gguf_transformer` carry diffusers keys and load as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditserve.errors import InvalidParameterError, ModelNotFoundError

#: quantization types :func:`write_gguf_transformer` offers (both run on any device, dequantized in torch)
WRITABLE_QUANT_TYPES = ("Q8_0", "Q4_0")
#: GGUF's "architecture" field; diffusers' loader does not read it
GGUF_ARCHITECTURE = "ditserve-transformer"


def transformer_class_of(model_path: str) -> Any:
    """The diffusers class of the pipeline's transformer, as ``model_index.json`` names it."""
    import diffusers

    _library, class_name = diffusers.DiffusionPipeline.load_config(model_path)["transformer"]
    model_class = getattr(diffusers, class_name, None)
    if model_class is None or not hasattr(model_class, "from_single_file"):
        raise InvalidParameterError(
            f"quantization='gguf': {class_name} has no single-file loader in diffusers {diffusers.__version__}, "
            "so a GGUF file cannot be loaded for it", param="quantization")
    return model_class


def load_gguf_transformer(model_path: str, gguf_file: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The pipeline's transformer with weights read (still quantized) from ``gguf_file``; its config comes
    from ``model_path``'s transformer folder."""
    from diffusers import GGUFQuantizationConfig

    if not Path(gguf_file).is_file():
        raise ModelNotFoundError(f"gguf_model={gguf_file!r} is not a file", param="gguf_model")
    model_class = transformer_class_of(model_path)
    transformer = model_class.from_single_file(
        gguf_file, config=model_path, subfolder="transformer", dtype=compute_dtype,
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype))
    return transformer.eval()


def _quantizable(name: str, tensor: torch.Tensor, block_size: int) -> bool:
    # only matrices whose rows split into whole blocks; norms, biases and odd shapes stay in float
    return name.endswith(".weight") and tensor.dim() == 2 and tensor.shape[-1] % block_size == 0


def write_gguf_transformer(transformer: torch.nn.Module, path: str | Path, quant_type: str = "Q8_0") -> Path:
    """Write ``transformer``'s weights to a GGUF file in diffusers' key layout, its 2-D weight matrices
    quantized to ``quant_type`` and every other tensor in float32."""
    import gguf

    if quant_type not in WRITABLE_QUANT_TYPES:
        raise InvalidParameterError(f"quant_type={quant_type!r} is not allowed; choose one of {list(WRITABLE_QUANT_TYPES)}",
                                    param="quant_type")
    qtype = gguf.GGMLQuantizationType[quant_type]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURE)
    for name, tensor in transformer.state_dict().items():
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if _quantizable(name, tensor, block_size):
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def is_gguf_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds GGUF-packed weights (diffusers' ``GGUFParameter`` carries a ``quant_type``)."""
    return any(hasattr(parameter, "quant_type") for parameter in module.parameters())
