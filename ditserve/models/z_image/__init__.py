"""Z-Image (ZImagePipeline). Its parts are declared in ``family.py``."""
