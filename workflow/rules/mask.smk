# Stage 2: synthetic masks from each face's 68 dlib landmarks (maskface.mask; design notes in its modules).
#   results/masked/{dataset}/shard-{shard}.parquet   one row per aligned row of the shard: the manifest columns
#                                                    + `png` (masked crop, lossless) + `occlusion` (1-bit PNG)
#   results/manifests/{dataset}/masked.parquet       every aligned row, one each (no images): image_id, identity,
#                                                    status, reason, skip, mask_type, mask_color, mask_texture,
#                                                    wear, coverage, yaw_deg, landmarks68, seed, shard, ...
#   results/masked/{dataset}/summary.json            masked rate, skips by reason, coverage per wear and type
#   results/figures/mask_gallery.png                 every type x wear on real faces (non-private lfw dataset)
# A mask shard reads the aligned shard of the same number.
MASK_CODE = code_digest("mask", "shards", "stageconfig", "imageio", "manifest", "workers", "fileio")


rule mask_shard:
    input:
        shard=aligned_shard(),
    output:
        shard=masked_shard(),
    params:
        cfg=MASK.result_params(),
        code=MASK_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("mask", "{dataset}", "shard-{shard}"),
    benchmark:
        bench_path("mask", "{dataset}", "shard-{shard}")
    threads: config["mask"]["threads"]
    resources:
        **slurm_partition(),
        mem_mb=lambda wc, threads: 1500 + 700 * threads,
        runtime=60,
    script:
        "../scripts/mask_shard.py"


rule mask_merge:
    input:
        aligned=aligned_manifest(),
        shards=lambda wc: shards(wc.dataset, "masked"),
    output:
        manifest=masked_manifest(),
        summary=stage_summary("masked"),
    params:
        cfg=MASK.result_params(),
        code=MASK_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("mask", "{dataset}", "merge"),
    benchmark:
        bench_path("mask", "{dataset}", "merge")
    threads: 1
    resources:
        **slurm_partition(),
        mem_mb=2048,
        runtime=10,
    script:
        "../scripts/mask_merge.py"


rule mask_gallery:
    input:
        shards=shards(MASK_GALLERY_DATASET, "clean") if MASK_GALLERY_DATASET else [],
    output:
        gallery=report(MASK_GALLERY, category="Masks", labels={"figure": "mask types x wearing styles"}),
        cells=MASK_GALLERY.replace(".png", ".json"),
    params:
        cfg=MASK.result_params(),
        dataset=MASK_GALLERY_DATASET,
        code=MASK_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("mask", "gallery"),
    threads: 1
    resources:
        **slurm_partition(),
        mem_mb=2048,
        runtime=10,
    script:
        "../scripts/mask_gallery.py"


rule mask:
    """Named target: masked manifests and summaries of every dataset, and the gallery figure."""
    input:
        mask_targets(),
