"""The per-face steps both entries share (:mod:`~maskface.mask.stage` for batches of aligned crops,
:mod:`~maskface.mask.api` for photos and single crops): the face box of an aligned crop (its template) or of a
photo (dlib's HOG detector), the 68 landmarks, the checks that decide whether a face can be masked, and
:func:`mask_face`, which draws the style (:mod:`~maskface.mask.style`) and renders the mask
(:mod:`~maskface.mask.render`). Flow: entry -> face -> render -> kernels.

Skips (``status == "skipped"``; ``skip`` holds the code, ``reason`` the numbers)
    too_small: the crop is under 24 px a side or the eye distance under ``min_eye_px``;
    landmarks_outside: a brow, eye, nose or mouth landmark lies more than 0.1 D outside the image (the jaw
    may leave the image: on SphereFace crops the chin is below the crop in 99 % of faces);
    landmarks_disagree: on an aligned crop, the 68-point fit's eye centres, nose tip and mouth corners lie on
    average more than 0.3 of the template's eye-to-mouth distance from the template points (not the face
    the aligner found);
    no_face: a centre-crop fallback (aligned status ``center_crop``: the aligner found no face) on which
    dlib's HOG detector finds no face either. Where it finds one, that box is used for the landmarks and
    the template check is not applied (the face is not on the template). Rows with aligned status ``ok``
    are trusted to hold the face the aligner found;
    bad_landmarks: implausible geometry (mouth not 0.5-2.5 D below the eyes);
    pitch: the nose tip lies outside 12-88 % of the way from the eyes to the mouth (head tilted far back or
    forward: dlib's nose landmarks collapse, a mask built on them would be wrong);
    yaw: the estimated head yaw exceeds ``max_yaw_deg``; mask_outside: nothing of the mask is in the image.
Landmarks of a face do not depend on the other faces of its batch (tested).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import cv2
import numpy as np

from . import landmarks as lmk
from . import render as rd
from .config import MaskConfig
from .kernels import face_metrics as _face_metrics
from .style import draw_style, image_rng

# SphereFace 112x96 template (sphereface/preprocess/code/face_align_demo.m); ArcFace 112x112 = same +8 px x
TEMPLATES = {
    "sphereface_112x96": np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                                   [33.5493, 92.3655], [62.7299, 92.2041]]),
}
TEMPLATES["arcface_112x112"] = TEMPLATES["sphereface_112x96"] + np.array([8.0, 0.0])

# Where the nose tip (30) may lie on the way from the eye midpoint to the mouth midpoint (median 0.50 on
# LFW crops; outside this range the nose landmarks have collapsed towards the eyes or the mouth, which on
# LFW happens for heads tilted far back (0.4 % of 1,695 faces): the landmark-built mask would be wrong).
PITCH_TIP_RANGE = (0.12, 0.88)

PAD_SHARE = 0.09        # edge-replicated border around the crop, share of the box side (see landmark_crops)
MIN_SIDE = 24           # px: smaller crops are skipped


def template_points(template: Optional[str], size_hw: tuple[int, int]) -> np.ndarray:
    """The five template points of an aligned crop, scaled if the crop is not the template's size."""
    name = template if template in TEMPLATES else "sphereface_112x96"
    pts = TEMPLATES[name]
    th, tw = (112, 112) if name == "arcface_112x112" else (112, 96)
    h, w = size_hw
    if (h, w) != (th, tw):
        pts = pts * np.array([w / tw, h / th])
    return pts


# ---------------------------------------------------------------------------------- boxes, landmarks

_HOG = None


def hog_detector():
    """dlib's HOG frontal-face detector, one per process."""
    global _HOG
    if _HOG is None:
        import dlib
        _HOG = dlib.get_frontal_face_detector()
    return _HOG


def hog_face_box(crop: np.ndarray, expected: np.ndarray, pad: int = 16) -> Optional[np.ndarray]:
    """dlib's HOG frontal-face box on a crop (edge-replicated border of ``pad`` px, no upsampling), the one
    overlapping ``expected`` most, or None. Used only on centre-crop fallbacks, where the aligner found no
    face: measured on 300 MTCNN-aligned LFW crops it finds 99 % of faces (IoU > 0.3 with the template box)
    in ~4 ms, and nothing on 50 noise images."""
    g = cv2.copyMakeBorder(lmk.intensity(crop), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    rects = hog_detector()(g, 0)
    if not len(rects):
        return None
    boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64) - pad
    e = np.asarray(expected, np.float64)
    ix = np.clip(np.minimum(boxes[:, 2], e[2]) - np.maximum(boxes[:, 0], e[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], e[3]) - np.maximum(boxes[:, 1], e[1]), 0, None)
    inter = ix * iy
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / (area + (e[2] - e[0]) * (e[3] - e[1]) - inter)
    return boxes[int(np.argmax(iou))] if iou.max() > 0 else boxes[int(np.argmax(area))]


_LANDMARKERS: dict[str, lmk.Landmarker] = {}


def landmarker(backend: str) -> lmk.Landmarker:
    if backend not in _LANDMARKERS:
        _LANDMARKERS[backend] = lmk.Landmarker(backend)
    return _LANDMARKERS[backend]


def landmark_crops(crops: np.ndarray, box: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """68 landmarks of same-size crops whose face box is known: the crop gets an edge-replicated border of
    ``PAD_SHARE`` of the box side (the predictor samples pixels around the chin, which on a SphereFace crop
    lies below the crop: measured on 996 LFW faces against landmarks of the full image, mean error over
    eye distance 0.037 without, 0.025 with an 8 px border; 4-24 px and mirrored borders are worse or
    equal), is optionally upscaled (``mask.upscale``; x2 / x3 changed the error by < 0.001), and the
    landmarks are mapped back to crop pixels."""
    up = cfg.upscale
    side = float(box[2] - box[0])
    pad = int(math.ceil(PAD_SHARE * side))
    out = np.zeros((len(crops), 68, 2), np.float32)
    lmr = landmarker(cfg.landmarks)
    for i in range(0, len(crops), max(cfg.batch, 1)):
        part = crops[i:i + cfg.batch]
        imgs = []
        for c in part:
            g = lmk.intensity(c)
            g = cv2.copyMakeBorder(g, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
            if up > 1:
                g = cv2.resize(g, None, fx=up, fy=up, interpolation=cv2.INTER_LINEAR)
            imgs.append(g)
        b = (np.asarray(box, np.float64) + pad + 0.5) * up - 0.5
        p = lmr(np.stack(imgs), np.tile(b, (len(imgs), 1)))
        out[i:i + len(part)] = (p + 0.5) / up - 0.5 - pad
    return out


# ------------------------------------------------------------------------------------------ checks

_NO_T5 = np.zeros((5, 2))


def too_small(size_hw: tuple[int, int]) -> Optional[rd.SkipFace]:
    """The skip of a crop under ``MIN_SIDE`` px a side, else None."""
    h, w = size_hw
    if min(h, w) < MIN_SIDE:
        return rd.SkipFace("too_small", f"crop {w}x{h} px is under {MIN_SIDE} px a side")
    return None


def face_checks(lm: np.ndarray, size_hw: tuple[int, int], cfg: MaskConfig,
                template5: Optional[np.ndarray] = None) -> tuple[Optional[rd.SkipFace], float]:
    """(skip or None, yaw in degrees) for one face."""
    h, w = size_hw
    lm = np.asarray(lm, np.float64)
    small = too_small(size_hw)
    if small is not None:
        return small, float("nan")
    if not np.isfinite(lm).all():
        return rd.SkipFace("bad_landmarks", "non-finite landmarks"), float("nan")
    D, n_out, mouth_v, tip, err, yaw = _face_metrics(
        np.ascontiguousarray(lm).reshape(68, 2), h, w,
        _NO_T5 if template5 is None else np.ascontiguousarray(template5, dtype=np.float64).reshape(5, 2),
        template5 is not None)
    if D < cfg.min_eye_px:
        return rd.SkipFace("too_small", f"eye distance {D:.1f} px < min_eye_px {cfg.min_eye_px:g}"), float("nan")
    if n_out:
        return rd.SkipFace("landmarks_outside",
                           f"{n_out} brow/eye/nose/mouth landmarks outside the image"), float("nan")
    if not 0.5 <= mouth_v <= 2.5:
        return rd.SkipFace("bad_landmarks", f"mouth {mouth_v:.2f} D below the eyes (0.5-2.5 expected)"), \
            float("nan")
    if not PITCH_TIP_RANGE[0] <= tip <= PITCH_TIP_RANGE[1]:
        return rd.SkipFace("pitch", f"nose tip at {tip:.2f} of the way from the eyes to the mouth (outside "
                                    f"{PITCH_TIP_RANGE[0]:g}-{PITCH_TIP_RANGE[1]:g}): head tilted too far up "
                                    f"or down for the 68-point fit"), float("nan")
    if template5 is not None and err > 0.3:
        return rd.SkipFace("landmarks_disagree",
                           f"68-point fit is {err:.2f} eye-mouth distances from the aligned template"), \
            float("nan")
    if abs(yaw) > cfg.max_yaw_deg:
        return rd.SkipFace("yaw", f"yaw {yaw:+.1f} deg beyond max_yaw_deg {cfg.max_yaw_deg:g}"), yaw
    return None, yaw


def face_region(img: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The face's landmark box grown by half its size (at least 24 px), clipped to the image."""
    h, w = img.shape[:2]
    lo, hi = lm.min(0), lm.max(0)
    g = np.maximum((hi - lo) * 0.5, 12)
    x0, y0 = int(max(lo[0] - g[0], 0)), int(max(lo[1] - g[1], 0))
    x1, y1 = int(min(hi[0] + g[0] + 1, w)), int(min(hi[1] + g[1] + 1, h))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return img
    return img[y0:y1, x0:x1]


# ------------------------------------------------------------------------------------- masking a face

def empty_record(image_id: str, identity: str, shard: int, seed: int) -> dict:
    """The record of one image (or face of a photo) before anything is known: the stage's manifest columns
    (``stage.MANIFEST_COLUMNS``), ``png`` and ``occlusion``, status ``error`` until a step sets it."""
    return {"image_id": image_id, "identity": identity, "status": "error", "reason": "", "skip": None,
            "aligned_status": None, "mask_type": None, "mask_color": None, "mask_texture": None, "wear": None,
            "coverage": None, "yaw_deg": None, "landmarks68": None, "seed": seed, "shard": shard,
            "png": None, "occlusion": None}


def mark_skipped(rec: dict, skip: rd.SkipFace) -> dict:
    """``rec`` as skipped: the skip's code and reason."""
    rec.update(status="skipped", skip=skip.code, reason=skip.reason)
    return rec


def mask_face(img: np.ndarray, lm: np.ndarray, draw_id: str, cfg: MaskConfig, rec: dict, *,
              template5: Optional[np.ndarray] = None, stats: Optional[dict] = None, region_stats: bool = False,
              force: Optional[Mapping[str, Any]] = None) -> Optional[rd.Rendered]:
    """Check, draw and render one face of ``img`` whose landmarks ``lm`` are known; fills ``rec``
    (landmarks68, yaw_deg, status, skip, reason; type, wear, colour, texture and coverage when masked) and
    returns the rendering, or None when the face is skipped. ``draw_id`` seeds the face's generator
    (:func:`~maskface.mask.style.image_rng`); ``template5``: the aligned crop's template points (checked
    against the landmarks); ``stats``: :func:`~maskface.mask.render.image_stats` of ``img`` if known, else
    measured on the face's region (``region_stats``, photos) or on the whole image (crops); ``force``:
    mask_type, wear, color, texture to impose (the other draws are unchanged)."""
    rec["landmarks68"] = np.asarray(lm, np.float32).ravel().tolist()
    skip, yaw = face_checks(lm, img.shape[:2], cfg, template5)
    rec["yaw_deg"] = None if not np.isfinite(yaw) else float(yaw)
    if skip is not None:
        mark_skipped(rec, skip)
        return None
    rng = image_rng(cfg, draw_id)
    sty = draw_style(rng, cfg, **(force or {}))
    try:
        if stats is None and region_stats:
            stats = rd.image_stats(face_region(img, lm))
        out = rd.render(img, lm, sty.mask_type, sty.wear, sty.color, sty.texture, sty.params, rng, stats)
    except rd.SkipFace as exc:
        mark_skipped(rec, exc)
        return None
    rec.update(status="ok", reason="", skip=None, mask_type=sty.mask_type, mask_color=sty.color,
               mask_texture=sty.texture, wear=sty.wear, coverage=float(out.occlusion.mean()))
    return out


# ----------------------------------------------------------------------------------------- processes

def limit_threads() -> None:
    """One compute thread per process (OpenCV, torch): the entries run processes, not threads; two torch
    threads on these tiny batches were slower than one."""
    cv2.setNumThreads(1)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
