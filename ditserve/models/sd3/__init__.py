"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline). Its parts are declared in ``family.py``."""
