"""Rule train_cache: decode a dataset's crop shards (aligned or masked) into a uint8 .npy + index
(maskface.train_data.build_cache)."""
import time

from maskface.manifest import provenance
from maskface.smk import logged
from maskface.train_data import build_cache

with logged(snakemake) as log:
    t0 = time.time()
    prov = provenance("train_cache", {"variant": snakemake.wildcards.cvariant}, list(snakemake.input.shards))
    index = build_cache(list(snakemake.input.shards), snakemake.output.npy, snakemake.output.index,
                        threads=snakemake.threads, prov=prov)
    dt = time.time() - t0
    log.info("%s/%s: %d crops decoded in %.1f s (%.0f img/s)", snakemake.wildcards.dataset,
             snakemake.wildcards.cvariant, len(index), dt, len(index) / max(dt, 1e-9))
