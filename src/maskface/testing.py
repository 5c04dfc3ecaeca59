"""Test data builders shared by the test suite and benchmarks (no real faces here: those come from LFW).

:func:`write_bad_inputs` writes one file for each kind of bad input every stage must survive, so the
stages' tests can run the same catalogue through their code.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> (expected raw-manifest status, what it is)
BAD_INPUTS = {
    "corrupt.jpg": ("unreadable", "a JPEG cut off after its header"),
    "zero.jpg": ("empty", "a zero-byte file"),
    "text.jpg": ("not_an_image", "a text file named .jpg"),
    "notes.txt": ("not_an_image", "a non-image file"),
    "gray.png": ("ok", "8-bit grayscale PNG"),
    "cmyk.jpg": ("ok", "CMYK JPEG"),
    "gray16.png": ("ok", "16-bit grayscale PNG"),
    "rgba.png": ("ok", "RGBA PNG"),
}


def _jpeg(rgb: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bad_inputs(folder: str | os.PathLike, *, size: int = 64, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write the :data:`BAD_INPUTS` catalogue into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    good = _jpeg(rgb)
    (folder / "corrupt.jpg").write_bytes(good[: max(len(good) // 3, 200)])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "notes.txt").write_text("notes about this identity\n")
    Image.fromarray(rgb[..., 0], mode="L").save(folder / "gray.png")
    (folder / "cmyk.jpg").write_bytes(_jpeg(rgb, "CMYK"))
    gray16 = (rgb[..., 1].astype(np.uint16) * 257)
    Image.fromarray(gray16).save(folder / "gray16.png")
    Image.fromarray(np.dstack([rgb, np.full((size, size), 200, np.uint8)]), mode="RGBA").save(folder / "rgba.png")
    return dict(BAD_INPUTS)


# the outputs of the stages upstream of training for an LFW-format dataset named lfw (paths under results/)
TRAINING_UPSTREAM = ("manifests/lfw/aligned.parquet", "manifests/lfw/pairs.parquet", "train_cache/lfw/clean.npy",
                     "train_cache/lfw/clean.parquet", "train_cache/lfw/masked.npy", "train_cache/lfw/masked.parquet")


def write_training_workdir(workdir: str | os.PathLike, train: dict) -> Path:
    """A Snakemake working folder in which only the training stage is left to plan: ``config.yaml`` (a dataset
    ``lfw`` and the ``train`` section given) and empty stand-ins for the upstream stages' outputs, which
    Snakemake takes as done (no code or parameter records: nothing triggers their rerun). For dry runs and for
    jobs that stop before they read their inputs. Returns the config file."""
    import json

    root = Path(workdir)
    cfg = {"datasets": {"lfw": {"source": str(root), "format": "lfw", "pairs": str(root / "pairs.txt")}},
           "train": train}
    (root / "pairs.txt").write_text("2\t1\n")     # a config's local paths must exist
    for f in TRAINING_UPSTREAM:
        (root / "results" / f).parent.mkdir(parents=True, exist_ok=True)
        (root / "results" / f).write_bytes(b"")
    (root / "config.yaml").write_text(json.dumps(cfg))
    return root / "config.yaml"
