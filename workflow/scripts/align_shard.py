"""Rule align_shard: detect + align the images of one shard into results/aligned/{dataset}/shard-{shard}.parquet."""
import json

import pandas as pd

from maskface.align import SHARD_SCHEMA, AlignConfig, align_shard, summarize
from maskface.devices import precision_policy, resolve_device
from maskface.fileio import read_json
from maskface.manifest import provenance
from maskface.shards import write_shard
from maskface.smk import logged

with logged(snakemake) as log:
    record = read_json(snakemake.input.json)
    params = dict(snakemake.params.cfg)
    ops = snakemake.config.get("align", {})     # device / batch size: never a rerun trigger
    cfg = AlignConfig.from_mapping(params, device=ops.get("device", "auto"), batch_size=ops.get("batch_size", 0),
                                   workers=snakemake.threads)
    shard = int(snakemake.wildcards.shard)
    raw = pd.read_parquet(snakemake.input.raw,
                          columns=["image_id", "identity", "path", "width", "height", "status", "reason"])
    recs = align_shard(raw, record["root"], record.get("format"), cfg, shard, cfg.shards)
    device = resolve_device(cfg.device, "align.device")
    prov = provenance("align_shard", params, [snakemake.input.json, snakemake.input.raw], shard=shard,
                      code=snakemake.params.code, device=device, precision=precision_policy(device))
    table = write_shard(recs, SHARD_SCHEMA, snakemake.output.shard, prov)
    log.info("shard %d: %s", shard, json.dumps(summarize(table.drop_columns(["png"]).to_pandas()), sort_keys=True))
