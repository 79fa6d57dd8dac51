"""Wan2.1 / Wan2.2 text-to-video (WanPipeline). Its parts are declared in ``family.py``."""
