"""One rank's runner: a ``ModelRunner`` with the parallel plan installed. Rank 0 decides every step's running set
and sends the same plan to every rank (an abort seen by rank 0 drops the request on every rank at the same
step, so no rank is left waiting in a collective)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ditserve.cache.base import CacheBackend
from ditserve.cache.selector import build_cache_backend
from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.runner import ModelRunner
from ditserve.errors import ParallelConfigError
from ditserve.levers import load_options
from ditserve.parallel.caches import agree_on_skips
from ditserve.parallel.cfg import CfgParallelPredictor
from ditserve.parallel.install import check_request_sequence, install_parallelism
from ditserve.parallel.topology import ParallelTopology
from ditserve.parallel.vae_patch import install_vae_patch_parallel
from ditserve.request import Request


@dataclass
class RequestSpec:
    """What a worker needs of a request (a Request minus its future, event and callback: not picklable)."""

    prompt: str
    params: OmniDiffusionSamplingParams
    request_id: str
    images: list[Image.Image] = field(default_factory=list)

    @classmethod
    def of(cls, request: Request) -> RequestSpec:
        return cls(prompt=request.prompt, params=request.params, request_id=request.request_id,
                   images=list(request.images))

    def to_request(self) -> Request:
        return Request(prompt=self.prompt, params=self.params, images=self.images, request_id=self.request_id)


def rank_device(device: str, local_rank: int) -> str:
    """Each rank's own device: ``cuda:<local rank>`` on GPUs, ``cpu`` otherwise."""
    if device not in ("auto", "cpu", "cuda"):
        raise ParallelConfigError(
            f"device={device!r}: with a parallel config choose 'auto', 'cpu' or 'cuda' (rank i uses cuda:i)",
            param="device")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{local_rank}"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class RankRunner(ModelRunner):
    """The model runner of one rank. Rank 0 decodes (helped by the VAE group's ranks with VAE patch
    parallelism); the others return empty media."""

    def __init__(self, config: OmniDiffusionConfig, topology: ParallelTopology, local_rank: int) -> None:
        self.topology = topology  # read by _build_cache, which the base class calls
        super().__init__(dataclasses.replace(config, device=rank_device(config.device, local_rank)))
        self.plan = install_parallelism(self.adapter, topology)
        parallel = self.config.parallel_config
        if parallel.cfg_parallel_size > 1:
            self.predictor = CfgParallelPredictor(self.adapter.predict, topology, self.plan.output_shape,
                                                  lambda name: getattr(self.model.pipeline, name),
                                                  self.model.device)
        if self._shards_before_placing():
            self.model.pipeline.to(self.model.device)
        self.decodes = topology.is_driver
        if parallel.vae_patch_parallel_size > 1:
            install_vae_patch_parallel(self.model.pipeline.vae, parallel.vae_patch_parallel_size,
                                       parallel.world_size)
            # every rank of the VAE group takes part in the decode (only rank 0's images are returned)
            self.decodes = topology.rank < parallel.vae_patch_parallel_size

    def validate_request(self, request: Request) -> None:
        if self.config.parallel_config.sequence_parallel_size > 1:
            check_request_sequence(self.plan, self.adapter, self.config.parallel_config, request.params)

    def _shards_before_placing(self) -> bool:
        """Tensor parallelism exists to fit weights that one device cannot hold, so they are loaded into CPU
        memory, sharded there, and only then is each rank's shard moved to its device (unless an offload lever
        places them itself)."""
        placed_by_a_lever = load_options(self.config)["keep_on_cpu"]
        return self.config.parallel_config.tensor_parallel_size > 1 and not placed_by_a_lever

    def _load_options(self) -> dict[str, Any]:
        options = super()._load_options()
        if self._shards_before_placing():
            options["keep_on_cpu"] = True
        return options

    def _build_cache(self) -> CacheBackend | None:
        if self.config.cache_backend is None:
            return None
        backend = build_cache_backend(self.config.cache_backend, self.config.cache_config)
        agree_on_skips(backend, self.topology)
        backend.enable(self.model.pipeline, self.adapter)
        return backend
