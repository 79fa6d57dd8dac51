"""The bundled demo model ``ditserve-shapes``: its prompt language, renderer, adherence checker and training.

Heavy modules (diffusers, training) are imported only by the functions that need them, so ``import
ditserve.demo`` stays cheap for the engine, which only needs :func:`demo_model_path`.
"""

from pathlib import Path

from ditserve.demo.checker import evaluate, score
from ditserve.demo.language import (
    NEW_SIZE,
    PromptOutsideLanguageError,
    heldout_prompts,
    is_in_language,
    new_size_prompts,
    parse_prompt,
    sample_prompts,
)
from ditserve.demo.render import render

DEMO_MODEL_NAME = "ditserve-shapes"
# The instruction-editing model trained from it (FluxKontextPipeline), with its own instruction language.
DEMO_EDIT_MODEL_NAME = f"{DEMO_MODEL_NAME}-edit"
# The trained LoRA shipped beside the model (a PEFT folder): it teaches the size word language.NEW_SIZE.
DEMO_LORA_NAME = f"{DEMO_MODEL_NAME}-lora-{NEW_SIZE}"


def demo_model_path() -> Path:
    """Folder of the bundled diffusers-format demo model."""
    return Path(__file__).resolve().parent / DEMO_MODEL_NAME


def demo_edit_model_path() -> Path:
    """Folder of the bundled diffusers-format edit model (FluxKontextPipeline)."""
    return Path(__file__).resolve().parent / DEMO_EDIT_MODEL_NAME


#: the models served by name with no download (``ditserve serve ditserve-shapes-edit``)
BUNDLED_MODELS = (DEMO_MODEL_NAME, DEMO_EDIT_MODEL_NAME)


def bundled_model_path(name: str) -> Path | None:
    """Folder of the bundled model called ``name``, or None when no bundled model has that name."""
    return Path(__file__).resolve().parent / name if name in BUNDLED_MODELS else None


def demo_lora_path() -> Path:
    """Folder of the bundled demo LoRA (PEFT format), for ``LoRARequest(lora_path=...)``."""
    return Path(__file__).resolve().parent / DEMO_LORA_NAME


__all__ = [
    "BUNDLED_MODELS",
    "bundled_model_path",
    "DEMO_EDIT_MODEL_NAME",
    "DEMO_LORA_NAME",
    "DEMO_MODEL_NAME",
    "NEW_SIZE",
    "PromptOutsideLanguageError",
    "demo_edit_model_path",
    "demo_lora_path",
    "demo_model_path",
    "evaluate",
    "heldout_prompts",
    "is_in_language",
    "parse_prompt",
    "new_size_prompts",
    "render",
    "sample_prompts",
    "score",
]
