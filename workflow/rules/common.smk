# Shared by the stage files, in one place:
#   1. the plan the config asks for: datasets, stage settings, training runs, evaluated models;
#   2. every result path, as a function (a rule's output pattern calls it with the wildcards' names);
#   3. the final targets (`final_targets`, from the config only);
#   4. the rules' input functions, params and resources helpers.
# The rule files (workflow/rules/<stage>.smk) hold rules only. Defaults come from the schema (validated with
# set_default before this file is read), never from here.
import json
import re

from snakemake.logging import logger

from maskface.align import AlignConfig
from maskface.devices import gpu_device_count, gpu_reserved
from maskface.download import chosen_sources
from maskface.manifest import code_version
from maskface.mask.config import MaskConfig  # numba- and OpenCV-free
from maskface.train_config import cpu_training_refusal, run_names, with_preset  # torch-free

RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"

# ---------------------------------------------------------------------------------------------------- 1. plan

# a source given as alternatives (a local copy, else the download) is resolved once, when the workflow is parsed
config["datasets"] = {name: chosen_sources(ds) for name, ds in config["datasets"].items()}
DATASETS = sorted(config["datasets"])
LFW_DATASETS = [d for d in DATASETS if config["datasets"][d]["format"] == "lfw"]
TEST_DATASETS = [d for d in DATASETS if config["datasets"][d]["role"] == "test"]
TRAIN_DATASETS = [d for d in DATASETS if config["datasets"][d]["role"] == "train"]
PRIVATE_DATASETS = [d for d in DATASETS if config["datasets"][d].get("private")]


def dataset_cfg(dataset):
    return config["datasets"][dataset]


# Only the settings that change a stage's results are its params (a change reruns it); device, threads and
# batch sizes are read by the jobs from config and never rerun anything.
ALIGN = AlignConfig.from_mapping(config["align"])
MASK = MaskConfig.from_mapping(config["mask"])
SHARDS = ALIGN.shards   # a mask shard reads the aligned shard of the same number
ALIGN_FIDELITY_SAMPLE = 500


def _mask_gallery_dataset():
    """mask.gallery, else the first LFW-format dataset that is not private (its faces appear in a figure)."""
    name = config["mask"]["gallery"]
    if name:
        if name not in DATASETS:
            raise WorkflowError(f"mask.gallery: unknown dataset {name!r}; configured: {DATASETS}")
        if name in PRIVATE_DATASETS:
            raise WorkflowError(f"mask.gallery: dataset {name!r} is private; its faces may not appear in a figure")
        return name
    public_lfw = [d for d in LFW_DATASETS if d not in PRIVATE_DATASETS]
    return public_lfw[0] if public_lfw else None


MASK_GALLERY_DATASET = _mask_gallery_dataset()

# Training: train.preset picks a size for where the jobs will run (a GPU, or this machine's CPU).
PRESET_ENV = "MASKFACE_TRAIN_PRESET_AUTO"


def _gpu_will_train():
    """Where the training jobs run there is a GPU: this machine has one, or the run was given one. A cluster
    profile says so itself (profiles/slurm sets MASKFACE_TRAIN_PRESET_AUTO=gpu: the submit host has no GPU,
    and which executor runs the jobs is not known while the workflow is parsed), as may the user. The answer
    goes to the jobs in their environment (envvars in train.smk), so that a job that parses the workflow again
    on a node plans the same run names as the main process."""
    if PRESET_ENV not in os.environ:
        os.environ[PRESET_ENV] = "gpu" if gpu_device_count() > 0 or gpu_reserved() is not None else "cpu"
    if os.environ[PRESET_ENV] not in ("gpu", "cpu"):
        raise WorkflowError(f"{PRESET_ENV}={os.environ[PRESET_ENV]!r}: expected gpu or cpu")
    return os.environ[PRESET_ENV] == "gpu"


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
TRAIN_RUNS = run_names(TRAIN)     # {run: {fold, seed, mask_fraction, group}}
TRAIN_LFW = TRAIN["protocol"] == "lfw_unrestricted"
TRAIN_GROUPS = list(dict.fromkeys(r["group"] for r in TRAIN_RUNS.values()))
if TRAIN_LFW:
    _lfw = TRAIN["lfw_dataset"] or (LFW_DATASETS[0] if LFW_DATASETS else None)
    TRAIN_ON = [_lfw] if _lfw else []
else:
    TRAIN_ON = list(TRAIN["datasets"]) or list(TRAIN_DATASETS)
# train.init: fine-tuning a pretrained chip network (dlib's ResNet) on 150x150 chips and its frozen prefix
TRAIN_CHIPS = TRAIN["init"] is not None
# train.validation next_fold: each group's per-fold models are also an evaluation, results/eval/{name}/ (one
# per seed: {group}-run{seed} when there are several seeds, averaged in the summary)
TRAIN_EVALS = {}
if TRAIN_LFW and TRAIN["validation"] == "next_fold" and TRAIN_ON:
    for _r, _v in TRAIN_RUNS.items():
        _name = _v["group"] if len(TRAIN["seeds"]) == 1 else f"{_v['group']}-run{_v['seed']}"
        TRAIN_EVALS.setdefault(_name, []).append(_r)

# Evaluation: every configured model on every test dataset.
EVAL = config["evaluate"]
EVAL_MODELS = sorted(EVAL["models"])
DEMO = config["demo"]
if set(TRAIN_EVALS) & set(EVAL_MODELS):
    raise WorkflowError(f"evaluate.models {sorted(set(TRAIN_EVALS) & set(EVAL_MODELS))}: the name of a training "
                        f"group's evaluation (results/eval/<name>/, train.validation: next_fold); rename the model")


def model_cfg(model):
    return EVAL["models"][model]


def source_embedder(model):
    """Models that embed the source photo (dlib-resnet, dlib) rather than the aligned crop (sphereface)."""
    return model_cfg(model)["embedder"] != "sphereface"


# --------------------------------------------------------------------------------------------------- 2. paths
# Each result path is written once, here. Called without arguments a function gives the rule's output pattern.


def dataset_json(dataset="{dataset}"):
    """The acquisition record of a dataset (absolute root, images_root, pairs path); see rule download."""
    return f"{RESULTS}/datasets/{dataset}/dataset.json"


def raw_manifest(dataset="{dataset}"):
    return f"{RESULTS}/manifests/{dataset}/raw.parquet"


def pairs_manifest(dataset="{dataset}"):
    return f"{RESULTS}/manifests/{dataset}/pairs.parquet"


def aligned_manifest(dataset="{dataset}"):
    return f"{RESULTS}/manifests/{dataset}/aligned.parquet"


def masked_manifest(dataset="{dataset}"):
    return f"{RESULTS}/manifests/{dataset}/masked.parquet"


def aligned_shard(dataset="{dataset}", shard="{shard}"):
    return f"{RESULTS}/aligned/{dataset}/shard-{shard}.parquet"


def masked_shard(dataset="{dataset}", shard="{shard}"):
    return f"{RESULTS}/masked/{dataset}/shard-{shard}.parquet"


def shards(dataset, variant):
    """Every shard of a dataset: the aligned crops (clean) or the mask stage's (masked)."""
    path = aligned_shard if variant == "clean" else masked_shard
    return [path(dataset, s) for s in range(SHARDS)]


def stage_summary(stage, dataset="{dataset}"):
    """results/aligned|masked/{dataset}/summary.json: a stage's counts."""
    return f"{RESULTS}/{stage}/{dataset}/summary.json"


def align_fidelity(dataset="{dataset}"):
    return f"{RESULTS}/aligned/{dataset}/fidelity.json"


MASK_GALLERY = f"{RESULTS}/figures/mask_gallery.png"


def train_cache(dataset="{dataset}", variant="{cvariant}"):
    """The crops of a dataset decoded once to uint8 for training: [array .npy, index .parquet]."""
    return [f"{RESULTS}/train_cache/{dataset}/{variant}.npy", f"{RESULTS}/train_cache/{dataset}/{variant}.parquet"]


def chip_cache(dataset="{dataset}", variant="{cvariant}"):
    """150x150 chips of a dataset cut as the evaluation cuts them (train.init): [array .npy, index .parquet]."""
    return [f"{RESULTS}/train_cache/{dataset}/chips-{variant}.npy",
            f"{RESULTS}/train_cache/{dataset}/chips-{variant}.parquet"]


def prefix_cache(dataset="{dataset}", variant="{cvariant}"):
    """The frozen part's activations of a dataset's chips, plain and mirrored: [array .npy, index .parquet]."""
    return [f"{RESULTS}/train_cache/{dataset}/prefix-{variant}.npy",
            f"{RESULTS}/train_cache/{dataset}/prefix-{variant}.parquet"]


def run_cache(dataset, variant):
    """What a training run reads: the frozen-prefix activations (train.init) or the 112x96 crops."""
    return prefix_cache(dataset, variant) if TRAIN_CHIPS else train_cache(dataset, variant)


def eval_cache(dataset, variant):
    """What a run's fold evaluation reads: the chips (train.init) or the 112x96 crops."""
    return chip_cache(dataset, variant) if TRAIN_CHIPS else train_cache(dataset, variant)


def model_dir(run="{run}"):
    return f"{RESULTS}/models/{run}"


def fold_eval(run="{run}"):
    return f"{model_dir(run)}/fold_eval.json"


def train_summary():
    """[json, md] of the training summary (lfw_unrestricted: mean +- std over folds and seeds, per group)."""
    return [f"{RESULTS}/models/{TRAIN['name']}.summary.json", f"{RESULTS}/models/{TRAIN['name']}.summary.md"]


def features(model="{model}", dataset="{dataset}", variant="{variant}"):
    return f"{RESULTS}/features/{model}/{dataset}/{variant}.parquet"


def evaluation(model="{model}", dataset="{dataset}", ext="json"):
    """results/eval/{model}/{dataset}.json | .md | _roc.png"""
    suffix = "_roc.png" if ext == "png" else f".{ext}"
    return f"{RESULTS}/eval/{model}/{dataset}{suffix}"


EVAL_SUMMARY = f"{RESULTS}/eval/summary.md"
REPORT_TABLES = f"{RESULTS}/report/tables.html"
DEMO_DIR = f"{RESULTS}/demo"
DEMO_TV = f"{DEMO_DIR}/testvideo"
DEMO_OUT = DEMO["output"].rstrip("/")


def log_path(*parts):
    return f"{os.path.join(LOGS, *parts)}.log"


def bench_path(*parts):
    return f"{os.path.join(BENCH, *parts)}.tsv"


# ------------------------------------------------------------------------------------------- 3. final targets


def manifest_targets():
    return [raw_manifest(d) for d in DATASETS] + [pairs_manifest(d) for d in LFW_DATASETS]


def align_targets():
    return [p for d in DATASETS for p in (aligned_manifest(d), stage_summary("aligned", d), align_fidelity(d))]


def mask_targets():
    out = [p for d in DATASETS for p in (masked_manifest(d), stage_summary("masked", d))]
    return out + ([MASK_GALLERY] if MASK_GALLERY_DATASET else [])


def train_targets():
    if not TRAIN_RUNS or not TRAIN_ON:
        return []
    out = [f"{model_dir(r)}/model.pt" for r in TRAIN_RUNS]
    if TRAIN_LFW:
        out += [fold_eval(r) for r in TRAIN_RUNS] + train_summary() + train_evaluations()
    return out


def train_evaluations(ext="json"):
    """results/eval/{name}/{lfw}.json of the training groups' per-fold models (train.validation: next_fold)."""
    return [evaluation(name, TRAIN_ON[0], ext) for name in TRAIN_EVALS]


def evaluate_targets():
    if not EVAL_MODELS and not TRAIN_EVALS:
        return []
    return [evaluation(m, d) for m in EVAL_MODELS for d in TEST_DATASETS] + train_evaluations() + [EVAL_SUMMARY]


def final_targets(wildcards=None):
    """What `snakemake` builds (the `all` rule), from the config alone: every stage's results and the tables page.
    The demo is a named target of its own (`snakemake demo`)."""
    return (manifest_targets() + align_targets() + mask_targets() + train_targets() + evaluate_targets()
            + [REPORT_TABLES])


# ------------------------------------------------------------------------------------- 4. rule helpers


def as_param(value):
    """A deep copy made of builtin types only, so Snakemake compares it for reruns (params must be plain)."""
    return json.loads(json.dumps(value))


def code_digest(*modules):
    """Digest of the source of the `maskface` modules a rule's job runs: a param, so a code change reruns it."""
    return code_version(*modules)


SLURM = config.get("slurm") or {}


def slurm_partition(gpu=False):
    """The SLURM partition of a rule's jobs from the workflow config (slurm.partition, or slurm.gpu_partition
    for jobs that ask for a GPU), as a resource for snakemake-executor-plugin-slurm; nothing when unset (the
    profile's MASKFACE_SLURM_PARTITION, then the cluster's default partition, apply)."""
    name = (SLURM.get("gpu_partition") if gpu else None) or SLURM.get("partition")
    return {"slurm_partition": name} if name else {}


def uses_gpu(device):
    """1 when a stage's `device` may use CUDA (auto or cuda): on a cluster such jobs request one GPU; set the
    stage's device to cpu on a cluster without GPUs."""
    return 0 if device == "cpu" else 1


def gpu_resources(device, gpus=1):
    """The GPU part of a rule's resources for a stage's `device` setting: `gpus` GPUs (none for cpu) and the
    partition that goes with it. Every rule whose job may start CUDA uses it, so that `--resources gpu=N` on a
    workstation and the GPU request on a cluster count every such job."""
    n = gpus * uses_gpu(device)
    return {**slurm_partition(gpu=n > 0), "gpu": n}


# --- training


def train_inputs(wc):
    refuse_long_cpu_training()
    run = TRAIN_RUNS[wc.run]
    inp = {"manifests": [aligned_manifest(d) for d in TRAIN_ON],
           "clean": [p for d in TRAIN_ON for p in run_cache(d, "clean")]}
    if run["mask_fraction"] > 0:      # a run without masks does not depend on the mask stage
        inp["masked"] = [p for d in TRAIN_ON for p in run_cache(d, "masked")]
    if TRAIN_CHIPS and TRAIN["init"] != "dlib-resnet":
        inp["init"] = TRAIN["init"]
    if TRAIN_LFW:
        inp["pairs"] = pairs_manifest(TRAIN_ON[0])
    return inp


RUN_LIST_KEYS = ("mask_fractions", "folds", "seeds")


def train_spec(wc):
    run = TRAIN_RUNS[wc.run]
    sources = []
    for d in TRAIN_ON:
        src = {"dataset": d, "manifest": aligned_manifest(d), "clean": run_cache(d, "clean")}
        if run["mask_fraction"] > 0:
            src["masked"] = run_cache(d, "masked")
        sources.append(src)
    spec = {"run": wc.run, "protocol": TRAIN["protocol"], "fold": run["fold"], "seed": run["seed"],
            "exclude_fold": run["fold"] if TRAIN_LFW else None,
            "pairs": pairs_manifest(TRAIN_ON[0]) if TRAIN_LFW else None,
            # the keys that list the runs are left out (the run's own fold, seed and fraction are in): adding a
            # fraction, a fold or a seed must not rerun the runs already trained
            "sources": sources, "train": {**{k: v for k, v in TRAIN.items() if k not in RUN_LIST_KEYS},
                                          "mask_fraction": run["mask_fraction"]}}
    return as_param(spec)


def _trains_on_cpu():
    """Whether the runs would train on this machine's CPU: device cpu, or auto with no GPU here and the jobs run
    here (on a cluster the jobs go to nodes with GPUs)."""
    if TRAIN["device"] != "auto":
        return TRAIN["device"] == "cpu"
    # a SLURM job given no GPU sees the node's device files, and trains on the CPU (devices.resolve_device)
    return (workflow.local_exec and (gpu_device_count() == 0 or "SLURM_JOB_ID" in os.environ)
            and gpu_reserved() is None)


_CPU_VERDICT = []


def refuse_long_cpu_training():
    """Evaluated once the DAG holds a train job (its input function): the runs still to train, estimated on
    this machine's cores; longer than train.max_cpu_hours on the CPU -> the run stops before any job."""
    if not _CPU_VERDICT:
        todo = [r for r in TRAIN_RUNS if not os.path.exists(f"{model_dir(r)}/model.pt")]
        cores = getattr(workflow, "_cores", None) or os.cpu_count() or 1
        _CPU_VERDICT.append(cpu_training_refusal(TRAIN, len(todo), cores) if _trains_on_cpu() else None)
    if _CPU_VERDICT[0]:
        raise WorkflowError(_CPU_VERDICT[0])


def fold_eval_inputs(wc):
    d = TRAIN_ON[0]
    inp = {"model": f"{model_dir(wc.run)}/model.pt", "pairs": pairs_manifest(d), "clean": eval_cache(d, "clean")}
    if TRAIN["eval_masked"]:
        inp["masked"] = eval_cache(d, "masked")
    return inp


# --- evaluation


def extract_inputs(wc):
    mcfg = model_cfg(wc.model)
    inp = {"json": dataset_json(wc.dataset), "aligned": aligned_manifest(wc.dataset)}
    if dataset_cfg(wc.dataset)["format"] == "lfw" and EVAL["lfw_images"] == "pairs":
        inp["pairs"] = pairs_manifest(wc.dataset)
    # sphereface needs its model file; dlib-resnet may come from a checkpoint of the network (e.g. fine-tuned)
    if mcfg["embedder"] == "sphereface" or mcfg.get("checkpoint"):
        inp["checkpoint"] = mcfg["checkpoint"]
    if not source_embedder(wc.model):
        inp["shards"] = shards(wc.dataset, wc.variant)
    elif wc.variant == "masked":
        inp["masked"] = masked_manifest(wc.dataset)
    return inp


def redraws_mask(wc):
    """Masked features of a source-image embedder: the mask is redrawn in the source photo by the mask stage's
    renderer, so the job depends on the mask settings and code."""
    return wc.variant == "masked" and source_embedder(wc.model)


def features_model(model):
    """A model may score another model's features differently (features_from): they are extracted once."""
    src = model_cfg(model).get("features_from") or model
    if src not in EVAL["models"] or model_cfg(src).get("features_from"):
        raise WorkflowError(f"evaluate.models.{model}.features_from: {src!r} must name a model with its own features")
    return src


def evaluate_inputs(wc):
    # masked features always exist (the mask stage is part of the workflow): the mixed and masked protocols follow
    inp = {"features": [features(features_model(wc.model), wc.dataset, v) for v in ("clean", "masked")]}
    if dataset_cfg(wc.dataset)["format"] == "lfw":
        inp["pairs"] = pairs_manifest(wc.dataset)
    return inp


# --- report


def report_inputs(wc):
    inp = {"stages": [stage_summary(s, d) for s in ("aligned", "masked") for d in DATASETS]}
    if EVAL_MODELS or TRAIN_EVALS:
        inp["eval_summary"] = EVAL_SUMMARY
        inp["eval_tables"] = ([evaluation(m, d, "md") for m in EVAL_MODELS for d in TEST_DATASETS]
                              + train_evaluations("md"))
    if TRAIN_LFW and train_targets():
        inp["train"] = [train_summary()[1]]
    return inp


# --- demo


def demo_lfw():
    name = DEMO["lfw_dataset"] or (LFW_DATASETS[0] if LFW_DATASETS else None)
    if name is None or name not in config["datasets"] or config["datasets"][name]["format"] != "lfw":
        raise WorkflowError(f"demo.lfw_dataset: {name!r} is not an LFW-format dataset of `datasets` "
                            f"(needed for the test video and the threshold)")
    return name


def demo_model():
    if DEMO["model"] not in EVAL["models"]:
        raise WorkflowError(f"demo.model: {DEMO['model']!r} is not a model of evaluate.models ({EVAL_MODELS})")
    return {"name": DEMO["model"], **EVAL["models"][DEMO["model"]]}


DEMO_BUILD = DEMO["video"] is None     # null: the LFW test video, with ground truth and open-set metrics
if DEMO["gallery"] is None and not DEMO_BUILD:
    raise WorkflowError("demo.gallery: null (the test video's gallery) needs demo.video: null as well")
DEMO_OUTPUTS = [f"{DEMO_OUT}/{f}" for f in ("annotated.mp4", "detections.parquet", "detections.csv",
                                             "summary.json", "snapshot.png")]
if DEMO_BUILD:
    DEMO_OUTPUTS += [f"{DEMO_OUT}/metrics.json", f"{DEMO_OUT}/metrics.md"]


def demo_settings():
    """The demo settings that change its detections and scores (a change reruns the threshold and the run)."""
    keys = ["min_face_size", "factor", "det_thresholds", "batch_size", "masked_gallery", "gallery_no_face",
            "max_frames"]
    return as_param({k: DEMO[k] for k in keys})


def threshold_inputs(wc):
    lfw = demo_lfw()
    inp = {"json": dataset_json(lfw)}
    if DEMO["threshold_from"] == "evaluation":
        inp.update(features=features(features_model(DEMO["model"]), lfw, "clean"), pairs=pairs_manifest(lfw))
    if demo_model().get("checkpoint"):     # the model the threshold is measured for (and its meta)
        inp["checkpoint"] = demo_model()["checkpoint"]
    return inp


def demo_inputs(wc):
    inp = {}
    if DEMO_BUILD:
        inp.update(video=f"{DEMO_TV}/video.mp4", gallery=f"{DEMO_TV}/gallery", gt=f"{DEMO_TV}/ground_truth.parquet",
                   lfw=dataset_json(demo_lfw()))
    else:
        inp["video"] = DEMO["video"]
        inp["gallery"] = DEMO["gallery"] or f"{DEMO_TV}/gallery"
    if DEMO["threshold"] is None:
        inp["threshold"] = f"{DEMO_DIR}/threshold.json"
    if demo_model().get("checkpoint"):
        inp["checkpoint"] = demo_model()["checkpoint"]
    return inp
