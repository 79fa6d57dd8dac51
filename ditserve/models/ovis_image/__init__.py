"""Ovis-Image (OvisImagePipeline) runs on the generic path (diffusers' own ``__call__``); this folder holds what
the caches need to know about its transformer."""
