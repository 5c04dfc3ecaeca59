"""SphereFace training: data from the aligned / masked manifests, the loop (GPU bf16, channels_last, optional
torch.compile, DDP under torchrun, CPU fallback), exact resume, protocols, the LFW fold evaluation of a run.

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

Data (pre-decoded uint8, so decoding never runs in the training loop)
    ``build_cache`` decodes a dataset's crops once from the Parquet shards (``image_id`` + PNG column) of the
    aligned stage (``variant=clean``) or the mask stage (``variant=masked``) into
    ``results/train_cache/{dataset}/{variant}.npy``: a (N, 112, 96, 3) uint8 array, RGB, opened memory-mapped,
    and ``{variant}.parquet`` mapping image_id to row. A batch is a fancy-index gather from that array (~16 MB
    for 512 crops) in a prefetch thread, a pinned host tensor, one non-blocking copy; flip and the
    ``(p - 127.5) / 128`` normalisation run on the device, and the NHWC uint8 batch permuted to NCHW *is*
    channels_last. Training images: aligned manifest rows with ``status`` in ``train.statuses`` (default
    ``ok``: SphereFace drops images without a detection from training), identities with at least
    ``train.min_images`` such images; labels = sorted ``"{dataset}/{identity}"``.

    Sample stream: the samples are an endless sequence of epochs; epoch ``e`` is a permutation drawn from
    ``numpy.random.default_rng([seed, e])``, together with, per sample, a uniform draw for "served masked"
    (``< train.mask_fraction``; a sample whose masked crop is missing is served clean) and one for the flip
    (``< 0.5`` when ``train.flip``). Global batch ``t`` is stream positions ``[t B, (t + 1) B)``; with DDP rank
    ``r`` of ``W`` takes the ``r``-th ``B / W`` slice (``train.batch_size`` is the global batch). The data
    position is therefore a pure function of (seed, iteration): resuming never replays or skips a sample.

Loop
    SGD with momentum; Caffe parameter groups (biases at ``bias_lr_mult`` x lr and no weight decay, as
    make_spherenet.py's ``lr_mult 2, decay_mult 0``; everything else, PReLU slopes and the head included, with
    ``weight_decay``); ``MultiStepLR`` at ``lr_steps`` (Caffe multistep: iteration ``t`` >= step uses the
    lower rate). The network runs under bf16 autocast on CUDA (``train.amp``), the head and loss in fp32.
    The A-Softmax lambda of training iteration ``t`` (0-based) is ``lambda(t + 1)``.

Checkpoint / resume (``results/models/{run}/checkpoint.pt``, written atomically every ``checkpoint_every``
iterations and at the end): model, head, optimizer (momentum), scheduler, iteration, RNG states (torch CPU and
CUDA, numpy, python), data position (samples consumed, epoch, offset), the log rows so far, and the digest of
the run's spec. A run finding a checkpoint with the same spec digest continues from it; a killed run re-runs
at most ``checkpoint_every`` iterations and, on CPU or with ``train.deterministic``, ends with bit-identical
weights (tests/test_train.py checks it, SIGKILL included). A different spec starts over.

Outputs of a run (``results/models/{run}/``): ``model.pt`` (maskface-embedder/1, see maskface.models),
``train_log.csv`` (iteration, loss, accuracy, lambda, lr, img_s, masked_share: means over the last
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
import collections
import copy
import csv
import hashlib
import json
import logging
import math
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import MarginHead, SphereNet, load_model, make_head, preprocess, save_model, sphereface_net

log = logging.getLogger("maskface.train")

CROP_SHAPE = (112, 96, 3)
STATE_FORMAT = "maskface-train-state/1"
LOG_FIELDS = ("iteration", "loss", "accuracy", "lambda", "lr", "img_s", "masked_share")

from .train_config import DEFAULTS, NON_SEMANTIC, merged, run_names  # noqa: F401 (re-exported)


# ------------------------------------------------------------------------------------------------ cache

def png_column(path: str | os.PathLike) -> str:
    """The PNG bytes column of a crops shard: ``png`` if present, else the only binary column."""
    schema = pq.read_schema(path)
    if "png" in schema.names:
        return "png"
    import pyarrow as pa

    cands = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if len(cands) != 1:
        raise ValueError(f"{path}: cannot tell which column holds the PNG crops (binary columns: {cands})")
    return cands[0]


def build_cache(shards: Sequence[str | os.PathLike], npy_path: str | os.PathLike, index_path: str | os.PathLike,
                *, threads: int = 2, prov: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
    """Decode every crop of ``shards`` (Parquet: image_id + PNG bytes; null = no crop) into a uint8
    (N, 112, 96, 3) ``.npy`` and an index Parquet (image_id, row, plus ``status`` when the shards have it)."""
    from .imageio import decode_png
    from .manifest import write_parquet

    frames = []
    for p in shards:
        col = png_column(p)
        names = pq.read_schema(p).names
        cols = ["image_id", col] + [c for c in ("status", "identity") if c in names]
        df = pq.read_table(p, columns=cols).to_pandas()
        df = df.rename(columns={col: "png"})
        frames.append(df[df["png"].notna()])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"image_id": [], "png": []})
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    if df["image_id"].duplicated().any():
        raise ValueError(f"duplicate image_id in shards, e.g. {df.loc[df['image_id'].duplicated(), 'image_id'].iloc[0]!r}")
    npy_path, index_path = Path(npy_path), Path(index_path)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy_path.with_name(f".{npy_path.name}.tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(df),) + CROP_SHAPE)

    def work(i: int) -> None:
        img = decode_png(df["png"].iat[i])
        if img.shape != CROP_SHAPE:
            raise ValueError(f"{df['image_id'].iat[i]}: crop is {img.shape}, expected {CROP_SHAPE} (SphereFace "
                             f"112x96 template)")
        arr[i] = img

    with ThreadPoolExecutor(max(1, int(threads))) as ex:
        list(ex.map(work, range(len(df)), chunksize=256))
    arr.flush()
    del arr
    os.replace(tmp, npy_path)
    index = df.drop(columns=["png"]).assign(row=np.arange(len(df), dtype=np.int64))
    write_parquet(index, index_path, prov)
    return index


def open_cache(npy_path: str | os.PathLike, index_path: str | os.PathLike) -> tuple[np.ndarray, pd.DataFrame]:
    arr = np.load(npy_path, mmap_mode="r")
    index = pd.read_parquet(index_path)
    if arr.shape[1:] != CROP_SHAPE or len(arr) != len(index):
        raise ValueError(f"{npy_path}: shape {arr.shape} does not match its index ({len(index)} rows) or 112x96x3")
    return arr, index


# -------------------------------------------------------------------------------------------- selection

def identity_of(image_id: str) -> str:
    return image_id.rsplit("/", 1)[0]


def fold_identities(pairs: pd.DataFrame, fold: int) -> set[str]:
    """People appearing in fold ``fold`` of pairs.txt (either side of any pair)."""
    sel = pairs[pairs["fold"] == fold]
    if sel.empty:
        raise ValueError(f"fold {fold} has no pairs (folds: {sorted(pairs['fold'].unique().tolist())})")
    return {identity_of(i) for i in pd.concat([sel["a"], sel["b"]]).astype(str)}


def select_training(manifest: pd.DataFrame, *, statuses: Sequence[str] = ("ok",), min_images: int = 1,
                    exclude_identities: Iterable[str] = ()) -> pd.DataFrame:
    """Training rows (image_id, identity) of an aligned manifest."""
    df = manifest[manifest["status"].astype(str).isin(list(statuses))][["image_id", "identity"]].copy()
    df["identity"] = df["identity"].astype(str)
    excl = set(exclude_identities)
    if excl:
        df = df[~df["identity"].isin(excl)]
    counts = df["identity"].value_counts()
    df = df[df["identity"].map(counts) >= int(min_images)]
    return df.sort_values("image_id", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- data

class TrainData:
    """Training samples over one or more datasets' caches: per sample its source, clean row, masked row (-1:
    none) and label."""

    def __init__(self, clean: list[np.ndarray], masked: list[Optional[np.ndarray]], src: np.ndarray,
                 clean_row: np.ndarray, masked_row: np.ndarray, labels: np.ndarray, classes: list[str]):
        self.clean, self.masked = clean, masked
        self.src, self.clean_row, self.masked_row = src, clean_row, masked_row
        self.labels, self.classes = labels, classes
        self.has_masked = masked_row >= 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_sources(cls, sources: Sequence[Mapping[str, Any]], *, statuses: Sequence[str] = ("ok",),
                     min_images: int = 1, exclude: Optional[Mapping[str, Iterable[str]]] = None,
                     need_masked: bool = False) -> "TrainData":
        """``sources``: dicts with ``dataset``, ``manifest`` (aligned manifest path or DataFrame), ``clean``
        (npy, index) and optional ``masked`` (npy, index). ``exclude``: {dataset: identities to leave out}."""
        clean, masked, parts = [], [], []
        for s_i, src in enumerate(sources):
            man = src["manifest"]
            man = pd.read_parquet(man, columns=["image_id", "identity", "status"]) if not isinstance(man, pd.DataFrame) else man
            sel = select_training(man, statuses=statuses, min_images=min_images,
                                  exclude_identities=(exclude or {}).get(src["dataset"], ()))
            c_arr, c_idx = open_cache(*src["clean"])
            crow = sel["image_id"].map(dict(zip(c_idx["image_id"], c_idx["row"])))
            if crow.isna().any():
                raise ValueError(f"{src['dataset']}: {int(crow.isna().sum())} training images have no crop in the "
                                 f"clean cache, e.g. {sel['image_id'][crow.isna()].iloc[0]!r}")
            m_arr, mrow = None, np.full(len(sel), -1, dtype=np.int64)
            if src.get("masked"):
                m_arr, m_idx = open_cache(*src["masked"])
                mrow = sel["image_id"].map(dict(zip(m_idx["image_id"], m_idx["row"]))).fillna(-1).to_numpy(np.int64)
            elif need_masked:
                raise ValueError(f"{src['dataset']}: mask_fraction > 0 needs the masked crops (no masked cache)")
            clean.append(c_arr)
            masked.append(m_arr)
            parts.append(pd.DataFrame({"src": s_i, "clean_row": crow.to_numpy(np.int64), "masked_row": mrow,
                                       "cls": src["dataset"] + "/" + sel["identity"]}))
        df = pd.concat(parts, ignore_index=True)
        classes = sorted(df["cls"].unique().tolist())
        label = df["cls"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
        return cls(clean, masked, df["src"].to_numpy(np.int16), df["clean_row"].to_numpy(np.int64),
                   df["masked_row"].to_numpy(np.int64), label, classes)

    def gather(self, idx: np.ndarray, use_masked: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 (len(idx), 112, 96, 3) RGB crops (into ``out`` if given); ``use_masked`` picks the masked
        crop of a sample."""
        if out is None:
            out = np.empty((len(idx),) + CROP_SHAPE, dtype=np.uint8)
        src = self.src[idx]
        for s in np.unique(src):
            sel = src == s
            m = sel & use_masked
            c = sel & ~use_masked
            if c.any():
                rows = self.clean_row[idx[c]]
                order = np.argsort(rows, kind="stable")  # sorted reads are kinder to a memory map
                tmp = self.clean[s][rows[order]]
                out[np.flatnonzero(c)[order]] = tmp
            if m.any():
                rows = self.masked_row[idx[m]]
                order = np.argsort(rows, kind="stable")
                out[np.flatnonzero(m)[order]] = self.masked[s][rows[order]]
        return out


class StreamSampler:
    """The deterministic sample stream (module docstring): position -> (sample, served masked, flipped)."""

    def __init__(self, n: int, seed: int, mask_fraction: float, has_masked: np.ndarray, flip: bool):
        self.n, self.seed = int(n), int(seed)
        self.mask_fraction, self.flip = float(mask_fraction), bool(flip)
        self.has_masked = np.asarray(has_masked, dtype=bool)
        self._plans: dict = {}

    def plan(self, epoch: int):
        """(permutation, served masked, flipped) of epoch ``epoch`` (the last two epochs are cached)."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, int(epoch)])
            perm = rng.permutation(self.n)
            u_mask = rng.random(self.n)
            u_flip = rng.random(self.n)
            masked = (u_mask < self.mask_fraction) & self.has_masked[perm]
            flip = (u_flip < 0.5) if self.flip else np.zeros(self.n, dtype=bool)
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = (perm, masked, flip)
        return self._plans[epoch]

    def take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx, msk, flp = [], [], []
        pos, end = int(start), int(start) + int(count)
        while pos < end:
            e, o = divmod(pos, self.n)
            k = min(end - pos, self.n - o)
            perm, masked, flip = self.plan(e)
            idx.append(perm[o:o + k])
            msk.append(masked[o:o + k])
            flp.append(flip[o:o + k])
            pos += k
        return np.concatenate(idx), np.concatenate(msk), np.concatenate(flp)


class BatchStream:
    """Iterator of (iteration, uint8 NHWC batch, labels, flip flags, served-masked count) for iterations
    ``start`` to ``stop`` (0-based), in order, with ``prefetch`` batches in flight on ``workers`` threads (numpy's
    gather releases the GIL). On CUDA the gather writes straight into pinned memory (torch's caching host
    allocator), so the host->device copy can be asynchronous."""

    def __init__(self, data: TrainData, sampler: StreamSampler, start: int, stop: int, global_batch: int,
                 rank: int = 0, world: int = 1, prefetch: int = 4, pin: bool = False, workers: int = 1):
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world} processes")
        self.data, self.sampler = data, sampler
        self.start, self.stop, self.B, self.b = int(start), int(stop), int(global_batch), int(global_batch) // world
        self.rank, self.pin, self.prefetch = int(rank), bool(pin), max(1, int(prefetch))
        self.pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="batch-stream")
        self._lock = threading.Lock()  # the sampler caches one epoch plan: plans are drawn under the lock

    def make(self, it: int):
        pos = it * self.B + self.rank * self.b
        with self._lock:
            idx, msk, flp = self.sampler.take(pos, self.b)
        if self.pin:
            x = torch.empty((self.b,) + CROP_SHAPE, dtype=torch.uint8, pin_memory=True)
            self.data.gather(idx, msk, out=x.numpy())
            y = torch.from_numpy(self.data.labels[idx]).pin_memory()
            f = torch.from_numpy(flp).pin_memory()
        else:
            x = torch.from_numpy(self.data.gather(idx, msk))
            y = torch.from_numpy(self.data.labels[idx])
            f = torch.from_numpy(flp)
        return it, x, y, f, int(msk.sum())

    def __iter__(self):
        pending: collections.deque = collections.deque()
        nxt = self.start
        try:
            while nxt < self.stop and len(pending) < self.prefetch:
                pending.append(self.pool.submit(self.make, nxt))
                nxt += 1
            while pending:
                item = pending.popleft().result()
                if nxt < self.stop:
                    pending.append(self.pool.submit(self.make, nxt))
                    nxt += 1
                yield item
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------- loop

class TrainModule(nn.Module):
    """net + head; the network under autocast, the head in fp32. One module, so DDP sees every parameter."""

    def __init__(self, net: SphereNet, head: MarginHead, amp_dtype: Optional[torch.dtype], compile_net: bool):
        super().__init__()
        self.net, self.head = net, head
        self.amp_dtype = amp_dtype
        object.__setattr__(self, "_net_fwd", torch.compile(net) if compile_net else net)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        dev = x.device.type
        if self.amp_dtype is None:
            return self.head(self._net_fwd(x).float(), labels, iteration)
        with torch.autocast(dev, dtype=self.amp_dtype):
            feat = self._net_fwd(x)
        with torch.autocast(dev, enabled=False):
            return self.head(feat.float(), labels, iteration)


def param_groups(module: nn.Module, cfg: Mapping[str, Any]) -> list[dict]:
    decay, bias = [], []
    for name, p in module.named_parameters():
        (bias if name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]},
            {"params": bias, "lr": cfg["lr"] * cfg["bias_lr_mult"],
             "weight_decay": cfg["weight_decay"] if cfg["bias_decay"] else 0.0}]


def spec_digest(spec: Mapping[str, Any]) -> str:
    """Digest of what determines the result (the train keys less NON_SEMANTIC, the data, fold, seed)."""
    train = {k: v for k, v in merged(spec.get("train")).items() if k not in NON_SEMANTIC}
    data = [{"dataset": s["dataset"], **{k: _ident(s.get(k)) for k in ("manifest", "clean", "masked")}}
            for s in spec.get("sources", [])]
    core = {"train": train, "data": data, "fold": spec.get("fold"), "seed": spec.get("seed"),
            "exclude_fold": spec.get("exclude_fold"), "pairs": _ident(spec.get("pairs"))}
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
    """Size + sha256 of index/manifest files (small); size only for the large .npy caches."""
    p = Path(path)
    if not p.exists():
        return f"missing:{p.name}"
    if p.suffix == ".npy":
        return f"{p.name}:{p.stat().st_size}"
    from .manifest import sha256_file
    return f"{p.name}:{sha256_file(p)[:16]}"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    from .devices import resolve

    if resolve(device, "train.device") == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {local_rank} needs cuda:{local_rank} but this job sees "
                               f"{torch.cuda.device_count()} GPU(s): ask for as many GPUs as train.gpus")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def _reduced(loss: torch.Tensor, correct: torch.Tensor, n: int, masked: int, world: int,
             device: torch.device) -> tuple[float, float, float, float]:
    """A log window's sums (loss, correct, samples, masked samples) over every rank (all-reduce when world > 1)."""
    if world == 1:
        return float(loss), float(correct), float(n), float(masked)
    stats = torch.stack([loss, correct, torch.tensor(float(n), device=device, dtype=torch.float64),
                         torch.tensor(float(masked), device=device, dtype=torch.float64)])
    torch.distributed.all_reduce(stats)
    return tuple(float(v) for v in stats)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_log_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in LOG_FIELDS})
    os.replace(tmp, path)


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(it, [r["loss"] for r in rows], color="tab:red")
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def build_data(spec: Mapping[str, Any]) -> TrainData:
    cfg = merged(spec.get("train"))
    exclude = {}
    if spec.get("exclude_fold") is not None:
        pairs = pd.read_parquet(spec["pairs"]) if not isinstance(spec["pairs"], pd.DataFrame) else spec["pairs"]
        people = fold_identities(pairs, int(spec["exclude_fold"]))
        exclude = {s["dataset"]: people for s in spec["sources"]}
    need_masked = float(cfg["mask_fraction"]) > 0
    sources = [dict(s, masked=s.get("masked") if need_masked else None) for s in spec["sources"]]
    return TrainData.from_sources(sources, statuses=cfg["statuses"], min_images=cfg["min_images"],
                                  exclude=exclude, need_masked=need_masked)


def train_run(spec: Mapping[str, Any], out_dir: str | os.PathLike, *, stop_after: Optional[int] = None,
              data: Optional[TrainData] = None) -> dict:
    """Train one run (see the module docstring). ``spec``: {"run", "seed", "fold", "exclude_fold", "pairs",
    "sources", "train"}. Writes model.pt, train_log.csv, curve.png (rank 0) unless stopped by ``stop_after``
    (after that many iterations, once the checkpoint is written: the interruption used by the tests).
    Returns a summary dict."""
    cfg = merged(spec.get("train"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg["device"], local_rank)
    torch.set_num_threads(max(1, int(cfg["threads"])))
    if device.type == "cuda":
        torch.cuda.set_device(device)          # before the process group, so that NCCL binds this rank's GPU
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    from .devices import precision_policy

    precision_policy(device, training=True)     # convolutions may use TF32; the head's matmuls stay fp32
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if rank == 0:
        from .devices import describe
        amp_name = "bf16" if amp_dtype_for(cfg["amp"], device) else "none"
        log.info("run %s: %s", spec.get("run"), describe(device, amp=amp_name, world_size=world))
    seed = int(spec.get("seed", 1))
    digest = spec_digest(spec)
    t_data = time.time()
    data = data if data is not None else build_data(spec)
    log.info("run %s: %d training images, %d classes, %.1f%% with a masked crop (%.1f s to open)",
             spec.get("run"), len(data), data.num_classes, 100 * data.has_masked.mean(), time.time() - t_data)

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    net = sphereface_net(**cfg["arch"])
    head = make_head(cfg["head"], net.feature_dim, data.num_classes)
    amp = amp_dtype_for(cfg["amp"], device)
    module = TrainModule(net, head, amp, bool(cfg["compile"])).to(device)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(module, cfg), lr=cfg["lr"], momentum=cfg["momentum"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg["lr_steps"]), gamma=cfg["lr_gamma"])

    ckpt_path = out / "checkpoint.pt"
    start, rows, window = 0, [], None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("format") == STATE_FORMAT and state.get("spec_digest") == digest:
            net.load_state_dict(state["model"])
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], device)
            start, rows = int(state["iteration"]), list(state["log"])
            window = state.get("window")
            log.info("resumed %s at iteration %d (data position %d)", spec.get("run"), start, state["data"]["position"])
        else:
            log.warning("%s belongs to another spec (digest %s, now %s): starting over", ckpt_path,
                        state.get("spec_digest"), digest)
    iterations = int(cfg["iterations"])
    model = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(module, device_ids=[local_rank] if device.type == "cuda" else None)
    sampler = StreamSampler(len(data), seed, cfg["mask_fraction"], data.has_masked, cfg["flip"])
    stop = iterations if stop_after is None else min(iterations, int(stop_after))
    stream = BatchStream(data, sampler, start, stop, int(cfg["batch_size"]), rank, world,
                         cfg["prefetch"], pin=device.type == "cuda", workers=cfg["loader_threads"])
    log_every, ckpt_every = int(cfg["log_every"]), int(cfg["checkpoint_every"])
    module.train()
    win_loss = torch.zeros((), device=device, dtype=torch.float64)
    win_correct = torch.zeros((), device=device, dtype=torch.float64)
    win_n, win_masked, win_t0, win_its = 0, 0, time.time(), 0
    if window and rank == 0:  # a log window cut by the checkpoint: its sums (over every rank) continue on rank 0,
        win_loss += window["loss"]  # so the next reduced row matches an uncut run
        win_correct += window["correct"]
        win_n, win_masked = int(window["n"]), int(window["masked"])

    def save_state(done: int) -> None:
        # the open log window, summed over the ranks (every rank saves at the same iteration): restored once, on rank 0
        w_loss, w_corr, w_n, w_m = _reduced(win_loss, win_correct, win_n, win_masked, world, device)
        if rank != 0:
            return
        e, o = divmod(done * int(cfg["batch_size"]), len(data))
        _atomic_save({"format": STATE_FORMAT, "spec_digest": digest, "iteration": done,
                      "model": net.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(), "rng": _rng_state(device),
                      "data": {"position": done * int(cfg["batch_size"]), "epoch": e, "offset": o, "seed": seed,
                               "n": len(data)},
                      "log": rows, "run": spec.get("run"),
                      "window": {"loss": w_loss, "correct": w_corr, "n": int(w_n), "masked": int(w_m)}}, ckpt_path)

    done = start
    try:
        for it, xb, yb, fb, n_masked in stream:
            x = xb.to(device, non_blocking=True)
            y = yb.to(device, non_blocking=True)
            f = fb.to(device, non_blocking=True)
            x = torch.where(f.view(-1, 1, 1, 1), x.flip(2), x)  # NHWC: dim 2 is the width
            x = preprocess(x)
            if not cfg["channels_last"]:
                x = x.contiguous()
            logits = model(x, y, it + 1)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_used = opt.param_groups[0]["lr"]
            sched.step()
            win_loss += loss.detach().double() * len(y)
            win_correct += (logits.detach().argmax(1) == y).sum().double()
            win_n += len(y)
            win_masked += n_masked
            win_its += 1
            done = it + 1
            if done % log_every == 0 or done == iterations:
                w_loss, w_corr, w_n, w_m = _reduced(win_loss, win_correct, win_n, win_masked, world, device)
                dt = time.time() - win_t0
                row = {"iteration": done, "loss": w_loss / w_n, "accuracy": w_corr / w_n,
                       "lambda": head.lambda_at(done), "lr": lr_used, "img_s": w_n / max(dt, 1e-9),
                       "masked_share": w_m / w_n}
                rows.append(row)
                if rank == 0:
                    log.info("it %d/%d loss %.4f acc %.3f lambda %.2f lr %.4g %.1f img/s masked %.2f", done, iterations,
                             row["loss"], row["accuracy"], row["lambda"], row["lr"], row["img_s"], row["masked_share"])
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"training loss is {row['loss']} at iteration {done}")
                win_loss.zero_()
                win_correct.zero_()
                win_n, win_masked, win_t0, win_its = 0, 0, time.time(), 0
            if done % ckpt_every == 0 or done == iterations or (stop_after is not None and done == stop):
                save_state(done)
    finally:
        stream.close()
    summary = {"run": spec.get("run"), "iterations": done, "classes": data.num_classes, "images": len(data),
               "spec_digest": digest}
    if done < iterations:
        summary["stopped"] = True
        return summary
    if rank == 0:
        if not rows:
            raise RuntimeError("no log rows: iterations < 1?")
        meta = {"run": spec.get("run"), "protocol": spec.get("protocol"), "fold": spec.get("fold"), "seed": seed,
                "iterations": iterations, "classes": data.num_classes, "images": len(data),
                "mask_fraction": cfg["mask_fraction"], "flip": cfg["flip"], "head": cfg["head"], "arch": cfg["arch"],
                "batch_size": cfg["batch_size"], "lr": cfg["lr"], "lr_steps": cfg["lr_steps"],
                "datasets": [s["dataset"] for s in spec.get("sources", [])], "spec_digest": digest,
                "final_loss": rows[-1]["loss"], "final_accuracy": rows[-1]["accuracy"],
                "training_channel_order": "RGB", "training_normalisation": "(p - 127.5) / 128"}
        try:
            from .manifest import code_version, git_commit
            meta["code"] = code_version("models", "train")
            meta["git_commit"] = git_commit()
        except Exception:  # noqa: BLE001 - provenance is best effort outside a checkout
            pass
        save_model(out / "model.pt", net, meta)
        write_log_csv(rows, out / "train_log.csv")
        plot_curve(rows, out / "curve.png", title=str(spec.get("run", "")))
        if not cfg["keep_checkpoint"]:
            ckpt_path.unlink(missing_ok=True)
        summary["final"] = rows[-1]
    if world > 1:
        torch.distributed.barrier()
    return summary


# ------------------------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def embed_rows(net: nn.Module, images: np.ndarray, rows: np.ndarray, device: torch.device,
               batch_size: int = 256) -> np.ndarray:
    """Features [f(x), f(flip x)] (evaluation.m) of ``images[rows]`` with the training preprocessing."""
    out = []
    for s in range(0, len(rows), batch_size):
        r = rows[s:s + batch_size]
        order = np.argsort(r)
        chunk = np.empty((len(r),) + CROP_SHAPE, np.uint8)
        chunk[order] = images[r[order]]
        x = preprocess(torch.from_numpy(chunk).to(device))
        f = torch.cat([net(x).float(), net(x.flip(3)).float()], dim=1)
        out.append(f.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2 * net.feature_dim), np.float32)


def evaluate_fold(model_path: str | os.PathLike, pairs: pd.DataFrame, fold: int,
                  clean: tuple[str, str], masked: Optional[tuple[str, str]] = None, *, device: str = "auto",
                  batch_size: int = 256, threads: int = 2) -> dict:
    """LFW accuracy of one fold for a model trained without that fold's people (module docstring):
    protocols clean, mixed (b masked) and masked (both), threshold from the other nine folds' pairs."""
    from .evaluate import ProtocolSettings, verify_10fold

    torch.set_num_threads(max(1, threads))
    dev = resolve_device(device)
    from .devices import precision_policy

    precision_policy(dev)                       # evaluation in true fp32
    net, meta = load_model(model_path, str(dev))
    variants = {"clean": open_cache(*clean)}
    if masked:
        variants["masked"] = open_cache(*masked)
    ids = sorted(set(pairs["a"].astype(str)) | set(pairs["b"].astype(str)))
    feats = {}
    for v, (arr, idx) in variants.items():
        row_of = dict(zip(idx["image_id"], idx["row"]))
        have = [i for i in ids if i in row_of]
        f = embed_rows(net, arr, np.array([row_of[i] for i in have], np.int64), dev, batch_size)
        feats[v] = dict(zip(have, f))
    dim = 2 * int(meta["feature_dim"])
    nan = np.full(dim, np.nan, np.float32)
    settings = ProtocolSettings()
    res = {"model": str(model_path), "fold": int(fold), "run": (meta.get("meta") or {}).get("run"),
           "settings": settings.to_dict(), "feature": "concat(f(x), f(flip x)), RGB, (p-127.5)/128",
           "protocols": {},
           "note": ("fold accuracy with the threshold chosen on the other nine folds' pairs scored by the same model "
                    "(those folds' people were training identities); seen_folds_mean is NOT a 10-fold result; a pair "
                    "whose image has no crop of the variant (e.g. mask skipped) counts as an error in accuracy and is "
                    "left out of accuracy_available_pairs")}
    for name, (va, vb) in {"clean": ("clean", "clean"), "mixed": ("clean", "masked"),
                           "masked": ("masked", "masked")}.items():
        if va not in feats or vb not in feats:
            continue
        fa = np.stack([feats[va].get(i, nan) for i in pairs["a"].astype(str)])
        fb = np.stack([feats[vb].get(i, nan) for i in pairs["b"].astype(str)])
        r = verify_10fold(fa, fb, pairs["same"].to_numpy(bool), pairs["fold"].to_numpy(), settings)
        k = r["folds"].index(int(fold))
        others = [a for j, a in enumerate(r["fold_accuracy"]) if j != k]
        in_fold = (pairs["fold"] == fold).to_numpy()
        sc, sm = np.asarray(r["scores"])[in_fold], pairs["same"].to_numpy(bool)[in_fold]
        ok = ~np.isnan(sc)
        thr = r["threshold"][k]
        res["protocols"][name] = {"accuracy": r["fold_accuracy"][k], "threshold": thr,
                                  "accuracy_available_pairs": float(np.mean(np.where(sm[ok], sc[ok] > thr, sc[ok] < thr)))
                                  if ok.any() else float("nan"),
                                  "n_pairs": int(in_fold.sum()),
                                  "n_missing": int((np.isnan(fa).any(1) | np.isnan(fb).any(1))[in_fold].sum()),
                                  "seen_folds_mean": float(np.mean(others))}
    return res


def summarize_evals(evals: Sequence[Mapping[str, Any]]) -> dict:
    """Mean and std (ddof=1) over runs of each protocol's fold accuracy."""
    out = {"runs": [e.get("run") for e in evals], "protocols": {}}
    for name in ("clean", "mixed", "masked"):
        accs = [e["protocols"][name]["accuracy"] for e in evals if name in e.get("protocols", {})]
        if accs:
            out["protocols"][name] = {"accuracies": accs, "mean": float(np.mean(accs)),
                                      "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "n": len(accs)}
    return out


def summarize_groups(evals: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """{group: its runs' evals} (e.g. the same runs with and without masks) -> the summary of all runs, with
    each group's own under ``groups``."""
    if len(evals) == 1:
        return summarize_evals(next(iter(evals.values())))
    # no pooled mean over the groups: runs with and without masks are different models
    return {"runs": [e.get("run") for evs in evals.values() for e in evs],
            "groups": {g: summarize_evals(evs) for g, evs in evals.items()}}


def summary_markdown(summary: Mapping[str, Any], title: str = "") -> str:
    lines = [f"# {title}" if title else "# Training runs", "",
             "LFW fold accuracy (lfw_unrestricted: threshold from the other nine folds, see maskface.train), "
             "mean ± std over runs, in percent."]
    groups = summary.get("groups")
    if groups:
        names = list(groups)
        lines[-1] += (" The groups differ only in their mask fraction (train.mask_fractions): the same folds, "
                      "seeds and schedule.")
        lines += ["", "| protocol | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for proto in ("clean", "mixed", "masked"):
            cells = [groups[g]["protocols"].get(proto) for g in names]
            if any(cells):
                lines.append(f"| {proto} | " + " | ".join(
                    f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f} ({c['n']} run{'s' if c['n'] > 1 else ''})"
                    if c else "" for c in cells) + " |")
        lines += ["", "| group | protocol | per run |", "|---|---|---|"]
        for g in names:
            for proto, p in groups[g]["protocols"].items():
                lines.append(f"| {g} | {proto} | " + ", ".join(f"{100 * a:.2f}" for a in p["accuracies"]) + " |")
        return "\n".join(lines) + "\n"
    lines += ["", "| protocol | runs | mean | std | per run |", "|---|---|---|---|---|"]
    for name, p in summary["protocols"].items():
        lines.append(f"| {name} | {p['n']} | {100 * p['mean']:.2f} | {100 * p['std']:.2f} | "
                     + ", ".join(f"{100 * a:.2f}" for a in p["accuracies"]) + " |")
    return "\n".join(lines) + "\n"


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
        spec = json.loads(Path(a.spec).read_text())
        try:
            res = train_run(spec, a.out or Path(a.spec).parent, stop_after=a.stop_after)
        finally:
            if torch.distributed.is_initialized():      # torchrun's ranks: leave the group cleanly
                torch.distributed.destroy_process_group()
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res, default=str))
    elif a.cmd == "cache":
        build_cache(a.shards, a.npy, a.index, threads=a.threads)
    else:
        from .manifest import write_json
        pairs = pd.read_parquet(a.pairs) if a.pairs.endswith(".parquet") else __import__(
            "maskface.datasets", fromlist=["parse_pairs"]).parse_pairs(a.pairs)
        write_json(evaluate_fold(a.model, pairs, a.fold, tuple(a.clean), tuple(a.masked) if a.masked else None,
                                 threads=a.threads), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
