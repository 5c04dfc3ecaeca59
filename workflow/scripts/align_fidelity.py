"""Rule align_fidelity: re-detect landmarks on a fixed sample of aligned crops; distances to the template."""
import json

import pandas as pd

from maskface.align import AlignConfig, fidelity_report
from maskface.fileio import write_json
from maskface.smk import logged

with logged(snakemake) as log:
    man = pd.read_parquet(snakemake.input.manifest)
    cfg = AlignConfig.from_mapping(dict(snakemake.params.cfg), device=snakemake.config["align"].get("device"))
    rep = fidelity_report(man, list(snakemake.input.shards), cfg, sample=int(snakemake.params.sample))
    log.info("%s", json.dumps(rep, sort_keys=True, indent=1))
    write_json(rep, snakemake.output.fidelity)
