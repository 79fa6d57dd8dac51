from ditserve.models.sd3.adapter import StableDiffusion3Adapter

__all__ = ["StableDiffusion3Adapter"]
