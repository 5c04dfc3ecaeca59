"""The training configuration without torch: defaults, merging, run names.

Snakemake's rule files import this at parse time (every job start on a cluster parses the workflow again), so it
must stay free of torch and of anything slow to import. The training that reads it is maskface.train (the
loop) and maskface.train_data (the data).
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
    "mask_variants": 1,
    "flip": True,
    "init": None,
    "frozen_blocks": 0,
    "lr_mult": {},
    "optimizer": "sgd",
    "lr_schedule": "multistep",
    "center_features": False,
    "head_init": "random",
    "distill": 0.0,
    "wise_alpha": 1.0,
    "validation": "none",
    "statuses": ["ok"],
    "min_images": 1,
    "people_fraction": 1.0,
    "device": "auto",
    "gpus": 1,
    "max_cpu_hours": 1.0,
    "amp": "auto",
    "channels_last": True,
    "compile": False,
    "deterministic": False,
    "threads": 2,
    "prefetch": 4,
    "loader_threads": 2,
    "stage": "auto",
    "checkpoint_every": 500,
    "log_every": 50,
    "keep_checkpoint": True,
    "eval_masked": True,
    "eval_batch_size": 256,
    "preset": "none",
    "mask_fractions": None,
}
# Keys that do not change the result (a checkpoint written under other values of these is resumed).
NON_SEMANTIC = ("preset", "mask_fractions", "device", "gpus", "max_cpu_hours", "compile", "threads", "prefetch", "loader_threads", "stage", "checkpoint_every", "log_every",
                "keep_checkpoint", "eval_masked", "eval_batch_size", "name", "folds", "seeds", "datasets",
                "lfw_dataset", "protocol")


# Keys applied to the network once training has ended (train.wise_alpha): left out of a run's digest, so that
# changing one finishes the run again from its kept checkpoint instead of training it again.
AFTER_TRAINING = ("wise_alpha",)


# Keys left out of a run's digest at these values: options added after runs existed, so that a run which does
# not use one still resumes its checkpoint.
DIGEST_NEUTRAL = {"mask_variants": 1, "people_fraction": 1.0}


def merged(cfg: Optional[Mapping[str, Any]]) -> dict:
    """``DEFAULTS`` updated (recursively for mappings) with ``cfg``."""
    def rec(base, upd):
        out = copy.deepcopy(base)
        for k, v in (upd or {}).items():
            out[k] = rec(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else copy.deepcopy(v)
        return out
    return rec(DEFAULTS, cfg)


# Training sizes picked by `train.preset` (auto: gpu where a GPU will train, else cpu), under the user's own keys.
PRESETS: dict[str, dict[str, Any]] = {
    # the defaults: SphereFace-20, 8,000 iterations x 256 on every LFW fold (about 10 min a run on one H100)
    "gpu": {},
    # SphereFace-4 at half width on fold 1, about 12 minutes a run on one CPU core
    # (config/cpu-quick.yaml holds the same settings, with the measured reasons for each)
    "cpu": {"folds": [1], "arch": {"depth": 4, "width": 0.5}, "min_images": 2, "batch_size": 64,
            "iterations": 1200, "lr": 0.0125, "lr_steps": [800, 1050], "device": "cpu", "threads": 1,
            "checkpoint_every": 100, "log_every": 25, "eval_batch_size": 128},
}


def with_preset(user: Optional[Mapping[str, Any]], gpu_here: bool) -> dict:
    """The train config of a run: ``DEFAULTS``, then the preset, then what the user set (``user``: the train
    section as written, before the schema's defaults). ``preset: auto`` becomes ``gpu`` when a GPU will train
    (``gpu_here``), else ``cpu``; a preset other than none is appended to the run name and kept in the config
    (so in every run's spec and provenance)."""
    user = dict(user or {})
    preset = user.get("preset", DEFAULTS["preset"])
    if preset == "auto":
        preset = "gpu" if gpu_here else "cpu"
    if preset not in PRESETS and preset != "none":
        raise ValueError(f"train.preset must be auto, gpu, cpu or none, got {preset!r}")
    # a key the user sets replaces the preset's whole value (arch: {depth: 20} is SphereFace-20 at the default
    # width, not at the preset's); the defaults fill in the rest
    base = {k: v for k, v in PRESETS.get(preset, {}).items() if k not in user}
    cfg = merged({**copy.deepcopy(base), **copy.deepcopy(user)})
    cfg["preset"] = preset
    if preset != "none":
        cfg["name"] = f"{cfg['name']}-{preset}"
    if float(cfg["distill"]) > 0 and cfg["init"] is None:
        raise ValueError(f"train.distill {cfg['distill']} needs train.init (the pretrained network whose clean "
                         f"features are the targets); SphereFace from scratch has no teacher")
    if float(cfg["wise_alpha"]) != 1.0 and cfg["init"] is None:
        raise ValueError(f"train.wise_alpha {cfg['wise_alpha']} needs train.init (the pretrained weights the "
                         f"fine-tuned ones are averaged with); SphereFace from scratch has none")
    if not 0.0 <= float(cfg["wise_alpha"]) <= 1.0:
        raise ValueError(f"train.wise_alpha must be in [0, 1], got {cfg['wise_alpha']}")
    if not 0.0 < float(cfg["people_fraction"]) <= 1.0:
        raise ValueError(f"train.people_fraction must be in (0, 1], got {cfg['people_fraction']}")
    if int(cfg["mask_variants"]) > 1 and cfg["init"] is None:
        raise ValueError(f"train.mask_variants {cfg['mask_variants']} needs train.init (the masked chips of a chip "
                         f"network); SphereFace's 112x96 crops have the mask stage's one mask per image")
    return cfg


def mask_tag(fraction: float) -> str:
    """``m50`` for a mask fraction of 0.5: the run-name part of a mask_fractions comparison."""
    return f"m{int(round(100 * float(fraction)))}"


def run_names(cfg: Mapping[str, Any]) -> dict[str, dict]:
    """{run name: {"fold": k or None, "seed": s, "mask_fraction": f, "group": name}} of a train config. With
    ``mask_fractions`` (e.g. [0.5, 0.0]: the same runs with and without masks), one run per fraction, named
    ``{name}-m50-...`` and grouped by that prefix."""
    cfg = merged(cfg)
    fractions = cfg["mask_fractions"]
    groups = ([(f"{cfg['name']}-{mask_tag(f)}", float(f)) for f in fractions] if fractions
              else [(cfg["name"], float(cfg["mask_fraction"]))])
    if len({g for g, _ in groups}) != len(groups):
        raise ValueError(f"train.mask_fractions {fractions}: two fractions give the same run name")
    if cfg["protocol"] not in ("lfw_unrestricted", "external"):
        raise ValueError(f"train.protocol must be lfw_unrestricted or external, got {cfg['protocol']!r}")
    folds = [int(k) for k in cfg["folds"]] if cfg["protocol"] == "lfw_unrestricted" else [None]
    out = {}
    for group, frac in groups:
        for s in cfg["seeds"]:
            for k in folds:
                name = f"{group}-seed{int(s)}" if k is None else f"{group}-fold{k}-seed{int(s)}"
                out[name] = {"fold": k, "seed": int(s), "mask_fraction": frac, "group": group}
    return out


# --------------------------------------------------------------------------- CPU training time, estimated

BASE_CHANNELS = (64, 128, 256, 512)
DEPTH_UNITS = {4: (0, 0, 0, 0), 10: (0, 1, 2, 0), 20: (1, 2, 4, 1), 36: (2, 4, 8, 2), 64: (3, 8, 16, 3)}
# Per CPU core, measured on a 2-core x86 VM: SphereFace-20 (1.75 GMAC forward) trains at about 8 img/s on
# 2 cores, i.e. a training step (forward + backward = 3x the forward) at ~21 GMAC/s per core; the fixed cost
# per image (loader, head, optimizer) is fitted to SphereFace-4 at half width (0.045 GMAC), which trained at
# 60-110 img/s on 1 core (results/logs/train of config/cpu-quick.yaml).
CPU_GMAC_PER_S = 21.0
CPU_OVERHEAD_S = 0.004


def forward_gmacs(arch: Mapping[str, Any]) -> float:
    """Multiply-accumulates (10^9) of one 112x96 image through a SphereFace network, forward."""
    width = float(arch.get("width", 1.0))
    units = arch.get("units") or DEPTH_UNITS[int(arch.get("depth", 20))]
    chans = [max(8, int(round(c * width))) for c in BASE_CHANNELS]     # as models.SphereNet
    sizes = [(56, 48), (28, 24), (14, 12), (7, 6)]
    macs, cin = 0, 3
    for c, (h, w), u in zip(chans, sizes, units):
        macs += h * w * c * cin * 9 + int(u) * 2 * h * w * c * c * 9
        cin = c
    macs += chans[-1] * 7 * 6 * int(arch.get("feature_dim", 512))
    return macs / 1e9


# Multiply-accumulates (10^9) of dlib's ResNet on a 150x150 chip: the stem, then each of its 14 residual blocks
# (counted with forward hooks on maskface.dlibnet.DlibResnet).
DLIB_STEM_GMACS = 0.0244
DLIB_BLOCK_GMACS = (0.0226, 0.0226, 0.0226, 0.0160, 0.0213, 0.0213, 0.0213, 0.0142, 0.0189, 0.0189, 0.0080,
                    0.0189, 0.0189, 0.0012)


def trained_gmacs(cfg: Mapping[str, Any]) -> float:
    """Forward GMACs per image of the part of the network a run trains: SphereFace whole, or a pretrained
    chip network (``init``) above its ``frozen_blocks`` (the frozen part runs once, in the prefix cache)."""
    if cfg.get("init") is None:
        return forward_gmacs(cfg["arch"])
    k = int(cfg.get("frozen_blocks", 0))
    return (0.0 if k else DLIB_STEM_GMACS) + sum(DLIB_BLOCK_GMACS[k:])


def cpu_core_seconds_per_image(cfg: Mapping[str, Any]) -> float:
    """Estimated core-seconds to train on one image (one sample of one iteration) on a CPU. Measured for a
    fine-tune of dlib's blocks 10-13 (init dlib-resnet, frozen_blocks 10, batch 128): 6 ms a sample on 2 cores
    against 11 ms estimated."""
    return 3 * trained_gmacs(cfg) / CPU_GMAC_PER_S + CPU_OVERHEAD_S


def cpu_training_estimate(cfg: Mapping[str, Any], runs: int, cores: int) -> dict:
    """Estimated CPU training cost of ``runs`` runs of ``cfg``: core-hours, and wall hours on ``cores`` cores
    (runs side by side, each on ``cfg["threads"]`` threads)."""
    cfg = merged(cfg)
    per_run = int(cfg["iterations"]) * int(cfg["batch_size"]) * cpu_core_seconds_per_image(cfg)
    used = max(1, min(int(cores), int(cfg["threads"]) * int(cfg["gpus"]) * max(1, runs)))
    return {"runs": runs, "core_hours": runs * per_run / 3600, "wall_hours": runs * per_run / 3600 / used,
            "cores": used, "img_s_per_core": 1 / cpu_core_seconds_per_image(cfg)}


def cpu_training_refusal(cfg: Mapping[str, Any], runs: int, cores: int) -> Optional[str]:
    """The message that refuses a CPU training run estimated longer than ``train.max_cpu_hours``, or None."""
    cfg = merged(cfg)
    est = cpu_training_estimate(cfg, runs, cores)
    if runs == 0 or est["wall_hours"] <= float(cfg["max_cpu_hours"]):
        return None
    arch = cfg["arch"]
    what = (f"fine-tuning run(s) of {cfg['init']} above block {cfg['frozen_blocks']}" if cfg["init"] is not None
            else f"SphereFace-{arch.get('depth', 20)} run(s) (width {arch.get('width', 1.0)})")
    return (f"train: {runs} {what} of "
            f"{int(cfg['iterations']):,} iterations x {int(cfg['batch_size'])} images would train on the CPU: about "
            f"{est['core_hours']:,.1f} core-hours, {est['wall_hours']:,.1f} h on {est['cores']} core(s) (estimated at "
            f"{est['img_s_per_core']:.1f} img/s per core), more than train.max_cpu_hours ({float(cfg['max_cpu_hours']):g}). "
            f"Ways out: a CPU-sized run (train: {{preset: cpu}}, or --configfile config/cpu-quick.yaml); a GPU (train.device: cuda on a machine "
            f"with one, or a cluster profile); stages without training (snakemake align mask); or accept the wait "
            f"with a config file holding train: {{max_cpu_hours: {int(est['wall_hours']) + 1}}}.")
