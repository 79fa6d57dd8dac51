"""ditserve: fast serving of diffusion transformers in diffusers format."""

from ditserve.config import DiffusionParallelConfig, Limits, OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.entrypoints.omni import Omni
from ditserve.errors import DitServeError, InvalidParameterError, InvalidTypeError
from ditserve.lora import LoRARequest
from ditserve.request import AudioTrack, RequestOutput

__all__ = [
    "AudioTrack",
    "DiffusionParallelConfig",
    "DitServeError",
    "InvalidParameterError",
    "InvalidTypeError",
    "Limits",
    "LoRARequest",
    "Omni",
    "OmniDiffusionConfig",
    "OmniDiffusionSamplingParams",
    "RequestOutput",
]
__version__ = "0.1.0"
