from ditserve.models.wan.adapter import WanAdapter

__all__ = ["WanAdapter"]
