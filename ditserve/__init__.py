"""ditserve: fast serving of diffusion transformers in diffusers format."""

from ditserve.config import DiffusionParallelConfig, Limits, OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.request import RequestOutput
from ditserve.entrypoints.omni import Omni
from ditserve.errors import DitServeError, InvalidParameterError, InvalidTypeError

__all__ = [
    "DiffusionParallelConfig",
    "DitServeError",
    "InvalidParameterError",
    "InvalidTypeError",
    "Limits",
    "Omni",
    "OmniDiffusionConfig",
    "OmniDiffusionSamplingParams",
    "RequestOutput",
]
__version__ = "0.1.0"
