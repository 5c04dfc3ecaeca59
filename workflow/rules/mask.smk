# Stage 2: synthetic masks from each face's 68 dlib landmarks (maskface.mask; design notes in its modules).
#   results/masked/{dataset}/shard-{shard}.parquet   one row per aligned row of the shard: the manifest columns
#                                                    + `png` (masked crop, lossless) + `occlusion` (1-bit PNG)
#   results/manifests/{dataset}/masked.parquet       every aligned row, one each (no images): image_id, identity,
#                                                    status, reason, skip, mask_type, mask_color, mask_texture,
#                                                    wear, coverage, yaw_deg, landmarks68, seed, shard, ...
#   results/masked/{dataset}/summary.json            masked rate, skips by reason, coverage per wear and type
#   results/figures/mask_gallery.png                 every type x wear on real faces (non-private lfw dataset)
# A mask shard reads the aligned shard of the same number (align.shards). Only the settings that change pixels
# are params (a change reruns the shards); threads and batch are read by the script and never rerun anything.

MASK_RESULT_KEYS = ["seed", "types", "colors", "textures", "wear", "upscale", "max_yaw_deg", "min_eye_px",
                    "landmarks"]


def mask_cfg():
    return plain({k: config["mask"][k] for k in MASK_RESULT_KEYS})


def mask_shard_files(dataset):
    return [f"{RESULTS}/masked/{dataset}/shard-{s}.parquet" for s in range(config["align"]["shards"])]


def _mask_gallery_dataset():
    name = config["mask"].get("gallery")
    if name:
        if name not in DATASETS:
            raise ValueError(f"mask.gallery: unknown dataset {name!r}; configured: {DATASETS}")
        if dataset_cfg(name).get("private"):
            raise ValueError(f"mask.gallery: dataset {name!r} is private; its faces may not appear in a figure")
        return name
    public_lfw = [d for d in LFW_DATASETS if not dataset_cfg(d).get("private")]
    return public_lfw[0] if public_lfw else None


MASK_GALLERY_DATASET = _mask_gallery_dataset()


rule mask_shard:
    input:
        shard=f"{RESULTS}/aligned/{{dataset}}/shard-{{shard}}.parquet",
    output:
        shard=f"{RESULTS}/masked/{{dataset}}/shard-{{shard}}.parquet",
    params:
        cfg=mask_cfg(),
        code=code("mask", "imageio", "manifest"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/mask/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/mask/{{dataset}}/shard-{{shard}}.tsv"
    threads: config["mask"]["threads"]
    resources:
        **part(),
        mem_mb=lambda wc, threads: 1500 + 700 * threads,
        runtime=60,
    script:
        "../scripts/mask_shard.py"


rule mask_merge:
    input:
        aligned=f"{RESULTS}/manifests/{{dataset}}/aligned.parquet",
        shards=lambda wc: mask_shard_files(wc.dataset),
    output:
        manifest=f"{RESULTS}/manifests/{{dataset}}/masked.parquet",
        summary=f"{RESULTS}/masked/{{dataset}}/summary.json",
    params:
        cfg=mask_cfg(),
        code=code("mask", "manifest"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/mask/{{dataset}}/merge.log",
    benchmark:
        f"{BENCH}/mask/{{dataset}}/merge.tsv"
    threads: 1
    resources:
        **part(),
        mem_mb=2048,
        runtime=10,
    script:
        "../scripts/mask_merge.py"


rule mask_gallery:
    input:
        shards=lambda wc: [f"{RESULTS}/aligned/{MASK_GALLERY_DATASET}/shard-{s}.parquet"
                           for s in range(config["align"]["shards"])],
    output:
        gallery=report(f"{RESULTS}/figures/mask_gallery.png", category="Masks",
                       labels={"figure": "mask types x wearing styles"}),
        cells=f"{RESULTS}/figures/mask_gallery.json",
    params:
        cfg=mask_cfg(),
        dataset=MASK_GALLERY_DATASET,
        code=code("mask"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/mask/gallery.log",
    threads: 1
    resources:
        **part(),
        mem_mb=2048,
        runtime=10,
    script:
        "../scripts/mask_gallery.py"


rule mask:
    """Named target: masked manifests and summaries of every dataset, and the gallery figure."""
    input:
        expand(f"{RESULTS}/manifests/{{dataset}}/masked.parquet", dataset=DATASETS),
        expand(f"{RESULTS}/masked/{{dataset}}/summary.json", dataset=DATASETS),
        [f"{RESULTS}/figures/mask_gallery.png"] if MASK_GALLERY_DATASET else [],


def _mask_targets():
    # join `all` once a rule makes the aligned shards (output patterns carry wildcard constraints: match the
    # fixed parts only)
    produced = [str(o) for r in workflow.rules for o in r.output]
    if not any(o.startswith(f"{RESULTS}/aligned/") and "/shard-" in o and o.endswith(".parquet") for o in produced):
        return []
    return list(rules.mask.input)


STAGE_TARGETS["mask"] = _mask_targets
