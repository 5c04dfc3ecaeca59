# Raw manifests: one row per file under the dataset's images root (every file accounted for), and LFW's
# pairs.txt parsed and checked against it.


rule raw_manifest:
    input:
        json=dataset_json(),
    output:
        raw=raw_manifest(),
    params:
        code=code_digest("datasets", "imageio", "manifest", "workers", "fileio"),
        chunk=config["manifest"]["chunk"],
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("raw_manifest", "{dataset}"),
    benchmark:
        bench_path("raw_manifest", "{dataset}")
    threads: config["manifest"]["threads"]
    resources:
        **slurm_partition(),
        mem_mb=4096,
        runtime=120,
    script:
        "../scripts/raw_manifest.py"


rule pairs_manifest:
    input:
        json=dataset_json(),
        raw=raw_manifest(),
    output:
        pairs=pairs_manifest(),
    params:
        code=code_digest("datasets", "manifest", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("pairs_manifest", "{dataset}"),
    resources:
        **slurm_partition(),
        mem_mb=1024,
        runtime=10,
    script:
        "../scripts/pairs_manifest.py"


rule manifests:
    """Named target: the raw manifest of every dataset and the pairs of every LFW-format dataset."""
    input:
        manifest_targets(),
