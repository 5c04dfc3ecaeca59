"""Stage 1: face detection and 5-point similarity alignment to the SphereFace / ArcFace template.

This module holds the stage's settings (:class:`AlignConfig`), face selection, the similarity fit and warp, the
per-image records and their worker processes, a shard's run (:func:`align_shard`), the summary, the fidelity
check and the ``maskface align`` CLI. The MTCNN detector is in :mod:`maskface.mtcnn` (``Detector`` is
re-exported here); shard assignment, shard files and the merge are in :mod:`maskface.shards`; the workflow's
adapters are workflow/scripts/align_*.py.

Workers
    On CPU each worker process runs torch with one intra-op thread and the stage runs ``workers`` such
    processes: on a machine with few cores shared with other jobs, two torch threads in one process were
    slower than one (thread hand-off on tiny convolutions), while two processes scale. Small batches (8) are
    kept on CPU (the P-net activations stay in cache); on GPU one large batch (64), detected by the job's own
    process while ``workers - 1`` worker processes decode the next chunks (at most two each ahead), so that
    JPEG decoding overlaps the GPU instead of leaving it idle.

Face selection (several faces found; ``n_faces`` records how many)
    ``largest``: the largest box. ``center`` (LFW-style centred crops, the default for ``format: lfw``):
    the box maximising ``area - 2 * d**2`` (px^2), ``d`` the distance from box centre to image centre.
    SphereFace keeps the box whose centre is nearest the image centre (pure distance); weighting by size
    keeps a small background face that happens to sit near the centre from beating the subject. The
    formula is facenet-pytorch's ``center_weighted_size`` with its default weight 2. The setting ``select``
    (``auto``: ``center`` for ``format: lfw``, else ``largest``) resolves per dataset with
    :meth:`AlignConfig.select_for`.

Alignment
    A similarity transform (rotation, uniform scale, translation; no reflection) is fitted by least squares
    (Umeyama 1991) from the 5 detected points to the template, and the image is warped once with
    ``cv2.warpAffine`` (bilinear, black border) from the *original* image. Never re-align an aligned crop:
    SphereFace users lost 30+ points of LFW accuracy that way. Templates: SphereFace 112x96 from
    sphereface/preprocess/code/face_align_demo.m; ArcFace 112x112 is the same points +8 px in x. The
    template and MTCNN's landmarks are used in the same pixel convention (as sphereface_pytorch and
    insightface do), so the fit is consistent.

No face
    ``on_no_face: center_crop`` warps a canonical centre crop instead: the transform that aligns the mean LFW
    landmark layout (``CANONICAL_LANDMARKS``, fractions of the image side, measured on deep-funneled LFW)
    placed in the image's centred square. Such rows have ``status == "center_crop"`` and ``fallback`` True.
    ``skip`` records ``status == "no_face"`` and writes no crop.

Shards
    A shard job writes ONE Parquet file, ``results/aligned/{dataset}/shard-{shard}.parquet`` (``SHARD_SCHEMA``):
    the manifest rows of its images plus a ``png`` column holding the lossless PNG bytes of the crop (null
    where there is none); why, and how images are assigned to shards, is in :mod:`maskface.shards`. The merge
    rule reads the shards without the ``png`` column and writes ``results/manifests/{dataset}/aligned.parquet``,
    checking that every raw row is present exactly once.

Manifest columns (``MANIFEST_COLUMNS``)
    image_id, identity, status (ok | center_crop | no_face | a raw/decoding failure | error), reason,
    fallback, n_faces, det_score, bbox (x1,y1,x2,y2), landmarks5 (10 floats, source pixels, interleaved
    x,y in the order left eye, right eye, nose, left mouth corner, right mouth corner), aligned_landmarks5
    (the same points mapped into the crop), fit_error (mean px distance of aligned_landmarks5 to the
    template), transform (the 2x3 source->crop matrix, row-major), src_width, src_height, template, shard.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from .devices import describe, resolve_device
from .fileio import atomic_path
from .imageio import ImageDecodeError, encode_png, load_rgb
from .manifest import provenance, write_table
from .mtcnn import Detector
from .shards import read_crops, records_table, shard_rows
from .stageconfig import StageConfig, floats, setting

log = logging.getLogger("maskface.align")

# SphereFace 112x96 template, sphereface/preprocess/code/face_align_demo.m (x, y): left eye, right eye, nose,
# left mouth corner, right mouth corner. insightface's 112x112 ArcFace template: the same points +8 px in x.
SPHEREFACE_112x96 = np.array([
    [30.2946, 51.6963],
    [65.5318, 51.5014],
    [48.0252, 71.7366],
    [33.5493, 92.3655],
    [62.7299, 92.2041],
], dtype=np.float64)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
TEMPLATES: dict[str, tuple[np.ndarray, tuple[int, int]]] = {
    # name -> (5x2 points, (height, width))
    "sphereface_112x96": (SPHEREFACE_112x96, (112, 96)),
    "arcface_112x112": (SPHEREFACE_112x96 + np.array([8.0, 0.0]), (112, 112)),
}

# Mean landmark layout of deep-funneled LFW as fractions of the image side (x, y), measured by this stage
# on 256 LFW images spread over the alphabet (every 51st file). Used only for the centre-crop fallback.
CANONICAL_LANDMARKS = np.array([
    [0.4197, 0.4538],
    [0.5875, 0.4502],
    [0.5064, 0.5516],
    [0.4331, 0.6388],
    [0.5818, 0.6355],
], dtype=np.float64)

ALIGNED_STATUSES = ("ok", "center_crop")   # rows that have a crop
MANIFEST_COLUMNS = [
    "image_id", "identity", "status", "reason", "fallback", "n_faces", "det_score", "bbox", "landmarks5",
    "aligned_landmarks5", "fit_error", "transform", "src_width", "src_height", "template", "shard",
]
_F64_LIST = pa.list_(pa.float64())
MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("identity", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("fallback", pa.bool_()), ("n_faces", pa.int32()), ("det_score", pa.float64()), ("bbox", _F64_LIST),
    ("landmarks5", _F64_LIST), ("aligned_landmarks5", _F64_LIST), ("fit_error", pa.float64()),
    ("transform", _F64_LIST), ("src_width", pa.int32()), ("src_height", pa.int32()), ("template", pa.string()),
    ("shard", pa.int32()),
])
SHARD_SCHEMA = MANIFEST_SCHEMA.append(pa.field("png", pa.binary()))


# ------------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class AlignConfig(StageConfig):
    """The ``align:`` section of the workflow config (defaults: SphereFace's, as the schema's)."""
    section: ClassVar[str] = "align"
    aliases: ClassVar[Mapping[str, str]] = {"threads": "workers"}   # config key ``threads``: worker processes

    template: str = setting("sphereface_112x96")
    min_face_size: int = setting(20)
    thresholds: tuple = setting((0.6, 0.7, 0.9), convert=floats)
    factor: float = setting(0.85)
    select: str = setting("auto")               # auto | center | largest
    on_no_face: str = setting("center_crop")    # skip | center_crop
    shards: int = setting(8)
    device: str = setting("auto", rerun=False)  # auto | cpu | cuda
    batch_size: int = setting(0, rerun=False)   # 0: 8 on CPU, 64 on GPU
    workers: int = setting(2, rerun=False)      # CPU processes (GPU: 1 detecting, workers - 1 decoding)

    def validate(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"align.template {self.template!r}: expected one of {sorted(TEMPLATES)}")
        if self.select not in ("auto", "center", "largest"):
            raise ValueError(f"align.select {self.select!r}: expected auto, center or largest")
        if self.on_no_face not in ("skip", "center_crop"):
            raise ValueError(f"align.on_no_face {self.on_no_face!r}: expected skip or center_crop")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"align.device {self.device!r}: expected auto, cpu or cuda")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"align.thresholds {self.thresholds!r}: three numbers in [0, 1]")
        if not 0 < self.factor < 1:
            raise ValueError(f"align.factor {self.factor!r}: must be in (0, 1)")
        if self.min_face_size < 4:
            raise ValueError(f"align.min_face_size {self.min_face_size!r}: must be >= 4")
        if self.shards < 1:
            raise ValueError(f"align.shards {self.shards!r}: must be >= 1")

    def resolved_batch(self, device: str) -> int:
        return self.batch_size if self.batch_size > 0 else (64 if device == "cuda" else 8)

    def select_for(self, dataset_format: Optional[str]) -> str:
        """The face selection (``center`` or ``largest``) for a dataset of ``dataset_format``."""
        if self.select != "auto":
            return self.select
        return "center" if dataset_format == "lfw" else "largest"


# -------------------------------------------------------------------------------------- selection, warp

def select_face(boxes: np.ndarray, shape: tuple[int, int], select: str) -> int:
    """Index of the face to keep among ``boxes`` (n, >=4) in an image of ``shape`` (H, W): ``select`` is
    ``largest`` or ``center`` (see the module docstring)."""
    b = np.asarray(boxes, dtype=np.float64)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    if select == "largest":
        return int(np.argmax(area))
    if select == "center":
        h, w = shape[:2]
        cx = (b[:, 0] + b[:, 2]) / 2 - w / 2
        cy = (b[:, 1] + b[:, 3]) / 2 - h / 2
        return int(np.argmax(area - 2.0 * (cx * cx + cy * cy)))
    raise ValueError(f"unknown face selection {select!r}")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991, no reflection) mapping ``src`` (n, 2) onto ``dst``: 2x3."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    n = len(src)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc ** 2).sum() / n
    if var_s <= 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = dc.T @ sc / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var_s)
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]


def warp(rgb: np.ndarray, m: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    h, w = size_hw
    return cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


def center_crop_points(h: int, w: int) -> np.ndarray:
    """Where a centred face's landmarks are expected: the LFW mean layout in the centred square."""
    side = min(h, w)
    return CANONICAL_LANDMARKS * side + np.array([(w - side) / 2.0, (h - side) / 2.0])


def align_face(rgb: np.ndarray, landmarks: np.ndarray, template: str = "sphereface_112x96"):
    """Warp ``rgb`` so that ``landmarks`` (5, 2) land on the template. Returns (crop, 2x3 matrix)."""
    pts, size = TEMPLATES[template]
    m = similarity_transform(landmarks, pts)
    return warp(rgb, m, size), m


# --------------------------------------------------------------------------------------- per-image logic

def _flat(a) -> list:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def empty_record(image_id: str, identity: str, status: str, reason: str, template: str, shard: int,
                 width=None, height=None) -> dict:
    return {
        "image_id": image_id, "identity": identity, "status": status, "reason": reason, "fallback": False,
        "n_faces": None, "det_score": None, "bbox": None, "landmarks5": None, "aligned_landmarks5": None,
        "fit_error": None, "transform": None, "src_width": width, "src_height": height, "template": template,
        "shard": shard, "png": None,
    }


def finish_image(rgb: np.ndarray, det: tuple[np.ndarray, np.ndarray], rec: dict, cfg: AlignConfig,
                 select: str) -> dict:
    """Select a face, align it (or fall back), fill ``rec``. ``det``: (boxes (n, 5), points (n, 5, 2))."""
    boxes, points = det
    h, w = rgb.shape[:2]
    tpl_pts, size = TEMPLATES[cfg.template]
    rec.update(n_faces=int(len(boxes)), src_width=int(w), src_height=int(h))
    if len(boxes):
        i = select_face(boxes, (h, w), select)
        lm = points[i]
        m = similarity_transform(lm, tpl_pts)
        aligned = transform_points(m, lm)
        crop = warp(rgb, m, size)
        rec.update(status="ok", reason="", det_score=float(boxes[i, 4]), bbox=_flat(boxes[i, :4]),
                   landmarks5=_flat(lm), aligned_landmarks5=_flat(aligned),
                   fit_error=float(np.linalg.norm(aligned - tpl_pts, axis=1).mean()), transform=_flat(m),
                   png=encode_png(crop))
    elif cfg.on_no_face == "center_crop":
        m = similarity_transform(center_crop_points(h, w), tpl_pts)
        rec.update(status="center_crop", reason="no face detected: canonical centre crop", fallback=True,
                   transform=_flat(m), png=encode_png(warp(rgb, m, size)))
    else:
        rec.update(status="no_face", reason="no face detected (on_no_face: skip)")
    return rec


# ------------------------------------------------------------------------------------------ the workers

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: AlignConfig, device: str, threads: int) -> None:
    import torch
    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    cv2.setNumThreads(1)
    _WORKER["cfg"] = cfg
    _WORKER["det"] = Detector(cfg.min_face_size, cfg.thresholds, cfg.factor, device)


def device_failed(exc: BaseException) -> bool:
    """A CUDA error other than running out of memory. CUDA errors are sticky: every later call on the device
    fails too, so retrying image by image would only turn the rest of the shard into ``error`` rows of a job
    that "succeeds". Such an error stops the job; out of memory is retried one image at a time."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)     # torch >= 2.8 raises CUDA errors as this
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and any(k in msg for k in ("CUDA error", "CUDA driver", "cuDNN error",
                                                                     "CUBLAS_STATUS", "device-side assert"))


def _decode_chunk(task: tuple[list[dict], str]) -> tuple[list[dict], list[tuple[dict, np.ndarray]]]:
    """Decode one chunk: (records of the images that cannot be read, with their status and reason; (record,
    RGB array) of the others). Runs in the detecting process, or in a decoding worker on the GPU path."""
    items, template = task
    failed: list[dict] = []
    loaded: list[tuple[dict, np.ndarray]] = []
    for it in items:
        rec = empty_record(it["image_id"], it["identity"], "error", "", template, it["shard"])
        src = it["src"]
        try:
            if isinstance(src, (str, os.PathLike)) and os.path.getsize(src) == 0:
                rec.update(status="empty", reason="zero-byte file")
                failed.append(rec)
                continue
            if isinstance(src, (bytes, bytearray, memoryview)) and len(src) == 0:
                rec.update(status="empty", reason="zero bytes")
                failed.append(rec)
                continue
            rgb = load_rgb(src)
        except ImageDecodeError as exc:
            rec.update(status=exc.status, reason=exc.reason)
            failed.append(rec)
            continue
        except OSError as exc:
            rec.update(status="unreadable", reason=f"cannot read: {exc}")
            failed.append(rec)
            continue
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the stage
            rec.update(status="unreadable", reason=f"decode failed: {type(exc).__name__}: {exc}")
            failed.append(rec)
            continue
        loaded.append((rec, rgb))
    return failed, loaded


def _detect_chunk(loaded: list[tuple[dict, np.ndarray]], select: str) -> list[dict]:
    """Detect (same-size images batched), align and encode decoded images with this process's detector."""
    cfg: AlignConfig = _WORKER["cfg"]
    det: Detector = _WORKER["det"]
    out: list[dict] = []
    groups: dict[tuple, list[tuple[dict, np.ndarray]]] = {}
    for rec, rgb in loaded:
        groups.setdefault(rgb.shape, []).append((rec, rgb))
    for group in groups.values():
        try:
            dets = det.detect(np.stack([rgb for _, rgb in group]))
        except Exception as exc:  # noqa: BLE001 - retry one by one to isolate the culprit (or fit in memory)
            if device_failed(exc):
                raise
            dets = None
        for j, (rec, rgb) in enumerate(group):
            try:
                d = dets[j] if dets is not None else det.detect(rgb[None])[0]
                finish_image(rgb, d, rec, cfg, select)
            except Exception as exc:  # noqa: BLE001
                if device_failed(exc):
                    raise
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                           src_width=int(rgb.shape[1]), src_height=int(rgb.shape[0]))
                log.warning("align failed on %s:\n%s", rec["image_id"], traceback.format_exc())
            out.append(rec)
    return out


def _process_chunk(task: tuple[list[dict], str]) -> list[dict]:
    """Decode, detect, align and encode one chunk of images (a CPU worker, or the one process on a GPU)."""
    items, select = task
    failed, loaded = _decode_chunk((items, _WORKER["cfg"].template))
    return failed + _detect_chunk(loaded, select)


def decode_processes(device: str, workers: int) -> int:
    """Worker processes that decode images for the detecting process: on a GPU, ``workers - 1`` (the job's
    other CPU runs the detector and the warp and PNG encoding of the crops), so that decoding overlaps the GPU;
    none with one CPU, and none on the CPU (there each worker decodes and detects its own chunks)."""
    return max(0, int(workers) - 1) if device == "cuda" else 0


def align_items(items: list[dict], cfg: AlignConfig, select: str, *, progress: bool = True,
                desc: str = "align", decoders: Optional[int] = None) -> list[dict]:
    """Align ``items`` (dicts: image_id, identity, src (path or bytes), shard). Returns one record each
    (in input order), with the crop's PNG bytes under ``png``. Runs ``cfg.workers`` processes on CPU; on a GPU
    one detecting process fed by :func:`decode_processes` decoding ones (``decoders`` overrides that count,
    for the tests of that path on the CPU)."""
    from tqdm import tqdm

    if not items:
        return []
    device = resolve_device(cfg.device, "align.device")
    batch = cfg.resolved_batch(device)
    # order by size so that chunks hold same-size images (facenet-pytorch batches one size only)
    sizes = [(it.get("height") or 0, it.get("width") or 0) for it in items]
    order = sorted(range(len(items)), key=lambda i: (sizes[i], i))
    chunks = [[items[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)]
    decoders = decode_processes(device, cfg.workers) if decoders is None else max(0, int(decoders))
    decoders = min(decoders, len(chunks) if len(chunks) > 1 else 0)
    workers = 1 if device == "cuda" or decoders else max(1, int(cfg.workers))
    workers = min(workers, len(chunks))
    log.info("%s: %s, batch %d, %d detecting process(es), %d decoding", desc, describe(device), batch, workers,
             decoders)
    results: dict[str, dict] = {}

    def bar():
        return tqdm(total=len(items), desc=desc, unit="img", disable=not progress, file=sys.stderr,
                    mininterval=5.0, smoothing=0.1)

    if workers == 1:
        import torch
        prev = torch.get_num_threads()
        _init_worker(cfg, device, 1)
        try:
            with bar() as pbar:
                if decoders:
                    from .workers import imap

                    # at most two chunks decoded ahead per decoder: memory stays bounded when the GPU is slower
                    decoded = imap(_decode_chunk, [(ch, cfg.template) for ch in chunks], decoders,
                                   ahead=2 * decoders, what="align (decoding)")
                else:
                    decoded = (_decode_chunk((ch, cfg.template)) for ch in chunks)
                with contextlib.closing(decoded):      # a detection error stops the decoders at once
                    for failed, loaded in decoded:
                        for rec in failed + _detect_chunk(loaded, select):
                            results[rec["image_id"]] = rec
                        pbar.update(len(failed) + len(loaded))
        finally:
            torch.set_num_threads(prev)
            _WORKER.clear()
    else:
        from .workers import imap

        with bar() as pbar:
            for recs in imap(_process_chunk, [(ch, select) for ch in chunks], workers, initializer=_init_worker,
                             initargs=(cfg, device, 1), what="align"):
                for rec in recs:
                    results[rec["image_id"]] = rec
                pbar.update(len(recs))
    return [results[it["image_id"]] for it in items]


# ------------------------------------------------------------------------------------------ a shard

def records_frame(records: Iterable[dict], with_png: bool) -> pa.Table:
    """The records as an Arrow table: ``SHARD_SCHEMA`` (with the crops' ``png``) or ``MANIFEST_SCHEMA``."""
    return records_table(records, SHARD_SCHEMA if with_png else MANIFEST_SCHEMA)


def align_shard(raw: pd.DataFrame, root: str | os.PathLike, dataset_format: Optional[str], cfg: AlignConfig,
                shard: int, shards: int, *, progress: bool = True) -> list[dict]:
    """Records (with ``png``) of every raw row of one shard; raw failures are carried, not processed."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    rows = shard_rows(raw, shard, shards)
    select = cfg.select_for(dataset_format)
    root = Path(root)
    carried, todo = [], []
    for r in rows.itertuples(index=False):
        image_id, identity = str(r.image_id), ("" if pd.isna(r.identity) else str(r.identity))
        if r.status != "ok":
            carried.append(empty_record(image_id, identity, str(r.status), str(r.reason or ""), cfg.template,
                                        shard))
            continue
        todo.append({"image_id": image_id, "identity": identity, "src": str(root / r.path), "shard": shard,
                     "width": None if pd.isna(r.width) else int(r.width),
                     "height": None if pd.isna(r.height) else int(r.height)})
    log.info("shard %d/%d: %d images to align, %d carried raw failures, select=%s", shard, shards, len(todo),
             len(carried), select)
    t0 = time.perf_counter()
    done = align_items(todo, cfg, select, progress=progress, desc=f"align shard {shard}")
    dt = time.perf_counter() - t0
    log.info("shard %d: %d images in %.1f s (%.1f img/s)", shard, len(todo), dt, len(todo) / max(dt, 1e-9))
    out = sorted(carried + done, key=lambda r: r["image_id"])
    return out


def summarize(df: pd.DataFrame, fit_px: float = 3.0) -> dict:
    """Counts and rates of an aligned manifest: detection rate, fallbacks, multi-face images, fit error."""
    status = df["status"].value_counts().to_dict()
    n = len(df)
    ok = int((df["status"] == "ok").sum())
    decoded = int(df["status"].isin(["ok", "center_crop", "no_face"]).sum())
    fit = df.loc[df["status"] == "ok", "fit_error"].astype(float)
    return {
        "rows": n,
        "status_counts": {str(k): int(v) for k, v in sorted(status.items())},
        "decoded_images": decoded,
        "faces_found": ok,
        "fallbacks": int((df["status"] == "center_crop").sum()),
        "no_face_skipped": int((df["status"] == "no_face").sum()),
        "detection_rate": ok / decoded if decoded else None,
        "multi_face_images": int((df["n_faces"].fillna(0) > 1).sum()),
        "fit_error_mean_px": float(fit.mean()) if len(fit) else None,
        "fit_error_median_px": float(fit.median()) if len(fit) else None,
        "fit_error_p98_px": float(fit.quantile(0.98)) if len(fit) else None,
        f"fit_within_{fit_px:g}px_rate": float((fit <= fit_px).mean()) if len(fit) else None,
    }


def redetect_fidelity(crops: Mapping[str, bytes], cfg: AlignConfig, *, pad: int = 48) -> pd.DataFrame:
    """Re-detect landmarks on aligned crops (padded with ``pad`` px of edge replication so that MTCNN sees a
    whole face) and measure their mean distance to the template. One row per crop."""
    from .imageio import decode_png
    tpl, _ = TEMPLATES[cfg.template]
    device = resolve_device(cfg.device, "align.device")
    log.info("fidelity re-detection: %s", describe(device))
    det = Detector(cfg.min_face_size, cfg.thresholds, cfg.factor, device)
    rows = []
    for image_id, png in crops.items():
        crop = decode_png(png)
        big = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        boxes, points = det.detect(big[None])[0]
        if len(boxes) == 0:
            rows.append({"image_id": image_id, "redetected": False, "error_px": np.nan, "per_point": None})
            continue
        i = select_face(boxes, big.shape[:2], "center")
        d = np.linalg.norm(points[i] - pad - tpl, axis=1)
        rows.append({"image_id": image_id, "redetected": True, "error_px": float(d.mean()), "per_point": d})
    return pd.DataFrame(rows, columns=["image_id", "redetected", "error_px", "per_point"])


def _error_stats(err: np.ndarray, px: float = 3.0) -> dict:
    err = np.asarray(err, dtype=np.float64)
    if not len(err):
        return {"n": 0}
    return {"n": int(len(err)), "mean_px": float(err.mean()), "median_px": float(np.median(err)),
            "p90_px": float(np.quantile(err, 0.9)), "p98_px": float(np.quantile(err, 0.98)),
            f"within_{px:g}px_rate": float((err <= px).mean())}


def fidelity_report(manifest: pd.DataFrame, shard_paths: Sequence[str | os.PathLike], cfg: AlignConfig, *,
                    sample: int = 500) -> dict:
    """Alignment fidelity, two ways. ``transformed``: the detected landmarks mapped by the fitted similarity
    (every ``ok`` row; the residual of the 5-point fit). ``redetected``: MTCNN run again on a fixed sample
    of crops (evenly spaced in image_id order). Both: mean distance (px, crop pixels) of the five points to
    the template, per image, and per point."""
    tpl, _ = TEMPLATES[cfg.template]
    ok = manifest[manifest["status"] == "ok"].sort_values("image_id")
    rep: dict[str, Any] = {"template": cfg.template, "ok_rows": int(len(ok))}
    if len(ok):
        al = np.stack([np.asarray(v, dtype=np.float64).reshape(5, 2) for v in ok["aligned_landmarks5"]])
        d = np.linalg.norm(al - tpl, axis=2)
        rep["transformed"] = _error_stats(d.mean(1))
        rep["transformed"]["per_point_mean_px"] = dict(zip(LANDMARK_NAMES, map(float, d.mean(0))))
    n = min(sample, len(ok))
    picked = ok["image_id"].iloc[np.linspace(0, len(ok) - 1, n).round().astype(int)].tolist() if n else []
    crops: dict[str, bytes] = {}
    for p in shard_paths:
        crops.update(read_crops(p, picked))
    red = redetect_fidelity({i: crops[i] for i in picked if i in crops}, cfg)
    found = red[red["redetected"]]
    rep["redetected"] = _error_stats(found["error_px"].to_numpy())
    rep["redetected"].update(sample=int(len(red)), redetected=int(len(found)),
                             per_point_mean_px=dict(zip(LANDMARK_NAMES, np.nanmean(
                                 np.stack(found["per_point"].to_list()), axis=0).tolist())) if len(found) else {})
    return rep


# ----------------------------------------------------------------------------------------------- the CLI

def _scan_inputs(inputs: Sequence[str]) -> list[dict]:
    items = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                # every file gets a row (a text file or a broken link is recorded, not skipped silently)
                if f.is_file() or (f.is_symlink() and not f.is_dir()):
                    rel = f.relative_to(p).as_posix()
                    ident = rel.split("/")[0] if "/" in rel else ""
                    items.append({"image_id": rel, "identity": ident, "src": str(f), "shard": 0})
        elif p.exists():
            items.append({"image_id": p.name, "identity": "", "src": str(p), "shard": 0})
        else:
            raise FileNotFoundError(f"no such file or folder: {inp}")
    ids = [it["image_id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("several inputs give the same image id; pass one folder or files with distinct names")
    return items


def _cli_parser() -> argparse.ArgumentParser:
    d = AlignConfig.defaults()
    ap = argparse.ArgumentParser(
        prog="maskface align",
        description="Detect faces (MTCNN, facenet-pytorch weights) and align them to the SphereFace 112x96 "
                    "(or ArcFace 112x112) template. Writes one PNG per aligned image under OUTDIR (same "
                    "relative path, .png) and OUTDIR/aligned.parquet with one row per input image.")
    ap.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("--template", choices=sorted(TEMPLATES), default=d["template"])
    ap.add_argument("--min-face-size", type=int, default=d["min_face_size"])
    ap.add_argument("--thresholds", type=float, nargs=3, default=d["thresholds"])
    ap.add_argument("--factor", type=float, default=d["factor"])
    ap.add_argument("--select", choices=["center", "largest"], default="largest",
                    help="face kept when several are found (center: LFW-style centred crops)")
    ap.add_argument("--on-no-face", choices=["skip", "center_crop"], default="skip")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d["device"])
    ap.add_argument("--batch-size", type=int, default=d["batch_size"], help="0: 8 on CPU, 64 on GPU")
    ap.add_argument("--workers", type=int, default=min(d["workers"], os.cpu_count() or 1), help="CPU processes")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _write_crops(recs: Sequence[dict], out: Path) -> None:
    """Each crop as ``out/<image_id with .png>`` (``<image_id>.png`` where two inputs would share a name)."""
    used: set[str] = set()
    for rec in recs:
        if rec["png"] is not None:
            name = Path(rec["image_id"]).with_suffix(".png").as_posix()
            if name in used:                  # a.jpg and a.png in one folder: keep both
                name = rec["image_id"] + ".png"
            used.add(name)
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(rec["png"])


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _cli_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = AlignConfig.from_mapping(
        dict(template=args.template, min_face_size=args.min_face_size, thresholds=args.thresholds,
             factor=args.factor, select=args.select, on_no_face=args.on_no_face, device=args.device,
             batch_size=args.batch_size, workers=args.workers))
    try:
        items = _scan_inputs(args.inputs)
    except (FileNotFoundError, ValueError) as exc:
        print(f"maskface align: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recs = align_items(items, cfg, cfg.select, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    _write_crops(recs, out)
    table = records_frame(recs, with_png=False)
    write_table(table, out / "aligned.parquet",
                provenance("align_cli", cfg.result_params(), {}, inputs_given=list(args.inputs)))
    s = summarize(table.to_pandas())
    print(f"{len(recs)} images in {dt:.1f} s ({len(recs) / max(dt, 1e-9):.1f} img/s): {s['status_counts']}; "
          f"crops and aligned.parquet in {out}")
    return 0
