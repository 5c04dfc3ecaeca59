"""Rule prefix_cache: the frozen blocks' output for a dataset's chips, plain and mirrored
(maskface.chipcache.build_prefix_cache)."""
import time

from maskface.chipcache import build_prefix_cache
from maskface.manifest import provenance
from maskface.smk import logged

with logged(snakemake) as log:
    t0 = time.time()
    p = snakemake.params
    prov = provenance("prefix_cache", {"init": p.init, "frozen_blocks": p.frozen_blocks}, list(snakemake.input.chips))
    index = build_prefix_cache(tuple(snakemake.input.chips), snakemake.output.npy, snakemake.output.index,
                               init=p.init, frozen_blocks=p.frozen_blocks, device=p.device,
                               threads=snakemake.threads, prov=prov)
    dt = time.time() - t0
    log.info("%d chips through the stem and %d blocks in %.1f s (%.0f img/s, plain + mirrored)", len(index),
             p.frozen_blocks, dt, len(index) / max(dt, 1e-9))
