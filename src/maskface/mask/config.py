"""The ``mask:`` section of the workflow config as a :class:`MaskConfig`, and the names its weights may use.

The lowest module of the mask package (numpy and :mod:`maskface.stageconfig` only): the entries
(:mod:`~maskface.mask.stage`, :mod:`~maskface.mask.api`), the per-face steps (:mod:`~maskface.mask.face`)
and the draws (:mod:`~maskface.mask.style`) read it, and Snakemake builds one while it parses the workflow.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ..stageconfig import StageConfig, setting
from .textures import PALETTE, TEXTURES

MASK_TYPES = ("surgical", "n95", "kn95", "cloth", "gas")
WEARS = ("proper", "nose_out", "chin")
WEIGHTED = ("types", "colors", "textures", "wear")      # the {name: weight} settings


def _weights(names: Sequence[str], what: str) -> Callable[[Any], dict[str, float]]:
    """The ``convert`` of a weights setting: a {name: weight} map from a mapping or a list (equal weights);
    unknown names, negative weights or none above 0 are an error; zero weights are dropped."""
    def convert(value: Any) -> dict[str, float]:
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
    return convert


@dataclass(frozen=True)
class MaskConfig(StageConfig):
    """Settings of the mask stage. Every result-changing one is hashed into each image's random generator
    (:meth:`digest`); ``threads`` and ``batch`` change nothing but speed. Weights are kept as
    {name: weight} dicts in name order, however the config was built (the draw order depends on it)."""
    section: ClassVar[str] = "mask"

    seed: int = setting(0, convert=int)
    types: dict = setting({"surgical": 0.30, "n95": 0.12, "kn95": 0.20, "cloth": 0.28, "gas": 0.10},
                          convert=_weights(MASK_TYPES, "types"))
    colors: dict = setting({"white": 3.0, "light_blue": 3.0, "black": 2.0, "grey": 1.0, "teal": 1.0, "blue": 1.0,
                            "navy": 1.0, "pink": 1.0, "green": 0.5, "red": 0.5, "yellow": 0.5, "beige": 0.5,
                            "purple": 0.5, "orange": 0.5, "brown": 0.5},
                           convert=_weights(tuple(PALETTE), "colors"))
    textures: dict = setting({"solid": 0.55, "stripes": 0.09, "checks": 0.09, "dots": 0.09, "printed": 0.09,
                              "noise": 0.09}, convert=_weights(TEXTURES, "textures"))
    wear: dict = setting({"proper": 0.70, "nose_out": 0.20, "chin": 0.10}, convert=_weights(WEARS, "wear"))
    upscale: int = setting(1, convert=int)
    max_yaw_deg: float = setting(45.0, convert=float)
    min_eye_px: float = setting(12.0, convert=float)
    landmarks: str = setting("ert", convert=str)
    threads: int = setting(1, rerun=False, convert=int)
    batch: int = setting(128, rerun=False, convert=int)

    def __post_init__(self):
        for k in WEIGHTED:
            object.__setattr__(self, k, dict(sorted((str(n), float(w)) for n, w in dict(getattr(self, k)).items())))

    def validate(self) -> None:
        if self.upscale < 1 or self.upscale > 4:
            raise ValueError("mask.upscale must be 1..4")
        if self.landmarks not in ("ert", "dlib"):
            raise ValueError("mask.landmarks must be ert or dlib")

    def weights(self, key: str) -> dict[str, float]:
        """{name: weight} of types / colors / textures / wear."""
        if key not in WEIGHTED:
            raise KeyError(key)
        return getattr(self, key)

    def digest(self) -> str:
        """Digest of everything that changes pixels except the seed (which is hashed on its own)."""
        d = self.__dict__.get("_digest")
        if d is None:
            sub = self.result_params()
            sub.pop("seed")
            d = hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]
            object.__setattr__(self, "_digest", d)
        return d
