"""The training configuration without torch: defaults, merging, run names.

Snakemake's rule files import this at parse time (every job start on a cluster parses the workflow again), so it
must stay free of torch and of anything slow to import; :mod:`maskface.train` re-exports all of it.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

# Mirrors workflow/schemas/config.schema.yaml `train:` (the schema is authoritative inside Snakemake).
DEFAULTS: dict[str, Any] = {
    "protocol": "lfw_unrestricted",
    "name": "sphereface",
    "lfw_dataset": None,
    "datasets": [],
    "folds": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "seeds": [1],
    "arch": {"depth": 20, "width": 1.0, "feature_dim": 512},
    "head": {"type": "asoftmax", "margin": None, "scale": None, "feature_norm": False, "grad": "exact",
             "lambda": {"base": 1000.0, "gamma": 0.12, "power": 1.0, "min": 5.0}},
    "iterations": 8000,
    "batch_size": 256,
    "lr": 0.05,
    "lr_steps": [5000, 7000],
    "lr_gamma": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0005,
    "bias_lr_mult": 2.0,
    "bias_decay": False,
    "mask_fraction": 0.0,
    "flip": True,
    "statuses": ["ok"],
    "min_images": 1,
    "device": "auto",
    "gpus": 1,
    "amp": "auto",
    "channels_last": True,
    "compile": False,
    "deterministic": False,
    "threads": 2,
    "prefetch": 4,
    "loader_threads": 2,
    "checkpoint_every": 500,
    "log_every": 50,
    "keep_checkpoint": True,
    "eval_masked": True,
    "eval_batch_size": 256,
}
# Keys that do not change the result (a checkpoint written under other values of these is resumed).
NON_SEMANTIC = ("device", "gpus", "compile", "threads", "prefetch", "loader_threads", "checkpoint_every", "log_every",
                "keep_checkpoint", "eval_masked", "eval_batch_size", "name", "folds", "seeds", "datasets",
                "lfw_dataset", "protocol")


def merged(cfg: Optional[Mapping[str, Any]]) -> dict:
    """``DEFAULTS`` updated (recursively for mappings) with ``cfg``."""
    def rec(base, upd):
        out = copy.deepcopy(base)
        for k, v in (upd or {}).items():
            out[k] = rec(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else copy.deepcopy(v)
        return out
    return rec(DEFAULTS, cfg)


def run_names(cfg: Mapping[str, Any]) -> dict[str, dict]:
    """{run name: {"fold": k or None, "seed": s}} of a train config."""
    cfg = merged(cfg)
    out = {}
    for s in cfg["seeds"]:
        if cfg["protocol"] == "lfw_unrestricted":
            for k in cfg["folds"]:
                out[f"{cfg['name']}-fold{int(k)}-seed{int(s)}"] = {"fold": int(k), "seed": int(s)}
        elif cfg["protocol"] == "external":
            out[f"{cfg['name']}-seed{int(s)}"] = {"fold": None, "seed": int(s)}
        else:
            raise ValueError(f"train.protocol must be lfw_unrestricted or external, got {cfg['protocol']!r}")
    return out
