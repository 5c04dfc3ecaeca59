"""Rule align_merge: the shards' manifest rows -> results/manifests/{dataset}/aligned.parquet + summary.json."""
import json

import pandas as pd

from maskface.align import MANIFEST_SCHEMA, summarize
from maskface.fileio import write_json
from maskface.manifest import provenance, write_parquet
from maskface.shards import merge_shards
from maskface.smk import logged

with logged(snakemake) as log:
    raw = pd.read_parquet(snakemake.input.raw, columns=["image_id"])
    df = merge_shards(list(snakemake.input.shards), MANIFEST_SCHEMA, raw["image_id"], what="aligned manifest",
                      against="raw manifest")
    summary = summarize(df)
    summary["config"] = dict(snakemake.params.cfg)
    log.info("%s", json.dumps(summary, sort_keys=True, indent=1))
    prov = provenance("align_merge", dict(snakemake.params.cfg),
                      [snakemake.input.json, snakemake.input.raw, *snakemake.input.shards],
                      code=snakemake.params.code)
    write_parquet(df, snakemake.output.manifest, prov, schema=MANIFEST_SCHEMA)
    write_json(summary, snakemake.output.summary)
