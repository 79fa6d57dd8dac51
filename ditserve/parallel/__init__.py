"""Multi-device parallelism on torch.distributed: CFG-parallel, Ulysses and ring sequence parallelism, tensor
parallelism, VAE patch parallelism.

Where things live: runner.py (``MultiProcessRunner``, the engine's runner when ``world_size > 1``),
worker.py / rank.py (a rank's life and runner), channel.py (rank 0 -> workers messages), topology.py (rank
layout and groups), cfg.py (CFG split), sequence.py / attention.py (Ulysses, ring, attention with LSE),
sharding.py and families/ (what each model family shards), tensor.py (tensor-parallel weight splits),
caches.py (skip decisions agreed across ranks), install.py (start-up checks), launch.py (torchrun), bench.py
(scaling here). README.md has the support table.
"""
