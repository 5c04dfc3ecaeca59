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


def write_training_workdir(workdir: str | os.PathLike, train: dict, *, caches: bool = False) -> Path:
    """A Snakemake working folder in which only the training stage is left to plan: ``config.yaml`` (a dataset
    ``lfw`` and the ``train`` section given) and stand-ins for the upstream stages' outputs, which Snakemake
    takes as done (no code or parameter records: nothing triggers their rerun). Returns the config file.

    The stand-ins are empty files, for dry runs and for jobs that stop before they read their inputs; with
    ``caches`` they are real and a training job can run on them: 8 synthetic people of 4 crops each (a random
    picture per person plus noise; masked: the lower half grey), in two folds of pairs."""
    import json

    root = Path(workdir)
    cfg = {"datasets": {"lfw": {"source": str(root), "format": "lfw", "pairs": str(root / "pairs.txt")}},
           "train": train}
    (root / "pairs.txt").write_text("2\t1\n")     # a config's local paths must exist
    for f in TRAINING_UPSTREAM:
        (root / "results" / f).parent.mkdir(parents=True, exist_ok=True)
        (root / "results" / f).write_bytes(b"")
    if caches:
        _write_training_caches(root / "results")
    (root / "config.yaml").write_text(json.dumps(cfg))
    return root / "config.yaml"


def synthetic_crops(people: int, per_person: int, seed: int = 0):
    """Synthetic 112x96 crops: (image_id, identity, crop, masked crop) for ``per_person`` images of each of
    ``people`` people (P0, P1, ...): a random picture per person plus noise; masked: the lower half grey."""
    rng = np.random.default_rng(seed)
    for c in range(people):
        base = rng.integers(0, 256, (112, 96, 3))
        for i in range(per_person):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            masked = img.copy()
            masked[60:] = 128
            yield f"P{c}/P{c}_{i + 1:04d}.jpg", f"P{c}", img, masked


def _write_training_caches(results: Path, people: int = 8, per_person: int = 4, seed: int = 0) -> None:
    import pandas as pd

    from .imageio import encode_png
    from .train_data import build_cache

    clean, masked, manifest = [], [], []
    for iid, identity, img, m in synthetic_crops(people, per_person, seed):
        clean.append({"image_id": iid, "png": encode_png(img)})
        masked.append({"image_id": iid, "masked_png": encode_png(m)})
        manifest.append({"image_id": iid, "identity": identity, "status": "ok"})
    shards = results / "test_shards"
    shards.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(clean).to_parquet(shards / "clean.parquet")
    pd.DataFrame(masked).to_parquet(shards / "masked.parquet")
    pd.DataFrame(manifest).to_parquet(results / "manifests/lfw/aligned.parquet")
    # fold 1: people 0-3, fold 2: people 4-7; one matched and one mismatched pair per two people
    pairs = []
    for fold, first in ((1, 0), (2, people // 2)):
        for c in range(first, first + people // 2, 2):
            pairs.append({"fold": fold, "a": f"P{c}/P{c}_0001.jpg", "b": f"P{c}/P{c}_0002.jpg", "same": True})
            pairs.append({"fold": fold, "a": f"P{c}/P{c}_0001.jpg", "b": f"P{c + 1}/P{c + 1}_0001.jpg",
                          "same": False})
    df = pd.DataFrame(pairs)
    df["fold"] = df["fold"].astype("int16")
    df["line"] = np.arange(2, len(df) + 2, dtype=np.int32)
    df.to_parquet(results / "manifests/lfw/pairs.parquet")
    for variant in ("clean", "masked"):
        build_cache([shards / f"{variant}.parquet"], results / f"train_cache/lfw/{variant}.npy",
                    results / f"train_cache/lfw/{variant}.parquet")
