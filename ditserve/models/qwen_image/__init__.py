"""Qwen-Image family: text-to-image (Qwen-Image, Qwen-Image-2512) and editing (Qwen-Image-Edit, -Edit-2509)."""

from ditserve.models.qwen_image.adapter import QwenImageAdapter
from ditserve.models.qwen_image.edit import QwenImageEditAdapter, QwenImageEditPlusAdapter

__all__ = ["QwenImageAdapter", "QwenImageEditAdapter", "QwenImageEditPlusAdapter"]
