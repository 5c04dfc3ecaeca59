"""Rule extract_features: one model's features of one dataset's images (one variant) -> features Parquet
(maskface.features.extract_features: which images, how each is loaded, the embedding and the provenance)."""
from maskface.features import extract_features
from maskface.fileio import read_json
from maskface.smk import logged

with logged(snakemake) as log:
    import torch

    torch.set_num_threads(max(1, snakemake.threads))
    inp = snakemake.input
    extract_features(snakemake.output.features, model=snakemake.params.model, variant=snakemake.wildcards.variant,
                     images_root=read_json(inp.json)["images_root"], aligned=inp.aligned,
                     pairs=inp.get("pairs"), masked=inp.get("masked"), shard_paths=inp.get("shards", []),
                     mask_settings=snakemake.params.mask, device=snakemake.params.device,
                     chunk=int(snakemake.params.chunk), workers=snakemake.threads, log=log)
