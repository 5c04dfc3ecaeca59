"""Stage 2: synthetic face masks drawn from each face's 68 dlib landmarks.

Modules
    landmarks  dlib's 68-point shape predictor model evaluated in batches (numpy), the known face box of an
               aligned crop, head yaw from the landmarks.
    render     mask geometry per type and wearing style, shading from the face's own light, anti-aliased
               compositing with blur/noise matched to the image, the occlusion map.
    textures   colours and fabric textures.
    stage      configuration, per-image deterministic random choices, checks and skips, shards, merge,
               summary (the Snakemake rules call these).
    gallery    the type x wear figure for the report.
    api        :func:`mask_image` for photos or crops in memory, and ``maskface mask`` (:func:`cli_main`).

Public API: :func:`mask_image`, :class:`MaskConfig`, :func:`cli_main`; the stage functions in
:mod:`maskface.mask.stage`.
"""
from __future__ import annotations

from .render import MASK_TYPES, WEARS
from .stage import DEFAULTS, MaskConfig
from .textures import PALETTE, TEXTURES


def mask_image(*args, **kwargs):
    """See :func:`maskface.mask.api.mask_image`."""
    from .api import mask_image as _mask_image
    return _mask_image(*args, **kwargs)


def cli_main(argv=None) -> int:
    """``maskface mask INPUT OUTPUT [--type ...] [--wear ...] [--seed N]``; see :mod:`maskface.mask.api`."""
    from .api import cli_main as _cli_main
    return _cli_main(argv)


__all__ = ["mask_image", "cli_main", "MaskConfig", "DEFAULTS", "MASK_TYPES", "WEARS", "PALETTE", "TEXTURES"]
