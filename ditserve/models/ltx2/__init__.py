"""LTX-2 text-to-video and image-to-video, with their sound track. Its parts are declared in ``family.py``."""
