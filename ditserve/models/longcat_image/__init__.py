"""LongCat-Image family: text-to-image (LongCat-Image) and editing (LongCat-Image-Edit). Its parts are declared in ``family.py``."""
