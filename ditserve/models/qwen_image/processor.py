"""Loading the edit and layered pipelines' Qwen2VLProcessor without its video part.

transformers builds a Qwen2VLProcessor's video processor from torchvision, which some machines lack (no CPU
build matches ours), and then refuses to load the processor at all. The Qwen-Image edit and layered pipelines and
LongCat-Image only feed it images and text, so where torchvision is missing the processor is assembled from the
folder's image processor, tokenizer and chat template alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def _image_only_processor_class() -> type:
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """A Qwen2VLProcessor whose video processor may be None (its class check needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor


def load_processor_without_video(folder: str | Path) -> Any:
    """A Qwen2VLProcessor from ``folder`` (a pipeline's ``processor/``) with no video processor, and the chat
    template the folder holds (LongCat-Image renders its prompt rewriting request with it)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    processor_class = _image_only_processor_class()
    chat_template = processor_class.get_processor_dict(str(folder))[0].get("chat_template")
    return processor_class(image_processor=AutoImageProcessor.from_pretrained(folder),
                           tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                           chat_template=chat_template)


def processor_components(path: str) -> dict[str, Any]:
    """The components to hand to ``from_pretrained`` for a pipeline folder with a ``processor/``: the processor,
    where transformers cannot load it (no torchvision); nothing where it can."""
    if torchvision_available():
        return {}
    return {"processor": load_processor_without_video(Path(path) / "processor")}
