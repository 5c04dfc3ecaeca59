"""Stage 2: synthetic face masks drawn from each face's 68 dlib landmarks.

Flow, top to bottom (a module imports only those below it):
    stage      the batch entry: aligned shards -> mask shards, merge, summary (the Snakemake rules call these).
    api        the single-image entry: :func:`mask_image` for photos or crops in memory, the test video's
               :func:`~maskface.mask.api.wearing_masker`, and ``maskface mask`` (:func:`cli_main`).
    gallery    the type x wear figure for the report (reads aligned shards through ``stage``).
    face       the per-face steps both entries share: face box, 68 landmarks, checks, :func:`mask_face`.
    style      the per-image random choices (generator seeded by the image, type, wear, colour, texture...).
    render     mask geometry per type and wearing style, shading from the face's own light, anti-aliased
               compositing with blur/noise matched to the image, the occlusion map.
    landmarks  dlib's 68-point shape predictor model evaluated in batches, the known face box of an aligned
               crop, head yaw from the landmarks.
    textures   colours and fabric textures.
    kernels    the compiled (numba) inner loops.
    config     :class:`MaskConfig`, the ``mask:`` section of the config, and the names of types and wears.

Public API: :func:`mask_image`, :class:`MaskConfig`, :func:`cli_main`; the stage functions in
:mod:`maskface.mask.stage`. Importing this package (or :mod:`maskface.mask.config`) loads neither numba nor
OpenCV: the workflow builds a :class:`MaskConfig` while Snakemake parses it.
"""
from __future__ import annotations

from .config import MASK_TYPES, WEARS, MaskConfig
from .textures import PALETTE, TEXTURES


def mask_image(*args, **kwargs):
    """See :func:`maskface.mask.api.mask_image`."""
    from .api import mask_image as _mask_image
    return _mask_image(*args, **kwargs)


def cli_main(argv=None) -> int:
    """``maskface mask INPUT OUTPUT [--type ...] [--wear ...] [--seed N]``; see :mod:`maskface.mask.api`."""
    from .api import cli_main as _cli_main
    return _cli_main(argv)


__all__ = ["mask_image", "cli_main", "MaskConfig", "MASK_TYPES", "WEARS", "PALETTE", "TEXTURES"]
