"""Rule pairs_manifest: parse LFW's pairs.txt, check every pair image against the raw manifest."""
import pandas as pd

from maskface.datasets import check_pairs, parse_pairs
from maskface.fileio import read_json
from maskface.manifest import provenance, write_parquet
from maskface.smk import logged

with logged(snakemake) as log:
    record = read_json(snakemake.input.json)
    pairs = parse_pairs(record["pairs"])
    raw = pd.read_parquet(snakemake.input.raw, columns=["image_id", "status"])
    check_pairs(pairs, raw, record["pairs"])
    log.info("%d pairs in %d folds (%d matched), all images present", len(pairs), pairs["fold"].nunique(),
             int(pairs["same"].sum()))
    prov = provenance("pairs_manifest", {"pairs": record["pairs"]}, [record["pairs"], snakemake.input.raw])
    write_parquet(pairs, snakemake.output.pairs, prov)
