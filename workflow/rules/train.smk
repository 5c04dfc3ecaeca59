# Stage 3: SphereFace training (maskface.train, maskface.models; the plan of runs is in common.smk).
#   results/train_cache/{dataset}/{cvariant}.npy|.parquet   crops decoded once to uint8 (clean: aligned, masked: mask stage)
#   results/models/{run}/model.pt, train_log.csv, curve.png  one run = one model (checkpoint.pt beside, for resume)
#   results/models/{run}/fold_eval.json                      lfw_unrestricted: accuracy of the run's held-out fold
#   results/models/{name}.summary.json / .md                 lfw_unrestricted: mean +- std over folds and seeds
# Runs: lfw_unrestricted -> {name}-fold{k}-seed{s}[-m{fraction}]; external -> {name}-seed{s} (evaluate those with
# the evaluation stage: evaluate.models.<run> = {embedder: sphereface, checkpoint: results/models/<run>/model.pt}).
#   results/train_cache/{dataset}/chips-{cvariant}.npy|.parquet  train.init: 150x150 chips cut as the evaluation cuts them
#   results/train_cache/{dataset}/prefix-{cvariant}.npy|.parquet train.init: the frozen blocks' output, plain + mirrored
#   results/eval/{group}/{dataset}.json / .md / _roc.png          train.validation next_fold: the per-fold models as
#                                                                 an evaluation, beside the evaluated models
CHIP_CODE = ("chipcache", "dlibnet", "features")
TRAIN_CODE = code_digest("models", "train", "train_data", "train_config", "devices", "imageio", "manifest", "fileio",
                         *(CHIP_CODE if TRAIN_CHIPS else ()))


envvars:
    PRESET_ENV,


rule train_cache:
    input:
        shards=lambda wc: shards(wc.dataset, wc.cvariant),
    output:
        npy=train_cache()[0],
        index=train_cache()[1],
    params:
        code=code_digest("train_data", "train_config", "imageio", "manifest", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("train_cache", "{dataset}", "{cvariant}"),
    benchmark:
        bench_path("train_cache", "{dataset}", "{cvariant}")
    threads: TRAIN["threads"]
    resources:
        **slurm_partition(),
        mem_mb=4096,
        runtime=240,
    script:
        "../scripts/train_cache.py"


rule chip_cache:
    input:
        json=dataset_json(),
        aligned=aligned_manifest(),
        masked=lambda wc: masked_manifest(wc.dataset) if wc.cvariant == "masked" else [],
    output:
        npy=chip_cache()[0],
        index=chip_cache()[1],
    params:
        # masked chips carry the mask stage's masks, redrawn: they depend on its settings and code
        mask=lambda wc: MASK.result_params() if wc.cvariant == "masked" else None,
        # train.mask_variants: masked chips per image (the stage's own + redrawn ones), for training only
        variants=lambda wc: TRAIN["mask_variants"] if wc.cvariant == "masked" else 1,
        code=lambda wc: code_digest(*CHIP_CODE, "workers", "manifest", "fileio") + (MASK_CODE if wc.cvariant == "masked" else ""),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("chip_cache", "{dataset}", "{cvariant}"),
    benchmark:
        bench_path("chip_cache", "{dataset}", "{cvariant}")
    threads: max(2, TRAIN["threads"])
    resources:
        **slurm_partition(),
        mem_mb=4096,
        runtime=240,
    script:
        "../scripts/chip_cache.py"


rule prefix_cache:
    input:
        chips=chip_cache(),
        init=TRAIN["init"] if TRAIN_CHIPS and TRAIN["init"] != "dlib-resnet" else [],
    output:
        npy=prefix_cache()[0],
        index=prefix_cache()[1],
    params:
        init=TRAIN["init"],
        frozen_blocks=TRAIN["frozen_blocks"],
        device=TRAIN["device"],
        code=code_digest("chipcache", "dlibnet", "features", "devices", "manifest", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("prefix_cache", "{dataset}", "{cvariant}"),
    benchmark:
        bench_path("prefix_cache", "{dataset}", "{cvariant}")
    threads: TRAIN["threads"]
    resources:
        **gpu_resources(TRAIN["device"]),
        mem_mb=4096,
        runtime=240,
    script:
        "../scripts/prefix_cache.py"


rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{model_dir()}/model.pt",
        log_csv=f"{model_dir()}/train_log.csv",
        curve=report(f"{model_dir()}/curve.png", category="Training",
                     labels={"run": "{run}", "figure": "loss and accuracy"}),
    params:
        spec=train_spec,
        code=TRAIN_CODE,
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("train", "{run}"),
    benchmark:
        bench_path("train", "{run}")
    # one process per GPU (torchrun): threads (torch intra-op + loader) and memory grow with train.gpus; all of
    # a run's GPUs on one node (a DDP run is --standalone)
    threads: TRAIN["threads"] * TRAIN["gpus"]
    resources:
        **gpu_resources(TRAIN["device"], TRAIN["gpus"]),
        mem_mb=16384 + 8192 * (TRAIN["gpus"] - 1),
        runtime=24 * 60,
        nodes=1,
        # one task that sees all the run's GPUs (torchrun starts the ranks): no --ntasks-per-gpu from the SLURM
        # executor plugin, whose versions 1.6 to 2.7.0 add --ntasks-per-gpu=1 unless this is 0
        tasks_per_gpu=0,
    script:
        "../scripts/train.py"


rule train_fold_eval:
    input:
        unpack(fold_eval_inputs),
    output:
        json=fold_eval(),
    params:
        fold=lambda wc: TRAIN_RUNS[wc.run]["fold"],
        validation=TRAIN["validation"],
        device=TRAIN["device"],
        batch_size=TRAIN["eval_batch_size"],
        code=code_digest("models", "foldeval", "train_data", "train_config", "evaluate", "devices", "fileio",
                         *(CHIP_CODE if TRAIN_CHIPS else ())),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("train_fold_eval", "{run}"),
    threads: TRAIN["threads"]
    resources:
        **gpu_resources(TRAIN["device"]),
        mem_mb=8192,
        runtime=120,
    script:
        "../scripts/train_eval.py"


rule train_summary:
    input:
        json=[fold_eval(r) for r in TRAIN_RUNS] if TRAIN_LFW else [],
    output:
        json=train_summary()[0],
        md=train_summary()[1],
    params:
        # {group: its runs}: with train.mask_fractions one group per fraction, side by side in the summary
        groups={g: [r for r, v in TRAIN_RUNS.items() if v["group"] == g] for g in TRAIN_GROUPS},
        code=code_digest("foldeval", "train_config", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("train_summary", TRAIN["name"]),
    script:
        "../scripts/train_summary.py"


rule train_lfw_eval:
    """The per-fold models of a group (train.validation: next_fold) as one evaluation in the evaluation stage's
    format; folds not run are listed as such."""
    input:
        json=lambda wc: [fold_eval(r) for r in TRAIN_EVALS[wc.tgroup]],
        pairs=pairs_manifest(),
    output:
        json=evaluation("{tgroup}"),
        md=evaluation("{tgroup}", ext="md"),
        png=report(evaluation("{tgroup}", ext="png"), category="Evaluation", subcategory="{dataset}",
                   labels={"model": "{tgroup}", "dataset": "{dataset}", "figure": "ROC"}),
    params:
        code=code_digest("foldeval", "evaluate", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("train_lfw_eval", "{tgroup}", "{dataset}"),
    script:
        "../scripts/train_lfw_eval.py"


rule train_all:
    """Named target: every configured run (and, for lfw_unrestricted, the fold evaluations and their summary)."""
    input:
        train_targets(),
