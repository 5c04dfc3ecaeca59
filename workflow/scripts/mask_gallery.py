"""Rule mask_gallery: every mask type x wearing style on real faces -> results/figures/mask_gallery.png."""
from maskface.fileio import write_json
from maskface.mask.config import MaskConfig
from maskface.mask.face import limit_threads
from maskface.mask.gallery import gallery
from maskface.smk import logged

with logged(snakemake) as log:
    limit_threads()
    cfg = MaskConfig.from_mapping(dict(snakemake.params.cfg))
    ds = snakemake.params.dataset
    info = gallery(list(snakemake.input.shards), cfg, snakemake.output.gallery,
                   title=f"maskface masks on {ds} (aligned crops, mask.seed {cfg.seed}); cells at 2x")
    info["dataset"] = ds
    log.info("gallery: %d faces, %s px", len(info["faces"]), info["size"])
    write_json(info, snakemake.output.cells)
