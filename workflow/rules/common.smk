# Shared helpers of the rules: dataset look-ups, input functions, code versions, stage target registry.
import json
from pathlib import Path

from maskface.manifest import code_version

RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"

DATASETS = sorted(config["datasets"])
LFW_DATASETS = [d for d in DATASETS if config["datasets"][d]["format"] == "lfw"]
TEST_DATASETS = [d for d in DATASETS if config["datasets"][d]["role"] == "test"]
TRAIN_DATASETS = [d for d in DATASETS if config["datasets"][d]["role"] == "train"]


wildcard_constraints:
    dataset="|".join(DATASETS),
    shard=r"\d+",


# stage name -> list of target files (or a function of no argument returning them); filled by each .smk.
STAGE_TARGETS = {}


def all_targets(wildcards=None):
    out = []
    for stage in STAGE_TARGETS:
        targets = STAGE_TARGETS[stage]
        out.extend(targets() if callable(targets) else targets)
    return out


# a source given as alternatives (a local copy, else the download) is resolved once, when the workflow is parsed
from maskface.download import chosen_sources

config["datasets"] = {name: chosen_sources(ds) for name, ds in config["datasets"].items()}


def dataset_cfg(dataset):
    return config["datasets"][dataset]


def dataset_json(dataset):
    """The acquisition record of a dataset (absolute root, images_root, pairs path); see rule download."""
    return f"{RESULTS}/datasets/{dataset}/dataset.json"


def raw_manifest(dataset):
    return f"{RESULTS}/manifests/{dataset}/raw.parquet"


def pairs_manifest(dataset):
    return f"{RESULTS}/manifests/{dataset}/pairs.parquet"


def plain(value):
    """A deep copy made of builtin types only, so Snakemake compares it for reruns (params must be plain)."""
    return json.loads(json.dumps(value))


def code(*modules):
    """Digest of the stage's source modules: a param, so a code change reruns the stage."""
    return code_version(*modules)


SLURM = config.get("slurm") or {}


def part(gpu=False):
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
    return {**part(gpu=n > 0), "gpu": n}
