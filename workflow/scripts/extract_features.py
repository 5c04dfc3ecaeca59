"""Rule extract_features: one model's features of one dataset's images (one variant) -> features Parquet.

dlib-resnet and dlib read the source images with the stage-1 MTCNN box of each (rows without a detection get the
centred fallback box); its masked variant is the source photo with the mask stage's mask redrawn in it
(maskface.features.masked_source_loader). sphereface reads the stage-1 aligned crops (clean) or the mask
stage's crops (masked) from the shard files, as they are.
"""
import json
import time

import pandas as pd
import pyarrow.parquet as pq

from maskface.align import ALIGNED_STATUSES
from maskface.features import (FaceInput, SourceLoader, embed_all, embedder_from_model, masked_source_loader,
                               write_features)
from maskface.devices import describe
from maskface.imageio import decode_png
from maskface.manifest import provenance
from maskface.smk import logged

with logged(snakemake) as log:
    import torch

    torch.set_num_threads(max(1, snakemake.threads))
    record = json.load(open(snakemake.input.json))
    mcfg = snakemake.params.model
    variant = snakemake.wildcards.variant
    aligned = pd.read_parquet(snakemake.input.aligned, columns=["image_id", "status", "bbox", "transform", "shard"])
    usable = aligned[aligned["status"].isin(ALIGNED_STATUSES)]
    if "pairs" in snakemake.input.keys():
        pairs = pd.read_parquet(snakemake.input.pairs, columns=["a", "b"])
        wanted = set(pairs["a"]) | set(pairs["b"])
        usable = usable[usable["image_id"].isin(wanted)]
        lacking = wanted - set(usable["image_id"])
        if lacking:  # never silently: the protocol counts these pairs as errors
            log.warning("%d pair images have no stage-1 crop or box (status not in %s), e.g. %s", len(lacking),
                        ALIGNED_STATUSES, sorted(lacking)[:3])
    usable = usable.sort_values("image_id")
    emb = embedder_from_model(mcfg, snakemake.params.device,
                              **({"eval_settings": mcfg["eval"]} if mcfg.get("eval") else {}))
    log.info("%s: %s", emb.name, describe(getattr(emb, "device", "cpu")))
    ids = usable["image_id"].tolist()
    if emb.input_kind == "source" and variant == "masked":
        masked = pd.read_parquet(snakemake.input.masked, columns=[
            "image_id", "status", "mask_type", "mask_color", "mask_texture", "wear", "landmarks68"])
        mids, load = masked_source_loader(record["images_root"], usable, masked, snakemake.params.mask)
        masked_ids = set(mids)
        lacking = [i for i in ids if i not in masked_ids]
        if lacking:  # the mask stage skipped them: no masked feature, their pairs count as errors
            log.warning("%d of %d images were not masked by the mask stage; they get no feature", len(lacking),
                        len(ids))
        ids = [i for i in ids if i in masked_ids]
    elif emb.input_kind == "source":
        load = SourceLoader(record["images_root"], {
            i: (None if s != "ok" or b is None else list(b))
            for i, s, b in zip(usable["image_id"], usable["status"], usable["bbox"])})
    else:
        crops = {}  # clean: stage-1 crops; masked: the mask stage's crops (png null where a face was not masked)
        for path in snakemake.input.shards:
            t = pq.read_table(path, columns=["image_id", "png"]).to_pandas()
            t = t[t["image_id"].isin(set(ids)) & t["png"].notna()]
            crops.update(zip(t["image_id"], t["png"]))

        def load(i):
            return FaceInput(decode_png(crops[i]))
    t0 = time.time()

    def progress(done, total):
        log.info("%d/%d faces, %.1f/s", done, total, done / max(time.time() - t0, 1e-9))

    if emb.input_kind == "aligned":
        lacking = [i for i in ids if i not in crops]
        if lacking:  # e.g. faces the mask stage skipped: no feature, the protocol counts their pairs as errors
            log.warning("%d of %d images have no %s crop; they get no feature", len(lacking), len(ids), variant)
            ids = [i for i in ids if i in crops]
    # source-image embedders: the job's threads become worker processes, one core each (on the CPU each embeds
    # its chunks; on a GPU they cut the chips and this process runs the network: embed_all)
    df = embed_all(emb, ids, load, variant, chunk=int(snakemake.params.chunk), progress=progress,
                   workers=snakemake.threads if emb.input_kind == "source" else 1)
    log.info("%d features (%s): %s", len(df), emb.name, df["face"].value_counts().to_dict())
    used = [snakemake.input.aligned] + ([snakemake.input.masked] if "masked" in snakemake.input.keys() else [])
    prov = provenance("features", {"model": mcfg, "variant": variant, "mask": snakemake.params.mask}, used,
                      embedder=emb.describe())
    write_features(df, snakemake.output.features, prov)
