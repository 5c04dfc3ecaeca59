"""Mask geometry from 68 landmarks, and rendering: shading from the face's own light, anti-aliased edges,
blur and noise matched to the image, compositing, and the binary occlusion map.

:func:`render` draws one mask on one face; :func:`maskface.mask.face.mask_face` calls it with the face's
drawn :class:`~maskface.mask.style.Style`, and it runs its inner loops in :mod:`~maskface.mask.kernels`.

Geometry (all in image pixels, derived from the landmarks of *this* face; D = distance of the eye centres)
    * The face frame: ``ex`` along the eye line, ``ey`` perpendicular, down the face.
    * The top edge runs from a corner on the jaw contour (fractional jaw index ``c_top``), over an apex on
      the face's midline, to the mirrored corner: two cubic curves whose tangent at the apex is pointed
      (surgical, KN95) or round (cloth, N95, respirator). The apex depends on the wear:
      proper: on the nose bridge, 40 % of the way from point 27 to the nose tip 30 (the nose is covered);
      nose_out: between the nose base 33 and the upper lip 51 (nose tip uncovered, mouth covered);
      chin: between the lower lip 57 and the chin 8 (mouth uncovered). The edge is then pushed below the
      lower eyelids / nostrils / lower lip where it would cross them, so the eyes are never covered.
    * The sides and bottom follow the jaw contour (points ``c_top`` .. 8 .. ``16 - c_top``), pushed
      outwards along the contour normal by a margin that grows from the sides to the chin (the mask stands
      off the face and hangs below the chin); a KN95 adds a point under the chin.
    * A ruled surface P(s, t) between the top edge T(s) and the lower contour B(s) (s across, t down) places
      pleats, seams, valves and cartridges, so they follow tilt, yaw and the face's proportions.
    * Surface coordinates per pixel for textures and shading: signed distance to the midline (apex to the
      lowest point), normalised per side by the half width of the face at mouth height (so the side turned
      away is compressed) and mapped to arc length on a cylinder; and distance along the midline.

Rendering (only inside the bounding box of the mask and its accessories)
    * Coverage alpha by polygon filling with 4-bit sub-pixel precision and anti-aliased edges (cv2 LINE_AA).
    * Colour = albedo (texture) x exposure x colour cast x face light x the mask's own relief.
      Face light: a quadratic in x, y fitted to the log luminance of the face under the mask (darkest
      20 % - mouth, nostrils, beard - and brightest 2 % left out), so the mask keeps the light direction
      and falloff of this photo. Exposure: from the crop's 90th luminance percentile against its median
      over LFW crops (178.5); colour cast: the crop's mean colour against LFW's (143.6, 111.2, 91.4), both
      damped (see ``_exposure``). Relief: cylinder falloff at the cheeks, pleats and bindings (surgical),
      panels and centre seam (KN95), dome (N95), seam and hem (cloth), rubber sheen (respirator).
    * A soft contact shadow on the skin along the mask's lower edge (light from above).
    * Blur matched to the image (its edge sharpness measured by the drop of the 99th gradient percentile
      under a [1 2 1] filter, see ``image_stats``), and noise at the image's noise level (Immerkaer's fast
      estimator). Noise comes from the per-image random generator: deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from . import kernels as K
from . import textures as tx

SHIFT = 4                       # cv2 drawing sub-pixel bits
ONE = 1 << SHIFT

# LFW statistics used to normalise exposure and colour cast (measured on 996 aligned 112x96 crops).
LFW_P90_LUMA = 178.5
LFW_MEAN_RGB = np.array([143.6, 111.2, 91.4], np.float32)


class SkipFace(Exception):
    """This face cannot be masked correctly; ``code`` names why (recorded, never drawn wrongly)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ------------------------------------------------------------------------------------------ the frame

class FaceFrame:
    """Landmark-derived frame of one face: eye centres, D, the unit vectors ex (eye line) and ey (down)."""

    def __init__(self, lm: np.ndarray):
        lm = np.ascontiguousarray(lm, dtype=np.float64).reshape(68, 2)
        self.lm = lm
        self.eye_l = lm[36:42].sum(0) / 6.0
        self.eye_r = lm[42:48].sum(0) / 6.0
        ex, ey = float(self.eye_r[0] - self.eye_l[0]), float(self.eye_r[1] - self.eye_l[1])
        self.D = math.hypot(ex, ey)
        if not self.D > 1e-6:
            raise SkipFace("bad_landmarks", "eye centres coincide")
        self.ex = np.array([ex / self.D, ey / self.D])
        self.ey = np.array([-self.ex[1], self.ex[0]])
        self.origin = (self.eye_l + self.eye_r) / 2


# ------------------------------------------------------------------------------------- type geometry

# top_sag: dip of the top edge between corner and apex (D units, + = down); round: 0 pointed apex .. 1 round;
# side_off / chin_off: outward margin at the sides / under the chin (D); corner_in: corners pulled towards
# the midline (share of half width); side_len: jaw-index length of the side edge (surgical binding);
# chin_point: extra drop at the chin (D), the fold point of a KN95.
TYPE_GEOM = {
    "surgical": dict(top_sag=0.03, round=0.15, side_off=0.05, chin_off=0.22, corner_in=0.0, side_len=2.0,
                     chin_point=0.0),
    "n95": dict(top_sag=-0.10, round=0.9, side_off=-0.02, chin_off=0.16, corner_in=0.12, side_len=1.2,
                chin_point=0.0),
    "kn95": dict(top_sag=0.05, round=0.0, side_off=0.03, chin_off=0.20, corner_in=0.03, side_len=1.5,
                 chin_point=0.16),
    "cloth": dict(top_sag=-0.06, round=0.7, side_off=0.05, chin_off=0.24, corner_in=0.0, side_len=1.8,
                  chin_point=0.0),
    "gas": dict(top_sag=-0.05, round=0.8, side_off=0.0, chin_off=0.14, corner_in=0.14, side_len=1.5,
                chin_point=0.0),
}

# apex between two landmarks (fraction), corner jaw index, extra drop under the chin (D), the landmarks the
# top edge must stay below (polylines: each lower eyelid; the nostrils; the lower lip) and by how much (D),
# and for nose_out the upper lip it must stay above (a smile lifts the mouth corners)
WEAR_GEOM = {
    "proper": dict(apex=(27, 30, 0.40), c_top=1.0, chin_extra=0.0,
                   keep_below=((36, 41, 40, 39), (42, 47, 46, 45)), margin=0.10),
    "nose_out": dict(apex=(33, 51, 0.45), c_top=2.6, chin_extra=0.05,
                     keep_below=((31, 32, 33, 34, 35),), margin=0.07,
                     keep_above=((48, 49, 50, 51, 52, 53, 54),), margin_above=0.06),
    "chin": dict(apex=(57, 8, 0.30), c_top=4.4, chin_extra=0.22,
                 keep_below=((48, 59, 58, 57, 56, 55, 54),), margin=0.06),
}

_UNITS: dict[int, np.ndarray] = {}


def _unit(n: int) -> np.ndarray:
    """np.linspace(0, 1, n) as a column, cached."""
    u = _UNITS.get(n)
    if u is None:
        u = _UNITS[n] = np.linspace(0.0, 1.0, n)[:, None]
    return u


@dataclass
class Geometry:
    outline: np.ndarray          # (N, 2) closed polygon of the mask body
    top: np.ndarray              # (n, 2) top edge, left corner -> apex -> right corner
    bottom: np.ndarray           # (n, 2) lower contour, matching ``top`` point by point (same s)
    apex: np.ndarray
    low: np.ndarray              # lowest point of the midline (under the chin)
    hw_l: float                  # half widths of the mask at mouth height, left / right of the midline (px)
    hw_r: float
    side_l: np.ndarray           # side edges (polylines from the top corner down)
    side_r: np.ndarray

    def P(self, s: float, t: float) -> np.ndarray:
        """A point of the ruled surface between the top edge and the lower contour; s (across) and t
        (down) in [0, 1]."""
        n = len(self.top) - 1
        x = min(max(float(s), 0.0), 1.0) * n
        i = min(int(x), n - 1)
        f = x - i
        top = self.top[i] * (1 - f) + self.top[i + 1] * f
        bot = self.bottom[i] * (1 - f) + self.bottom[i + 1] * f
        return top * (1 - t) + bot * t

    def row(self, t: float) -> np.ndarray:
        """The curve P(., t) across the mask (as many points as the top edge)."""
        return self.top * (1 - t) + self.bottom * t

    def midline(self, n: int = 7) -> np.ndarray:
        """P(0.5, t) for t from 0 to 1: the apex down to the lowest point."""
        m = len(self.top) // 2
        return self.top[m] * (1 - _unit(n)) + self.bottom[m] * _unit(n)


def build_geometry(face: FaceFrame, mask_type: str, wear: str, jitter: dict) -> Geometry:
    """The mask outline of ``mask_type`` worn ``wear`` on ``face``. ``jitter``: per-image random offsets.
    Computed by :func:`maskface.mask.kernels.mask_geometry` (the construction is described at the top of
    this module and in TYPE_GEOM / WEAR_GEOM)."""
    tg, wg, below, above = _GEOM_ARRAYS[(mask_type, wear)]
    j = np.array([jitter.get(k, 0.0) for k in ("apex", "corner", "side", "chin", "sag")], np.float64)
    D = face.D
    top, bottom, outline, side_l, side_r, apex, low, hw_l, hw_r = K.mask_geometry(
        face.lm, tg, wg, below[0], below[1], below[2] * D, above[0], above[1], above[2] * D, j)
    return Geometry(outline=outline, top=top, bottom=bottom, apex=apex, low=low, hw_l=float(hw_l),
                    hw_r=float(hw_r), side_l=side_l, side_r=side_r)


def _groups(groups, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landmark polylines as a padded index array, their lengths, and their margins (D units)."""
    n = max((len(g) for g in groups), default=1)
    idx = np.zeros((len(groups), n), np.int64)
    for i, g in enumerate(groups):
        idx[i, :len(g)] = g
    return idx, np.array([len(g) for g in groups], np.int64), np.full(len(groups), margin, np.float64)


_GEOM_ARRAYS = {
    (t, w): (np.array([g["top_sag"], g["round"], g["side_off"], g["chin_off"], g["corner_in"], g["side_len"],
                       g["chin_point"]], np.float64),
             np.array([*wg["apex"], wg["c_top"], wg["chin_extra"]], np.float64),
             _groups(wg["keep_below"], wg["margin"]),
             _groups(wg.get("keep_above", ()), wg.get("margin_above", 0.0)))
    for t, g in TYPE_GEOM.items() for w, wg in WEAR_GEOM.items()
}


# --------------------------------------------------------------------------------------- accessories

@dataclass
class Part:
    """An accessory drawn over the body: open polylines (one or more, same colour and width) or a filled
    ellipse."""
    kind: str                     # line | ellipse
    pts: object                   # line: list of (n, 2) arrays; ellipse: centre (2,)
    color: np.ndarray             # albedo rgb 0..1
    width: float = 1.0            # line width px
    axes: tuple = (0.0, 0.0)      # ellipse semi-axes px
    angle: float = 0.0            # ellipse angle, degrees
    shade: str = "flat"           # flat | dome | filter
    gloss: float = 0.0
    opacity: float = 1.0

    def bbox(self) -> np.ndarray:
        if self.kind == "ellipse":
            r = max(self.axes)
            return np.array([self.pts[0] - r, self.pts[1] - r, self.pts[0] + r, self.pts[1] + r])
        p = np.concatenate(self.pts)
        hw = self.width / 2 + 1
        lo, hi = p.min(0), p.max(0)
        return np.array([lo[0] - hw, lo[1] - hw, hi[0] + hw, hi[1] + hw])


_LOOP_N = 7
_LOOP_B = np.stack([(1 - _unit(_LOOP_N)[:, 0]) ** 2, 2 * (1 - _unit(_LOOP_N)[:, 0]) * _unit(_LOOP_N)[:, 0],
                    _unit(_LOOP_N)[:, 0] ** 2], 1)


def _loop(p_from: np.ndarray, p_to: np.ndarray, bulge: np.ndarray) -> np.ndarray:
    """A quadratic curve from ``p_from`` to ``p_to`` whose middle is displaced by ``bulge``."""
    return _LOOP_B @ np.stack([p_from, (p_from + p_to) / 2 + bulge, p_to])


def accessories(face: FaceFrame, geo: Geometry, mask_type: str, prm: dict) -> list[Part]:
    """Ear loops, straps, nose clip, valves and filter cartridges. An ear loop or strap on the side of the
    face that turns away (its half width under 0.8 of the mean) is hidden behind the head and not drawn."""
    D, ex, ey = face.D, face.ex, face.ey
    lm = face.lm
    parts: list[Part] = []
    mean_hw = (geo.hw_l + geo.hw_r) / 2
    f = {"l": geo.hw_l / mean_hw, "r": geo.hw_r / mean_hw}
    sgn = {"l": -1.0, "r": 1.0}
    visible = [s for s in "lr" if f[s] >= 0.8]
    ang = math.degrees(math.atan2(ex[1], ex[0]))
    # valves and cartridges shrink with the mask's height (a mask pulled down to the chin is short: they
    # must not reach the mouth); 2 D is the apex-to-bottom length of a properly worn mask
    hs = min(max(math.hypot(*(geo.low - geo.apex)) / (2.0 * D), 0.45), 1.0)
    if mask_type in ("surgical", "kn95", "cloth"):
        lines = []
        for s in visible:
            ear = lm[0 if s == "l" else 16] + ex * (sgn[s] * 0.25 * D) - ey * (0.02 * D)
            top_c = geo.top[0] if s == "l" else geo.top[-1]
            low_c = (geo.side_l if s == "l" else geo.side_r)[-1]
            lines.append(_loop(top_c, ear, ey * (-0.06 * D)))
            lines.append(_loop(low_c, ear + ey * (0.1 * D), ex * (sgn[s] * 0.06 * D) + ey * (0.05 * D)))
        if lines:
            parts.append(Part("line", lines, prm["loop_color"], max(0.035 * D, 0.6), opacity=0.9))
    elif mask_type == "n95":
        lines = []
        for s in visible:
            s0 = 0.03 if s == "l" else 0.97
            up_end = lm[0 if s == "l" else 16] + ex * (sgn[s] * 0.35 * D) - ey * (0.3 * D)
            lo_end = lm[4 if s == "l" else 12] + ex * (sgn[s] * 0.35 * D) + ey * (0.35 * D)
            lines.append(_loop(geo.P(s0, 0.3), up_end, ey * (-0.04 * D)))
            lines.append(_loop(geo.P(s0, 0.8), lo_end, ey * (0.04 * D)))
        if lines:
            parts.append(Part("line", lines, prm["strap_color"], max(0.045 * D, 0.7)))
        clip = np.stack([geo.P(x, 0.09) for x in (0.4, 0.45, 0.5, 0.55, 0.6)])
        parts.append(Part("line", [clip], np.array([0.78, 0.79, 0.81], np.float32), max(0.04 * D, 0.6),
                          gloss=0.3, opacity=0.8))
        if prm["valve"]:
            s = 0.3 if f["l"] >= f["r"] else 0.7
            fs = f["l"] if s < 0.5 else f["r"]
            r = 0.19 * D * hs
            parts.append(Part("ellipse", geo.P(s, 0.55), prm["valve_color"], axes=(r * 0.85 * min(fs, 1.1), r),
                              angle=ang, shade="filter", gloss=0.25))
    elif mask_type == "gas":
        body = prm["body_color"]
        cart = prm["cartridge_color"]
        for s in "lr":
            fs = f[s]
            c = geo.P(0.1 if s == "l" else 0.9, 0.64) + ex * (sgn[s] * 0.12 * D * fs * hs) + ey * (0.04 * D * hs)
            r = 0.42 * D * hs
            sq = min(max(0.72 * fs, 0.3), 1.0)
            parts.append(Part("ellipse", c, body * 0.85, axes=(r * sq, r), angle=ang, shade="dome", gloss=0.2))
            parts.append(Part("ellipse", c + ex * (sgn[s] * 0.04 * D * fs), cart, axes=(0.78 * r * sq, 0.78 * r),
                              angle=ang, shade="filter", gloss=0.1))
        parts.append(Part("ellipse", geo.P(0.5, 0.58), body * 0.8, axes=(0.2 * D * hs, 0.22 * D * hs), angle=ang,
                          shade="filter", gloss=0.3))
        lines = []
        for s in visible:
            tc = geo.top[0] if s == "l" else geo.top[-1]
            lines.append(_loop(tc, tc + ex * (sgn[s] * 0.45 * D) - ey * (0.5 * D), ey * (-0.03 * D)))
        if lines:
            parts.append(Part("line", lines, body * 0.9, max(0.06 * D, 1.0)))
    return parts


# --------------------------------------------------------------------------------------- image stats

def _p(a: np.ndarray, q: float) -> float:
    a = a.ravel()
    k = min(max(int(q * (a.size - 1)), 0), a.size - 1)
    return float(np.partition(a, k)[k])


def image_stats(img: np.ndarray) -> dict:
    """Exposure, colour cast, blur and noise of an image (a crop, or the face region of a photo); see
    :func:`image_stats_batch` (the same numbers, one image)."""
    return image_stats_batch(np.ascontiguousarray(img)[None])[0]


def image_stats_batch(imgs: np.ndarray) -> list[dict]:
    """Per image of a (B, H, W, 3) uint8 stack: p90 luminance, mean colour, noise and blur, computed for
    the whole stack at once (each image's numbers depend on that image only).

    blur: the Gaussian sigma (px) of the image's edges, from how much a [1 2 1] filter lowers the 99th
    percentile of the gradient magnitude: sigma^2 = 0.367 r^2 / (1 - r^2) - 0.370 with r the ratio, the
    constants fitted on synthetic edges blurred by 0.3-2.5 px (recovered within 0.1 px); median on LFW
    crops ~0.7 px. noise: Immerkaer's (1996) estimator (the Laplacian-difference kernel, applied as two
    second differences)."""
    from .kernels import image_stats as _stats
    imgs = np.ascontiguousarray(imgs, dtype=np.uint8)
    b, h, w = imgs.shape[:3]
    y = cv2.cvtColor(imgs.reshape(b * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(b, h, w)
    raw = np.empty((b, 7), np.float64)
    if b:
        _stats(y, imgs, raw)
    noise = math.sqrt(math.pi / 2) * raw[:, 4] / 6.0
    g0, g1 = raw[:, 5], raw[:, 6]
    r = np.minimum(g1 / np.maximum(g0, 1e-9), 0.99)
    s2 = 0.367 * r * r / (1 - r * r) - 0.370
    blur = np.where(g0 > 1e-3, np.sqrt(np.maximum(s2, 0.0)), 0.0)
    mean_rgb = raw[:, 1:4].astype(np.float32)
    return [{"p90": float(raw[i, 0]), "mean_rgb": mean_rgb[i], "noise": float(noise[i]), "blur": float(blur[i])}
            for i in range(b)]


def _exposure(stats: dict) -> tuple[float, np.ndarray]:
    """Exposure factor and per-channel colour cast of the mask, both damped: a dark skin is not a dark
    photo, so exposure moves only 65 % of the way with the crop's highlights and the cast with the 0.35th
    power of the mean colour ratio."""
    e = min(max(0.35 + 0.65 * stats["p90"] / LFW_P90_LUMA, 0.45), 1.2)
    r, g, b = (max(float(c), 1.0) / float(l) for c, l in zip(stats["mean_rgb"], LFW_MEAN_RGB))
    cast = (r ** 0.35, g ** 0.35, b ** 0.35)
    m = sum(cast) / 3.0
    return e, np.array([min(max(c / m, 0.9), 1.1) for c in cast], np.float32)


# ------------------------------------------------------------------------------------------- drawing

def _ipts(pts: np.ndarray, off) -> np.ndarray:
    return np.round((np.asarray(pts, np.float64) - off) * ONE).astype(np.int32).reshape(-1, 1, 2)


def _lines(canvas: np.ndarray, lines, off, value: int, width: float, closed: bool = False) -> None:
    cv2.polylines(canvas, [_ipts(p, off) for p in lines], closed, value, max(int(round(width)), 1),
                  cv2.LINE_AA, SHIFT)


@dataclass
class Rendered:
    image: np.ndarray             # (H, W, 3) uint8
    occlusion: np.ndarray         # (H, W) bool
    outline: np.ndarray           # mask body polygon (image px)
    geometry: Geometry
    roi: tuple                    # (x0, y0, x1, y1) of the drawn region


def render(img: np.ndarray, lm: np.ndarray, mask_type: str, wear: str, color: str, texture: str, prm: dict,
           rng: np.random.Generator, stats: Optional[dict] = None) -> Rendered:
    """Draw one mask on ``img`` (RGB uint8, not modified) for the face with landmarks ``lm`` (68, 2).

    ``prm``: the per-image random choices (geometry jitter, texture parameters, accessory colours), see
    :func:`maskface.mask.style.draw_style`. ``rng`` supplies the pixel noise (drawn last). ``stats``:
    :func:`image_stats` of the image (or of the face region of a large photo)."""
    h, w = img.shape[:2]
    face = FaceFrame(lm)
    D = face.D
    geo = build_geometry(face, mask_type, wear, prm["jitter"])
    parts = accessories(face, geo, mask_type, prm)
    stats = stats if stats is not None else image_stats(img)
    x0, y0, x1, y1 = _region(geo, parts, stats["blur"], D, (h, w))
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise SkipFace("mask_outside", "the mask falls outside the image")
    off = np.array([x0, y0], np.float64)
    rh, rw = y1 - y0, x1 - x0
    canvas = np.zeros((rh, rw), np.uint8)
    cv2.fillPoly(canvas, [_ipts(geo.outline, off)], 255, cv2.LINE_AA, SHIFT)
    a_body = canvas.astype(np.float32)
    a_body *= np.float32(1.0 / 255.0)
    if not (a_body > 0.5).any():
        raise SkipFace("mask_outside", "the mask falls outside the image")
    roi8 = img[y0:y1, x0:x1]
    d, xn, u, v, vn = _surface(face, geo, x0, y0, rh, rw)
    # one zero-mean, unit-variance noise field: fabric grain (multiplicative) and sensor noise (additive)
    noise = rng.random((rh, rw), dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(math.sqrt(12.0))
    # colour: planar (3, rh, rw) float32 throughout (numpy broadcasts over a trailing axis of 3 slowly)
    rgb = tx.albedo(texture, color, prm["texture"], u, v, 1.0 / D, noise)     # (3, rh, rw), C-contiguous
    light = _face_light(img, (x0, y0, x1, y1), a_body)
    expo, cast = _exposure(stats)
    shade = _relief(mask_type, face, geo, prm, xn, vn, d, off, a_body)
    K.shade_albedo(rgb, shade, light, (cast * prm["tint"] * np.float32(expo)).astype(np.float32))
    alpha = a_body.copy()
    colour = (cast * np.float32(expo)).astype(np.float32).reshape(3, 1, 1)
    for part in parts:
        _composite_part(part, rgb, alpha, light, colour, off, (rh, rw))
    # blur matched to the image (premultiplied colour); then sensor noise, the contact shadow (the body's
    # coverage smeared 1-3 steps of 0.03 D downwards, light from above) and compositing (kernels.composite)
    sigma = math.sqrt(max(stats["blur"] ** 2 - 0.35 ** 2, 0.0))
    rgb *= alpha[None]
    if sigma > 0.15:
        for c in range(3):             # contiguous planes: no transposed copies
            cv2.GaussianBlur(rgb[c], (0, 0), sigma, dst=rgb[c], borderType=cv2.BORDER_REPLICATE)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    noise_sd = float(min(stats["noise"], 6.0)) / 255.0
    result = img.copy()
    occ = np.zeros((h, w), bool)
    K.composite(roi8, rgb, alpha, a_body, noise, noise_sd, max(int(round(0.03 * D)), 1),
                result[y0:y1, x0:x1], occ[y0:y1, x0:x1])
    return Rendered(image=result, occlusion=occ, outline=geo.outline, geometry=geo, roi=(x0, y0, x1, y1))


def _region(geo: Geometry, parts: list[Part], blur: float, D: float, size_hw: tuple[int, int]) -> tuple:
    """(x0, y0, x1, y1): the body and every accessory, plus room for blur and the contact shadow, clipped
    to the image."""
    h, w = size_hw
    lo, hi = geo.outline.min(0), geo.outline.max(0)
    bx = [lo[0], lo[1], hi[0], hi[1]]
    for p in parts:
        pb = p.bbox()
        bx = [min(bx[0], pb[0]), min(bx[1], pb[1]), max(bx[2], pb[2]), max(bx[3], pb[3])]
    margin = 3 + int(math.ceil(2 * blur)) + int(math.ceil(0.15 * D))
    x0, y0 = max(int(math.floor(bx[0])) - margin, 0), max(int(math.floor(bx[1])) - margin, 0)
    x1, y1 = min(int(math.ceil(bx[2])) + margin + 1, w), min(int(math.ceil(bx[3])) + margin + 1, h)
    return x0, y0, x1, y1


def _surface(face: FaceFrame, geo: Geometry, x0: int, y0: int, rh: int, rw: int) -> tuple:
    """Surface coordinates (d, xn, u, v, vn) of the region's pixels, one compiled pass
    (:func:`maskface.mask.kernels.surface_coords`), from the midline apex -> lowest point."""
    D = face.D
    ax_, ay_ = float(geo.apex[0]), float(geo.apex[1])
    mx, my = float(geo.low[0]) - ax_, float(geo.low[1]) - ay_
    mlen = max(math.hypot(mx, my), 1e-6)
    mx, my = mx / mlen, my / mlen
    rx, ry = -my, mx
    if rx * face.ex[0] + ry * face.ex[1] < 0:
        rx, ry = -rx, -ry
    return K.surface_coords(x0, y0, rh, rw, ax_, ay_, mx, my, rx, ry, 1.0 / geo.hw_l, 1.0 / geo.hw_r,
                            (geo.hw_l + geo.hw_r) / 2 / D, 1.0 / D, 1.0 / mlen)


def _composite_part(part: Part, rgb, alpha, light, colour, off, size) -> None:
    """Draw one accessory into the region's planar colour and coverage, in place, within its bounding box."""
    rh, rw = size
    bx = part.bbox()
    sx0, sy0 = max(int(math.floor(bx[0] - off[0])) - 1, 0), max(int(math.floor(bx[1] - off[1])) - 1, 0)
    sx1, sy1 = min(int(math.ceil(bx[2] - off[0])) + 2, rw), min(int(math.ceil(bx[3] - off[1])) + 2, rh)
    if sx1 - sx0 < 1 or sy1 - sy0 < 1:
        return
    canvas = np.zeros((sy1 - sy0, sx1 - sx0), np.uint8)
    o = off + np.array([sx0, sy0])
    k = part.opacity
    if part.kind == "line":
        th = max(int(round(part.width)), 1)
        _lines(canvas, part.pts, o, 255, th)
        k *= min(part.width / th, 1.0)
    else:
        c = np.round((np.asarray(part.pts) - o) * ONE).astype(int)
        ax = (max(int(round(part.axes[0] * ONE)), 1), max(int(round(part.axes[1] * ONE)), 1))
        cv2.ellipse(canvas, (int(c[0]), int(c[1])), ax, part.angle, 0, 360, 255, -1, cv2.LINE_AA, SHIFT)
    a = canvas.astype(np.float32)
    a *= np.float32(k / 255.0)
    lt = light[sy0:sy1, sx0:sx1]
    if part.kind == "ellipse" and part.shade in ("dome", "filter"):
        xs = np.arange(sx0, sx1, dtype=np.float32) + np.float32(off[0] - part.pts[0])
        ys = (np.arange(sy0, sy1, dtype=np.float32) + np.float32(off[1] - part.pts[1]))[:, None]
        th_ = math.radians(part.angle)
        cu, su = math.cos(th_), math.sin(th_)
        eu = (xs * np.float32(cu) + ys * np.float32(su)) * np.float32(1.0 / max(part.axes[0], 1e-3))
        ev = (ys * np.float32(cu) - xs * np.float32(su)) * np.float32(1.0 / max(part.axes[1], 1e-3))
        r2 = np.minimum(eu * eu + ev * ev, 1.0)
        hl = np.maximum(1.0 - ((eu + 0.35) ** 2 + (ev + 0.45) ** 2) * 4.0, 0.0)
        if part.shade == "dome":
            rel = 1.0 - 0.35 * r2 + part.gloss * hl
        else:   # a filter face: flat, with two concentric ridges and a hub
            r = np.sqrt(r2)
            rel = (1.0 - 0.18 * np.exp(-((r - 0.62) / 0.07) ** 2) - 0.14 * np.exp(-((r - 0.88) / 0.06) ** 2)
                   - 0.12 * (r < 0.2) + part.gloss * hl)
        lt = lt * rel
    else:
        lt = lt * np.float32(1.0 + 0.3 * part.gloss)
    prgb = np.minimum(np.asarray(part.color, np.float32).reshape(3, 1, 1) * colour * lt[None], 1.0)
    sub = rgb[:, sy0:sy1, sx0:sx1]
    sub *= (1.0 - a)[None]
    prgb *= a[None]
    sub += prgb
    asub = alpha[sy0:sy1, sx0:sx1]
    asub += a * (1.0 - asub)


_LIGHT_STEP = 3


def _face_light(img: np.ndarray, roi: tuple, a_body: np.ndarray) -> np.ndarray:
    """Relative illumination of the face under the mask: a quadratic in x, y fitted (least squares) to the
    log luminance of the face inside the mask, on every third pixel of the image, the darkest 20 % (mouth,
    nostrils, beard) and the brightest 2 % left out; normalised to mean 1 over the mask and clipped to
    0.6 .. 1.45. The mask keeps the light direction and falloff of this photo, not its facial features."""
    x0, y0, x1, y1 = roi
    h, w = img.shape[:2]
    rh, rw = a_body.shape
    A, b, ysum, used, covered = K.light_normal_equations(img, a_body, x0, y0, _LIGHT_STEP)
    if covered < 12 or used < 8:
        return np.ones((rh, rw), np.float32)
    try:
        coef = np.linalg.solve(A + np.eye(6) * 1e-7, b)
    except np.linalg.LinAlgError:
        return np.ones((rh, rw), np.float32)
    return K.light_field(coef, ysum / used, x0, y0, rh, rw, h, w)


def _band(a_body: np.ndarray, width: float) -> np.ndarray:
    """A band of ``width`` px along the inside of the body's edge (body minus its erosion), 0..1."""
    k = max(int(round(width)), 1)
    return a_body - cv2.erode(a_body, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))


def _relief(mask_type: str, face: FaceFrame, geo: Geometry, prm: dict, xn, vn, d, off, a_body) -> np.ndarray:
    """The mask's own shading: falloff where the surface turns away, and the type's folds and seams. Thin
    lines are drawn one pixel wide (anti-aliased) and widened by a blur; edge bands come from erosion."""
    ax = np.minimum(np.abs(xn), 1.2)
    rel = ax * ax
    rel *= ax
    rel *= np.float32(-0.16)
    rel += np.float32(1.0)
    D = face.D
    rh, rw = a_body.shape
    if mask_type == "surgical":
        dark = np.zeros((rh, rw), np.uint8)
        light = np.zeros((rh, rw), np.uint8)
        rows = [geo.row(t) for t in prm["pleats"]]
        _lines(dark, rows, off, 255, 1)
        _lines(light, [r - face.ey * (0.06 * D) for r in rows], off, 255, 1)
        # bindings: the top edge (with the nose wire) and the two sides, as filled bands
        wt, ws = 0.12 * D, 0.16 * D
        band_top = np.concatenate([geo.top, (geo.top + face.ey * wt)[::-1]])
        band_l = np.concatenate([geo.side_l, (geo.side_l + face.ex * ws)[::-1]])
        band_r = np.concatenate([geo.side_r, (geo.side_r - face.ex * ws)[::-1]])
        cv2.fillPoly(dark, [_ipts(band_top, off), _ipts(band_l, off), _ipts(band_r, off)], 110, cv2.LINE_AA, SHIFT)
        k = max(0.017 * D, 0.4)
        dk = cv2.GaussianBlur(dark, (0, 0), k).astype(np.float32)
        lt = cv2.GaussianBlur(light, (0, 0), k).astype(np.float32)
        rel *= 1.0 + lt * np.float32(0.12 / 255) - dk * np.float32(0.32 / 255)
    elif mask_type == "kn95":
        mean_hw = (geo.hw_l + geo.hw_r) / 2
        pl, pr = 0.93 + 0.1 * (geo.hw_l / mean_hw - 1), 0.93 + 0.1 * (geo.hw_r / mean_hw - 1)
        rel *= np.where(d < 0, np.float32(pl), np.float32(pr))
        seam = np.zeros((rh, rw), np.uint8)
        _lines(seam, [geo.midline()], off, 255, 1)
        rel *= 1.0 - cv2.GaussianBlur(seam, (0, 0), 0.6).astype(np.float32) * np.float32(0.3 / 255) \
            - _band(a_body, 0.14 * D) * np.float32(0.07)
    elif mask_type == "n95":
        v2 = (np.clip(vn, -0.2, 1.2) - 0.5) * 2.0
        r2 = np.minimum(xn * xn + v2 * v2, 2.0)
        rel *= (1.08 - 0.22 * r2) * (1.0 - _band(a_body, 0.09 * D) * np.float32(0.10))
    elif mask_type == "cloth":
        rel *= 1.0 + 0.05 * np.cos(np.clip(vn, 0, 1) * np.float32(2 * np.pi)) * (1 - ax)
        shade = 1.0 - _band(a_body, 0.11 * D) * np.float32(0.14)
        if prm["seam"]:
            seam = np.zeros((rh, rw), np.uint8)
            _lines(seam, [geo.midline()], off, 255, 1)
            shade -= cv2.GaussianBlur(seam, (0, 0), 0.5).astype(np.float32) * np.float32(0.12 / 255)
        rel *= shade
    elif mask_type == "gas":
        ridge = np.exp(-(xn * np.float32(4.0)) ** 2) * np.clip(1.0 - vn * 1.5, 0, 1)
        rel *= 1.0 - 0.25 * ax * ax
        rel += 0.22 * ridge
    return rel.astype(np.float32, copy=False)
