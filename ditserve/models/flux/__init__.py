from ditserve.models.flux.adapter import FluxAdapter

__all__ = ["FluxAdapter"]
