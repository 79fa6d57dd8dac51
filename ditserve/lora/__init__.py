"""LoRA adapters: chosen per request, applied per row of a step batch, loaded only from allowed folders.

This package's top level holds only the request records (``ditserve.request`` imports them); the loader
(``ditserve.lora.files``), the per-row layers (``ditserve.lora.layers``) and the manager
(``ditserve.lora.manager``) are imported where they are used.
"""

from ditserve.lora.request import AppliedLoRA, LoRABackend, LoRARequest

__all__ = ["AppliedLoRA", "LoRABackend", "LoRARequest"]
