"""Rule mask_merge: the mask shards' rows -> results/manifests/{dataset}/masked.parquet + summary.json."""
import json

import pandas as pd

from maskface.fileio import write_json
from maskface.manifest import provenance, write_parquet
from maskface.mask.config import MaskConfig
from maskface.mask.stage import MANIFEST_SCHEMA, merge_shards, summarize
from maskface.smk import logged

with logged(snakemake) as log:
    aligned = pd.read_parquet(snakemake.input.aligned, columns=["image_id"])
    df = merge_shards(list(snakemake.input.shards), aligned["image_id"])
    summary = summarize(df)
    summary["config"] = dict(snakemake.params.cfg)
    summary["config_digest"] = MaskConfig.from_mapping(dict(snakemake.params.cfg)).digest()
    log.info("%s", json.dumps(summary, sort_keys=True, indent=1))
    prov = provenance("mask_merge", dict(snakemake.params.cfg), [snakemake.input.aligned, *snakemake.input.shards],
                      code=snakemake.params.code)
    write_parquet(df, snakemake.output.manifest, prov, schema=MANIFEST_SCHEMA)
    write_json(summary, snakemake.output.summary)
