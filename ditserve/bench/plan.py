"""What the bench runs: the baselines, our cache backends, and the peers.

Every run is a ``RunSpec``. Where the model has a searched calibration (``ditserve calibrate``), each of our
backends runs the points of its front, every knob set; the peers whose libraries expose knobs run the front of the
same search when the bench ran it for them (``--search-peers``), else a sweep of their main knob. Our
``cache_dit`` backend and the cache-dit library applied directly to diffusers get the same settings, so the two
rows of a setting compare the engines, not the knobs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: who runs the images: our engine, diffusers' own pipeline ``__call__``, or cache-dit on that pipeline
System = Literal["ditserve", "diffusers", "cache-dit"]
#: how the row is drawn and summarised
Group = Literal["baseline", "ours", "peer"]

UNCACHED = "uncached"
#: the name each of our backends' rows carry
OUR_METHODS = {"tea_cache": "TeaCache", "mag_cache": "MagCache", "cache_dit": "Cache-DiT"}
#: searched fronts: our backend name, or a peer's (system, method), -> the configs of its front
OurFronts = Mapping[str, Sequence[dict[str, Any]]]
PeerFronts = Mapping[tuple[str, str], Sequence[dict[str, Any]]]


@dataclass(frozen=True)
class RunSpec:
    system: System
    #: "uncached", our backend name ("tea_cache", ...) or the peer method ("FirstBlockCache", "DBCache", ...)
    method: str
    group: Group
    #: the method's options as the user would write them (our ``cache_config``, a diffusers config's fields)
    config: dict[str, Any] = field(default_factory=dict)
    #: our ``cache_backend`` name (ditserve rows only)
    backend: str | None = None

    @property
    def label(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.system} {self.method}" + (f" ({options})" if options else "")

    def key(self) -> str:
        return json.dumps([self.system, self.method, self.config], sort_keys=True, default=str)


def baselines() -> list[RunSpec]:
    return [RunSpec("diffusers", UNCACHED, "baseline"), RunSpec("ditserve", UNCACHED, "baseline")]


def _ours(backend: str, method: str, configs: list[dict[str, Any]]) -> list[RunSpec]:
    return [RunSpec("ditserve", method, "ours", config, backend) for config in configs]


def _peers(system: System, method: str, configs: list[dict[str, Any]]) -> list[RunSpec]:
    return [RunSpec(system, method, "peer", config) for config in configs]


def _cache_dit_settings(thresholds: list[float], taylor_threshold: float) -> list[tuple[str, dict[str, Any]]]:
    """DBCache over its threshold, then + TaylorSeer, then + TaylorSeer + SCM: (method name, config). SCM's
    "dynamic" policy still asks the threshold before reusing a masked step; "static" follows the mask."""
    base = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4}
    settings = [("DBCache", {**base, "residual_diff_threshold": t}) for t in thresholds]
    taylor = {**base, "residual_diff_threshold": taylor_threshold, "enable_taylorseer": True, "taylorseer_order": 1}
    settings.append(("DBCache+TaylorSeer", taylor))
    settings += [("DBCache+TaylorSeer+SCM", {**taylor, "scm_steps_mask_policy": mask, "scm_steps_policy": policy})
                 for mask, policy in (("fast", "dynamic"), ("ultra", "static"))]
    return settings


#: the same knob values for our method and the peer that reads the same signal, so neither side gets a finer sweep
FIRST_BLOCK_THRESHOLDS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.8)
MAG_THRESHOLDS = (0.03, 0.06, 0.09, 0.12, 0.24)


def full_plan(ours: OurFronts | None = None, searched_peers: PeerFronts | None = None) -> list[RunSpec]:
    """The full run (50 steps on the demo model): each method's searched front where there is one, else a sweep
    of its main knob from "skips little" to "skips most"."""
    ours, searched_peers = ours or {}, searched_peers or {}
    cache_dit = _cache_dit_settings([0.08, 0.12, 0.24, 0.4, 0.6], taylor_threshold=0.4)
    ours_specs = [
        *_ours("tea_cache", "TeaCache", ours.get("tea_cache") or [{"rel_l1_thresh": t} for t in FIRST_BLOCK_THRESHOLDS]),
        *_ours("mag_cache", "MagCache", ours.get("mag_cache") or [{"magcache_thresh": t} for t in MAG_THRESHOLDS]),
    ]
    if ours.get("cache_dit"):
        ours_specs += _ours("cache_dit", "Cache-DiT", ours["cache_dit"])
        # unsearched, the library runs our front: the rows then compare the engines
        cache_dit_peer = [("DBCache", config) for config in ours["cache_dit"]]
    else:
        ours_specs += [RunSpec("ditserve", f"Cache-DiT {method}", "ours", config, "cache_dit")
                       for method, config in cache_dit]
        cache_dit_peer = cache_dit
    if searched_peers.get(("cache-dit", "DBCache")):
        cache_dit_peer = [("DBCache", config) for config in searched_peers[("cache-dit", "DBCache")]]

    def peer(method: str, fallback: list[dict[str, Any]]) -> list[RunSpec]:
        return _peers("diffusers", method, list(searched_peers.get(("diffusers", method)) or fallback))

    return [
        *baselines(), *ours_specs,
        *peer("FirstBlockCache", [{"threshold": t} for t in FIRST_BLOCK_THRESHOLDS]),
        *peer("TaylorSeerCache", [{"cache_interval": n} for n in (3, 5, 8)]),
        *peer("MagCache", [{"threshold": t} for t in MAG_THRESHOLDS]),
        *_peers("diffusers", "PyramidAttentionBroadcast", [{"spatial_attention_block_skip_range": n} for n in (2, 3)]),
        *_peers("diffusers", "FasterCache", [{"spatial_attention_block_skip_range": 2}]),
        *_peers("diffusers", "SeaCache", [{}]),
        *_peers("diffusers", "TextKVCache", [{}]),
        *[RunSpec("cache-dit", method, "peer", config) for method, config in cache_dit_peer],
    ]


def quick_plan() -> list[RunSpec]:
    """One setting per method: a smoke run on a tiny random model, where thresholds must be high to skip."""
    taylor = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1,
              "residual_diff_threshold": 2.0, "enable_taylorseer": True, "taylorseer_order": 1}
    return [
        *baselines(),
        *_ours("tea_cache", "TeaCache", [{"rel_l1_thresh": 2.0}]),
        *_ours("mag_cache", "MagCache", [{"magcache_thresh": 1.0}]),
        RunSpec("ditserve", "Cache-DiT DBCache+TaylorSeer", "ours", taylor, "cache_dit"),
        *_peers("diffusers", "FirstBlockCache", [{"threshold": 2.0}]),
        *_peers("diffusers", "TaylorSeerCache", [{"cache_interval": 2, "disable_cache_before_step": 1}]),
        *_peers("diffusers", "MagCache", [{"threshold": 1.0, "retention_ratio": 0.2}]),
        *_peers("diffusers", "SeaCache", [{}]),
        RunSpec("cache-dit", "DBCache+TaylorSeer", "peer", taylor),
    ]
