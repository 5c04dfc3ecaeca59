"""Mask colours and fabric textures: the names the config and the draws choose from
(:mod:`~maskface.mask.config`, :mod:`~maskface.mask.style`) and the albedo :mod:`~maskface.mask.render`
paints with. Imports nothing of the package.

A texture is evaluated per pixel from mask surface coordinates ``(u, v)`` in units of the face's eye
distance ``D`` (u across the face, arc length on a cylinder so patterns compress towards the cheeks; v down
the face's midline), so a pattern keeps its size relative to the face at any resolution and bends with the
head. :func:`albedo` returns a planar (3, H, W) float32 image in 0..1, anti-aliased at the pixel scale
``pix`` (one pixel in D units).
"""
from __future__ import annotations

import numpy as np

# Albedo of each named colour (sRGB 0-255): surgical blues and greens, the usual cloth colours. 15 colours
# (MaskTheFace: 13).
PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 231),
    "light_blue": (140, 186, 216),
    "blue": (62, 108, 184),
    "navy": (36, 46, 82),
    "teal": (96, 172, 164),
    "green": (78, 124, 76),
    "black": (32, 32, 35),
    "grey": (134, 136, 139),
    "pink": (231, 163, 183),
    "red": (176, 42, 48),
    "yellow": (232, 201, 84),
    "beige": (207, 187, 157),
    "purple": (112, 72, 142),
    "orange": (226, 122, 52),
    "brown": (110, 78, 56),
}

TEXTURES = ("solid", "stripes", "checks", "dots", "printed", "noise")

# What each type is made of in the real world: the colours and textures drawn for it. A draw from
# mask.colors / mask.textures is restricted to these (weights renormalised); see style.draw_style.
TYPE_COLORS: dict[str, tuple[str, ...]] = {
    "surgical": ("white", "light_blue", "teal", "blue", "black", "pink", "grey", "purple", "yellow"),
    "n95": ("white", "grey", "light_blue", "beige", "black"),
    "kn95": ("white", "black", "grey", "pink", "light_blue", "blue", "beige", "navy"),
    "cloth": tuple(PALETTE),
    "gas": ("black", "grey", "navy", "green"),
}
TYPE_TEXTURES: dict[str, tuple[str, ...]] = {
    "surgical": ("solid", "dots", "printed"),
    "n95": ("solid",),
    "kn95": ("solid", "printed"),
    "cloth": TEXTURES,
    "gas": ("solid",),
}
# Colours of accessories
LOOP_COLORS = ("white", "black", "grey")
STRAP_COLORS = ("yellow", "orange", "blue", "white", "grey")
CARTRIDGE_COLORS = {"magenta": (196, 58, 142), "olive": (104, 112, 64), "black": (38, 38, 40),
                    "grey": (120, 122, 124), "yellow": (214, 178, 60)}


_RGB01 = {k: np.asarray(v, np.float32) / 255.0 for k, v in PALETTE.items()}


def rgb01(name: str) -> np.ndarray:
    return _RGB01[name].copy()


def _smooth_wave(x: np.ndarray, period: float, pix: float, duty: float = 0.5) -> np.ndarray:
    """1 on a ``duty`` share of each period of ``x``, 0 elsewhere, edges anti-aliased over one pixel."""
    f = np.mod(x / period, 1.0)
    # distance (in D units) to the nearer stripe edge, signed (+ inside the stripe)
    inside = np.minimum(f, duty - f) * period
    outside = -np.minimum(f - duty, 1.0 - f) * period
    d = np.where(f < duty, inside, outside)
    return np.clip(0.5 + d / max(pix, 1e-6), 0.0, 1.0)


def _sample_tile(tile: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping sample of ``tile`` at (u, v) in tile cells."""
    import cv2
    n = tile.shape[0]
    mx = np.mod(u, n).astype(np.float32)
    my = np.mod(v, n).astype(np.float32)
    big = np.pad(tile, ((0, 1), (0, 1)), mode="wrap")
    return cv2.remap(big, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def _contrasting() -> dict[str, tuple[str, ...]]:
    out = {}
    for p in PALETTE:
        names = [n for n in PALETTE if n != p]
        good = [n for n in names if np.abs(_RGB01[n] - _RGB01[p]).sum() > 0.6]
        out[p] = tuple(good or names)
    return out


# colours that contrast with each colour (second and third colours of stripes, checks, dots, prints)
CONTRAST: dict[str, tuple[str, ...]] = _contrasting()


def _col(c: np.ndarray) -> np.ndarray:
    return np.asarray(c, np.float32).reshape(3, 1, 1)


def _mix(c1: np.ndarray, c2: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Planar (3, H, W) c1 + (c2 - c1) * w."""
    return _col(c1) + _col(c2 - c1) * w[None]


def albedo(texture: str, primary: str, prm: dict, u: np.ndarray, v: np.ndarray, pix: float,
           grain: np.ndarray | None = None) -> np.ndarray:
    """Albedo of a textured mask at surface coordinates (u, v) (D units), planar: (3, H, W) float32.
    ``grain``: zero-mean unit-variance noise (H, W) for the fabric's fine brightness variation."""
    c1 = rgb01(primary)
    ca, sa = np.float32(np.cos(prm["angle"])), np.float32(np.sin(prm["angle"]))
    per = prm["period"]
    if texture == "solid":
        out = np.empty((3,) + u.shape, np.float32)
        out[:] = _col(c1)
        return _with_grain(out, grain, prm["grain"])
    uu = ca * u - sa * v + np.float32(prm["phase_u"])
    vv = sa * u + ca * v + np.float32(prm["phase_v"])
    if texture == "stripes":
        w = _smooth_wave(uu if prm["vertical"] else vv, per, pix, 0.45)
        out = _mix(c1, rgb01(prm["second"]), w)
    elif texture == "checks":   # gingham: two half-transparent stripe sets
        w = 0.5 * (_smooth_wave(uu, per, pix) + _smooth_wave(vv, per, pix))
        out = _mix(c1, rgb01(prm["second"]), w)
    elif texture == "dots":
        row = np.floor(vv / per)
        uo = uu + 0.5 * per * np.mod(row, 2)
        du = np.mod(uo, per) - per / 2
        dv = np.mod(vv, per) - per / 2
        d = prm["radius"] * per - np.sqrt(du * du + dv * dv)
        w = np.clip(0.5 + d / max(pix, 1e-6), 0.0, 1.0)
        out = _mix(c1, rgb01(prm["second"]), w)
    elif texture == "printed":  # blobs of two other colours on the primary (a soft fabric print)
        n = _sample_tile(prm["tile"], uu / per * 3.0, vv / per * 3.0)
        w2 = np.clip((n - 0.62) / 0.08 + 0.5, 0, 1) * np.float32(0.85)
        w3 = np.clip((0.30 - n) / 0.08 + 0.5, 0, 1) * np.float32(0.85)
        c2, c3 = rgb01(prm["second"]), rgb01(prm["third"])
        out = _col(c1) + _col(c2 - c1) * w2[None] + _col(c3 - c1) * w3[None]
    elif texture == "noise":    # heathered / woven fabric: fine weave plus irregular yarn brightness
        n = _sample_tile(prm["tile"], uu / 0.05, vv / 0.11)
        weave = 0.5 + 0.5 * np.sin(uu * np.float32(2 * np.pi / 0.045)) * np.sin(vv * np.float32(2 * np.pi / 0.045))
        lum = 0.86 + 0.2 * n + 0.06 * weave
        out = _col(c1) * lum[None]
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return _with_grain(out.astype(np.float32, copy=False), grain, prm["grain"])


def _with_grain(out: np.ndarray, grain: np.ndarray | None, amount: float) -> np.ndarray:
    if grain is not None:
        out *= (1.0 + np.float32(amount) * grain)[None]
    return out
