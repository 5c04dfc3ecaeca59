"""The per-image random choices: a generator seeded by the image alone, and the style drawn from it.

Between the per-face steps (:mod:`~maskface.mask.face`, which calls :func:`draw_style` for a face that
passed its checks) and the drawing (:mod:`~maskface.mask.render`, which takes the :class:`Style` and draws
the pixel noise from the same generator, last).

Determinism
    Every random choice of an image comes from its own generator, seeded by sha256 of (mask.seed, image_id,
    digest of the result-affecting mask config): never from global state, row order, batch or shard. The
    draws happen in a fixed order (type, wear, colour, texture, then the parameters), so forcing a type or a
    wear (gallery, ``--type``) leaves the later choices of the image unchanged.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import textures as tx
from .config import MaskConfig


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
