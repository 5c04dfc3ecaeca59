"""The mask stage: configuration, per-image random choices, checks and skips, shards, merge and summary.

Determinism
    Every random choice of an image comes from its own generator, seeded by sha256 of (mask.seed, image_id,
    digest of the result-affecting mask config): never from global state, row order, batch or shard. The
    draws happen in a fixed order (type, wear, colour, texture, then the parameters), so forcing a type or a
    wear (gallery, ``--type``) leaves the later choices of the image unchanged. Landmarks of a face do not
    depend on the other faces of its batch (tested).

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
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..imageio import encode_png
from ..manifest import write_table
from . import landmarks as lmk
from . import render as rd
from . import textures as tx
from .kernels import face_metrics as _face_metrics

log = logging.getLogger("maskface.mask")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "types": {"surgical": 0.30, "n95": 0.12, "kn95": 0.20, "cloth": 0.28, "gas": 0.10},
    "colors": {"white": 3.0, "light_blue": 3.0, "black": 2.0, "grey": 1.0, "teal": 1.0, "blue": 1.0,
               "navy": 1.0, "pink": 1.0, "green": 0.5, "red": 0.5, "yellow": 0.5, "beige": 0.5,
               "purple": 0.5, "orange": 0.5, "brown": 0.5},
    "textures": {"solid": 0.55, "stripes": 0.09, "checks": 0.09, "dots": 0.09, "printed": 0.09, "noise": 0.09},
    "wear": {"proper": 0.70, "nose_out": 0.20, "chin": 0.10},
    "upscale": 1,
    "max_yaw_deg": 45.0,
    "min_eye_px": 12.0,
    "landmarks": "ert",
}
# keys that change pixels (hashed into every image's seed); threads/batch/gallery do not
RESULT_KEYS = tuple(DEFAULTS)

ALIGNED_WITH_CROP = ("ok", "center_crop")
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


def _weights(value: Any, names: Sequence[str], what: str) -> dict[str, float]:
    """A {name: weight} map from a mapping or a list (equal weights); unknown names are an error."""
    if isinstance(value, Mapping):
        out = {str(k): float(v) for k, v in value.items()}
    else:
        out = {str(k): 1.0 for k in value}
    bad = sorted(set(out) - set(names))
    if bad:
        raise ValueError(f"mask.{what}: unknown {bad}; known: {list(names)}")
    if any(v < 0 for v in out.values()) or not any(v > 0 for v in out.values()):
        raise ValueError(f"mask.{what}: weights must be >= 0 with at least one > 0")
    return {k: v for k, v in out.items() if v > 0}


@dataclass(frozen=True)
class MaskConfig:
    seed: int = 0
    types: tuple = tuple(DEFAULTS["types"].items())
    colors: tuple = tuple(DEFAULTS["colors"].items())
    textures: tuple = tuple(DEFAULTS["textures"].items())
    wear: tuple = tuple(DEFAULTS["wear"].items())
    upscale: int = 1
    max_yaw_deg: float = 45.0
    min_eye_px: float = 12.0
    landmarks: str = "ert"
    threads: int = 1
    batch: int = 128

    def __post_init__(self):
        # weights in name order, however the config was built (the draw order depends on it)
        for k in ("types", "colors", "textures", "wear"):
            object.__setattr__(self, k, tuple(sorted((str(n), float(w)) for n, w in dict(getattr(self, k)).items())))

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]] = None, **overrides: Any) -> "MaskConfig":
        d = dict(DEFAULTS)
        d.update({k: v for k, v in (cfg or {}).items() if k in DEFAULTS or k in ("threads", "batch")})
        d.update(overrides)
        types = _weights(d["types"], rd.MASK_TYPES, "types")
        colors = _weights(d["colors"], tuple(tx.PALETTE), "colors")
        textures = _weights(d["textures"], tx.TEXTURES, "textures")
        wear = _weights(d["wear"], rd.WEARS, "wear")
        if int(d["upscale"]) < 1 or int(d["upscale"]) > 4:
            raise ValueError("mask.upscale must be 1..4")
        if d["landmarks"] not in ("ert", "dlib"):
            raise ValueError("mask.landmarks must be ert or dlib")
        return cls(seed=int(d["seed"]), types=tuple(sorted(types.items())), colors=tuple(sorted(colors.items())),
                   textures=tuple(sorted(textures.items())), wear=tuple(sorted(wear.items())),
                   upscale=int(d["upscale"]), max_yaw_deg=float(d["max_yaw_deg"]),
                   min_eye_px=float(d["min_eye_px"]), landmarks=str(d["landmarks"]),
                   threads=int(d.get("threads", 1)), batch=int(d.get("batch", 128)))

    def result_subset(self) -> dict:
        return {"seed": self.seed, "types": dict(self.types), "colors": dict(self.colors),
                "textures": dict(self.textures), "wear": dict(self.wear), "upscale": self.upscale,
                "max_yaw_deg": self.max_yaw_deg, "min_eye_px": self.min_eye_px, "landmarks": self.landmarks}

    def weights(self, key: str) -> dict:
        """{name: weight} of types / colors / textures / wear (cached)."""
        cache = self.__dict__.get("_weights")
        if cache is None:
            cache = {k: dict(getattr(self, k)) for k in ("types", "colors", "textures", "wear")}
            object.__setattr__(self, "_weights", cache)
        return cache[key]

    def digest(self) -> str:
        """Digest of everything that changes pixels except the seed (which is hashed on its own)."""
        d = self.__dict__.get("_digest")
        if d is None:
            sub = self.result_subset()
            sub.pop("seed")
            d = hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]
            object.__setattr__(self, "_digest", d)
        return d


def image_rng(cfg: MaskConfig, image_id: str) -> np.random.Generator:
    """The random generator of one image: a pure function of (mask.seed, image_id, config digest)."""
    h = hashlib.sha256(f"maskface.mask\0{cfg.seed}\0{image_id}\0{cfg.digest()}".encode("utf-8")).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(h[:16], "little")))


def _pick(rng: np.random.Generator, weights: Mapping[str, float], allowed: Optional[Sequence[str]] = None) -> str:
    """One name drawn with the given weights (restricted to ``allowed``): one uniform draw, always."""
    items = [(k, w) for k, w in weights.items() if allowed is None or k in allowed]
    if not items:                                 # nothing of the config fits: the type's own choices
        items = [(k, 1.0) for k in allowed]
    x = rng.random() * sum(w for _, w in items)
    acc = 0.0
    for k, w in items:
        acc += w
        if x < acc:
            return k
    return items[-1][0]


@dataclass
class Style:
    mask_type: str
    wear: str
    color: str
    texture: str
    params: dict = field(repr=False)


def draw_style(rng: np.random.Generator, cfg: MaskConfig, mask_type: Optional[str] = None,
               wear: Optional[str] = None, color: Optional[str] = None, texture: Optional[str] = None) -> Style:
    """Type, wear, colour, texture and every rendering parameter of one image, in a fixed draw order.
    Colours and textures are drawn from the config weights restricted to what the type is made of
    (``textures.TYPE_COLORS`` / ``TYPE_TEXTURES``); a forced value replaces a draw but the draw still
    happens, so the other choices do not move."""
    t = _pick(rng, cfg.weights("types"))
    t = mask_type or t
    w = _pick(rng, cfg.weights("wear"))
    w = wear or w
    c = _pick(rng, cfg.weights("colors"), tx.TYPE_COLORS[t])
    c = color or c
    x = _pick(rng, cfg.weights("textures"), tx.TYPE_TEXTURES[t])
    x = texture or x
    u = iter(rng.random(32).tolist())         # every scalar parameter from one block of uniforms

    def uni(lo: float, hi: float) -> float:
        return lo + (hi - lo) * next(u)

    def choice(seq):
        return seq[min(int(next(u) * len(seq)), len(seq) - 1)]

    prm: dict[str, Any] = {}
    prm["jitter"] = {"apex": uni(-0.06, 0.06), "corner": uni(-0.3, 0.3), "side": uni(-0.02, 0.03),
                     "chin": uni(-0.04, 0.06), "sag": uni(-0.03, 0.03)}
    tp = {"angle": uni(-0.12, 0.12), "phase_u": uni(0, 1), "phase_v": uni(0, 1), "period": uni(0.16, 0.32),
          "vertical": next(u) < 0.3, "second": choice(tx.CONTRAST[c]), "third": choice(tx.CONTRAST[c]),
          "grain": uni(0.008, 0.02), "radius": uni(0.22, 0.32)}
    p2 = next(u)
    if x == "dots":
        tp["period"] = 0.2 + 0.1 * p2
    elif x == "printed":
        tp["period"] = 0.35 + 0.35 * p2
    tp["tile"] = rng.random((16, 16), dtype=np.float32)
    prm["texture"] = tp
    prm["pleats"] = [0.3 + uni(-0.03, 0.03), 0.52 + uni(-0.03, 0.03), 0.74 + uni(-0.03, 0.03)]
    prm["seam"] = next(u) < 0.5
    prm["valve"] = next(u) < 0.3
    loop_own = next(u) < 0.6
    prm["loop_color"] = tx.rgb01(c if (t == "cloth" and loop_own) else choice(tx.LOOP_COLORS))
    prm["strap_color"] = tx.rgb01(choice(tx.STRAP_COLORS))
    prm["valve_color"] = tx.rgb01(choice(("white", "grey", "beige", "light_blue")))
    prm["body_color"] = tx.rgb01(c)
    cart = choice(tuple(tx.CARTRIDGE_COLORS))
    prm["cartridge"] = cart
    prm["cartridge_color"] = np.asarray(tx.CARTRIDGE_COLORS[cart], np.float32) / 255.0
    # small colour variation of the named colour (dye lots, fading): +-4 % per channel
    prm["tint"] = np.array([uni(0.96, 1.04), uni(0.96, 1.04), uni(0.96, 1.04)], np.float32)
    return Style(t, w, c, x, prm)


# ---------------------------------------------------------------------------------------- landmarking

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


def face_checks(lm: np.ndarray, size_hw: tuple[int, int], cfg: MaskConfig,
                template5: Optional[np.ndarray] = None) -> tuple[Optional[rd.SkipFace], float]:
    """(skip or None, yaw in degrees) for one face."""
    h, w = size_hw
    lm = np.asarray(lm, np.float64)
    if min(h, w) < 24:
        return rd.SkipFace("too_small", f"crop {w}x{h} px is under 24 px a side"), float("nan")
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


_NO_T5 = np.zeros((5, 2))


# ------------------------------------------------------------------------------------ per-image work

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


def template_points(template: Optional[str], size_hw: tuple[int, int]) -> np.ndarray:
    """The five template points of an aligned crop, scaled if the crop is not the template's size."""
    name = template if template in TEMPLATES else "sphereface_112x96"
    pts = TEMPLATES[name]
    th, tw = (112, 112) if name == "arcface_112x112" else (112, 96)
    h, w = size_hw
    if (h, w) != (th, tw):
        pts = pts * np.array([w / tw, h / th])
    return pts


def _blank(image_id: str, identity: str, shard: int, cfg: MaskConfig) -> dict:
    return {"image_id": image_id, "identity": identity, "status": "error", "reason": "", "skip": None,
            "aligned_status": None, "mask_type": None, "mask_color": None, "mask_texture": None, "wear": None,
            "coverage": None, "yaw_deg": None, "landmarks68": None, "seed": cfg.seed, "shard": shard,
            "png": None, "occlusion": None}


def mask_one(crop: np.ndarray, lm: np.ndarray, image_id: str, cfg: MaskConfig, rec: dict, *,
             template5: Optional[np.ndarray] = None, mask_type: Optional[str] = None,
             wear: Optional[str] = None, color: Optional[str] = None, texture: Optional[str] = None,
             keep_arrays: bool = False, stats: Optional[dict] = None) -> dict:
    """Check, draw and encode one face of a crop whose landmarks are known; fills and returns ``rec``."""
    rec["landmarks68"] = np.asarray(lm, np.float32).ravel().tolist()
    skip, yaw = face_checks(lm, crop.shape[:2], cfg, template5)
    rec["yaw_deg"] = None if not np.isfinite(yaw) else float(yaw)
    if skip is not None:
        rec.update(status="skipped", skip=skip.code, reason=skip.reason)
        return rec
    rng = image_rng(cfg, image_id)
    st = draw_style(rng, cfg, mask_type=mask_type, wear=wear, color=color, texture=texture)
    try:
        out = rd.render(crop, lm, st.mask_type, st.wear, st.color, st.texture, st.params, rng, stats)
    except rd.SkipFace as exc:
        rec.update(status="skipped", skip=exc.code, reason=exc.reason)
        return rec
    rec.update(status="ok", reason="", skip=None, mask_type=st.mask_type, mask_color=st.color,
               mask_texture=st.texture, wear=st.wear, coverage=float(out.occlusion.mean()),
               png=encode_rgb_png(out.image), occlusion=encode_occlusion(out.occlusion))
    if keep_arrays:
        rec["_image"], rec["_occlusion"], rec["_outline"] = out.image, out.occlusion, out.outline
    return rec


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


def limit_threads() -> None:
    """One compute thread per process (OpenCV, torch): the stage runs processes, not threads; two torch
    threads on these tiny batches were slower than one here."""
    cv2.setNumThreads(1)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _process_chunk_star(args) -> list[dict]:
    return _process_chunk(*args)


def _process_chunk(items: Sequence[Mapping[str, Any]], cfg: MaskConfig, force: Mapping[str, Any]) -> list[dict]:
    recs: list[dict] = []
    todo: dict[tuple, list[tuple[dict, np.ndarray]]] = {}
    for it in items:
        image_id = str(it["image_id"])
        ident = it.get("identity")
        rec = _blank(image_id, "" if ident is None or (isinstance(ident, float) and math.isnan(ident)) else str(ident),
                     int(it.get("shard") or 0), cfg)
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
        key = (crop.shape, it.get("template"))
        todo.setdefault(key, []).append((rec, crop))
    for (shape, template), group in todo.items():
        h, w = shape[:2]
        if min(h, w) < 24:
            for rec, _ in group:
                rec.update(status="skipped", skip="too_small", reason=f"crop {w}x{h} px is under 24 px a side")
            continue
        t5 = template_points(template, (h, w))
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
                mask_one(crop, lm, rec["image_id"], cfg, rec, template5=tpl, stats=ss, **force)
            except Exception as exc:  # noqa: BLE001 - one bad image never stops the stage
                log.warning("mask failed on %s", rec["image_id"], exc_info=True)
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}", png=None, occlusion=None)
    return recs


_HOG = None


def hog_face_box(crop: np.ndarray, expected: np.ndarray, pad: int = 16) -> Optional[np.ndarray]:
    """dlib's HOG frontal-face box on a crop (edge-replicated border of ``pad`` px, no upsampling), the one
    overlapping ``expected`` most, or None. Used only on centre-crop fallbacks, where the aligner found no
    face: measured on 300 MTCNN-aligned LFW crops it finds 99 % of faces (IoU > 0.3 with the template box)
    in ~4 ms, and nothing on 50 noise images."""
    global _HOG
    if _HOG is None:
        import dlib
        _HOG = dlib.get_frontal_face_detector()
    g = cv2.copyMakeBorder(lmk.intensity(crop), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    rects = _HOG(g, 0)
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


# --------------------------------------------------------------------------------------- shards, merge

def read_aligned_shard(path: str | os.PathLike) -> list[dict]:
    """The items of an aligned shard (maskface.align's layout: manifest columns + ``png``)."""
    schema = pq.read_schema(path)
    cols = [c for c in ("image_id", "identity", "status", "reason", "template", "shard", "png") if c in schema.names]
    t = pq.read_table(path, columns=cols)
    data = {c: t.column(c).to_pylist() for c in cols}
    n = t.num_rows
    return [{c: data[c][i] for c in cols} for i in range(n)]


def records_table(records: Iterable[Mapping[str, Any]], with_images: bool) -> pa.Table:
    recs = list(records)
    schema = SHARD_SCHEMA if with_images else MANIFEST_SCHEMA
    return pa.table({c: [r.get(c) for r in recs] for c in schema.names}, schema=schema)


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
    write_table(records_table(recs, True), out_path, prov)
    return recs


def merge_shards(paths: Sequence[str | os.PathLike], expected_ids: Optional[Iterable[str]] = None):
    """The manifest columns of every shard, sorted by image_id; checks that no image appears twice and,
    when ``expected_ids`` is given (the aligned manifest), that every aligned row is present exactly once."""
    tables = [pq.read_table(p, columns=MANIFEST_COLUMNS) for p in paths]
    df = pa.concat_tables(tables).to_pandas() if tables else records_table([], False).to_pandas()
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{len(dup)} images appear in more than one mask shard, e.g. {dup.iloc[0]!r}")
    if expected_ids is not None:
        want, have = set(map(str, expected_ids)), set(df["image_id"])
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ValueError(f"masked manifest does not match the aligned manifest: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    return df


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
    out["coverage_by_wear"] = {w: cov(df["wear"] == w) for w in rd.WEARS}
    out["coverage_by_type_proper"] = {t: cov((df["mask_type"] == t) & (df["wear"] == "proper"))
                                      for t in rd.MASK_TYPES}
    for col in ("mask_type", "wear", "mask_color", "mask_texture"):
        out[f"{col}_counts"] = {str(k): int(v) for k, v in sorted(df.loc[ok, col].value_counts().items())}
    yaw = df.loc[df["yaw_deg"].notna(), "yaw_deg"].astype(float).abs()
    out["abs_yaw_deg"] = ({"median": float(yaw.median()), "p99": float(yaw.quantile(0.99)), "max": float(yaw.max())}
                          if len(yaw) else None)
    return out
