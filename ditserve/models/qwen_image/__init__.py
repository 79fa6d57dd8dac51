"""Qwen-Image family: text-to-image (Qwen-Image, Qwen-Image-2512) and editing (Qwen-Image-Edit, -Edit-2509). Its parts are declared in ``family.py``."""
