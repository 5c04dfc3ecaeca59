"""The mask stage's batch entry: an aligned shard in, a mask shard out (the Snakemake rules call these).

A shard's rows are masked in chunks of ``mask.batch`` crops over ``mask.threads`` processes; per chunk the
crops are grouped by size and template, their landmarks and image statistics computed per group in
batches, and every face goes through :func:`maskface.mask.face.mask_face`; the masked crop and its
occlusion map are encoded as PNGs into the row. Then the shard file, the merge and the summary. Results do
not depend on batch, processes or row order (see :mod:`maskface.mask.style`). Flow: stage -> face ->
render -> kernels.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
import pyarrow as pa

from ..imageio import encode_png
from .. import shards
from . import landmarks as lmk
from . import render as rd
from .config import MASK_TYPES, WEARS, MaskConfig
from .face import (empty_record, hog_face_box, landmark_crops, limit_threads, mark_skipped, mask_face,
                   template_points, too_small)

log = logging.getLogger("maskface.mask")

ALIGNED_WITH_CROP = ("ok", "center_crop")


# ---------------------------------------------------------------------------------------- shard rows

MANIFEST_COLUMNS = [
    "image_id", "identity", "status", "reason", "skip", "aligned_status", "mask_type", "mask_color",
    "mask_texture", "wear", "coverage", "yaw_deg", "landmarks68", "seed", "shard",
]
MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("identity", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("skip", pa.string()), ("aligned_status", pa.string()), ("mask_type", pa.string()),
    ("mask_color", pa.string()), ("mask_texture", pa.string()), ("wear", pa.string()),
    ("coverage", pa.float64()), ("yaw_deg", pa.float64()), ("landmarks68", pa.list_(pa.float32())),
    ("seed", pa.int64()), ("shard", pa.int32()),
])
# png: the masked crop (lossless RGB PNG); occlusion: the binary occlusion map as a 1-bit PNG (white = mask)
SHARD_SCHEMA = MANIFEST_SCHEMA.append(pa.field("png", pa.binary())).append(pa.field("occlusion", pa.binary()))


encode_rgb_png = encode_png     # the crops of every stage share one fast lossless encoding (imageio)


def encode_occlusion(occ: np.ndarray) -> bytes:
    """The occlusion map as a 1-bit PNG (any PNG reader; Pillow opens it as mode "1")."""
    ok, buf = cv2.imencode(".png", occ.astype(np.uint8) * 255,
                           [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_occlusion(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_occlusion`: a bool (H, W) array."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError("not a PNG occlusion map")
    return arr > 127


def decode_crop(data: bytes) -> np.ndarray:
    """RGB uint8 crop from PNG bytes (OpenCV's decoder; Pillow's through maskface.imageio as fallback)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None or arr.ndim != 3:
        from ..imageio import decode_png
        return decode_png(data)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def mask_one(crop: np.ndarray, lm: np.ndarray, image_id: str, cfg: MaskConfig, rec: dict, *,
             template5: Optional[np.ndarray] = None, stats: Optional[dict] = None,
             force: Optional[Mapping[str, Any]] = None) -> dict:
    """Check, draw and encode one face of a crop whose landmarks are known; fills and returns ``rec``."""
    out = mask_face(crop, lm, image_id, cfg, rec, template5=template5, stats=stats, force=force)
    if out is not None:
        rec.update(png=encode_rgb_png(out.image), occlusion=encode_occlusion(out.occlusion))
    return rec


# ---------------------------------------------------------------------------------------- processing

def process_items(items: Sequence[Mapping[str, Any]], cfg: MaskConfig, *, progress: bool = False,
                  desc: str = "mask", **force: Any) -> list[dict]:
    """Mask a list of aligned crops. ``items``: dicts with image_id, identity, status, reason, template,
    png (PNG bytes or None), shard. One record per item, in order. Items without a crop (aligned status
    other than ok / center_crop) are carried with their status and reason. ``force``: mask_type, wear,
    color, texture to impose (the other draws are unchanged). Runs ``cfg.threads`` processes."""
    from tqdm import tqdm

    items = list(items)
    chunk = max(cfg.batch, 1)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, file=sys.stderr, mininterval=2.0)
    out: list[dict] = []
    try:
        if cfg.threads <= 1 or len(chunks) <= 1:
            limit_threads()
            for ch in chunks:
                out.extend(_process_chunk(ch, cfg, force))
                bar.update(len(ch))
        else:
            from ..workers import imap

            for recs in imap(_process_chunk_star, [(ch, cfg, force) for ch in chunks], cfg.threads,
                             initializer=limit_threads, what="mask"):
                out.extend(recs)
                bar.update(len(recs))
    finally:
        bar.close()
    return out


def _process_chunk_star(args) -> list[dict]:
    return _process_chunk(*args)


def _process_chunk(items: Sequence[Mapping[str, Any]], cfg: MaskConfig, force: Mapping[str, Any]) -> list[dict]:
    """One record per item, in order: the crops decoded, grouped by size and template, masked group by group."""
    recs, groups = _records_and_crops(items, cfg)
    for (shape, template), group in groups.items():
        _mask_group(group, shape[:2], template, cfg, force)
    return recs


def _records_and_crops(items: Sequence[Mapping[str, Any]], cfg: MaskConfig) -> tuple[list[dict], dict]:
    """The record of every item, and (record, decoded crop) pairs grouped by (crop shape, template). Items
    without a crop are finished here: their aligned status carried, or unreadable."""
    recs: list[dict] = []
    groups: dict[tuple, list[tuple[dict, np.ndarray]]] = {}
    for it in items:
        image_id = str(it["image_id"])
        ident = it.get("identity")
        rec = empty_record(image_id,
                           "" if ident is None or (isinstance(ident, float) and math.isnan(ident)) else str(ident),
                           int(it.get("shard") or 0), cfg.seed)
        recs.append(rec)
        status = it.get("status") or "ok"
        rec["aligned_status"] = status
        png = it.get("png")
        if status not in ALIGNED_WITH_CROP or png is None:
            rec.update(status=status if status not in ALIGNED_WITH_CROP else "error",
                       reason=str(it.get("reason") or ("" if status not in ALIGNED_WITH_CROP else "no crop bytes")))
            continue
        try:
            crop = decode_crop(png)
        except Exception as exc:  # noqa: BLE001 - a bad crop is recorded, never fatal
            rec.update(status="unreadable", reason=f"crop does not decode: {exc}")
            continue
        groups.setdefault((crop.shape, it.get("template")), []).append((rec, crop))
    return recs, groups


def _mask_group(group: list[tuple[dict, np.ndarray]], size_hw: tuple[int, int], template: Optional[str],
                cfg: MaskConfig, force: Mapping[str, Any]) -> None:
    """Mask same-size crops of one template, in place of their records: the aligned ones (status ok) with
    landmarks and image statistics computed in batches from the template's face box, the centre-crop
    fallbacks one by one from the box dlib's HOG detector finds."""
    small = too_small(size_hw)
    if small is not None:
        for rec, _ in group:
            mark_skipped(rec, small)
        return
    t5 = template_points(template, size_hw)
    box = lmk.face_box_from_points5(t5)
    aligned = [(rec, crop) for rec, crop in group if rec["aligned_status"] == "ok"]
    jobs = []
    if aligned:
        stack = np.stack([c for _, c in aligned])
        lms = landmark_crops(stack, box, cfg)
        stats = rd.image_stats_batch(stack)
        jobs += [(rec, crop, lm, t5, ss) for (rec, crop), lm, ss in zip(aligned, lms, stats)]
    for rec, crop in group:                  # centre-crop fallbacks: no face was detected there
        if rec["aligned_status"] == "ok":
            continue
        found = hog_face_box(crop, box)
        if found is None:
            rec.update(status="skipped", skip="no_face",
                       reason="the aligner found no face (centre-crop fallback) and dlib's HOG detector "
                              "finds none on the crop: no mask drawn")
            continue
        jobs.append((rec, crop, landmark_crops(crop[None], found, cfg)[0], None, None))
    for rec, crop, lm, tpl, ss in jobs:
        try:
            mask_one(crop, lm, rec["image_id"], cfg, rec, template5=tpl, stats=ss, force=force)
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the stage
            log.warning("mask failed on %s", rec["image_id"], exc_info=True)
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}", png=None, occlusion=None)


# --------------------------------------------------------------------------------------- shards, merge

ALIGNED_COLUMNS = ("image_id", "identity", "status", "reason", "template", "shard", "png")


def read_aligned_shard(path: str | os.PathLike) -> list[dict]:
    """The items of an aligned shard (maskface.align's layout: manifest columns + ``png``)."""
    return shards.read_rows(path, ALIGNED_COLUMNS)


def records_table(records: Iterable[Mapping[str, Any]], with_images: bool) -> pa.Table:
    return shards.records_table(records, SHARD_SCHEMA if with_images else MANIFEST_SCHEMA)


def mask_shard(aligned_path: str | os.PathLike, out_path: str | os.PathLike, cfg: MaskConfig, shard: int,
               prov: Optional[Mapping[str, Any]] = None, *, progress: bool = True) -> list[dict]:
    """Mask every row of one aligned shard and write ``out_path`` (SHARD_SCHEMA). Returns the records."""
    items = read_aligned_shard(aligned_path)
    for it in items:
        it["shard"] = shard
    items.sort(key=lambda it: it["image_id"])
    t0 = time.perf_counter()
    recs = process_items(items, cfg, progress=progress, desc=f"mask shard {shard}")
    dt = time.perf_counter() - t0
    n_crop = sum(1 for r in recs if r["aligned_status"] in ALIGNED_WITH_CROP)
    log.info("shard %d: %d rows, %d crops in %.1f s (%.1f crops/s with %d process(es))", shard, len(recs),
             n_crop, dt, n_crop / max(dt, 1e-9), cfg.threads)
    shards.write_shard(recs, SHARD_SCHEMA, out_path, prov)
    return recs


def merge_shards(paths: Sequence[str | os.PathLike], expected_ids: Optional[Iterable[str]] = None):
    """The masked manifest: the manifest columns of every shard, sorted by image_id, each aligned row
    (``expected_ids``) exactly once (:func:`maskface.shards.merge_shards`)."""
    return shards.merge_shards(paths, MANIFEST_SCHEMA, expected_ids, what="masked manifest",
                               against="aligned manifest")


def summarize(df) -> dict:
    """Counts and rates of a masked manifest: masked share of the crops, skips by reason, coverage per wear
    and type, and how often each type / wear / colour / texture was drawn."""
    n = len(df)
    with_crop = df["aligned_status"].isin(list(ALIGNED_WITH_CROP))
    ok = df["status"] == "ok"
    out: dict[str, Any] = {
        "rows": int(n),
        "status_counts": {str(k): int(v) for k, v in sorted(df["status"].value_counts().items())},
        "crops": int(with_crop.sum()),
        "masked": int(ok.sum()),
        "masked_rate": float(ok.sum() / with_crop.sum()) if with_crop.sum() else None,
        "skips": {str(k): int(v) for k, v in sorted(df.loc[df["status"] == "skipped", "skip"].value_counts().items())},
    }

    def cov(sel):
        c = df.loc[sel & ok, "coverage"].astype(float)
        if not len(c):
            return None
        return {"n": int(len(c)), "mean": float(c.mean()), "median": float(c.median()),
                "p05": float(c.quantile(0.05)), "p95": float(c.quantile(0.95)), "min": float(c.min()),
                "max": float(c.max())}
    out["coverage_by_wear"] = {w: cov(df["wear"] == w) for w in WEARS}
    out["coverage_by_type_proper"] = {t: cov((df["mask_type"] == t) & (df["wear"] == "proper"))
                                      for t in MASK_TYPES}
    for col in ("mask_type", "wear", "mask_color", "mask_texture"):
        out[f"{col}_counts"] = {str(k): int(v) for k, v in sorted(df.loc[ok, col].value_counts().items())}
    yaw = df.loc[df["yaw_deg"].notna(), "yaw_deg"].astype(float).abs()
    out["abs_yaw_deg"] = ({"median": float(yaw.median()), "p99": float(yaw.quantile(0.99)), "max": float(yaw.max())}
                          if len(yaw) else None)
    return out
