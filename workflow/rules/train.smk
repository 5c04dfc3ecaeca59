# Stage 3: SphereFace training (maskface.train, maskface.models).
#   results/train_cache/{dataset}/{cvariant}.npy|.parquet   crops decoded once to uint8 (clean: aligned, masked: mask stage)
#   results/models/{run}/model.pt, train_log.csv, curve.png  one run = one model (checkpoint.pt beside, for resume)
#   results/models/{run}/fold_eval.json                      lfw_unrestricted: accuracy of the run's held-out fold
#   results/models/{name}.summary.json / .md                 lfw_unrestricted: mean +- std over folds and seeds
# Runs: lfw_unrestricted -> {name}-fold{k}-seed{s}; external -> {name}-seed{s} (evaluate those with the
# evaluation stage: evaluate.models.<run> = {embedder: sphereface, checkpoint: results/models/<run>/model.pt}).
# The targets join `all` only once the workflow has rules producing the aligned (and, when needed, masked) crops.
import re

from snakemake.logging import logger

from maskface.devices import gpu_device_count, gpu_reserved
from maskface.train_config import cpu_training_refusal, run_names as _train_run_names, with_preset  # torch-free


def _gpu_will_train():
    """Where the training jobs run there is a GPU: this machine has one, or the run was given one. A cluster
    profile says so itself (profiles/slurm sets MASKFACE_TRAIN_PRESET_AUTO=gpu: the submit host has no GPU,
    and which executor runs the jobs is not known while the workflow is parsed), as may the user. The answer
    goes to the jobs in their environment (envvars below), so that a job that parses the workflow again on a
    node plans the same run names as the main process."""
    if PRESET_ENV not in os.environ:
        os.environ[PRESET_ENV] = "gpu" if gpu_device_count() > 0 or gpu_reserved() is not None else "cpu"
    if os.environ[PRESET_ENV] not in ("gpu", "cpu"):
        raise WorkflowError(f"{PRESET_ENV}={os.environ[PRESET_ENV]!r}: expected gpu or cpu")
    return os.environ[PRESET_ENV] == "gpu"


PRESET_ENV = "MASKFACE_TRAIN_PRESET_AUTO"
if "mask_fraction" in USER_TRAIN and (USER_TRAIN.get("mask_fractions") or None) is not None:
    raise WorkflowError(
        f"train.mask_fraction ({USER_TRAIN['mask_fraction']}) is not used while train.mask_fractions is set "
        f"({USER_TRAIN['mask_fractions']}, config.yaml sets [0.5, 0.0]): give train: {{mask_fractions: null}} "
        f"beside it to train at mask_fraction, or list the fractions in mask_fractions")
TRAIN = with_preset(USER_TRAIN, _gpu_will_train())
if workflow.is_main_process and TRAIN["preset"] != "none":
    logger.info(f"train.preset {USER_TRAIN.get('preset')}: {TRAIN['preset']} size "
                f"(SphereFace-{TRAIN['arch']['depth']} width {TRAIN['arch']['width']}, {TRAIN['iterations']:,} "
                f"iterations x {TRAIN['batch_size']}, folds {TRAIN['folds']}), runs {TRAIN['name']}-...")


envvars:
    PRESET_ENV,


TRAIN_RUNS = _train_run_names(TRAIN)
TRAIN_MASKED_FOR_TRAINING = any(r["mask_fraction"] > 0 for r in TRAIN_RUNS.values())
TRAIN_LFW = TRAIN["protocol"] == "lfw_unrestricted"
TRAIN_GROUPS = list(dict.fromkeys(r["group"] for r in TRAIN_RUNS.values()))


wildcard_constraints:
    run="|".join(re.escape(r) for r in TRAIN_RUNS) or "no-run-configured",
    cvariant="clean|masked",


def _train_datasets():
    if TRAIN_LFW:
        lfw = TRAIN["lfw_dataset"] or (LFW_DATASETS[0] if LFW_DATASETS else None)
        return [lfw] if lfw else []
    return list(TRAIN["datasets"]) or list(TRAIN_DATASETS)


def _train_shards(dataset, variant):
    if variant == "clean":
        return [f"{RESULTS}/aligned/{dataset}/shard-{s}.parquet" for s in range(config["align"]["shards"])]
    # the mask stage writes one masked shard per aligned shard (same numbers)
    return [f"{RESULTS}/masked/{dataset}/shard-{s}.parquet" for s in range(config["align"]["shards"])]


def _train_cache(dataset, variant):
    return [f"{RESULTS}/train_cache/{dataset}/{variant}.npy", f"{RESULTS}/train_cache/{dataset}/{variant}.parquet"]


rule train_cache:
    input:
        shards=lambda wc: _train_shards(wc.dataset, wc.cvariant),
    output:
        npy=f"{RESULTS}/train_cache/{{dataset}}/{{cvariant}}.npy",
        index=f"{RESULTS}/train_cache/{{dataset}}/{{cvariant}}.parquet",
    params:
        code=code("train", "train_config", "imageio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/train_cache/{{dataset}}/{{cvariant}}.log",
    benchmark:
        f"{BENCH}/train_cache/{{dataset}}/{{cvariant}}.tsv"
    threads: TRAIN["threads"]
    resources:
        **part(),
        mem_mb=4096,
        runtime=240,
    script:
        "../scripts/train_cache.py"


def _train_spec(wc):
    run = TRAIN_RUNS[wc.run]
    sources = []
    for d in _train_datasets():
        src = {"dataset": d, "manifest": f"{RESULTS}/manifests/{d}/aligned.parquet", "clean": _train_cache(d, "clean")}
        if run["mask_fraction"] > 0:      # a run without masks does not depend on the mask stage
            src["masked"] = _train_cache(d, "masked")
        sources.append(src)
    spec = {"run": wc.run, "protocol": TRAIN["protocol"], "fold": run["fold"], "seed": run["seed"],
            "exclude_fold": run["fold"] if TRAIN_LFW else None,
            "pairs": pairs_manifest(_train_datasets()[0]) if TRAIN_LFW else None,
            # mask_fractions left out: adding a fraction must not rerun the runs already trained
            "sources": sources, "train": {**{k: v for k, v in TRAIN.items() if k != "mask_fractions"},
                                          "mask_fraction": run["mask_fraction"]}}
    return plain(spec)


def _trains_on_cpu():
    """Whether the runs would train on this machine's CPU: device cpu, or auto with no GPU here and the jobs run
    here (on a cluster the jobs go to nodes with GPUs)."""
    if TRAIN["device"] != "auto":
        return TRAIN["device"] == "cpu"
    return workflow.local_exec and gpu_device_count() == 0 and gpu_reserved() is None


_CPU_VERDICT = []


def _refuse_long_cpu_training():
    """Evaluated once the DAG holds a train job (its input function): the runs still to train, estimated on
    this machine's cores; longer than train.max_cpu_hours on the CPU -> the run stops before any job."""
    if not _CPU_VERDICT:
        todo = [r for r in TRAIN_RUNS if not os.path.exists(f"{RESULTS}/models/{r}/model.pt")]
        cores = getattr(workflow, "_cores", None) or os.cpu_count() or 1
        _CPU_VERDICT.append(cpu_training_refusal(TRAIN, len(todo), cores) if _trains_on_cpu() else None)
    if _CPU_VERDICT[0]:
        raise WorkflowError(_CPU_VERDICT[0])


def _train_inputs(wc):
    _refuse_long_cpu_training()
    inp = {"manifests": [f"{RESULTS}/manifests/{d}/aligned.parquet" for d in _train_datasets()],
           "clean": [p for d in _train_datasets() for p in _train_cache(d, "clean")]}
    if TRAIN_RUNS[wc.run]["mask_fraction"] > 0:
        inp["masked"] = [p for d in _train_datasets() for p in _train_cache(d, "masked")]
    if TRAIN_LFW:
        inp["pairs"] = pairs_manifest(_train_datasets()[0])
    return inp


rule train:
    input:
        unpack(_train_inputs),
    output:
        model=f"{RESULTS}/models/{{run}}/model.pt",
        log_csv=f"{RESULTS}/models/{{run}}/train_log.csv",
        curve=report(f"{RESULTS}/models/{{run}}/curve.png", category="Training",
                     labels={"run": "{run}", "figure": "loss and accuracy"}),
    params:
        spec=_train_spec,
        code=code("models", "train", "train_config"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    # one process per GPU (torchrun): threads (torch intra-op + loader) and memory grow with train.gpus; all of
    # a run's GPUs on one node (a DDP run is --standalone)
    threads: TRAIN["threads"] * TRAIN["gpus"]
    resources:
        **gpu_resources(TRAIN["device"], TRAIN["gpus"]),
        mem_mb=16384 + 8192 * (TRAIN["gpus"] - 1),
        runtime=24 * 60,
        nodes=1,
    script:
        "../scripts/train.py"


def _fold_eval_inputs(wc):
    d = _train_datasets()[0]
    inp = {"model": f"{RESULTS}/models/{wc.run}/model.pt", "pairs": pairs_manifest(d), "clean": _train_cache(d, "clean")}
    if TRAIN["eval_masked"]:
        inp["masked"] = _train_cache(d, "masked")
    return inp


rule train_fold_eval:
    input:
        unpack(_fold_eval_inputs),
    output:
        json=f"{RESULTS}/models/{{run}}/fold_eval.json",
    params:
        fold=lambda wc: TRAIN_RUNS[wc.run]["fold"],
        device=TRAIN["device"],
        batch_size=TRAIN["eval_batch_size"],
        code=code("models", "train", "train_config", "evaluate"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/train_fold_eval/{{run}}.log",
    threads: TRAIN["threads"]
    resources:
        **gpu_resources(TRAIN["device"]),
        mem_mb=8192,
        runtime=120,
    script:
        "../scripts/train_eval.py"


TRAIN_MODELS = [f"{RESULTS}/models/{r}/model.pt" for r in TRAIN_RUNS]
TRAIN_EVALS = [f"{RESULTS}/models/{r}/fold_eval.json" for r in TRAIN_RUNS] if TRAIN_LFW else []
TRAIN_SUMMARY = [f"{RESULTS}/models/{TRAIN['name']}.summary.json", f"{RESULTS}/models/{TRAIN['name']}.summary.md"]


rule train_summary:
    input:
        json=TRAIN_EVALS,
    output:
        json=TRAIN_SUMMARY[0],
        md=TRAIN_SUMMARY[1],
    params:
        # {group: its runs}: with train.mask_fractions one group per fraction, side by side in the summary
        groups={g: [r for r, v in TRAIN_RUNS.items() if v["group"] == g] for g in TRAIN_GROUPS},
        code=code("train", "train_config"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/train_summary/{TRAIN['name']}.log",
    script:
        "../scripts/train_summary.py"


rule train_all:
    """Named target: every configured run (and, for lfw_unrestricted, the fold evaluations and their summary)."""
    input:
        TRAIN_MODELS,
        TRAIN_EVALS,
        TRAIN_SUMMARY if TRAIN_LFW else [],


def _train_targets():
    # output patterns carry their wildcard constraints ({dataset,...}): match the fixed parts only
    produced = [str(o) for r in workflow.rules for o in r.output]

    def made(stage):
        return any(o.startswith(f"{RESULTS}/{stage}/") and "/shard-" in o and o.endswith(".parquet") for o in produced)

    needs = ["aligned"] + (["masked"] if TRAIN_MASKED_FOR_TRAINING or (TRAIN_LFW and TRAIN["eval_masked"]) else [])
    if not TRAIN_RUNS or not _train_datasets() or not all(made(n) for n in needs):
        return []
    return list(rules.train_all.input)


STAGE_TARGETS["train"] = _train_targets
