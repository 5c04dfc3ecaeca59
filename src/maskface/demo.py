"""Open-set face recognition on a video against a gallery: the original project's demo, on our pipeline.

Holds the demo's settings (:class:`DemoConfig`, the ``demo:`` config section), the gallery, video and drawing
helpers, the threshold from LFW, the run (:func:`run_demo`: gallery, annotated video, detections, summary) and
the ``maskface demo`` command. The open-set metrics against a test video's ground truth (DIR / FAR) are
:func:`maskface.evaluate.open_set_metrics`; :func:`score_run` writes them for a run.

Pipeline (:func:`run_demo`)
    The video is decoded with OpenCV, ``batch_size`` frames at a time. Every frame of a batch goes through
    stage 1's MTCNN :class:`maskface.mtcnn.Detector` in one call (frames of a video share one size, which the
    batched cascade needs); every face found (at least ``min_face_size`` px) is embedded -- all faces of the
    batch in one :meth:`Embedder.embed` call -- with the same embedder the evaluation uses: ``dlib-resnet``
    takes the frame and the MTCNN box (dlib's own 5-point chip inside it), ``sphereface`` takes the 112x96
    crop aligned from the frame with the MTCNN landmarks (never a re-aligned crop).

Gallery (:func:`load_gallery`)
    A folder with one sub-folder per identity holding one or more face photographs (an image directly in the
    folder is an identity named after its file stem). Each photograph goes through the same detector (the
    largest face is used) and embedder. A photograph without a detectable face, an unreadable file or an
    empty folder stops the run with an error naming the file (``gallery_no_face: skip`` skips such
    photographs instead, as long as every identity keeps one). ``masked_gallery`` draws a synthetic mask on
    each gallery photograph with the mask stage first.

Scores and open-set labels
    Embeddings are L2-normalised and scored by cosine similarity: a face's score for an identity is the
    highest cosine to any of that identity's gallery photographs; its *best identity* is the identity with
    the highest score. Above or at ``threshold`` the face is that identity, below it is ``unknown``.
    For dlib-resnet, whose descriptor is metric-learned for Euclidean distance: on L2-normalised vectors
    ``d^2 = 2 - 2 cos``, so cosine and Euclidean rank identically and the threshold is stated as a cosine.

Threshold (:func:`resolve_threshold`)
    A number (cosine), or taken from LFW at a chosen false accept rate ``far``, two ways:
    :func:`threshold_at_far` -- the cosine at which at most ``far`` of LFW view-2's impostor pairs (3,000)
    are accepted, from the evaluation stage's features of the same model
    (``results/features/{model}/{dataset}/clean.parquet``); or :func:`calibrate_on_lfw` -- every
    cross-person pair of one photograph each of a seeded sample of LFW people (400 people: 79,800 impostor
    pairs, finer than view-2 at 1e-3, minutes of CPU, no other stage needed). Both L2-normalise without mean
    subtraction, as here. Without either, dlib-resnet uses :data:`DLIB_RESNET_THRESHOLD` (measured that way
    at FAR 1e-3); other embedders must be given one. LFW's FAR is per comparison; in open set an unknown
    face is compared with every gallery identity, so its false-alarm rate grows with the gallery size (about
    ``1 - (1 - far)^N`` for N independent identities).

Drawing
    Each known identity gets its own colour, stable across frames, runs and videos: the hue is taken from a
    hash of the name (:func:`colour_for`); unknown faces are grey. The label is the name (or ``unknown``) and
    the score.

Outputs (``OUTPUT`` folder)
    ``annotated.mp4`` (mp4v, the input's size and frame rate), ``detections.parquet`` and ``detections.csv``
    (one row per detected face: frame, time_s, face, x1, y1, x2, y2, det_score, identity -- the name or
    ``unknown`` --, best_identity, score, known), ``summary.json`` (video, gallery, threshold and where it
    came from, counts, timings and frames per second), ``frame_NNNNN.png`` snapshots of the annotated frames
    with most known faces (``snapshots`` of them) and ``snapshot.png``, the first of those; with a ground
    truth (the test video of :mod:`maskface.testvideo`), ``metrics.json`` and ``metrics.md``.
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence

import cv2
import numpy as np
import pandas as pd

from .align import align_face, select_face
from .datasets import lfw_people
from .devices import describe, resolve_device
from .evaluate import FeatureTable, metrics_markdown, open_set_metrics
from .features import FaceInput, embedder_from_model   # the demo's embedders are the evaluation's models
from .fileio import atomic_path, write_json, write_text
from .imageio import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb
from .manifest import provenance, write_parquet
from .mask.api import MaskFailed, wearing_masker
from .mtcnn import Detector
from .stageconfig import StageConfig, floats, setting

log = logging.getLogger("maskface.demo")

UNKNOWN = "unknown"
UNKNOWN_COLOUR_BGR = (170, 170, 170)
DET_COLUMNS = ["frame", "time_s", "face", "x1", "y1", "x2", "y2", "det_score", "identity", "best_identity",
               "score", "known"]


class DemoError(Exception):
    """A bad input the demo cannot work with; the message says which and why."""


class VideoError(DemoError):
    pass


class GalleryError(DemoError):
    pass


@dataclass(frozen=True)
class DemoConfig(StageConfig):
    """The demo's settings: the ``demo:`` section of the workflow config (its other keys are the rules')."""
    section: ClassVar[str] = "demo"

    threshold: Optional[float] = setting(None)   # cosine; None: the embedder's measured default (dlib-resnet only)
    min_face_size: int = setting(40)             # MTCNN minsize in the frames (px)
    # MTCNN P-, R-, O-net thresholds: facenet-pytorch's; SphereFace's O-net 0.9 misses masked faces
    det_thresholds: tuple = setting((0.6, 0.7, 0.7), convert=floats)
    factor: float = setting(0.709)               # MTCNN pyramid factor (facenet-pytorch's default; 0.85 = SphereFace)
    batch_size: int = setting(8)                 # frames per detector call
    device: str = setting("auto", rerun=False)
    masked_gallery: bool = setting(False)
    gallery_no_face: str = setting("error")      # error | skip
    max_frames: int = setting(0)                 # 0: every frame
    snapshots: int = setting(1)                  # annotated frames saved as PNG (the ones with most known faces)

    def validate(self) -> None:
        if self.threshold is not None and not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold {self.threshold!r}: a cosine similarity in [-1, 1]")
        if self.gallery_no_face not in ("error", "skip"):
            raise ValueError(f"gallery_no_face {self.gallery_no_face!r}: error or skip")
        if self.min_face_size < 4 or self.batch_size < 1 or not 0 < self.factor < 1:
            raise ValueError("min_face_size >= 4, batch_size >= 1 and 0 < factor < 1 are required")
        if len(self.det_thresholds) != 3:
            raise ValueError("det_thresholds: three numbers (P-, R-, O-net)")


# ------------------------------------------------------------------------------------------- helpers

def colour_for(name: str) -> tuple[int, int, int]:
    """A stable BGR colour of an identity: hue from the SHA-1 of its name, full saturation, bright."""
    if name == UNKNOWN:
        return UNKNOWN_COLOUR_BGR
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
    hue = (h % 360) / 360.0
    sat = 0.75 + 0.25 * ((h >> 12) % 100) / 100.0
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 1.0)
    return int(round(b * 255)), int(round(g * 255)), int(round(r * 255))


def display_name(name: str) -> str:
    return name.replace("_", " ")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def make_detector(cfg: DemoConfig) -> Detector:
    device = resolve_device(cfg.device, "demo.device")
    log.info("demo detector: %s", describe(device))
    return Detector(cfg.min_face_size, cfg.det_thresholds, cfg.factor, device)


def face_inputs(embedder, rgb: np.ndarray, boxes: np.ndarray, points: np.ndarray) -> list:
    """What ``embedder`` consumes for each detected face of one image."""
    out = []
    if embedder.input_kind == "aligned":
        template = (getattr(embedder, "meta", None) or {}).get("template") or "sphereface_112x96"
        for p in points:
            crop, _ = align_face(rgb, np.asarray(p, dtype=np.float64).reshape(5, 2), template)
            out.append(FaceInput(crop))
    else:
        for b, p in zip(boxes, points):
            out.append(FaceInput(rgb, [float(v) for v in b[:4]], [float(v) for v in np.ravel(p)]))
    return out


# ------------------------------------------------------------------------------------------- gallery

@dataclass
class Gallery:
    names: list[str]                   # identities, sorted
    files: list[str]                   # one per embedding
    image_identity: np.ndarray         # (n_images,) index into names
    embeddings: np.ndarray             # (n_images, dim), L2-normalised
    skipped: list[dict] = field(default_factory=list)

    def identity_scores(self, emb: np.ndarray) -> np.ndarray:
        """(n, n_identities): per identity, the highest cosine to its gallery photographs."""
        sims = l2_normalize(emb) @ self.embeddings.T
        out = np.full((len(sims), len(self.names)), -np.inf, dtype=np.float32)
        for k in range(len(self.names)):
            cols = self.image_identity == k
            out[:, k] = sims[:, cols].max(axis=1) if len(sims) else 0
        return out

    def label(self, emb: np.ndarray, threshold: float) -> tuple[list[str], list[str], np.ndarray]:
        """(identity or unknown, best identity, best score) per embedding."""
        if len(emb) == 0:
            return [], [], np.zeros(0, np.float32)
        s = self.identity_scores(emb)
        best = s.argmax(axis=1)
        score = s[np.arange(len(s)), best]
        bestn = [self.names[i] for i in best]
        ident = [n if sc >= threshold else UNKNOWN for n, sc in zip(bestn, score)]
        return ident, bestn, score


def scan_gallery(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(identity, file) pairs of a gallery folder: sub-folder per identity, or loose images named by stem."""
    root = Path(folder)
    if not root.exists():
        raise GalleryError(f"gallery folder not found: {root}")
    if not root.is_dir():
        raise GalleryError(f"gallery must be a folder (one sub-folder per identity), got a file: {root}")
    items: list[tuple[str, Path]] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.name.startswith("."))
            items.extend((p.name, f) for f in files)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            items.append((p.stem, p))
    if not items:
        raise GalleryError(f"gallery folder {root} holds no images: expected one sub-folder per identity with "
                           f"at least one face photograph ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if UNKNOWN in {i for i, _ in items}:
        raise GalleryError(f"gallery folder {root}: an identity may not be called {UNKNOWN!r}")
    return items


def load_gallery(folder: str | os.PathLike, detector, embedder, *, masked: bool = False,
                 on_no_face: str = "error", mask_seed: int = 0) -> Gallery:
    """Detect, (optionally mask,) and embed every gallery photograph; see the module docstring."""
    items = scan_gallery(folder)
    masker = None
    if masked:
        masker = wearing_masker()
    faces, idents, files, skipped = [], [], [], []
    for k, (ident, path) in enumerate(items):
        try:
            rgb = load_rgb(path)
        except ImageDecodeError as exc:
            raise GalleryError(f"gallery image {path}: {exc.reason} ({exc.status})") from None
        except OSError as exc:
            raise GalleryError(f"gallery image {path}: cannot read: {exc}") from None
        if masker is not None:
            try:
                rgb = masker(rgb, mask_seed + k, f"{ident}/{path.name}")
            except MaskFailed as exc:
                raise GalleryError(f"gallery image {path}: masked_gallery: the mask stage could not mask it "
                                   f"({exc})") from None
        boxes, points = detector.detect(np.array(rgb[None]))[0]   # a writable copy for torch
        if not len(boxes):
            msg = (f"gallery image {path}: no face detected (MTCNN, min_face_size {detector.min_face_size:g} px, "
                   f"image {rgb.shape[1]}x{rgb.shape[0]}); use a photograph with one clearly visible face")
            if on_no_face == "skip":
                log.warning("%s -- skipped", msg)
                skipped.append({"identity": ident, "file": str(path), "reason": "no face detected"})
                continue
            raise GalleryError(msg)
        i = select_face(boxes, rgb.shape[:2], "largest")
        if len(boxes) > 1:
            log.info("gallery image %s: %d faces, the largest is used", path, len(boxes))
        faces.extend(face_inputs(embedder, rgb, boxes[i:i + 1], points[i:i + 1]))
        idents.append(ident)
        files.append(str(path))
    names = sorted(set(i for i, _ in items))
    lost = sorted(set(names) - set(idents))
    if lost:
        raise GalleryError(f"gallery identities without any usable face photograph: {lost}")
    emb = l2_normalize(embedder.embed(faces))
    index = {n: k for k, n in enumerate(names)}
    return Gallery(names, files, np.array([index[i] for i in idents], dtype=np.int64), emb, skipped)


# --------------------------------------------------------------------------------------------- video

@dataclass
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    frame_count: int          # as the container says (may be -1 / approximate)
    fps_assumed: bool = False


def open_video(path: str | os.PathLike) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video for reading, or raise :class:`VideoError` saying why not."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: {p}")
    if not p.is_file():
        raise VideoError(f"video path is not a file: {p}")
    if p.stat().st_size == 0:
        raise VideoError(f"video file is empty (0 bytes): {p}")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"cannot open video {p}: OpenCV/FFmpeg cannot decode it (corrupt, truncated or not a "
                         f"video)")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    assumed = not (math.isfinite(fps) and 0 < fps < 1000)
    if assumed:
        fps = 25.0
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or -1)
    if w <= 0 or h <= 0:
        cap.release()
        raise VideoError(f"video {p} reports no frame size: corrupt or not a video")
    return cap, VideoInfo(str(p), w, h, fps, n, assumed)


def iter_frame_batches(cap: cv2.VideoCapture, info: VideoInfo, batch: int,
                       max_frames: int = 0) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index of the first frame, [RGB frames]) batches; stops at the end, at max_frames, or at the first
    frame that fails to decode (a warning if the container promised more)."""
    index = 0
    while True:
        frames = []
        while len(frames) < batch and (max_frames <= 0 or index + len(frames) < max_frames):
            ok, bgr = cap.read()
            if not ok or bgr is None:
                break
            if bgr.shape[:2] != (info.height, info.width):
                raise VideoError(f"{info.path}: frame {index + len(frames)} is {bgr.shape[1]}x{bgr.shape[0]}, "
                                 f"the video {info.width}x{info.height}")
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        if frames:
            yield index, frames
            index += len(frames)
        if len(frames) < batch:
            if index == 0:
                raise VideoError(f"video {info.path}: no frame could be decoded (corrupt or empty)")
            if max_frames <= 0 and info.frame_count > 0 and index < info.frame_count - 1:
                log.warning("video %s: decoding stopped at frame %d of %d announced (truncated or corrupt "
                            "from there)", info.path, index, info.frame_count)
            return


# ------------------------------------------------------------------------------------------- drawing

def draw_faces(bgr: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Boxes and labels of one frame's faces, drawn in place on a BGR frame (returned)."""
    h, w = bgr.shape[:2]
    scale = max(0.35, min(h, w) / 600.0)
    thick = max(1, int(round(min(h, w) / 300.0)))
    for r in rows:
        name = r["identity"]
        col = colour_for(name)
        x1, y1, x2, y2 = (int(round(v)) for v in (r["x1"], r["y1"], r["x2"], r["y2"]))
        cv2.rectangle(bgr, (x1, y1), (x2, y2), col, thick + (1 if name != UNKNOWN else 0), cv2.LINE_AA)
        text = f"{display_name(name)} {r['score']:.3f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 3 if y1 - th - base - 3 >= 0 else min(y2 + th + 3, h - base)
        tx = min(max(x1, 0), max(w - tw - 2, 0))
        cv2.rectangle(bgr, (tx, ty - th - 2), (tx + tw + 2, ty + base), col, -1)
        lum = 0.114 * col[0] + 0.587 * col[1] + 0.299 * col[2]
        cv2.putText(bgr, text, (tx + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0) if lum > 128 else (255, 255, 255), 1, cv2.LINE_AA)
    return bgr


# ----------------------------------------------------------------------------------------- threshold

def threshold_at_far(features: str | os.PathLike, pairs: str | os.PathLike | pd.DataFrame,
                     far: float) -> dict:
    """The cosine threshold at which at most ``far`` of LFW's impostor pairs are accepted (score >= t),
    from an evaluation features Parquet (clean variant), L2-normalised, no mean subtraction."""
    if not 0 <= far < 1:
        raise ValueError(f"far {far!r}: must be in [0, 1)")
    table = FeatureTable.read(features)
    p = pairs if isinstance(pairs, pd.DataFrame) else pd.read_parquet(pairs, columns=["a", "b", "same"])
    fa = table.lookup(p["a"].astype(str).tolist(), "clean")
    fb = table.lookup(p["b"].astype(str).tolist(), "clean")
    ok = ~(np.isnan(fa).any(1) | np.isnan(fb).any(1))
    s = (l2_normalize(fa[ok]) * l2_normalize(fb[ok])).sum(1).astype(np.float64)
    same = p["same"].to_numpy(bool)[ok]
    imp = s[~same]
    if not len(imp):
        raise ValueError(f"{features}: no impostor pair with features")
    t = threshold_at_far_scores(imp, far)
    return {"threshold": t, "far_target": float(far), "far_achieved": float((imp >= t).mean()),
            "tar": float((s[same] >= t).mean()) if same.any() else None, "n_impostor": int(len(imp)),
            "n_genuine": int(same.sum()), "n_missing_pairs": int((~ok).sum()), "features": str(features),
            "scoring": "cosine on L2-normalised features, no mean subtraction"}


def threshold_at_far_scores(impostor: np.ndarray, far: float) -> float:
    """The lowest threshold t (accept iff score >= t) that accepts at most ``far`` of ``impostor``."""
    imp = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    k = int(math.floor(far * len(imp) + 1e-9))
    if k >= len(imp):
        return float(imp[-1])
    # just above the (k+1)-th highest score, as a float32 value: scores are float32, and a threshold between
    # two float32 numbers would round onto one of them in a float32 comparison
    return float(np.nextafter(np.float32(imp[k]), np.float32(np.inf)))


def calibrate_on_lfw(images_root: str | os.PathLike, detector, embedder, far: float, *, people: int = 400,
                     seed: int = 0, exclude: Sequence[str] = (), only: Optional[Sequence[str]] = None,
                     progress: bool = True) -> dict:
    """A threshold at ``far`` without the evaluation stage: one photograph each of ``people`` LFW people
    (seeded draw among ``only`` when given, people in ``exclude`` left out) is detected (the most central face, as stage 1 does for
    LFW) and embedded; every cross-person pair is an impostor pair (people*(people-1)/2 of them, so FARs
    down to ~1e-4 are resolved). For people with a second photograph, that one against the first gives the
    genuine pairs (TAR at the threshold)."""
    from tqdm import tqdm

    if not 0 <= far < 1:
        raise ValueError(f"far {far!r}: must be in [0, 1)")
    root = Path(images_root)
    allp = lfw_people(root)
    names = sorted((set(allp) if only is None else set(allp) & set(only)) - set(exclude))
    if not names:
        raise DemoError(f"calibration: no LFW person of {root} left to draw from")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(names, min(people, len(names)), replace=False).tolist())
    items = []   # (person, file, role)
    for p in chosen:
        files = allp[p]
        items.append((p, files[0], "a"))
        if len(files) > 1:
            items.append((p, files[1], "b"))
    faces, owners = [], []
    for p, f, role in tqdm(items, desc="calibrate", unit="img", disable=not progress, file=sys.stderr,
                           mininterval=float(os.environ.get("TQDM_MININTERVAL", 1.0))):
        rgb = load_rgb(root / f)
        boxes, points = detector.detect(np.array(rgb[None]))[0]   # a writable copy for torch
        if not len(boxes):
            continue
        i = select_face(boxes, rgb.shape[:2], "center")
        faces.extend(face_inputs(embedder, rgb, boxes[i:i + 1], points[i:i + 1]))
        owners.append((p, role))
    emb = l2_normalize(embedder.embed(faces))
    a_idx = [k for k, (_, r) in enumerate(owners) if r == "a"]
    a = emb[a_idx]
    sims = a @ a.T
    iu = np.triu_indices(len(a), 1)
    imp = sims[iu].astype(np.float64)
    t = threshold_at_far_scores(imp, far)
    first = {owners[k][0]: k for k in a_idx}
    gen = np.array([float(emb[first[p]] @ emb[k]) for k, (p, r) in enumerate(owners) if r == "b" and p in first])
    return {"threshold": t, "far_target": float(far), "far_achieved": float((imp >= t).mean()),
            "tar": float((gen >= t).mean()) if len(gen) else None, "n_impostor": int(len(imp)),
            "n_genuine": int(len(gen)), "people": len(a_idx), "seed": seed, "images_root": str(root),
            "drawn": chosen,
            "scoring": "cosine on L2-normalised features, no mean subtraction",
            "impostor_quantiles": {q: float(np.quantile(imp, q)) for q in (0.5, 0.9, 0.99, 0.999)}}


# ---------------------------------------------------------------------- people a model never trained on

def fold_people(pairs: pd.DataFrame, folds: Sequence[int]) -> set[str]:
    """The people of these folds of LFW's pairs (pairs.txt parsed by maskface.datasets.parse_pairs)."""
    from .train_data import fold_identities

    return set().union(*(fold_identities(pairs, int(k)) for k in folds))


def model_held_out(model: Optional[Mapping[str, Any]], dataset: str, pairs: pd.DataFrame
                   ) -> Optional[list[int]]:
    """The LFW folds whose people a model was never trained on, for a model trained on ``dataset`` under LFW's
    unrestricted protocol (maskface.train, ``lfw_unrestricted``: its test fold, and its validation fold under
    ``train.validation: next_fold``); None for a model that did not train on ``dataset``'s people (dlib's,
    or one trained on another set)."""
    ckpt = (model or {}).get("checkpoint")
    if not ckpt:
        return None
    import torch

    meta = (torch.load(ckpt, map_location="cpu", weights_only=False) or {}).get("meta") or {}
    if meta.get("protocol") != "lfw_unrestricted" or dataset not in (meta.get("datasets") or []):
        return None
    from .train_data import validation_fold

    fold = int(meta["fold"])
    return [fold] + ([validation_fold(pairs, fold)] if meta.get("validation") == "next_fold" else [])


def check_evaluation_threshold(model: Optional[Mapping[str, Any]], dataset: str, pairs: pd.DataFrame) -> None:
    """Stop (DemoError) when the threshold would come from the evaluation's view-2 pairs (every fold) of a model
    fine-tuned on ``dataset``: most of those pairs are of its training people."""
    held = model_held_out(model, dataset, pairs)
    if held is not None:
        raise DemoError(f"demo.threshold_from evaluation: demo.model {(model or {}).get('name', '')!r} was trained "
                        f"on the {dataset} people outside folds {held}, whose pairs the evaluation scores; use "
                        f"threshold_from lfw_sample with demo.calibration_folds: [{held[-1]}]")


def check_never_trained_on(model: Optional[Mapping[str, Any]], dataset: str, pairs: pd.DataFrame,
                           people: Sequence[str], what: str, key: str) -> None:
    """Stop (DemoError) when ``people`` (the test video's, or the threshold's calibration people) include people
    ``model`` trained on: its open-set rates or its threshold would be measured on its own training identities.
    ``key``: the config key that picks those people's folds, named in the message."""
    held = model_held_out(model, dataset, pairs)
    if held is None:
        return
    seen = sorted(set(people) - fold_people(pairs, held))
    if seen:
        raise DemoError(
            f"demo.model {(model or {}).get('name', '')!r} ({model['checkpoint']}) was trained on the {dataset} "
            f"people outside folds {held}; {len(seen)} of the {len(set(people))} {what} are among them "
            f"(e.g. {seen[0]}). Set {key} to folds it never trained on ({held[0]} for the video, "
            f"{held[-1]} for the threshold).")


# Cosine thresholds at LFW FAR 1e-3 (per comparison), measured with calibrate_on_lfw (400 LFW people, seed 0,
# one photograph each: 79,800 impostor pairs; detector at the DemoConfig defaults):
#   python -c "from maskface.demo import *; print(calibrate_on_lfw(LFW_IMAGES, make_detector(DemoConfig()),
#              embedder_from_model({'embedder': 'dlib-resnet'}), 1e-3, people=400))"
# dlib-resnet (the torch module, measured 2026-12-04): 0.92445 (FAR 0.99e-3; TAR 99.2% on 125 genuine pairs;
# impostor median 0.8321, 99th percentile 0.9055, 99.9th 0.9243).
# dlib (dlib's own run of the same network, measured earlier): 0.92445 (FAR 1.0e-3; TAR 99.2%; impostor median
# 0.832, 99th percentile 0.906). The two agree to the fourth digit, as their descriptors do (cosine >= 0.9999).
# Used when no threshold is given; SphereFace has no such default.
DLIB_RESNET_THRESHOLD = 0.9245
DEFAULT_THRESHOLDS = {"dlib-resnet": DLIB_RESNET_THRESHOLD, "dlib": DLIB_RESNET_THRESHOLD}


def resolve_threshold(threshold: Optional[float], embedder, source: Optional[Mapping[str, Any]] = None
                      ) -> tuple[float, dict]:
    """(threshold, where it came from): the given one, else the embedder's measured default."""
    if threshold is not None:
        return float(threshold), dict(source or {"kind": "config"})
    name = getattr(embedder, "name", "")
    # the measured value holds for the settings it was measured with only (no flip, no jitter)
    plain_settings = (not getattr(embedder, "flip", False) and not getattr(embedder, "num_jitters", 0)
                      and getattr(embedder, "checkpoint", None) is None)      # not for other (fine-tuned) weights
    if name in DEFAULT_THRESHOLDS and plain_settings:
        return DEFAULT_THRESHOLDS[name], {"kind": "built-in", "far": 1e-3,
                                          "note": f"{name} at LFW FAR 1e-3, measured by calibrate_on_lfw"}
    raise DemoError(f"no threshold for embedder {name!r} with these settings: give one (cosine), or take it "
                    f"from LFW at a FAR (maskface demo --lfw-features/--calibrate-lfw; Snakemake: "
                    f"demo.threshold null)")


# ----------------------------------------------------------------------------------------------- run

def run_demo(video: str | os.PathLike, gallery_dir: str | os.PathLike, output: str | os.PathLike,
             cfg: DemoConfig | Mapping[str, Any] | None = None, *, embedder=None, model: Optional[Mapping] = None,
             progress: bool = True, threshold_source: Optional[Mapping[str, Any]] = None) -> dict:
    """Annotate ``video`` against ``gallery_dir`` into the folder ``output``; returns the summary."""
    cfg = cfg if isinstance(cfg, DemoConfig) else DemoConfig.from_mapping(cfg)
    t_start = time.perf_counter()
    cap, info = open_video(video)           # fail on a bad video before any model loads
    try:
        detector = make_detector(cfg)
        if embedder is None:
            embedder = embedder_from_model(model or {"embedder": "dlib-resnet"}, cfg.device)
        thr, threshold_source = resolve_threshold(cfg.threshold, embedder, threshold_source)
        cfg = replace(cfg, threshold=thr)
        t0 = time.perf_counter()
        gallery = load_gallery(gallery_dir, detector, embedder, masked=cfg.masked_gallery,
                               on_no_face=cfg.gallery_no_face)
        t_gallery = time.perf_counter() - t0
        log.info("gallery: %d identities, %d photographs (%.1f s): %s", len(gallery.names), len(gallery.files),
                 t_gallery, ", ".join(gallery.names))
        log.info("video %s: %dx%d, %.3g fps%s, %s frames; threshold %.4f (cosine)", info.path, info.width,
                 info.height, info.fps, " (assumed)" if info.fps_assumed else "",
                 info.frame_count if info.frame_count > 0 else "?", cfg.threshold)
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        t_loop = time.perf_counter()
        with atomic_path(out / "annotated.mp4") as tmp:
            run = annotate_video(cap, info, tmp, detector, embedder, gallery, cfg, progress=progress)
    finally:
        cap.release()
    t_video = time.perf_counter() - t_loop

    det = write_detections(out, run.rows, cfg, model, embedder)
    seconds = {"gallery": round(t_gallery, 3), "video": round(t_video, 3),
               "total": round(time.perf_counter() - t_start, 3), **{k: round(v, 3) for k, v in run.timing.items()}}
    summary = {
        "video": asdict(info), "gallery": {"folder": str(gallery_dir), "identities": gallery.names,
                                           "files": gallery.files, "skipped": gallery.skipped,
                                           "masked": cfg.masked_gallery},
        "threshold": float(cfg.threshold), "threshold_source": threshold_source,
        "config": asdict(cfg), "embedder": embedder.describe(), "frames": run.frames, "faces": int(len(det)),
        "known_faces": int(det["known"].sum()) if len(det) else 0,
        "faces_per_identity": det["identity"].value_counts().sort_index().to_dict() if len(det) else {},
        "seconds": seconds, "fps": run.frames / max(t_video, 1e-9), "faces_per_s": len(det) / max(t_video, 1e-9),
        "snapshots": write_snapshots(out, run),
        "outputs": {"video": "annotated.mp4", "detections": "detections.parquet", "csv": "detections.csv"},
    }
    write_json(summary, out / "summary.json")
    log.info("%d frames, %d faces (%d known) in %.1f s: %.2f frames/s, %.2f faces/s (detect %.1f s, embed %.1f "
             "s, decode %.1f s, draw+write %.1f s) -> %s", run.frames, len(det), summary["known_faces"], t_video,
             summary["fps"], summary["faces_per_s"], run.timing["detect"], run.timing["embed"],
             run.timing["decode"], run.timing["draw_write"], out)
    return summary


@dataclass
class Annotation:
    """What annotating a video gave: one row per face (:data:`DET_COLUMNS`), the annotated frames kept as
    snapshots (``snapshots`` of them: most known faces, then most faces, then earliest), counts and timings."""
    snapshots: int = 1
    rows: list[dict] = field(default_factory=list)
    snaps: list[tuple[tuple, np.ndarray]] = field(default_factory=list)  # ((-known, -faces, frame), BGR), best first
    first_bgr: Optional[np.ndarray] = None
    frames: int = 0
    timing: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("decode", "detect", "embed",
                                                                            "draw_write"), 0.0))

    def add_frame(self, frame: int, faces: list[dict], bgr: np.ndarray) -> None:
        self.rows.extend(faces)
        if self.first_bgr is None:
            self.first_bgr = bgr
        if self.snapshots > 0 and faces:   # keep the frames with most known faces
            self.snaps.append(((-sum(r["known"] for r in faces), -len(faces), frame), bgr))
            self.snaps.sort(key=lambda x: x[0])
            del self.snaps[self.snapshots:]


def annotate_video(cap: cv2.VideoCapture, info: VideoInfo, path: str | os.PathLike, detector, embedder,
                   gallery: Gallery, cfg: DemoConfig, *, progress: bool = True) -> Annotation:
    """Detect, embed, label and draw the faces of every frame (``batch_size`` frames at a time) and write the
    annotated frames to an mp4v video at ``path``."""
    from tqdm import tqdm

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), info.fps, (info.width, info.height))
    if not writer.isOpened():
        raise DemoError(f"OpenCV cannot write an mp4v video to {path}")
    run = Annotation(snapshots=cfg.snapshots)
    total = info.frame_count if info.frame_count > 0 else None
    if cfg.max_frames and total:
        total = min(total, cfg.max_frames)
    t_loop = time.perf_counter()
    try:
        bar = tqdm(total=total, desc="demo", unit="frame", disable=not progress, file=sys.stderr,
                   mininterval=float(os.environ.get("TQDM_MININTERVAL", 1.0)))
        with bar:
            it = iter_frame_batches(cap, info, cfg.batch_size, cfg.max_frames)
            while True:
                ta = time.perf_counter()
                try:
                    start, frames = next(it)
                except StopIteration:
                    break
                tb = time.perf_counter()
                dets = detector.detect(np.stack(frames))
                tc = time.perf_counter()
                per_frame = label_faces(frames, dets, start, info.fps, embedder, gallery, cfg.threshold)
                td = time.perf_counter()
                for j, rgb in enumerate(frames):
                    bgr = draw_faces(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), per_frame[j])
                    writer.write(bgr)
                    run.add_frame(start + j, per_frame[j], bgr)
                te = time.perf_counter()
                for k, dt in (("decode", tb - ta), ("detect", tc - tb), ("embed", td - tc), ("draw_write", te - td)):
                    run.timing[k] += dt
                run.frames += len(frames)
                bar.update(len(frames))
                bar.set_postfix(fps=f"{run.frames / max(te - t_loop, 1e-9):.2f}", faces=len(run.rows))
    finally:
        writer.release()
    return run


def label_faces(frames: Sequence[np.ndarray], dets: Sequence[tuple], start: int, fps: float, embedder,
                gallery: Gallery, threshold: float) -> list[list[dict]]:
    """The rows (:data:`DET_COLUMNS`) of each frame of a batch (first frame ``start``): every detected face is
    embedded (one call for the batch) and labelled against the gallery at ``threshold``."""
    faces, owners = [], []
    for j, (boxes, points) in enumerate(dets):
        if len(boxes):
            faces.extend(face_inputs(embedder, frames[j], boxes, points))
            owners.extend((j, k) for k in range(len(boxes)))
    emb = embedder.embed(faces) if faces else np.zeros((0, 1), np.float32)
    ident, bestn, score = gallery.label(emb, threshold)
    per_frame: list[list[dict]] = [[] for _ in frames]
    for q, (j, k) in enumerate(owners):
        b = dets[j][0][k]
        per_frame[j].append({"frame": start + j, "time_s": (start + j) / fps, "face": k,
                             "x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3]),
                             "det_score": float(b[4]), "identity": ident[q], "best_identity": bestn[q],
                             "score": float(score[q]), "known": ident[q] != UNKNOWN})
    return per_frame


def write_detections(out: Path, rows: list[dict], cfg: DemoConfig, model: Optional[Mapping], embedder
                     ) -> pd.DataFrame:
    """``detections.parquet`` (with the run's provenance) and ``detections.csv``."""
    det = pd.DataFrame(rows, columns=DET_COLUMNS)
    prov = provenance("demo", {**asdict(cfg), "model": dict(model or {})}, {}, embedder=embedder.describe())
    write_parquet(det, out / "detections.parquet", prov)
    with atomic_path(out / "detections.csv") as tmp:
        det.to_csv(tmp, index=False, float_format="%.4f")
    return det


def write_snapshots(out: Path, run: Annotation) -> list[str]:
    """``frame_NNNNN.png`` of the kept frames and ``snapshot.png``; the names of the former."""
    names = []
    for (_, _, f), bgr in sorted(run.snaps, key=lambda x: x[0][2]):
        names.append(_write_png(out / f"frame_{f:05d}.png", bgr))
    # the frame with most known faces (then most faces, then earliest) under a fixed name; frame 0 if no face
    if run.snaps or run.first_bgr is not None:
        _write_png(out / "snapshot.png", run.snaps[0][1] if run.snaps else run.first_bgr)
    return names


def _write_png(path: Path, bgr: np.ndarray) -> str:
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), bgr)
    return path.name


def score_run(output: str | os.PathLike, ground_truth: str | os.PathLike, threshold: float, frames: int, *,
              extra: Optional[Mapping[str, Any]] = None, note: str = "") -> str:
    """The open-set metrics (:func:`maskface.evaluate.open_set_metrics`) of the run in ``output`` against a test
    video's ground truth, over its first ``frames`` frames: ``metrics.json`` (with ``extra``) and
    ``metrics.md`` (ending with ``note``); returns the markdown."""
    out = Path(output)
    det = pd.read_parquet(out / "detections.parquet")
    res = open_set_metrics(det, pd.read_parquet(ground_truth), threshold, frames=frames)
    res.update(extra or {})
    write_json(res, out / "metrics.json")
    md = metrics_markdown(res) + note
    write_text(md, out / "metrics.md")
    return md


# ----------------------------------------------------------------------------------------------- CLI

def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="maskface demo",
        description="Open-set face recognition on a video: detect and align every face (MTCNN), embed it, score "
                    "it by cosine against a gallery (one sub-folder per identity), label it known or unknown "
                    "and write OUTPUT/annotated.mp4, detections.parquet/.csv, summary.json and a PNG frame.")
    ap.add_argument("video", help="input video (anything OpenCV/FFmpeg decodes)")
    ap.add_argument("gallery", help="gallery folder: GALLERY/<identity>/<photo>.jpg")
    ap.add_argument("output", help="output folder")
    ap.add_argument("--threshold", type=float, default=None,
                    help="cosine threshold (default: at --far from --lfw-features or --calibrate-lfw, else the "
                         "embedder's measured default, dlib-resnet only)")
    ap.add_argument("--far", type=float, default=1e-3, help="LFW false accept rate to take the threshold at")
    ap.add_argument("--lfw-features", default=None,
                    help="evaluation features Parquet of the same model (results/features/MODEL/lfw/clean.parquet)")
    ap.add_argument("--lfw-pairs", default=None, help="pairs manifest (results/manifests/lfw/pairs.parquet)")
    ap.add_argument("--calibrate-lfw", default=None, metavar="LFW_IMAGES",
                    help="take the threshold from cross-person pairs of --calibration-people LFW people (minutes)")
    ap.add_argument("--calibration-people", type=int, default=400)
    ap.add_argument("--embedder", choices=["dlib-resnet", "dlib", "sphereface"], default="dlib-resnet")
    ap.add_argument("--checkpoint", default=None, help="sphereface model file")
    ap.add_argument("--min-face-size", type=int, default=DemoConfig.min_face_size)
    ap.add_argument("--factor", type=float, default=DemoConfig.factor)
    ap.add_argument("--det-thresholds", type=float, nargs=3, default=list(DemoConfig.det_thresholds),
                    help="MTCNN P/R/O-net thresholds")
    ap.add_argument("--batch-size", type=int, default=DemoConfig.batch_size)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--masked-gallery", action="store_true", help="draw a mask on every gallery photograph")
    ap.add_argument("--skip-gallery-no-face", action="store_true",
                    help="skip gallery photographs without a face instead of stopping")
    ap.add_argument("--max-frames", type=int, default=0)
    ap.add_argument("--ground-truth", default=None,
                    help="ground_truth.parquet of a test video: also write metrics.json / metrics.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source: dict[str, Any] = {"kind": "command line"}
    try:
        thr = args.threshold
        if thr is None and args.lfw_features:
            if not args.lfw_pairs:
                raise DemoError("--lfw-features needs --lfw-pairs")
            source = {"kind": "evaluation", **threshold_at_far(args.lfw_features, args.lfw_pairs, args.far)}
            thr = source["threshold"]
        cfg = DemoConfig.from_mapping(dict(
            threshold=thr, min_face_size=args.min_face_size, factor=args.factor, batch_size=args.batch_size,
            det_thresholds=args.det_thresholds,
            device=args.device, masked_gallery=args.masked_gallery, max_frames=args.max_frames,
            gallery_no_face="skip" if args.skip_gallery_no_face else "error"))
        model = {"embedder": args.embedder, "checkpoint": args.checkpoint}
        embedder = None
        if thr is None and args.calibrate_lfw:
            open_video(args.video)[0].release()          # a bad video fails before minutes of calibration
            scan_gallery(args.gallery)
            embedder = embedder_from_model(model, cfg.device)
            source = {"kind": "lfw_sample", **calibrate_on_lfw(args.calibrate_lfw, make_detector(cfg), embedder,
                                                                args.far, people=args.calibration_people,
                                                                progress=not args.no_progress)}
            cfg = replace(cfg, threshold=source["threshold"])
        summary = run_demo(args.video, args.gallery, args.output, cfg, model=model, embedder=embedder,
                           progress=not args.no_progress, threshold_source=source if cfg.threshold is not None else None)
        cfg = replace(cfg, threshold=summary["threshold"])
        if args.ground_truth:
            print(score_run(args.output, args.ground_truth, cfg.threshold, summary["frames"]))
    except (DemoError, ValueError, FileNotFoundError) as exc:
        print(f"maskface demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['frames']} frames, {summary['faces']} faces ({summary['known_faces']} known), "
          f"{summary['fps']:.2f} frames/s -> {args.output}")
    return 0
