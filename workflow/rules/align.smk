# Stage 1: MTCNN detection + 5-point similarity alignment (maskface.align; design notes in its docstring).
#   results/aligned/{dataset}/shard-{shard}.parquet   manifest rows of the shard + lossless PNG crops (`png`)
#   results/manifests/{dataset}/aligned.parquet        every raw row, one each (no PNGs)
#   results/aligned/{dataset}/summary.json             detection rate, fallbacks, multi-face count, fit error
#   results/aligned/{dataset}/fidelity.json            landmarks re-detected on a sample of crops vs template
# Nothing outside `align:` is a param, so changing e.g. mask settings never reruns alignment.
ALIGN_CODE = code_digest("align", "mtcnn", "shards", "stageconfig", "imageio", "manifest", "workers", "devices",
                         "fileio")


rule align_shard:
    input:
        json=dataset_json(),
        raw=raw_manifest(),
    output:
        shard=aligned_shard(),
    params:
        cfg=ALIGN.result_params(),
        code=ALIGN_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("align", "{dataset}", "shard-{shard}"),
    benchmark:
        bench_path("align", "{dataset}", "shard-{shard}")
    threads: config["align"]["threads"]
    resources:
        **gpu_resources(config["align"]["device"]),
        mem_mb=lambda wc, threads: 1500 + 1000 * threads,
        runtime=120,
    script:
        "../scripts/align_shard.py"


rule align_merge:
    input:
        json=dataset_json(),
        raw=raw_manifest(),
        shards=lambda wc: shards(wc.dataset, "clean"),
    output:
        manifest=aligned_manifest(),
        summary=stage_summary("aligned"),
    params:
        cfg=ALIGN.result_params(),
        code=ALIGN_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("align", "{dataset}", "merge"),
    benchmark:
        bench_path("align", "{dataset}", "merge")
    threads: 1
    resources:
        **slurm_partition(),
        mem_mb=2048,
        runtime=10,
    script:
        "../scripts/align_merge.py"


rule align_fidelity:
    input:
        manifest=aligned_manifest(),
        shards=lambda wc: shards(wc.dataset, "clean"),
    output:
        fidelity=align_fidelity(),
    params:
        cfg=ALIGN.result_params(),
        sample=ALIGN_FIDELITY_SAMPLE,
        code=ALIGN_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("align", "{dataset}", "fidelity"),
    benchmark:
        bench_path("align", "{dataset}", "fidelity")
    threads: 1
    resources:
        **gpu_resources(config["align"]["device"]),     # re-detects a sample with the stage's detector
        mem_mb=2048,
        runtime=30,
    script:
        "../scripts/align_fidelity.py"


rule align:
    """Named target: aligned manifests, summaries and fidelity checks of every dataset."""
    input:
        align_targets(),
