from ditserve.models.generic.adapter import GenericAdapter

__all__ = ["GenericAdapter"]
