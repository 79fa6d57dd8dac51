"""Ovis-Image (OvisImagePipeline): its step-level adapter and what the caches need to know about its transformer."""
