"""Rule train: one run; several GPUs -> torchrun with DistributedDataParallel (maskface.train.launch)."""
import json
from pathlib import Path

from maskface.smk import logged
from maskface.train import launch

with logged(snakemake) as log:
    spec = dict(snakemake.params.spec)
    res = launch(spec, Path(snakemake.output.model).parent)
    if res is not None:
        log.info("run %s: %s", spec["run"], json.dumps(res, default=str))
