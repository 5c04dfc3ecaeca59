# Stage 4: features of every configured model on every test dataset, then evaluation.
#   results/features/{model}/{dataset}/{variant}.parquet   (image_id, variant, feature, face)
#   results/eval/{model}/{dataset}.json / .md / _roc.png   (LFW: 10-fold protocols; imagefolder: identification)
#   results/eval/summary.md                                (every model/run and protocol; mean +- std over runs)
# Aligned-crop embedders (sphereface) read the stage-1 crops (clean) or the mask stage's (masked); source-image
# embedders (dlib-resnet, dlib) the source photo, with the mask stage's mask redrawn in it for the masked variant.
FEATURES_CODE = code_digest("features", "dlibnet", "models", "align", "evaluate", "devices", "resources", "imageio",
                            "manifest", "workers", "fileio")


rule extract_features:
    input:
        unpack(extract_inputs),
    output:
        features=features(),
    params:
        model=lambda wc: as_param(model_cfg(wc.model)),
        device=EVAL["device"],
        chunk=EVAL["chunk"],
        # the mask settings a source-photo redraw needs (it depends on the mask settings and code then)
        mask=lambda wc: MASK.result_params() if redraws_mask(wc) else None,
        code=lambda wc: FEATURES_CODE + (MASK_CODE if redraws_mask(wc) else ""),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("extract_features", "{model}", "{dataset}", "{variant}"),
    benchmark:
        bench_path("extract_features", "{model}", "{dataset}", "{variant}")
    threads: EVAL["threads"]
    resources:
        # dlib's own run of the reference network never uses a GPU
        **{**gpu_resources(EVAL["device"]),
           "gpu": lambda wc: 0 if model_cfg(wc.model)["embedder"] == "dlib" else uses_gpu(EVAL["device"])},
        mem_mb=8192,
        runtime=240,
    script:
        "../scripts/extract_features.py"


rule evaluate_model:
    input:
        unpack(evaluate_inputs),
    output:
        json=evaluation(),
        md=evaluation(ext="md"),
        png=report(evaluation(ext="png"), category="Evaluation", subcategory="{dataset}",
                   labels={"model": "{model}", "dataset": "{dataset}", "figure": "ROC"}),
    params:
        model=lambda wc: as_param(model_cfg(wc.model)),
        n_impostors=EVAL["n_impostors"],
        code=code_digest("evaluate", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("evaluate", "{model}", "{dataset}"),
    benchmark:
        bench_path("evaluate", "{model}", "{dataset}")
    resources:
        **slurm_partition(),
        mem_mb=4096,
        runtime=30,
    script:
        "../scripts/evaluate.py"


rule eval_summary:
    input:
        # the evaluated models, and the training groups' per-fold models (train.validation: next_fold)
        json=[evaluation(m, d) for m in EVAL_MODELS for d in TEST_DATASETS] + train_evaluations(),
    output:
        md=EVAL_SUMMARY,
    params:
        code=code_digest("evaluate", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("evaluate", "summary"),
    script:
        "../scripts/eval_summary.py"


rule evaluate:
    """Named target: every model on every test dataset, and the summary."""
    input:
        evaluate_targets(),
