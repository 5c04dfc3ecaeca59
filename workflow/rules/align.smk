# Stage 1: MTCNN detection + 5-point similarity alignment (maskface.align; design notes in its docstring).
#   results/aligned/{dataset}/shard-{shard}.parquet   manifest rows of the shard + lossless PNG crops (`png`)
#   results/manifests/{dataset}/aligned.parquet        every raw row, one each (no PNGs)
#   results/aligned/{dataset}/summary.json             detection rate, fallbacks, multi-face count, fit error
#   results/aligned/{dataset}/fidelity.json            landmarks re-detected on a sample of crops vs template
# Only the settings that change the crops are params (a change reruns the shards); device, batch_size and
# threads are read by the script from config and never trigger a rerun. Nothing outside `align:` is used,
# so changing e.g. mask settings never reruns alignment.

ALIGN_RESULT_KEYS = ["template", "min_face_size", "thresholds", "factor", "select", "on_no_face", "shards"]
ALIGN_FIDELITY_SAMPLE = 500


def align_cfg():
    return plain({k: config["align"][k] for k in ALIGN_RESULT_KEYS})


def align_shard_files(dataset):
    return [f"{RESULTS}/aligned/{dataset}/shard-{s}.parquet" for s in range(config["align"]["shards"])]


rule align_shard:
    input:
        json=f"{RESULTS}/datasets/{{dataset}}/dataset.json",
        raw=f"{RESULTS}/manifests/{{dataset}}/raw.parquet",
    output:
        shard=f"{RESULTS}/aligned/{{dataset}}/shard-{{shard}}.parquet",
    params:
        cfg=align_cfg(),
        code=code("align", "imageio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/align/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/align/{{dataset}}/shard-{{shard}}.tsv"
    threads: config["align"]["threads"]
    resources:
        **gpu_resources(config["align"]["device"]),
        mem_mb=lambda wc, threads: 1500 + 1000 * threads,
        runtime=120,
    script:
        "../scripts/align_shard.py"


rule align_merge:
    input:
        json=f"{RESULTS}/datasets/{{dataset}}/dataset.json",
        raw=f"{RESULTS}/manifests/{{dataset}}/raw.parquet",
        shards=lambda wc: align_shard_files(wc.dataset),
    output:
        manifest=f"{RESULTS}/manifests/{{dataset}}/aligned.parquet",
        summary=f"{RESULTS}/aligned/{{dataset}}/summary.json",
    params:
        cfg=align_cfg(),
        code=code("align"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/align/{{dataset}}/merge.log",
    benchmark:
        f"{BENCH}/align/{{dataset}}/merge.tsv"
    threads: 1
    resources:
        **part(),
        mem_mb=2048,
        runtime=10,
    script:
        "../scripts/align_merge.py"


rule align_fidelity:
    input:
        manifest=f"{RESULTS}/manifests/{{dataset}}/aligned.parquet",
        shards=lambda wc: align_shard_files(wc.dataset),
    output:
        fidelity=f"{RESULTS}/aligned/{{dataset}}/fidelity.json",
    params:
        cfg=align_cfg(),
        sample=ALIGN_FIDELITY_SAMPLE,
        code=code("align"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/align/{{dataset}}/fidelity.log",
    benchmark:
        f"{BENCH}/align/{{dataset}}/fidelity.tsv"
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
        expand(f"{RESULTS}/manifests/{{dataset}}/aligned.parquet", dataset=DATASETS),
        expand(f"{RESULTS}/aligned/{{dataset}}/summary.json", dataset=DATASETS),
        expand(f"{RESULTS}/aligned/{{dataset}}/fidelity.json", dataset=DATASETS),


STAGE_TARGETS["align"] = rules.align.input
