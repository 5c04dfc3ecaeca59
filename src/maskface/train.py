"""SphereFace training: the loop (GPU bf16, channels_last, optional torch.compile, DDP under torchrun, CPU
fallback), exact resume, the protocols, the outputs of a run, and the command line the Snakemake rule runs.
Neighbours: the crop caches, training images and sample stream are in maskface.train_data; the fold
evaluation of a run and the summaries over runs in maskface.foldeval; the configuration in maskface.train_config.

Protocols (``train.protocol``)
    ``lfw_unrestricted``  LFW's unrestricted setting: for each evaluated fold ``k`` of pairs.txt (its folds are
        identity-disjoint) a model is trained on every LFW person who does not appear in fold ``k``'s pairs
        (people in no pair at all included), so the default config needs no CASIA. Its fold-``k`` accuracy uses
        the threshold chosen on the other nine folds' pairs scored *with the same model* (evaluation.m's
        getThreshold: mean of the best thresholds over 20,001 in [-1, 1], mean subtraction of the nine folds'
        mean feature; maskface.evaluate.verify_10fold, of which only the fold-``k`` entry is kept). Those nine
        folds are training people for that model, so the threshold is picked on seen identities: the protocol
        can only report fold ``k``; the other nine entries of the 10-fold run are reported as ``seen_folds_mean``
        for information, never as a result.
    ``external``  train on the ``role: train`` datasets (``train.datasets``, e.g. CASIA-WebFace), one model per
        seed, evaluated on LFW's ten folds by the evaluation stage.
    With ``train.validation: next_fold`` the people of fold ``k+1`` (fold 1 after 10) are held out of training
    too, and fold ``k``'s threshold and mean feature come from fold ``k+1``'s pairs only: nothing that shapes
    fold ``k``'s result was trained on (maskface.foldeval; the group's folds are then also an evaluation).

Fine-tuning a pretrained network (``train.init``: ``dlib-resnet`` or a checkpoint of it)
    The run starts from dlib's face ResNet (maskface.dlibnet) with its stem and first ``frozen_blocks`` blocks
    frozen; their output for every chip is cached once per dataset (maskface.chipcache), so the loop runs only
    the blocks above and the fc on 150x150 chips cut as the evaluation cuts them (masked: the mask stage's masks
    redrawn in the photo). The stage's heads apply; ``center_features`` gives the head the batch-centred
    features (dlib's descriptors share a large common component), ``head_init: class_means`` starts the head at
    the class means of the initial features, ``optimizer`` / ``lr_schedule`` / ``lr_mult`` (per parameter-name
    prefix; 0 freezes) set the schedule. model.pt is then a dlib-resnet checkpoint (maskface.features) whose
    network subtracts its mean training feature (with ``center_features``), so plain cosine scores it too.
    ``distill`` adds a feature-distillation term to the head's loss: the initial network (frozen, the teacher)
    gives every training image's clean feature once, and the sample served (clean or masked, same flip) is pulled
    to it, which keeps clean faces where the pretrained network put them and maps a masked face to its own
    clean feature.

Loop
    SGD with momentum (or AdamW); Caffe parameter groups (biases at ``bias_lr_mult`` x lr and no weight decay, as
    make_spherenet.py's ``lr_mult 2, decay_mult 0``; everything else, PReLU slopes and the head included, with
    ``weight_decay``); ``MultiStepLR`` at ``lr_steps`` (Caffe multistep: iteration ``t`` >= step uses the
    lower rate; or a half cosine to 0, ``lr_schedule: cosine``), each group's rate times its ``lr_mult``. The
    network runs under bf16 autocast on CUDA (``train.amp``), the head and loss in fp32.
    The A-Softmax lambda of training iteration ``t`` (0-based) is ``lambda(t + 1)``. ``train_run`` is four
    steps: set up (process group, data, model), resume, the loop, finalise; the log rows are a ``LogWindow``'s.

Checkpoint / resume (``results/models/{run}/checkpoint.pt``, written atomically every ``checkpoint_every``
iterations and at the end): model, head, optimizer (momentum), scheduler, iteration, RNG states (torch CPU and
CUDA, numpy, python), data position (samples consumed, epoch, offset), the log rows so far, the open log
window (summed over the ranks) and the digest of the run's spec. A run finding a checkpoint with the same spec
digest continues from it; a killed run re-runs at most ``checkpoint_every`` iterations and, on CPU or with
``train.deterministic``, ends with bit-identical weights (tests/test_train.py checks it, SIGKILL included).
A job stopped by SIGTERM or SIGHUP (``scancel``, a SLURM time limit) finishes its iteration and writes the
checkpoint first, so nothing is re-run; the ranks of a multi-GPU job agree every ``STOP_CHECK`` iterations
whether one was stopped, and stop together.
A different spec starts over.

Outputs of a run (``results/models/{run}/``): ``model.pt`` (maskface-embedder/1, see maskface.models),
``train_log.csv`` (iteration, loss, accuracy, lambda, lr, img_s, masked_share, distill: means over the last
``log_every`` iterations; accuracy = argmax of the training logits, margin included, as Caffe's Accuracy
layer on fc6), ``curve.png``.

Command line (what the Snakemake rule runs; torchrun for several GPUs)::

    python -m maskface.train run --spec results/models/RUN/spec.json
    torchrun --standalone --nproc_per_node 2 -m maskface.train run --spec results/models/RUN/spec.json
    python -m maskface.train cache --shards a.parquet b.parquet --npy clean.npy --index clean.parquet
    python -m maskface.train eval --model results/models/RUN/model.pt --pairs pairs.parquet --fold 1 \\
        --clean clean.npy clean.parquet [--masked masked.npy masked.parquet] --out fold_eval.json
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .datasets import parse_pairs
from .devices import claim_gpus, describe, precision_policy, require_gpus, resolve_device
from .fileio import atomic_path, read_json, write_json
from .foldeval import evaluate_fold
from .manifest import code_version, git_commit, sha256_file
from .models import MarginHead, make_head, preprocess, save_model, sphereface_net
from .train_config import AFTER_TRAINING, DIGEST_NEUTRAL, NON_SEMANTIC, merged
from .slurmjob import stop_with_job
from .staging import stage, unstage
from .train_data import BatchStream, StreamSampler, TrainData, build_cache, build_data, cache_files

log = logging.getLogger("maskface.train")

STATE_FORMAT = "maskface-train-state/1"
LOG_FIELDS = ("iteration", "loss", "accuracy", "lambda", "lr", "img_s", "masked_share", "distill")


# ------------------------------------------------------------------------------------------------ model

class TrainModule(nn.Module):
    """net + head; the network under autocast, the head in fp32. One module, so DDP sees every parameter.
    ``center``: the head sees the features less their batch mean (``train.center_features``).

    ``compile_net`` (``train.compile``) compiles the network alone, inside the module that DDP wraps. PyTorch
    advises compiling the DDP-wrapped module instead, so that the graph is split at DDP's gradient buckets and
    their all-reduce overlaps the backward; that would compile the head too, whose margin schedule (lambda)
    is a new Python number every iteration and would recompile. The cost: the compiled network's gradients
    reach DDP together at the end of its backward, so their all-reduce follows it (not measured on GPUs);
    the weights are those of an eager run (tests/test_train.py, 2 ranks compiled)."""

    def __init__(self, net: nn.Module, head: MarginHead, amp_dtype: Optional[torch.dtype], compile_net: bool,
                 center: bool = False):
        super().__init__()
        self.net, self.head = net, head
        self.amp_dtype, self.center = amp_dtype, bool(center)
        object.__setattr__(self, "_net_fwd", torch.compile(net) if compile_net else net)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, iteration: int, with_features: bool = False):
        """The head's logits; with ``with_features``, (logits, the network's fp32 features)."""
        dev = x.device.type
        if self.amp_dtype is None:
            feat = self._net_fwd(x).float()
            logits = self.head(self._centred(feat), labels, iteration)
        else:
            with torch.autocast(dev, dtype=self.amp_dtype):
                feat = self._net_fwd(x)
            with torch.autocast(dev, enabled=False):
                feat = feat.float()
                logits = self.head(self._centred(feat), labels, iteration)
        return (logits, feat) if with_features else logits

    def _centred(self, feat: torch.Tensor) -> torch.Tensor:
        return feat - feat.mean(dim=0, keepdim=True) if self.center else feat


def lr_multiplier(name: str, lr_mult: Mapping[str, float]) -> float:
    """``train.lr_mult`` of a parameter: the value of the longest prefix of ``name`` (at a dot) it holds, else 1."""
    best, mult = -1, 1.0
    for prefix, value in lr_mult.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, mult = len(prefix), float(value)
    return mult


def param_groups(module: nn.Module, cfg: Mapping[str, Any]) -> list[dict]:
    """Caffe's groups (weights; biases at ``bias_lr_mult`` without decay unless ``bias_decay``), split by
    ``train.lr_mult``; a parameter at multiplier 0, or frozen already, is left out and frozen."""
    groups: dict[tuple, list] = {}
    for name, p in module.named_parameters():
        mult = lr_multiplier(name, cfg["lr_mult"] or {})
        if mult == 0 or not p.requires_grad:
            p.requires_grad_(False)
            continue
        groups.setdefault((name.endswith(".bias"), -mult), []).append(p)
    out = []
    for (bias, neg_mult), params in sorted(groups.items()):
        lr = cfg["lr"] * -neg_mult * (cfg["bias_lr_mult"] if bias else 1.0)
        out.append({"params": params, "lr": lr,
                    "weight_decay": cfg["weight_decay"] if (not bias or cfg["bias_decay"]) else 0.0})
    return out


def make_optimizer(module: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    groups = param_groups(module, cfg)
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"])
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])


def make_schedule(opt: torch.optim.Optimizer, cfg: Mapping[str, Any]):
    """``multistep`` (Caffe: iteration t >= step uses the lower rate) or ``cosine`` (half a cosine to 0 over
    ``iterations``)."""
    if cfg["lr_schedule"] == "cosine":
        total = int(cfg["iterations"])
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg["lr_steps"]), gamma=cfg["lr_gamma"])


def build_network(cfg: Mapping[str, Any]) -> tuple[nn.Module, Optional[dict]]:
    """(network to train, input normalisation of a pretrained chip network or None): SphereFace from scratch,
    or with ``train.init`` the pretrained network less its frozen prefix (maskface.dlibnet.DlibResnetTop)."""
    if cfg["init"] is None:
        return sphereface_net(**cfg["arch"]), None
    from .chipcache import load_init
    from .dlibnet import DlibResnetTop

    net, normalisation = load_init(cfg["init"])
    return DlibResnetTop.from_network(net, int(cfg["frozen_blocks"])), normalisation


@torch.no_grad()
def _sample_features(net: nn.Module, data: TrainData, device: torch.device, idx: np.ndarray, masked: bool,
                     flip: bool = False, batch_size: int = 512) -> torch.Tensor:
    """fp32 features under ``net`` (in eval mode; left in train mode) of the samples ``idx``, their clean or
    masked version, plain or (mirrored caches) mirrored."""
    net.eval()
    feats = []
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        x = torch.from_numpy(data.gather(b, np.full(len(b), masked), np.full(len(b), flip))).to(device)
        x = x.float() if data.mirrored else preprocess(x)
        feats.append(net(x).float())
    net.train()
    return torch.cat(feats)


def training_features(net: nn.Module, data: TrainData, device: torch.device, use_masked: bool,
                      batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every training image under ``net`` (unflipped): clean and, with ``use_masked``,
    the masked ones too. The network is left in train mode."""
    parts = [np.arange(len(data))] + ([np.flatnonzero(data.has_masked)] if use_masked else [])
    feats = [_sample_features(net, data, device, idx, m > 0, batch_size=batch_size) for m, idx in enumerate(parts)]
    return torch.cat(feats), torch.from_numpy(data.labels[np.concatenate(parts)]).to(device)


@torch.no_grad()
def teacher_targets(net: nn.Module, data: TrainData, device: torch.device,
                    batch_size: int = 512) -> tuple[np.ndarray, float]:
    """``train.distill``: (each training image's clean feature under ``net``, plain and mirrored, float32
    (n, 2, d); their variance, the mean squared distance to their mean, which scales the term). Mirrored caches
    only (a chip network's frozen-prefix activations). The network is left in train mode."""
    if not data.mirrored:
        raise ValueError("train.distill needs train.init (a pretrained chip network's mirrored caches)")
    idx = np.arange(len(data))
    out = np.stack([_sample_features(net, data, device, idx, False, flip, batch_size).cpu().numpy()
                    for flip in (False, True)], axis=1)
    flat = out.reshape(-1, out.shape[2]).astype(np.float64)
    return out, float(((flat - flat.mean(axis=0)) ** 2).sum(axis=1).mean())


def distill_term(feat: torch.Tensor, target: torch.Tensor, variance: float) -> torch.Tensor:
    """The distillation term: mean squared distance of the features to their targets over ``variance``."""
    return (feat - target).pow(2).sum(dim=1).mean() / variance


@torch.no_grad()
def weight_ensemble(net: nn.Module, init: nn.Module, alpha: float) -> None:
    """``train.wise_alpha``: every floating-point weight and buffer of ``net`` becomes ``alpha`` times its own
    value plus ``1 - alpha`` times the same tensor of ``init`` (the network training started from): a
    weight-space ensemble of the fine-tuned and the pretrained network (WiSE-FT, Wortsman et al., CVPR 2022)."""
    own, start = net.state_dict(), init.state_dict()
    if own.keys() != start.keys():
        raise ValueError(f"train.wise_alpha: the initial network's tensors differ from the trained one's "
                         f"({sorted(set(own) ^ set(start))[:4]}...)")
    # start + alpha * (own - start): exact where a weight never moved (the frozen part), whatever alpha
    mixed = {k: start[k].to(v.device, v.dtype) + alpha * (v - start[k].to(v.device, v.dtype))
             if v.is_floating_point() else v for k, v in own.items()}
    net.load_state_dict(mixed)


@torch.no_grad()
def head_at_class_means(head: MarginHead, net: nn.Module, data: TrainData, device: torch.device,
                        center: bool, use_masked: bool) -> None:
    """``train.head_init: class_means``: each class weight = the normalised sum of its images' normalised
    features under the initial network (less the mean of all of them when ``center``), clean and, with
    ``use_masked``, masked."""
    f, y = training_features(net, data, device, use_masked)
    if center:
        f = f - f.mean(dim=0, keepdim=True)
    w = torch.zeros(data.num_classes, f.shape[1], device=device).index_add_(0, y, F.normalize(f, dim=1))
    head.weight.copy_(F.normalize(w, dim=1).to(head.weight.dtype))


def spec_digest(spec: Mapping[str, Any]) -> str:
    """Digest of what determines the training (the train keys less NON_SEMANTIC and AFTER_TRAINING, the data,
    fold, seed): the checkpoint of a run with the same digest is resumed."""
    train = {k: v for k, v in merged(spec.get("train")).items()
             if k not in NON_SEMANTIC and k not in AFTER_TRAINING and not (k in DIGEST_NEUTRAL and v == DIGEST_NEUTRAL[k])}
    data = [{"dataset": s["dataset"], **{k: _ident(s.get(k)) for k in ("manifest", "clean", "masked")}}
            for s in spec.get("sources", [])]
    core = {"train": train, "data": data, "fold": spec.get("fold"), "seed": spec.get("seed"),
            "exclude_fold": spec.get("exclude_fold"), "pairs": _ident(spec.get("pairs"))}
    init = train.get("init")
    if init not in (None, "dlib-resnet"):     # a checkpoint file: its content, not only its path
        core["init_file"] = _file_id(init)
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _ident(obj):
    """What identifies a data input in the digest: files by :func:`_file_id`, frames by content."""
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return "frame:" + hashlib.sha256(pd.util.hash_pandas_object(obj, index=False).values.tobytes()).hexdigest()[:16]
    if isinstance(obj, (str, os.PathLike)):
        return _file_id(obj)
    return [_ident(o) for o in obj]


def _file_id(path) -> str:
    """What identifies an input file: the sha256 of a Parquet index's or manifest's table without its metadata
    (so a cache rebuilt with the same rows but new provenance resumes a run), size only for the large .npy
    caches, else the file's sha256."""
    p = Path(path)
    if not p.exists():
        return f"missing:{p.name}"
    if p.suffix == ".npy":
        return f"{p.name}:{p.stat().st_size}"
    if p.suffix == ".parquet":
        return f"{p.name}:table:{_table_digest(p)}"
    return f"{p.name}:{sha256_file(p)[:16]}"


def _table_digest(path) -> str:
    """sha256 of a Parquet file's table (columns, types, rows) in Arrow's stream format, metadata dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path).replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0 on: A100, H100, RTX 30xx and later).
    V100 and T4 only emulate it, slower than fp32."""
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:      # torch < 2.3
        return torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 autocast on a GPU with native bf16, else none (fp32); ``bf16`` forces it."""
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return {"bf16": torch.bfloat16, "none": None}[amp]


def _rng_state(device: torch.device) -> dict:
    """The generators this process uses: CPU, numpy, Python, and the one CUDA device it trains on (never every
    visible device: a resume may see fewer)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if device.type == "cuda" and st.get("cuda") is not None:
        cuda = st["cuda"]
        if isinstance(cuda, (list, tuple)):   # checkpoints of earlier versions: every visible device's state
            index = device.index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


# -------------------------------------------------------------------------------------------- log window

class LogWindow:
    """The running sums of the current log window (loss, correct predictions, samples, masked samples) of this
    rank. A row of train_log.csv and the checkpoint's ``window`` are those sums summed over every rank
    (all-reduce when world > 1; every rank must call :meth:`row` and :meth:`state_dict` at the same iteration).
    A window cut by a checkpoint is saved already summed and restored on rank 0 alone, so the next row matches
    that of an uncut run."""

    def __init__(self, device: torch.device, world: int, rank: int, iterations: int):
        self.device, self.world, self.rank, self.iterations = device, int(world), int(rank), int(iterations)
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.float64)
        self.distill = torch.zeros((), device=device, dtype=torch.float64)
        self.n, self.masked, self.t0 = 0, 0, time.time()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, n_masked: int,
            distill: Optional[torch.Tensor] = None) -> None:
        self.loss += loss.detach().double() * len(labels)
        if distill is not None:
            self.distill += distill.detach().double() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum().double()
        self.n += len(labels)
        self.masked += n_masked

    def reduced(self) -> tuple[float, float, float, float, float]:
        """(loss, correct, samples, masked samples, distillation term) summed over every rank."""
        if self.world == 1:
            return float(self.loss), float(self.correct), float(self.n), float(self.masked), float(self.distill)
        stats = torch.stack([self.loss, self.correct,
                             torch.tensor(float(self.n), device=self.device, dtype=torch.float64),
                             torch.tensor(float(self.masked), device=self.device, dtype=torch.float64),
                             self.distill])
        torch.distributed.all_reduce(stats)
        return tuple(float(v) for v in stats)

    def row(self, done: int, lam: float, lr: float) -> dict:
        """The log row that closes the window at iteration ``done`` (logged on rank 0); the window restarts."""
        loss, correct, n, masked, distill = self.reduced()
        dt = time.time() - self.t0
        row = {"iteration": done, "loss": loss / n, "accuracy": correct / n, "lambda": lam, "lr": lr,
               "img_s": n / max(dt, 1e-9), "masked_share": masked / n, "distill": distill / n}
        if self.rank == 0:
            log.info("it %d/%d loss %.4f acc %.3f lambda %.2f lr %.4g %.1f img/s masked %.2f distill %.4f", done,
                     self.iterations, row["loss"], row["accuracy"], row["lambda"], row["lr"], row["img_s"],
                     row["masked_share"], row["distill"])
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"training loss is {row['loss']} at iteration {done}")
        self.loss.zero_()
        self.correct.zero_()
        self.distill.zero_()
        self.n, self.masked, self.t0 = 0, 0, time.time()
        return row

    def state_dict(self) -> dict:
        """The open window summed over the ranks, for the checkpoint."""
        loss, correct, n, masked, distill = self.reduced()
        return {"loss": loss, "correct": correct, "n": int(n), "masked": int(masked), "distill": distill}

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """Continue a saved window: on rank 0 only, its sums being every rank's."""
        if state and self.rank == 0:
            self.loss += state["loss"]
            self.correct += state["correct"]
            self.distill += state.get("distill", 0.0)
            self.n, self.masked = int(state["n"]), int(state["masked"])


def write_log_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in LOG_FIELDS})


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(it, [r["loss"] for r in rows], color="tab:red", label="head's loss")
    if any(r.get("distill") for r in rows):
        a1.plot(it, [r["distill"] for r in rows], color="tab:green", label="distillation term (unweighted)")
        a1.legend()
    a1.set_xlabel("iteration")
    a1.set_ylabel("training loss")
    a1.grid(alpha=0.3)
    a2.plot(it, [100 * r["accuracy"] for r in rows], color="tab:blue")
    a2.set_xlabel("iteration")
    a2.set_ylabel("training accuracy (%, margin logits)")
    a2.grid(alpha=0.3)
    a3 = a2.twinx()
    a3.plot(it, [r["lr"] for r in rows], color="tab:gray", ls="--", lw=1)
    a3.set_ylabel("lr (dashed)")
    a3.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------- run

@dataclasses.dataclass
class Run:
    """One training run in this process: its spec, settings, rank, data, model and optimizer."""
    spec: Mapping[str, Any]
    cfg: dict
    out: Path
    digest: str
    seed: int
    world: int
    rank: int
    local_rank: int
    device: torch.device
    data: TrainData
    net: nn.Module
    head: MarginHead
    module: TrainModule
    opt: torch.optim.Optimizer
    sched: Any
    normalisation: Optional[dict] = None       # a pretrained chip network's input normalisation
    distill_variance: float = 0.0              # train.distill: the teacher features' variance (0: no term)

    @property
    def iterations(self) -> int:
        return int(self.cfg["iterations"])

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"


def _init_process(cfg: Mapping[str, Any]) -> tuple[int, int, int, torch.device]:
    """(world, rank, local_rank, device) of this process, the process group joined under torchrun, threads,
    precision and determinism set."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(resolve_device(cfg["device"], "train.device", rank=local_rank))
    torch.set_num_threads(max(1, int(cfg["threads"])))
    if device.type == "cuda":
        torch.cuda.set_device(device)          # before the process group, so that NCCL binds this rank's GPU
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    precision_policy(device, training=True)     # convolutions may use TF32; the head's matmuls stay fp32
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return world, rank, local_rank, device


def _setup(spec: Mapping[str, Any], out_dir: str | os.PathLike, data: Optional[TrainData]) -> Run:
    """The process, the data and a freshly seeded model, optimizer and schedule."""
    cfg = merged(spec.get("train"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world, rank, local_rank, device = _init_process(cfg)
    amp = amp_dtype_for(cfg["amp"], device)
    if rank == 0:
        log.info("run %s: %s", spec.get("run"), describe(device, amp="bf16" if amp else "none", world_size=world))
    seed = int(spec.get("seed", 1))
    digest = spec_digest(spec)
    t_data = time.time()
    data = data if data is not None else build_data(spec)
    log.info("run %s: %d training images, %d classes, %.1f%% with a masked crop (%.1f s to open)",
             spec.get("run"), len(data), data.num_classes, 100 * data.has_masked.mean(), time.time() - t_data)

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    net, normalisation = build_network(cfg)
    variance = 0.0
    if float(cfg["distill"]) > 0:          # the teacher is the initial network: its clean features, once
        t0 = time.time()
        data.targets, variance = teacher_targets(net.to(device), data, device)
        log.info("distillation targets: the initial network's clean features of %d images, plain and mirrored "
                 "(variance %.4f, %.1f s)", len(data), variance, time.time() - t0)
    head = make_head(cfg["head"], net.feature_dim, data.num_classes)
    module = TrainModule(net, head, amp, bool(cfg["compile"]), center=cfg["center_features"]).to(device)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    if cfg["head_init"] == "class_means":
        t0 = time.time()
        head_at_class_means(head, net, data, device, cfg["center_features"], float(cfg["mask_fraction"]) > 0)
        log.info("head at the class means of the initial features (%.1f s)", time.time() - t0)
    opt = make_optimizer(module, cfg)
    sched = make_schedule(opt, cfg)
    return Run(spec, cfg, out, digest, seed, world, rank, local_rank, device, data, net, head, module, opt, sched,
               normalisation, variance)


def _resume(run: Run) -> tuple[int, list, Optional[dict]]:
    """(start iteration, log rows, open log window) from the run's checkpoint when it has the same spec digest,
    else a fresh start."""
    if not run.ckpt_path.exists():
        return 0, [], None
    state = torch.load(run.ckpt_path, map_location="cpu", weights_only=False)
    if state.get("format") != STATE_FORMAT or state.get("spec_digest") != run.digest:
        log.warning("%s belongs to another spec (digest %s, now %s): starting over", run.ckpt_path,
                    state.get("spec_digest"), run.digest)
        return 0, [], None
    run.net.load_state_dict(state["model"])
    run.head.load_state_dict(state["head"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], run.device)
    log.info("resumed %s at iteration %d (data position %d)", run.spec.get("run"), int(state["iteration"]),
             state["data"]["position"])
    return int(state["iteration"]), list(state["log"]), state.get("window")


def _save_checkpoint(run: Run, done: int, rows: list, window: LogWindow) -> None:
    """The checkpoint after ``done`` iterations (every rank calls it: the window is summed; rank 0 writes)."""
    win = window.state_dict()
    if run.rank != 0:
        return
    position = done * int(run.cfg["batch_size"])
    e, o = divmod(position, len(run.data))
    state = {"format": STATE_FORMAT, "spec_digest": run.digest, "iteration": done,
             "model": run.net.state_dict(), "head": run.head.state_dict(), "optimizer": run.opt.state_dict(),
             "scheduler": run.sched.state_dict(), "rng": _rng_state(run.device),
             "data": {"position": position, "epoch": e, "offset": o, "seed": run.seed, "n": len(run.data)},
             "log": rows, "run": run.spec.get("run"), "window": win}
    with atomic_path(run.ckpt_path) as tmp:
        torch.save(state, tmp)


def _step(run: Run, model: nn.Module, it: int, xb: torch.Tensor, yb: torch.Tensor, fb: torch.Tensor,
          tb: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float,
                                                      Optional[torch.Tensor]]:
    """One SGD step of iteration ``it`` on a batch (uint8 NHWC crops, or frozen-prefix activations): (the
    head's loss, logits, labels, the lr it used, the distillation term or None). ``tb``: the distillation
    targets (train.distill), whose term is added to the loss at weight ``distill``."""
    x = xb.to(run.device, non_blocking=True)
    y = yb.to(run.device, non_blocking=True)
    if run.data.mirrored:                                # frozen-prefix activations, flipped by the loader
        x = x.float()
    else:
        f = fb.to(run.device, non_blocking=True)
        x = torch.where(f.view(-1, 1, 1, 1), x.flip(2), x)  # NHWC: dim 2 is the width
        x = preprocess(x)
    if not run.cfg["channels_last"]:
        x = x.contiguous()
    logits, feat = model(x, y, it + 1, with_features=True)
    loss = total = F.cross_entropy(logits, y)
    distill = None
    if tb is not None:
        distill = distill_term(feat, tb.to(run.device, non_blocking=True), run.distill_variance)
        total = loss + float(run.cfg["distill"]) * distill
    run.opt.zero_grad(set_to_none=True)
    total.backward()
    run.opt.step()
    lr_used = run.opt.param_groups[0]["lr"]
    run.sched.step()
    return loss, logits, y, lr_used, distill


def _loop(run: Run, rows: list, start: int, stop: int, window_state: Optional[dict], hold=None,
          rank_stop: bool = False) -> int:
    """Iterations ``start`` to ``stop`` (log rows appended to ``rows``, checkpoints written); returns the
    iterations done. With ``hold`` or ``rank_stop`` (:func:`train_run`) a stop by signal comes between two
    iterations, after a checkpoint of the last one."""
    model = run.module
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(run.module, device_ids=[run.local_rank]
                                                    if run.device.type == "cuda" else None)
    cfg, data = run.cfg, run.data
    sampler = StreamSampler(len(data), run.seed, cfg["mask_fraction"], data.has_masked, cfg["flip"], data.variants)
    stream = BatchStream(data, sampler, start, stop, int(cfg["batch_size"]), run.rank, run.world,
                         cfg["prefetch"], pin=run.device.type == "cuda", workers=cfg["loader_threads"])
    log_every, ckpt_every = int(cfg["log_every"]), int(cfg["checkpoint_every"])
    run.module.train()
    window = LogWindow(run.device, run.world, run.rank, run.iterations)
    window.load_state_dict(window_state)
    done = saved = start
    # SIGTERM / SIGHUP wait for the iteration's end (Ctrl-C does not), from the second iteration of this run on
    # (the first may compile or autotune for long). One process only: the ranks of a multi-GPU run would each
    # stop at their own iteration and the checkpoint's all-reduce would not match; they use rank_stop instead.
    held = hold is not None and run.world == 1
    boundary = True                 # between two iterations: a checkpoint may be written
    flags = _rank_stop_flag() if rank_stop and run.world > 1 else contextlib.nullcontext()
    try:
        with flags as stop_flag:
            for it, xb, yb, fb, n_masked, tb in stream:
                boundary = False
                with hold(ctrl_c=False) if held and it > start else contextlib.nullcontext():
                    loss, logits, y, lr_used, distill = _step(run, model, it, xb, yb, fb, tb)
                    window.add(loss, logits, y, n_masked, distill)
                    done = it + 1
                    if done % log_every == 0 or done == run.iterations:
                        rows.append(window.row(done, run.head.lambda_at(done), lr_used))
                    if done % ckpt_every == 0 or done == stop:
                        _save_checkpoint(run, done, rows, window)
                        saved = done
                    boundary = True
                if stop_flag is not None and done % STOP_CHECK == 0 and done < stop:
                    signum = _ranks_stop(run, stop_flag)
                    if signum:
                        if done > saved:
                            _save_checkpoint(run, done, rows, window)   # every rank: the window is all-reduced
                        if run.rank == 0:
                            log.warning("stopped after iteration %d of %d: checkpoint written, the next run of "
                                        "%s resumes there", done, run.iterations, run.spec.get("run"))
                        raise SystemExit(128 + signum)
    except SystemExit:
        if held and boundary and done > saved:
            _save_checkpoint(run, done, rows, window)
            log.warning("stopped after iteration %d of %d: checkpoint written, the next run of %s resumes there",
                        done, run.iterations, run.spec.get("run"))
        raise
    finally:
        stream.close()
    return done


STOP_CHECK = 10      # iterations between two checks of the ranks for a stop signal (each: an all-reduce of
                     # one int and a host sync)


def _ranks_stop(run: Run, stop_flag: Mapping[str, Any]) -> int:
    """The signal number any rank was stopped by (the largest), 0 when none: an all-reduce, so that every rank
    answers the same at the same iteration."""
    t = torch.tensor([int(stop_flag.get("signum") or 0)], dtype=torch.int32, device=run.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


@contextlib.contextmanager
def _rank_stop_flag():
    """In a rank of a multi-GPU run (torchrun passes the job's SIGTERM on to every rank): SIGTERM and SIGHUP
    only set ``flag["signum"]``, and the training loop stops every rank at the same iteration
    (:func:`_ranks_stop`). A rank's default would be to die mid-step, its checkpoint unwritten. Yields the flag."""
    flag: dict[str, Any] = {"signum": None}

    def _note(signum, frame):
        if flag["signum"] is None:
            log.warning("rank %s: signal %d, stopping after the ranks' next check", os.environ.get("RANK"), signum)
            flag["signum"] = signum

    before = {}
    for name in _EXITING:
        s = getattr(signal, name, None)
        if s is None or (s != signal.SIGTERM and signal.getsignal(s) is signal.SIG_IGN):
            continue
        before[s] = signal.signal(s, _note) or signal.SIG_DFL
    try:
        yield flag
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _trained_on(run: Run) -> dict:
    """Where the run's last stretch trained (its provenance in model.pt): device, ranks, AMP, torch, and on a
    GPU its name, CUDA and the TF32 policy in force (devices.precision_policy)."""
    out = {"device": run.device.type, "world_size": run.world,
           "amp": "bf16" if run.module.amp_dtype is not None else "none", "torch": str(torch.__version__)}
    if run.device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(run.device), cuda=torch.version.cuda,
                   conv_tf32=bool(torch.backends.cudnn.allow_tf32),
                   matmul_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return out


def _model_meta(run: Run, rows: Sequence[Mapping[str, Any]]) -> dict:
    cfg = run.cfg
    meta = {"run": run.spec.get("run"), "protocol": run.spec.get("protocol"), "fold": run.spec.get("fold"),
            "seed": run.seed, "iterations": run.iterations, "classes": run.data.num_classes, "images": len(run.data),
            "mask_fraction": cfg["mask_fraction"], "flip": cfg["flip"], "head": cfg["head"], "arch": cfg["arch"],
            "batch_size": cfg["batch_size"], "lr": cfg["lr"], "lr_steps": cfg["lr_steps"],
            "datasets": [s["dataset"] for s in run.spec.get("sources", [])], "spec_digest": run.digest,
            "validation": cfg["validation"], "people_fraction": cfg["people_fraction"],
            "final_loss": rows[-1]["loss"], "final_accuracy": rows[-1]["accuracy"],
            "training_channel_order": "RGB", "training_normalisation": "(p - 127.5) / 128",
            "trained_on": _trained_on(run)}
    if cfg["init"] is not None:
        meta.update({k: cfg[k] for k in ("init", "frozen_blocks", "lr_mult", "optimizer", "lr_schedule",
                                         "center_features", "head_init", "distill", "mask_variants",
                                         "wise_alpha")})
        meta.pop("arch")
        meta["training_normalisation"] = f"(p - mean {run.normalisation['mean']}) / 256, dlib's 150x150 chips"
    try:
        meta["code"] = code_version("models", "train", "train_data")
        meta["git_commit"] = git_commit()
    except Exception:  # noqa: BLE001 - provenance is best effort outside a checkout
        pass
    return meta


def _finalise(run: Run, rows: list, done: int) -> dict:
    """The run's summary; once every iteration is done, rank 0 writes model.pt, train_log.csv, curve.png and
    drops the checkpoint (unless ``keep_checkpoint``)."""
    summary = {"run": run.spec.get("run"), "iterations": done, "classes": run.data.num_classes,
               "images": len(run.data), "spec_digest": run.digest}
    if done < run.iterations:
        summary["stopped"] = True
        return summary
    if run.rank == 0:
        if not rows:
            raise RuntimeError("no log rows: iterations < 1?")
        if run.normalisation is not None:
            from .chipcache import save_chip_model

            alpha = float(run.cfg["wise_alpha"])
            if alpha != 1.0:         # the saved network only: the checkpoint keeps the fine-tuned weights
                weight_ensemble(run.net, build_network(run.cfg)[0].to(run.device), alpha)
                log.info("saved weights: %.2f x fine-tuned + %.2f x %s (train.wise_alpha)", alpha, 1 - alpha,
                         run.cfg["init"])

            center = None
            if run.cfg["center_features"]:      # the network subtracts its mean training feature itself
                feats, _ = training_features(run.net, run.data, run.device, float(run.cfg["mask_fraction"]) > 0)
                center = feats.mean(dim=0).cpu().numpy()
            save_chip_model(run.out / "model.pt", run.net, run.normalisation, _model_meta(run, rows), center)
        else:
            save_model(run.out / "model.pt", run.net, _model_meta(run, rows))
        write_log_csv(rows, run.out / "train_log.csv")
        plot_curve(rows, run.out / "curve.png", title=str(run.spec.get("run", "")))
        if not run.cfg["keep_checkpoint"]:
            run.ckpt_path.unlink(missing_ok=True)
        summary["final"] = rows[-1]
    if run.world > 1:
        torch.distributed.barrier()
    return summary


def train_run(spec: Mapping[str, Any], out_dir: str | os.PathLike, *, stop_after: Optional[int] = None,
              data: Optional[TrainData] = None, hold=None, rank_stop: bool = False) -> dict:
    """Train one run (see the module docstring). ``spec``: {"run", "seed", "fold", "exclude_fold", "pairs",
    "sources", "train"}. Writes model.pt, train_log.csv, curve.png (rank 0) unless stopped by ``stop_after``
    (after that many iterations, once the checkpoint is written: the interruption used by the tests).
    ``hold`` (from :func:`_stop_signals`, one process): a SIGTERM or SIGHUP during an iteration lets it finish,
    writes the checkpoint and then stops the run, so that the next run resumes exactly there. ``rank_stop``
    (a rank of a multi-GPU run, under torchrun): during the loop the ranks agree every ``STOP_CHECK``
    iterations whether any of them was sent SIGTERM or SIGHUP (:func:`_rank_stop_flag`), and if so all stop
    after the same iteration, checkpointed. The first iteration of a run (compilation, autotuning) and the set
    up before it are not held: a signal there stops the run at once.
    Returns a summary dict."""
    run = _setup(spec, out_dir, data)
    start, rows, window_state = _resume(run)
    stop = run.iterations if stop_after is None else min(run.iterations, int(stop_after))
    done = _loop(run, rows, start, stop, window_state, hold, rank_stop)
    return _finalise(run, rows, done)


def launch(spec: Mapping[str, Any], out_dir: str | os.PathLike) -> Optional[dict]:
    """The Snakemake job of a run: ``spec.json`` written into the run folder, then the run in this process, or
    for ``train.gpus`` > 1 under torchrun, one rank per GPU (returns None: the ranks log their own summary).
    Before torchrun a workstation's free GPUs are claimed (a cluster has chosen already), and a job that sees
    fewer GPUs than ranks stops: a rank without its own GPU would fail mid-start."""
    out = Path(out_dir)
    write_json(dict(spec), out / "spec.json")
    cfg = merged(spec.get("train"))
    gpus = int(cfg["gpus"])
    if gpus > 1 and cfg["device"] != "cpu":
        claim_gpus(gpus)
        require_gpus(gpus, "train.gpus")
    # stop_with_job: a SLURM job that is ending stops this run even where SLURM's SIGTERM reaches only the job
    # step's task (proctrack/cgroup), not this script
    with _stop_signals() as hold, stop_with_job():
        # the caches on the node's local disk, once for every rank (they inherit the mapping), removed at the end;
        # stage() fills `copies` as it goes, so a signal at any point leaves nothing that this finally misses
        copies: dict[str, str] = {}
        try:
            stage(cache_files(spec), str(cfg["stage"]), into=copies, hold=hold)
            if gpus <= 1:
                return train_run(spec, out, hold=hold)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                   "-m", "maskface.train", "run", "--spec", str(out / "spec.json")]
            log.info("launching %s", " ".join(cmd))
            _run_child(cmd, hold=hold)
            return None
        finally:
            unstage(copies)


_EXITING = ("SIGTERM", "SIGHUP")      # scancel / a SLURM time limit; the terminal closed


@contextlib.contextmanager
def _stop_signals():
    """SIGTERM (``scancel``, a SLURM time limit) and SIGHUP (the terminal closed; left ignored under ``nohup``)
    raise SystemExit(128 + signal) in this process, so that its ``finally`` blocks run: staged copies removed,
    torchrun stopped. Python's default is to die on the spot. A second such signal is ignored, so it cannot cut
    the clean-up short.

    Yields ``hold``: a context manager for the few instructions that a signal must not split (a staged folder
    created but not yet recorded, torchrun started but not yet known, a training iteration). A SIGTERM, SIGHUP
    or SIGINT (Ctrl-C; not with ``hold(ctrl_c=False)``) that arrives inside waits for its end and is raised
    there; when the block ends with an error of its own, that error goes on instead. Only the main thread can
    take signals; elsewhere nothing is installed and ``hold`` does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda ctrl_c=True: contextlib.nullcontext()
        return
    state: dict[str, Any] = {"held": 0, "pending": None}
    exiting = [getattr(signal, name) for name in _EXITING if hasattr(signal, name)]

    def _raise(signum: int):
        log.warning("stopped by signal %d", signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _exit(signum, frame):
        for s in exiting:                     # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        if state["held"]:
            state["pending"] = state["pending"] or signum
            return
        _raise(signum)

    def _interrupt(signum, frame):
        state["pending"] = state["pending"] or signum

    @contextlib.contextmanager
    def hold(ctrl_c: bool = True):
        # Ctrl-C too: Python's own handler would raise KeyboardInterrupt at the same bad moment (a handler
        # the user set, or SIGINT ignored, is left alone); ctrl_c=False leaves Ctrl-C immediate
        swap = ctrl_c and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if swap:
            signal.signal(signal.SIGINT, _interrupt)
        state["held"] += 1
        ended = False
        try:
            yield
            ended = True
        finally:
            state["held"] -= 1
            if swap:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if not state["held"] and state["pending"]:
                signum, state["pending"] = state["pending"], None
                if ended:
                    _raise(signum)
                # else the body's own error goes on (the step is half done): it stops the job anyway
                log.warning("stopped by signal %d, during an error that goes first", signum)

    before = {}
    for s in exiting:
        current = signal.getsignal(s)
        if s != signal.SIGTERM and current is signal.SIG_IGN:      # nohup: stay as asked
            continue
        before[s] = signal.signal(s, _exit)
        if before[s] is None:                                      # installed from C: restore the default
            before[s] = signal.SIG_DFL
    try:
        yield hold
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _run_child(cmd: Sequence[str], grace: float = 45.0, hold=contextlib.nullcontext) -> None:
    """Run torchrun and wait; when this job is stopped meanwhile, pass SIGTERM on (torchrun stops its ranks,
    killing them after its own 30 s) and wait up to ``grace`` seconds before killing it. ``hold`` (from
    :func:`_stop_signals`) keeps a signal from landing between the start of the child and ``child`` being set."""
    child: Optional[subprocess.Popen] = None
    try:
        with hold():
            child = subprocess.Popen(list(cmd), stdout=sys.stdout, stderr=sys.stderr)
        rc = child.wait()
    except BaseException:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise
    if rc != 0:
        raise subprocess.CalledProcessError(rc, list(cmd))


# ------------------------------------------------------------------------------------------------- CLI

def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="maskface train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one run from its spec JSON (torchrun-compatible)")
    r.add_argument("--spec", required=True)
    r.add_argument("--out", help="run folder (default: the spec's folder)")
    r.add_argument("--stop-after", type=int, default=None)
    c = sub.add_parser("cache", help="decode crop shards into a uint8 .npy + index")
    c.add_argument("--shards", nargs="+", required=True)
    c.add_argument("--npy", required=True)
    c.add_argument("--index", required=True)
    c.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("eval", help="fold accuracy (clean/mixed/masked) of a lfw_unrestricted model")
    e.add_argument("--model", required=True)
    e.add_argument("--pairs", required=True, help="pairs.parquet or pairs.txt")
    e.add_argument("--fold", type=int, required=True)
    e.add_argument("--clean", nargs=2, required=True, metavar=("NPY", "INDEX"))
    e.add_argument("--masked", nargs=2, metavar=("NPY", "INDEX"))
    e.add_argument("--out", required=True)
    e.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.cmd == "run":
        spec = read_json(a.spec)
        try:
            res = train_run(spec, a.out or Path(a.spec).parent, stop_after=a.stop_after,
                            rank_stop=int(os.environ.get("WORLD_SIZE", "1")) > 1)
        finally:
            if torch.distributed.is_initialized():      # torchrun's ranks: leave the group cleanly
                torch.distributed.destroy_process_group()
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res, default=str))
    elif a.cmd == "cache":
        build_cache(a.shards, a.npy, a.index, threads=a.threads)
    else:
        pairs = pd.read_parquet(a.pairs) if a.pairs.endswith(".parquet") else parse_pairs(a.pairs)
        write_json(evaluate_fold(a.model, pairs, a.fold, tuple(a.clean), tuple(a.masked) if a.masked else None,
                                 threads=a.threads), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
