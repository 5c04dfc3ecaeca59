"""The Snakemake workflow driven for real (subprocess), on a tiny dataset built in a temporary work dir."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import snakemake_run
from PIL import Image

from maskface.manifest import read_provenance
from maskface.testing import BAD_INPUTS, write_bad_inputs

REPO = Path(__file__).resolve().parents[1]


smk = snakemake_run


def _dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in {"Alice_A": 2, "Bob_B": 2}.items():
        for i in range(1, n + 1):
            (root / "imgs" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                root / "imgs" / name / f"{name}_{i:04d}.jpg")
    write_bad_inputs(root / "imgs" / "Bob_B")
    (root / "pairs.txt").write_text("1\t1\nAlice_A\t1\t2\nAlice_A\t1\tBob_B\t2\n")


def _config(workdir: Path, data: Path, **extra) -> None:
    cfg = {"datasets": {"tiny": {"source": str(data), "format": "lfw", "pairs": str(data / "pairs.txt"), **extra}}}
    (workdir / "config.yaml").write_text(json.dumps(cfg))


def test_manifests_target_end_to_end_and_idempotent(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _dataset(data)
    work.mkdir()
    _config(work, data)
    smk(work, "manifests")
    raw = pd.read_parquet(work / "results/manifests/tiny/raw.parquet")
    assert len(raw) == 4 + len(BAD_INPUTS)        # every file accounted for
    assert set(raw["status"]) == {"ok", "unreadable", "empty", "not_an_image"}
    pairs = pd.read_parquet(work / "results/manifests/tiny/pairs.parquet")
    assert list(pairs["same"]) == [True, False]
    prov = read_provenance(work / "results/manifests/tiny/raw.parquet")
    assert prov["stage"] == "raw_manifest" and prov["packages"]["snakemake"].startswith("9.")
    assert set(prov["inputs"]) == {"results/datasets/tiny/dataset.json"}
    for rule in ("download", "raw_manifest", "pairs_manifest"):
        assert (work / f"results/logs/{rule}/tiny.log").stat().st_size > 0
    assert (work / "results/benchmarks/raw_manifest/tiny.tsv").exists()
    # the folder was used in place: nothing copied under resources/
    assert not (work / "resources").exists()
    mtime = (work / "results/manifests/tiny/raw.parquet").stat().st_mtime_ns
    again = smk(work, "manifests")
    assert "Nothing to be done" in again.stdout + again.stderr
    assert (work / "results/manifests/tiny/raw.parquet").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("patch,key", [
    ({"format": "lfww"}, "datasets.tiny.format: 'lfww' is not allowed; one of: lfw, imagefolder"),
    ({"pairs": None}, "datasets.tiny.pairs: a dataset of format lfw needs its pairs file"),
    ({"role": "training"}, "datasets.tiny.role: 'training' is not allowed; one of: train, test"),
    ({"md5": "xyz"}, "datasets.tiny.md5: 'xyz' does not match"),
    ({"colour": "red"}, "datasets.tiny.colour: unknown key; allowed under datasets.tiny: source, format"),
])
def test_bad_config_stops_before_any_job_naming_the_key(tmp_path, patch, key):
    data, work = tmp_path / "data", tmp_path / "work"
    _dataset(data)
    work.mkdir()
    _config(work, data, **patch)
    res = smk(work, "-n", "manifests", check=False)
    assert res.returncode != 0
    assert key in res.stdout + res.stderr
    assert not (work / "results").exists()


def test_bad_value_in_a_stage_section_names_the_key(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _dataset(data)
    work.mkdir()
    _config(work, data)
    res = smk(work, "-n", "--config", "align={'min_face_size': 'big'}", check=False)
    assert res.returncode != 0 and "align.min_face_size: 'big' is a string, expected integer" in res.stdout + res.stderr


def test_pairs_naming_a_missing_image_fail_the_job_with_the_line(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _dataset(data)
    (data / "pairs.txt").write_text("1\t1\nAlice_A\t1\t7\nAlice_A\t1\tBob_B\t2\n")
    work.mkdir()
    _config(work, data)
    res = smk(work, "manifests", check=False)
    assert res.returncode != 0
    log = (work / "results/logs/pairs_manifest/tiny.log").read_text()
    assert "pairs.txt:2: image Alice_A/Alice_A_0007.jpg is missing from the dataset" in log
    assert not (work / "results/manifests/tiny/pairs.parquet").exists()


def test_default_config_builds_a_dag(tmp_path):
    """The shipped config.yaml (official LFW URLs) is valid and yields a DAG (dry run: nothing fetched)."""
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "manifests"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "download" in res.stdout


@pytest.mark.lfw
def test_real_lfw_dag_builds(lfw, tmp_path):
    """The real LFW's DAG: config/cpu-quick.yaml plans on this CPU; config/lfw-local.yaml (the default 10
    SphereFace-20 runs) is refused here, before any job, unless a GPU is present."""
    quick = (REPO / "config/cpu-quick.yaml").read_text().replace("../shared/data/lfw", str(lfw))
    (tmp_path / "config.yaml").write_text(quick)
    res = smk(tmp_path, "-n", check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    full = (REPO / "config/lfw-local.yaml").read_text().replace("../shared/data/lfw", str(lfw))
    (tmp_path / "config.yaml").write_text(full)
    res = smk(tmp_path, "-n", check=False)
    if Path("/dev/nvidia0").exists():
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert res.returncode != 0 and "would train on the CPU" in res.stdout + res.stderr


@pytest.mark.lfw
def test_the_default_config_trains_at_the_size_of_the_machine(lfw, tmp_path):
    """config.yaml (a local LFW copy when there is one; train.preset auto, with and without masks): on a machine
    without a GPU the CPU size (fold 1, SphereFace-4, two runs), with a GPU given to the run the GPU size (every
    fold, SphereFace-20); either way planned, not refused."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text().replace("../shared/data/lfw", str(lfw)))
    gpu_env = {"CUDA_VISIBLE_DEVICES": "0"}
    runs = {}
    for name, env in (("here", None), ("gpu", gpu_env)):
        res = smk(tmp_path, "-n", "all", env=env)
        out = res.stdout + res.stderr
        runs[name] = sorted({line.split("run=")[1].split(",")[0] for line in out.splitlines()
                             if "wildcards: run=" in line})
        assert "rule download:" in out and "would train on the CPU" not in out
    if not Path("/dev/nvidia0").exists():
        assert runs["here"] == ["sphereface-cpu-m0-fold1-seed1", "sphereface-cpu-m50-fold1-seed1"]
    assert len(runs["gpu"]) == 20 and "sphereface-gpu-m50-fold10-seed1" in runs["gpu"]
    # what profiles/slurm sets on a submit host without a GPU: the GPU size (run here, it is refused: this
    # machine's CPU would train it; under the SLURM executor the GPU nodes do)
    res = smk(tmp_path, "-n", "all", env={"MASKFACE_TRAIN_PRESET_AUTO": "gpu"}, check=False)
    if not Path("/dev/nvidia0").exists():
        assert "run=sphereface-gpu-m50-fold1-seed1" in res.stdout + res.stderr and "would train on the CPU" in \
            res.stdout + res.stderr
    # an overlay's mask_fraction under config.yaml's mask_fractions: said, not silently dropped
    (tmp_path / "overlay.yaml").write_text("train: {mask_fraction: 0.25}\n")
    res = smk(tmp_path, "-n", "all", "--configfile", str(tmp_path / "overlay.yaml"), check=False)
    assert res.returncode != 0 and "train.mask_fraction (0.25) is not used while train.mask_fractions is set" in \
        res.stdout + res.stderr


# the rules whose jobs resolve a stage's device (maskface.devices.resolve) and so may start CUDA
GPU_RULES = {"align_shard", "align_fidelity", "extract_features", "demo_threshold", "demo_run", "train",
             "train_fold_eval"}


@pytest.mark.lfw
def test_every_job_that_may_use_cuda_asks_for_a_gpu(lfw, tmp_path):
    """With devices auto/cuda, each job that may start CUDA counts against `--resources gpu=N` (and asks the
    cluster for one); no other job does. With device cpu, none does."""
    quick = (REPO / "config/cpu-quick.yaml").read_text().replace("../shared/data/lfw", str(lfw))
    (tmp_path / "config.yaml").write_text(quick)

    def gpus_by_rule(*config: str) -> dict:
        res = smk(tmp_path, "-n", "all", "demo", "--config", *config)
        rules: dict = {}
        rule = None
        for line in (res.stdout + res.stderr).splitlines():
            if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
                rule = line.split()[1].rstrip(":")
                rules.setdefault(rule, set())
            elif rule and line.strip().startswith("resources:"):
                gpu = [int(p.split("=")[1]) for p in line.split(":", 1)[1].split(", ") if p.startswith("gpu=")]
                rules[rule].add(gpu[0] if gpu else 0)
                rule = None
        return rules

    auto = gpus_by_rule('train={"device": "cuda"}', 'align={"device": "auto"}', 'evaluate={"device": "auto"}',
                        'demo={"device": "auto"}')
    assert GPU_RULES <= set(auto), set(auto)
    assert {r for r, g in auto.items() if g != {0}} == GPU_RULES, auto
    cpu = gpus_by_rule('train={"device": "cpu"}', 'align={"device": "cpu"}', 'evaluate={"device": "cpu"}',
                       'demo={"device": "cpu"}')
    assert all(g == {0} for g in cpu.values()), cpu


def test_download_rule_fetches_url_archive_with_checksums(tmp_path):
    """The download rule on an http URL (127.0.0.1): archive verified, extracted under resources/, manifested."""
    import functools
    import hashlib
    import tarfile
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    data, www, work = tmp_path / "data", tmp_path / "www", tmp_path / "work"
    _dataset(data)
    www.mkdir()
    work.mkdir()
    with tarfile.open(www / "tiny.tgz", "w:gz") as tf:
        tf.add(data / "imgs", arcname="tiny")
    (www / "pairs.txt").write_bytes((data / "pairs.txt").read_bytes())
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    try:
        cfg = {"datasets": {"tiny": {"source": f"{base}/tiny.tgz", "md5": md5(www / "tiny.tgz"), "format": "lfw",
                                     "pairs": {"source": f"{base}/pairs.txt", "md5": md5(www / "pairs.txt")}}}}
        (work / "config.yaml").write_text(json.dumps(cfg))
        smk(work, "manifests")
        raw = pd.read_parquet(work / "results/manifests/tiny/raw.parquet")
        assert len(raw) == 4 + len(BAD_INPUTS)
        assert (work / "resources/downloads/tiny/tiny.tgz").exists()
        assert (work / "resources/datasets/tiny/tiny/Alice_A/Alice_A_0001.jpg").exists()
        # a wrong checksum: the job fails with both digests in its log, and nothing is left renamed in place
        cfg["datasets"]["tiny"]["md5"] = "0" * 32
        (work / "config.yaml").write_text(json.dumps(cfg))
        res = smk(work, "manifests", "--forceall", check=False)
        assert res.returncode != 0
        log = (work / "results/logs/download/tiny.log").read_text()
        assert "md5 mismatch" in log and "0" * 32 in log
    finally:
        srv.shutdown()
        srv.server_close()


def test_lint_reports_only_what_the_readme_explains():
    """`snakemake --lint`: every finding that remains is one the README's development section gives a reason for."""
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(REPO), "--lint",
                          "--configfile", str(REPO / "config/cpu-quick.yaml")], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode in (0, 1) and "Lints for snakefile" in out, out[-3000:]     # it linted (1: lints found)
    kinds = {line.strip()[2:].split(":")[0].split(" in line")[0] for line in out.splitlines()
             if line.startswith("    * ")}
    assert kinds, out[-3000:]
    explained = {"Environment variable PYTHONPATH used but not asserted with envvars directive"}
    unexplained = kinds - explained
    assert not unexplained, unexplained
    assert "PYTHONPATH used but not asserted with envvars" in (REPO / "README.md").read_text()
