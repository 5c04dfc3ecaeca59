# Acquisition: a URL is downloaded (resumable, checksum-verified, atomic rename) and extracted safely under
# resources/; a local archive is extracted there; a local folder is used in place (never copied).
# The archive and the extracted folder are deliberately not declared outputs: Snakemake deletes declared
# outputs before rerunning a job, which would throw away a half-done download instead of resuming it.


rule download:
    # on the submit host: compute nodes of many clusters have no internet (a local folder costs nothing either)
    localrule: True
    output:
        json=dataset_json(),
    params:
        cfg=lambda wc: as_param(dataset_cfg(wc.dataset)),
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout"],
        code=code_digest("download", "datasets", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("download", "{dataset}"),
    benchmark:
        bench_path("download", "{dataset}")
    resources:
        **slurm_partition(),
        mem_mb=1024,
        runtime=240,
    threads: 1
    script:
        "../scripts/download.py"
