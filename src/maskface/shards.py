"""Shards: which shard an image belongs to, the storage of one shard, and the merge of a stage's shards into its
manifest. Shared by the align stage (:mod:`maskface.align`, which defines its columns) and the mask stage
(:mod:`maskface.mask.stage`); what goes into the rows is theirs.

Assignment
    An image belongs to shard ``int(sha1(image_id)[:8], 16) % shards``: deterministic, independent of row
    order and of the other images (adding an image never moves another one between shards). A mask shard reads
    the aligned shard of the same number.

Storage
    A shard job writes ONE Parquet file: the manifest rows of its images plus image columns holding lossless
    PNG bytes (``png``; null where there is none). Why Parquet rather than a folder of PNGs: one atomic output
    per job (a crashed job leaves nothing half-written, Snakemake tracks one file instead of ~1,700), no
    million-small-file cost on shared filesystems, and the next stage reads exact pixels (PNG is lossless) by
    ``image_id`` with a columnar read.

Merge
    :func:`merge_shards` reads the manifest columns only (not the images), sorts by ``image_id`` and checks that
    every expected row is present exactly once.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import write_table


def shard_of(image_id: str, shards: int) -> int:
    """Stable shard of an image: sha1 of its id, mod ``shards``."""
    return int(hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:8], 16) % shards


def shard_rows(raw: pd.DataFrame, shard: int, shards: int) -> pd.DataFrame:
    """The rows of ``raw`` (an ``image_id`` column) that belong to ``shard``, sorted by image_id."""
    ids = raw["image_id"].astype(str)
    mask = np.fromiter((shard_of(i, shards) == shard for i in ids), dtype=bool, count=len(ids))
    return raw.loc[mask].sort_values("image_id", kind="stable")


def records_table(records: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """An Arrow table of ``records`` (dicts) with the columns of ``schema`` (a missing key is null)."""
    recs = list(records)
    return pa.table({c: [r.get(c) for r in recs] for c in schema.names}, schema=schema)


def write_shard(records: Iterable[Mapping[str, Any]], schema: pa.Schema, path: str | os.PathLike,
                prov: Optional[Mapping[str, Any]] = None) -> pa.Table:
    """Write a shard file atomically (with the provenance record ``prov``); returns the table written."""
    table = records_table(records, schema)
    write_table(table, path, prov)
    return table


def read_rows(path: str | os.PathLike, columns: Sequence[str]) -> list[dict]:
    """The rows of a shard file as dicts of those of ``columns`` that the file has."""
    names = pq.read_schema(path).names
    cols = [c for c in columns if c in names]
    t = pq.read_table(path, columns=cols)
    data = {c: t.column(c).to_pylist() for c in cols}
    return [{c: data[c][i] for c in cols} for i in range(t.num_rows)]


def read_crops(path: str | os.PathLike, image_ids: Optional[Iterable[str]] = None,
               column: str = "png") -> dict[str, bytes]:
    """The image bytes in ``column`` of a shard file, by image_id (all, or the given ones; nulls left out)."""
    t = pq.read_table(path, columns=["image_id", column])
    ids = t.column("image_id").to_pylist()
    pngs = t.column(column).to_pylist()
    want = None if image_ids is None else set(image_ids)
    return {i: p for i, p in zip(ids, pngs) if p is not None and (want is None or i in want)}


def merge_shards(paths: Sequence[str | os.PathLike], schema: pa.Schema,
                 expected_ids: Optional[Iterable[str]] = None, *, what: str = "manifest",
                 against: str = "expected rows") -> pd.DataFrame:
    """The columns of ``schema`` (a stage's manifest schema: no image columns) of every shard, concatenated
    and sorted by image_id. Checks that no image appears in two shards and, when ``expected_ids`` is given,
    that every expected image is present exactly once. ``what`` and ``against`` name the merged manifest and
    the source of ``expected_ids`` in the errors (e.g. "aligned manifest", "raw manifest")."""
    tables = [pq.read_table(p, columns=schema.names) for p in paths]
    df = pa.concat_tables(tables).to_pandas() if tables else records_table([], schema).to_pandas()
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{len(dup)} images appear in more than one shard of the {what}, e.g. {dup.iloc[0]!r}")
    if expected_ids is not None:
        want, have = set(map(str, expected_ids)), set(df["image_id"])
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ValueError(f"{what} does not match the {against}: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    return df
