"""Rule mask_merge: the mask shards' rows -> results/manifests/{dataset}/masked.parquet + summary.json."""
import json

import pandas as pd
import pyarrow as pa

from maskface.manifest import provenance, write_json
from maskface.mask.stage import MANIFEST_SCHEMA, MaskConfig, merge_shards, summarize, write_table
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
    write_table(pa.Table.from_pandas(df, schema=MANIFEST_SCHEMA, preserve_index=False), snakemake.output.manifest,
                prov)
    write_json(summary, snakemake.output.summary)
