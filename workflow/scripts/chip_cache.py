"""Rule chip_cache: a dataset's 150x150 chips (clean, or with the mask stage's masks redrawn) for training a
chip network (maskface.chipcache.build_chip_cache)."""
import time

from maskface.chipcache import build_chip_cache
from maskface.fileio import read_json
from maskface.manifest import provenance
from maskface.smk import logged

with logged(snakemake) as log:
    t0 = time.time()
    variant = snakemake.wildcards.cvariant
    used = [snakemake.input.aligned] + ([snakemake.input.masked] if variant == "masked" else [])
    prov = provenance("chip_cache", {"variant": variant, "mask": snakemake.params.mask,
                                     "variants": snakemake.params.variants}, used)
    index = build_chip_cache(snakemake.output.npy, snakemake.output.index,
                             images_root=read_json(snakemake.input.json)["images_root"],
                             aligned=snakemake.input.aligned, variant=variant,
                             masked=snakemake.input.masked if variant == "masked" else None,
                             mask_settings=snakemake.params.mask, variants=snakemake.params.variants,
                             workers=snakemake.threads,
                             chunk=snakemake.config["evaluate"]["chunk"], prov=prov)
    dt = time.time() - t0
    log.info("%s/%s: %d chips in %.1f s (%.0f img/s)", snakemake.wildcards.dataset, variant, len(index), dt,
             len(index) / max(dt, 1e-9))
