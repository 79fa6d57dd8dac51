"""Multi-device parallelism on torch.distributed: CFG-parallel, Ulysses and ring sequence parallelism.

``MultiProcessRunner`` (runner.py) is the engine's runner when ``parallel_config.world_size > 1``; the rank
layout is in topology.py, the attention math in attention.py / sequence.py, the CFG split in cfg.py, and what
each model family shards in families/.
"""
