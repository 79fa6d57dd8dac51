"""The bundled demo model ``ditserve-shapes``: its prompt language, renderer, adherence checker and training.

Heavy modules (diffusers, training) are imported only by the functions that need them, so ``import
ditserve.demo`` stays cheap for the engine, which only needs :func:`demo_model_path`.
"""

from pathlib import Path

from ditserve.demo.checker import evaluate, score
from ditserve.demo.language import (
    PromptOutsideLanguageError,
    heldout_prompts,
    is_in_language,
    parse_prompt,
    sample_prompts,
)
from ditserve.demo.render import render

DEMO_MODEL_NAME = "ditserve-shapes"


def demo_model_path() -> Path:
    """Folder of the bundled diffusers-format demo model."""
    return Path(__file__).resolve().parent / DEMO_MODEL_NAME


__all__ = [
    "DEMO_MODEL_NAME",
    "PromptOutsideLanguageError",
    "demo_model_path",
    "evaluate",
    "heldout_prompts",
    "is_in_language",
    "parse_prompt",
    "render",
    "sample_prompts",
    "score",
]
