from ditserve.models.z_image.adapter import ZImageAdapter

__all__ = ["ZImageAdapter"]
