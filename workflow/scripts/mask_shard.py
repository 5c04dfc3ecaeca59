"""Rule mask_shard: draw masks on one aligned shard -> results/masked/{dataset}/shard-{shard}.parquet."""
import json

from maskface.manifest import provenance
from maskface.mask.config import MaskConfig
from maskface.mask.stage import mask_shard, records_table, summarize
from maskface.smk import logged

# guarded: with mask.threads > 1 worker processes may re-import this script (multiprocessing spawn)
if __name__ == "__main__":
    with logged(snakemake) as log:
        params = dict(snakemake.params.cfg)
        ops = snakemake.config.get("mask", {})      # batch size: never a rerun trigger
        cfg = MaskConfig.from_mapping(params, threads=snakemake.threads, batch=ops.get("batch"))
        shard = int(snakemake.wildcards.shard)
        prov = provenance("mask_shard", params, [snakemake.input.shard], shard=shard, code=snakemake.params.code,
                          config_digest=cfg.digest())
        recs = mask_shard(snakemake.input.shard, snakemake.output.shard, cfg, shard, prov)
        s = summarize(records_table(recs, False).to_pandas())
        log.info("shard %d: %s", shard, json.dumps({k: s[k] for k in ("rows", "status_counts", "masked_rate", "skips")},
                                                   sort_keys=True))
