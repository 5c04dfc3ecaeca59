"""Training data of the SphereFace stage: the crop caches, the training images of a run, and the sample stream.
The loop that consumes it is maskface.train; the fold evaluation, which reads the same caches, is
maskface.foldeval.

Caches (pre-decoded uint8, so decoding never runs in the training loop)
    ``build_cache`` decodes a dataset's crops once from the Parquet shards (``image_id`` + PNG column) of the
    aligned stage (``variant=clean``) or the mask stage (``variant=masked``) into
    ``results/train_cache/{dataset}/{variant}.npy``: a (N, 112, 96, 3) uint8 array, RGB, opened memory-mapped,
    and ``{variant}.parquet`` mapping image_id to row. A batch is a fancy-index gather from that array (~16 MB
    for 512 crops) in a prefetch thread, a pinned host tensor, one non-blocking copy; flip and the
    ``(p - 127.5) / 128`` normalisation run on the device, and the NHWC uint8 batch permuted to NCHW *is*
    channels_last. Training images: aligned manifest rows with ``status`` in ``train.statuses`` (default
    ``ok``: SphereFace drops images without a detection from training), identities with at least
    ``train.min_images`` such images; labels = sorted ``"{dataset}/{identity}"``. Under ``lfw_unrestricted``
    the people of the held-out fold's pairs are left out (``build_data``).

    A run from a pretrained chip network (``train.init``) reads the frozen-prefix caches of
    maskface.chipcache instead: float16 activations of each chip and of its mirror image, so the flip picks a
    row (``TrainData.mirrored``) and the step only casts them to float32. ``train.validation: next_fold``
    leaves fold ``k+1``'s people out as well (``held_out_folds``).

Sample stream
    The samples are an endless sequence of epochs; epoch ``e`` is a permutation drawn from
    ``numpy.random.default_rng([seed, e])``, together with, per sample, a uniform draw for "served masked"
    (``< train.mask_fraction``; a sample whose masked crop is missing is served clean), one for the flip
    (``< 0.5`` when ``train.flip``) and one for the masked variant (``train.mask_variants``: which of a chip
    cache's masks a sample served masked shows; drawn last, so one variant gives the stream it always gave). Global batch ``t`` is stream positions ``[t B, (t + 1) B)``; with DDP rank
    ``r`` of ``W`` takes the ``r``-th ``B / W`` slice (``train.batch_size`` is the global batch). The data
    position is therefore a pure function of (seed, iteration): resuming never replays or skips a sample.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .fileio import atomic_path
from .imageio import decode_png
from .manifest import write_parquet
from .staging import staged
from .train_config import merged

CROP_SHAPE = (112, 96, 3)


# ------------------------------------------------------------------------------------------------ cache

def png_column(path: str | os.PathLike) -> str:
    """The PNG bytes column of a crops shard: ``png`` if present, else the only binary column."""
    schema = pq.read_schema(path)
    if "png" in schema.names:
        return "png"
    cands = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if len(cands) != 1:
        raise ValueError(f"{path}: cannot tell which column holds the PNG crops (binary columns: {cands})")
    return cands[0]


def build_cache(shards: Sequence[str | os.PathLike], npy_path: str | os.PathLike, index_path: str | os.PathLike,
                *, threads: int = 2, prov: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
    """Decode every crop of ``shards`` (Parquet: image_id + PNG bytes; null = no crop) into a uint8
    (N, 112, 96, 3) ``.npy`` and an index Parquet (image_id, row, plus ``status`` when the shards have it)."""
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
    with atomic_path(npy_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(df),) + CROP_SHAPE)
        with ThreadPoolExecutor(max(1, int(threads))) as ex:
            list(ex.map(functools.partial(_decode_into, arr, df), range(len(df)), chunksize=256))
        arr.flush()
        del arr
    index = df.drop(columns=["png"]).assign(row=np.arange(len(df), dtype=np.int64))
    write_parquet(index, index_path, prov)
    return index


def _decode_into(arr: np.ndarray, df: pd.DataFrame, i: int) -> None:
    img = decode_png(df["png"].iat[i])
    if img.shape != CROP_SHAPE:
        raise ValueError(f"{df['image_id'].iat[i]}: crop is {img.shape}, expected {CROP_SHAPE} (SphereFace "
                         f"112x96 template)")
    arr[i] = img


def open_cache(npy_path: str | os.PathLike, index_path: str | os.PathLike,
               sample_shape: Optional[tuple] = CROP_SHAPE) -> tuple[np.ndarray, pd.DataFrame]:
    """(memory-mapped array, index) of a cache; ``sample_shape``: what one row must be (None: any, e.g. the
    frozen-prefix activations of maskface.chipcache, whose shape depends on the blocks frozen)."""
    arr = np.load(npy_path, mmap_mode="r")
    index = pd.read_parquet(index_path)
    if (sample_shape is not None and arr.shape[1:] != tuple(sample_shape)) or len(arr) != len(index):
        want = "x".join(map(str, sample_shape)) if sample_shape else "its rows"
        raise ValueError(f"{npy_path}: shape {arr.shape} does not match its index ({len(index)} rows) or {want}")
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


def people_subset(identities: Iterable[str], fraction: float) -> set[str]:
    """``train.people_fraction``: the identities whose sha256 falls in the first ``fraction`` of its range. The
    choice depends on the name alone, so a smaller fraction's people are among a larger one's (nested subsets:
    a data-size curve) and every fold and seed draws alike."""
    cut = float(fraction) * 2 ** 32
    return {i for i in identities if int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) < cut}


def select_training(manifest: pd.DataFrame, *, statuses: Sequence[str] = ("ok",), min_images: int = 1,
                    exclude_identities: Iterable[str] = (), people_fraction: float = 1.0) -> pd.DataFrame:
    """Training rows (image_id, identity) of an aligned manifest: the images of the given statuses, less the
    excluded identities, of the people with at least ``min_images`` such images, of whom ``people_fraction``
    (:func:`people_subset`) when below 1."""
    df = manifest[manifest["status"].astype(str).isin(list(statuses))][["image_id", "identity"]].copy()
    df["identity"] = df["identity"].astype(str)
    excl = set(exclude_identities)
    if excl:
        df = df[~df["identity"].isin(excl)]
    counts = df["identity"].value_counts()
    df = df[df["identity"].map(counts) >= int(min_images)]
    if float(people_fraction) < 1.0:
        people = df["identity"].unique()
        df = df[df["identity"].isin(people_subset(people, people_fraction))]
        if len(people) and df.empty:
            raise ValueError(f"train.people_fraction {people_fraction} keeps none of the {len(people)} training "
                             f"people; raise it")
    return df.sort_values("image_id", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- data

class TrainData:
    """Training samples over one or more datasets' caches: per sample its source, clean row, masked rows (one
    per masked variant, -1: none; (n, variants)) and label. ``mirrored``: the caches hold each sample and its
    mirror image (axis 1, as the frozen-prefix activations of maskface.chipcache), so the flip picks one; else
    the flip is left to the training step (uint8 crops)."""

    def __init__(self, clean: list[np.ndarray], masked: list[Optional[np.ndarray]], src: np.ndarray,
                 clean_row: np.ndarray, masked_row: np.ndarray, labels: np.ndarray, classes: list[str],
                 mirrored: bool = False):
        self.clean, self.masked = clean, masked
        masked_row = np.asarray(masked_row, np.int64)
        self.masked_row = masked_row.reshape(len(masked_row), -1)      # (n, variants)
        self.src, self.clean_row = src, clean_row
        self.labels, self.classes = labels, classes
        self.has_masked = (self.masked_row >= 0).all(1)
        self.variants = self.masked_row.shape[1]
        self.mirrored = bool(mirrored)
        self.sample_shape = tuple(clean[0].shape[2:] if self.mirrored else clean[0].shape[1:])
        self.dtype = clean[0].dtype
        # per sample, plain and mirrored: a target feature of the distillation term (train.distill), or None
        self.targets: Optional[np.ndarray] = None
        for arr in [*clean, *(m for m in masked if m is not None)]:
            if arr.shape[1 + self.mirrored:] != self.sample_shape or arr.dtype != self.dtype:
                raise ValueError(f"caches disagree: {arr.shape} {arr.dtype} vs {self.sample_shape} {self.dtype}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_sources(cls, sources: Sequence[Mapping[str, Any]], *, statuses: Sequence[str] = ("ok",),
                     min_images: int = 1, exclude: Optional[Mapping[str, Iterable[str]]] = None,
                     need_masked: bool = False, mirrored: bool = False,
                     people_fraction: float = 1.0) -> "TrainData":
        """``sources``: dicts with ``dataset``, ``manifest`` (aligned manifest path or DataFrame), ``clean``
        (npy, index) and optional ``masked`` (npy, index): 112x96 crop caches, or with ``mirrored`` caches of
        (sample, mirror image) pairs of any shape. ``exclude``: {dataset: identities to leave out}."""
        shape = None if mirrored else CROP_SHAPE
        clean, masked, parts = [], [], []
        for s_i, src in enumerate(sources):
            man = src["manifest"]
            man = pd.read_parquet(man, columns=["image_id", "identity", "status"]) if not isinstance(man, pd.DataFrame) else man
            sel = select_training(man, statuses=statuses, min_images=min_images,
                                  exclude_identities=(exclude or {}).get(src["dataset"], ()),
                                  people_fraction=people_fraction)
            c_arr, c_idx = open_cache(*src["clean"], sample_shape=shape)
            crow = sel["image_id"].map(dict(zip(c_idx["image_id"], c_idx["row"])))
            if crow.isna().any():
                raise ValueError(f"{src['dataset']}: {int(crow.isna().sum())} training images have no crop in the "
                                 f"clean cache, e.g. {sel['image_id'][crow.isna()].iloc[0]!r}")
            m_arr, mrow = None, np.full((len(sel), 1), -1, dtype=np.int64)
            if src.get("masked"):
                m_arr, m_idx = open_cache(*src["masked"], sample_shape=shape)
                if len(m_idx):    # image_id x variant -> row (a cache without variants: variant 0)
                    rows = m_idx.assign(variant=m_idx["variant"] if "variant" in m_idx.columns else 0).pivot(
                        index="image_id", columns="variant", values="row")
                    mrow = rows.reindex(sel["image_id"]).fillna(-1).to_numpy(np.int64)
            elif need_masked:
                raise ValueError(f"{src['dataset']}: mask_fraction > 0 needs the masked crops (no masked cache)")
            clean.append(c_arr)
            masked.append(m_arr)
            parts.append((pd.DataFrame({"src": s_i, "clean_row": crow.to_numpy(np.int64),
                                        "cls": src["dataset"] + "/" + sel["identity"]}), mrow))
        widths = {m.shape[1] for (_, m), a in zip(parts, masked) if a is not None} or {1}
        if len(widths) > 1:
            raise ValueError(f"the masked caches of {[s['dataset'] for s in sources]} hold different numbers of "
                             f"mask variants ({sorted(widths)})")
        width = widths.pop()
        mrows = np.concatenate([m if a is not None else np.full((len(m), width), -1, np.int64)
                                for (_, m), a in zip(parts, masked)])
        df = pd.concat([d for d, _ in parts], ignore_index=True)
        classes = sorted(df["cls"].unique().tolist())
        label = df["cls"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
        return cls(clean, masked, df["src"].to_numpy(np.int16), df["clean_row"].to_numpy(np.int64),
                   mrows, label, classes, mirrored=mirrored)

    def gather(self, idx: np.ndarray, use_masked: np.ndarray, flip: Optional[np.ndarray] = None,
               out: Optional[np.ndarray] = None, variant: Optional[np.ndarray] = None) -> np.ndarray:
        """The samples ``idx`` (into ``out`` if given): uint8 (n, 112, 96, 3) RGB crops, or for ``mirrored``
        caches each sample's plain or mirrored row as ``flip`` says. ``use_masked`` picks the masked one,
        ``variant`` (default 0: the mask stage's) which of its masked variants."""
        if out is None:
            out = np.empty((len(idx),) + self.sample_shape, dtype=self.dtype)
        flip = np.zeros(len(idx), bool) if flip is None else np.asarray(flip, bool)
        use_masked = np.asarray(use_masked, bool)
        variant = np.zeros(len(idx), np.int64) if variant is None else np.asarray(variant, np.int64)
        masked_row = self.masked_row[idx, variant]
        src = self.src[idx]
        for s in np.unique(src):
            sel = src == s
            for take, arrays, rows_all in ((sel & ~use_masked, self.clean, self.clean_row[idx]),
                                           (sel & use_masked, self.masked, masked_row)):
                if not take.any():
                    continue
                rows = rows_all[take]
                order = np.argsort(rows, kind="stable")  # sorted reads are kinder to a memory map
                arr = arrays[s]
                part = arr[rows[order], flip[take][order].astype(np.int64)] if self.mirrored else arr[rows[order]]
                out[np.flatnonzero(take)[order]] = part
        return out


class StreamSampler:
    """The deterministic sample stream (module docstring): position -> (sample, served masked, flipped, masked
    variant)."""

    def __init__(self, n: int, seed: int, mask_fraction: float, has_masked: np.ndarray, flip: bool,
                 variants: int = 1):
        self.n, self.seed = int(n), int(seed)
        self.mask_fraction, self.flip = float(mask_fraction), bool(flip)
        self.has_masked = np.asarray(has_masked, dtype=bool)
        self.variants = int(variants)
        self._plans: dict = {}

    def plan(self, epoch: int):
        """(permutation, served masked, flipped, masked variant) of epoch ``epoch`` (the last two epochs are
        cached)."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, int(epoch)])
            perm = rng.permutation(self.n)
            u_mask = rng.random(self.n)
            u_flip = rng.random(self.n)
            masked = (u_mask < self.mask_fraction) & self.has_masked[perm]
            flip = (u_flip < 0.5) if self.flip else np.zeros(self.n, dtype=bool)
            var = (np.minimum(rng.random(self.n) * self.variants, self.variants - 1).astype(np.int64)
                   if self.variants > 1 else np.zeros(self.n, np.int64))
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = (perm, masked, flip, var)
        return self._plans[epoch]

    def take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(samples, served masked, flipped, masked variant) of stream positions [start, start + count)."""
        parts: list[list[np.ndarray]] = [[], [], [], []]
        pos, end = int(start), int(start) + int(count)
        while pos < end:
            e, o = divmod(pos, self.n)
            k = min(end - pos, self.n - o)
            for acc, a in zip(parts, self.plan(e)):
                acc.append(a[o:o + k])
            pos += k
        idx, msk, flp, var = (np.concatenate(a) for a in parts)
        return idx, msk, flp, var


class BatchStream:
    """Iterator of (iteration, uint8 NHWC batch, labels, flip flags, served-masked count, distillation targets or
    None) for iterations ``start`` to ``stop`` (0-based), in order, with ``prefetch`` batches in flight on
    ``workers`` threads (numpy's gather releases the GIL). On CUDA the gather writes straight into pinned memory
    (torch's caching host allocator), so the host->device copy can be asynchronous."""

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
            idx, msk, flp, var = self.sampler.take(pos, self.b)
        if self.pin:
            x = torch.from_numpy(np.empty((0,), self.data.dtype))
            x = torch.empty((self.b,) + self.data.sample_shape, dtype=x.dtype, pin_memory=True)
            self.data.gather(idx, msk, flp, out=x.numpy(), variant=var)
        else:
            x = torch.from_numpy(self.data.gather(idx, msk, flp, variant=var))
        y = torch.from_numpy(self.data.labels[idx])
        # mirrored caches have served the flipped samples already; for crops the step flips them
        f = torch.from_numpy(np.zeros_like(flp) if self.data.mirrored else flp)
        t = None
        if self.data.targets is not None:  # the clean image's target, flipped as the sample served
            t = torch.from_numpy(self.data.targets[idx, flp.astype(np.int64)])
        if self.pin:
            y, f = y.pin_memory(), f.pin_memory()
            t = t.pin_memory() if t is not None else None
        return it, x, y, f, int(msk.sum()), t

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


def validation_fold(pairs: pd.DataFrame, fold: int) -> int:
    """The fold after ``fold`` in pairs.txt's order (the first after the last): ``train.validation:
    next_fold`` holds its people out of training and picks fold ``fold``'s threshold on its pairs."""
    folds = sorted(int(f) for f in pairs["fold"].unique())
    if int(fold) not in folds or len(folds) < 2:
        raise ValueError(f"fold {fold}: pairs have folds {folds}; a validation fold needs another one")
    return folds[(folds.index(int(fold)) + 1) % len(folds)]


def held_out_folds(spec: Mapping[str, Any], pairs: pd.DataFrame) -> list[int]:
    """The folds whose people a run never trains on: its test fold, and its validation fold under
    ``train.validation: next_fold``."""
    if spec.get("exclude_fold") is None:
        return []
    fold = int(spec["exclude_fold"])
    if merged(spec.get("train"))["validation"] == "next_fold":
        return [fold, validation_fold(pairs, fold)]
    return [fold]


def cache_files(spec: Mapping[str, Any]) -> list[str]:
    """The cache arrays a run's spec reads (clean, and masked when ``mask_fraction`` > 0): what
    :func:`maskface.staging.stage` copies to local disk."""
    need_masked = float(merged(spec.get("train"))["mask_fraction"]) > 0
    return [str(s[k][0]) for s in spec.get("sources", []) for k in ("clean", "masked")
            if s.get(k) and (k == "clean" or need_masked) and isinstance(s[k][0], (str, os.PathLike))]


def build_data(spec: Mapping[str, Any]) -> TrainData:
    """The training images of a run's spec: its sources, less the held-out folds' people (``held_out_folds``),
    with the masked crops only when ``mask_fraction`` > 0. A run from a pretrained chip network
    (``train.init``) reads the frozen-prefix caches (mirrored)."""
    cfg = merged(spec.get("train"))
    exclude = {}
    if spec.get("exclude_fold") is not None:
        pairs = pd.read_parquet(spec["pairs"]) if not isinstance(spec["pairs"], pd.DataFrame) else spec["pairs"]
        people = set().union(*(fold_identities(pairs, k) for k in held_out_folds(spec, pairs)))
        exclude = {s["dataset"]: people for s in spec["sources"]}
    need_masked = float(cfg["mask_fraction"]) > 0
    local = lambda pair: None if not pair else (staged(pair[0]), pair[1])  # noqa: E731 - the node-local copy
    sources = [dict(s, clean=local(s["clean"]), masked=local(s.get("masked")) if need_masked else None)
               for s in spec["sources"]]
    return TrainData.from_sources(sources, statuses=cfg["statuses"], min_images=cfg["min_images"],
                                  exclude=exclude, need_masked=need_masked, mirrored=cfg["init"] is not None,
                                  people_fraction=cfg["people_fraction"])
