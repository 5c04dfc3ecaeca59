# Raw manifests: one row per file under the dataset's images root (every file accounted for), and LFW's
# pairs.txt parsed and checked against it.


rule raw_manifest:
    input:
        json=f"{RESULTS}/datasets/{{dataset}}/dataset.json",
    output:
        raw=f"{RESULTS}/manifests/{{dataset}}/raw.parquet",
    params:
        code=code("datasets", "imageio", "manifest"),
        chunk=config["manifest"]["chunk"],
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/raw_manifest/{{dataset}}.log",
    benchmark:
        f"{BENCH}/raw_manifest/{{dataset}}.tsv"
    threads: config["manifest"]["threads"]
    resources:
        **part(),
        mem_mb=4096,
        runtime=120,
    script:
        "../scripts/raw_manifest.py"


rule pairs_manifest:
    input:
        json=f"{RESULTS}/datasets/{{dataset}}/dataset.json",
        raw=f"{RESULTS}/manifests/{{dataset}}/raw.parquet",
    output:
        pairs=f"{RESULTS}/manifests/{{dataset}}/pairs.parquet",
    params:
        code=code("datasets", "manifest"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/pairs_manifest/{{dataset}}.log",
    resources:
        **part(),
        mem_mb=1024,
        runtime=10,
    script:
        "../scripts/pairs_manifest.py"


rule manifests:
    """Named target: the raw manifest of every dataset and the pairs of every LFW-format dataset."""
    input:
        expand(f"{RESULTS}/manifests/{{dataset}}/raw.parquet", dataset=DATASETS),
        expand(f"{RESULTS}/manifests/{{dataset}}/pairs.parquet", dataset=LFW_DATASETS),


STAGE_TARGETS["manifests"] = rules.manifests.input
