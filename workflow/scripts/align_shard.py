"""Rule align_shard: detect + align the images of one shard into results/aligned/{dataset}/shard-{shard}.parquet."""
import json

import pandas as pd

from maskface.align import AlignConfig, align_shard, records_frame, summarize
from maskface.devices import precision_policy
from maskface.manifest import provenance, write_table
from maskface.smk import logged

with logged(snakemake) as log:
    record = json.load(open(snakemake.input.json))
    params = dict(snakemake.params.cfg)
    ops = snakemake.config.get("align", {})     # device / batch size: never a rerun trigger
    cfg = AlignConfig.from_mapping(params, device=ops.get("device", "auto"), batch_size=ops.get("batch_size", 0),
                                   workers=snakemake.threads)
    shard = int(snakemake.wildcards.shard)
    raw = pd.read_parquet(snakemake.input.raw,
                          columns=["image_id", "identity", "path", "width", "height", "status", "reason"])
    recs = align_shard(raw, record["root"], record.get("format"), cfg, shard, int(params["shards"]))
    table = records_frame(recs, with_png=True)
    s = summarize(table.drop_columns(["png"]).to_pandas())
    log.info("shard %d: %s", shard, json.dumps(s, sort_keys=True))
    device = cfg.resolved_device()
    prov = provenance("align_shard", params, [snakemake.input.json, snakemake.input.raw], shard=shard,
                      code=snakemake.params.code, device=device, precision=precision_policy(device))
    write_table(table, snakemake.output.shard, prov)
