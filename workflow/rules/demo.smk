# Open-set video recognition demo (maskface.demo, maskface.testvideo). A named target, not part of `all`:
#   snakemake --cores 2 demo
#   results/demo/testvideo/video.mp4, gallery/, ground_truth.parquet, spec.json   the LFW test video (video: null)
#   results/demo/threshold.json                                                    threshold at `far` (threshold: null)
#   {output}/annotated.mp4, detections.parquet/.csv, summary.json, snapshot.png    the demo run
#   {output}/metrics.json / metrics.md                                             DIR / FAR (test video only)
DEMO_CODE = code_digest("demo", "testvideo", "mtcnn", "align", "shards", "features", "dlibnet", "models",
                        "evaluate", "datasets", "download", "resources", "mask", "stageconfig", "devices", "imageio",
                        "manifest", "fileio")


rule demo_test_video:
    input:
        json=lambda wc: dataset_json(demo_lfw()),
    output:
        video=f"{DEMO_TV}/video.mp4",
        gt=f"{DEMO_TV}/ground_truth.parquet",
        spec=f"{DEMO_TV}/spec.json",
        gallery=directory(f"{DEMO_TV}/gallery"),
    params:
        spec=lambda wc: as_param({**DEMO["test_video"], "masked_fraction": DEMO["masked_probes"]}),
        folds=DEMO["video_folds"],
        code=DEMO_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("demo", "test_video"),
    benchmark:
        bench_path("demo", "test_video")
    threads: 1
    resources:
        **slurm_partition(),
        mem_mb=2048,
        runtime=30,
    script:
        "../scripts/demo_testvideo.py"


rule demo_threshold:
    input:
        unpack(threshold_inputs),
    output:
        json=f"{DEMO_DIR}/threshold.json",
    params:
        far=DEMO["far"],
        source=DEMO["threshold_from"],
        people=DEMO["calibration_people"],
        folds=DEMO["calibration_folds"],
        dataset=lambda wc: demo_lfw(),
        model=lambda wc: as_param(demo_model()),
        cfg=demo_settings(),
        code=DEMO_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("demo", "threshold"),
    benchmark:
        bench_path("demo", "threshold")
    threads: DEMO["threads"]
    resources:
        **gpu_resources(DEMO["device"]),
        mem_mb=4096,
        runtime=60,
    script:
        "../scripts/demo_threshold.py"


rule demo_run:
    input:
        unpack(demo_inputs),
    output:
        DEMO_OUTPUTS,
    params:
        out=lambda wc, output: os.path.dirname(output[0]),   # the demo's output folder
        threshold=DEMO["threshold"],
        dataset=lambda wc: demo_lfw() if DEMO_BUILD else None,
        model=lambda wc: as_param(demo_model()),
        cfg=demo_settings(),
        device=DEMO["device"],
        code=DEMO_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("demo", "run"),
    benchmark:
        bench_path("demo", "run")
    threads: DEMO["threads"]
    resources:
        **gpu_resources(DEMO["device"]),
        mem_mb=4096,
        runtime=120,
    script:
        "../scripts/demo.py"


rule demo:
    """Named target: the annotated video, its detections and (test video) the open-set metrics."""
    input:
        DEMO_OUTPUTS,
