"""The whole workflow as users live with it, driven for real on a tiny real-face set (16 LFW photos of 8
people, 2 folds of pairs) plus a private folder-per-identity set (6 photos of 3 people under made-up names):

* a complete run (align -> mask -> train -> features -> evaluation -> report page) succeeds;
* a second invocation does nothing and touches no file;
* exact partial reruns: changing mask.seed reruns masking and what depends on masks, never alignment;
  align.min_face_size reruns everything from alignment on, never the manifests; train.lr reruns training
  and what depends on the model only (asserted on Snakemake's own job list, then mask.seed for real:
  aligned shards keep their bytes and times, masked shards change);
* privacy: the private set's names appear in its local manifests (the check can find them) but nowhere in
  `snakemake --report` output nor in the shared artifacts (results/eval, results/figures, results/report).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import snakemake_run

SECRET = {"Qz_Secret_Alpha": None, "Qz_Secret_Bravo": None, "Qz_Secret_Charlie": None}

pytestmark = [pytest.mark.lfw, pytest.mark.slow]


def smk(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return snakemake_run(workdir, *args, check=check, timeout=1200)


def _people(lfw: Path, n: int) -> list[str]:
    """The first ``n`` people (sorted) with at least two photos."""
    out = []
    for d in sorted((lfw / "images_deepfunneled").iterdir()):
        if d.is_dir() and len(list(d.glob("*.jpg"))) >= 2:
            out.append(d.name)
            if len(out) == n:
                break
    return out


def _build(lfw: Path, root: Path) -> dict:
    people = _people(lfw, 11)
    tiny = root / "tinylfw"
    for p in people[:8]:
        (tiny / "images_deepfunneled" / p).mkdir(parents=True)
        for k in (1, 2):
            shutil.copy(lfw / "images_deepfunneled" / p / f"{p}_{k:04d}.jpg", tiny / "images_deepfunneled" / p)
    P = people
    lines = ["2\t2"]
    for a, b, c in ((P[0], P[1], P[2]), (P[3], P[4], P[5])):   # fold 1: people 0-2, fold 2: people 3-5
        lines += [f"{a}\t1\t2", f"{b}\t1\t2", f"{a}\t1\t{c}\t2", f"{b}\t2\t{c}\t1"]
    (tiny / "pairs.txt").write_text("\n".join(lines) + "\n")
    secret = root / "secret"
    for name, p in zip(SECRET, people[8:11]):
        (secret / name).mkdir(parents=True)
        for k in (1, 2):
            shutil.copy(lfw / "images_deepfunneled" / p / f"{p}_{k:04d}.jpg", secret / name / f"{name.lower()}_{k}.jpg")
    cfg = {
        "datasets": {
            "tinylfw": {"source": str(tiny), "format": "lfw", "role": "test", "images_subdir": "images_deepfunneled",
                        "pairs": str(tiny / "pairs.txt")},
            "secret": {"source": str(secret), "format": "imagefolder", "role": "test", "private": True},
        },
        "align": {"shards": 2, "threads": 1},
        "mask": {"threads": 1},
        "train": {"protocol": "lfw_unrestricted", "name": "tiny", "folds": [1], "arch": {"depth": 4, "width": 0.25},
                  "batch_size": 8, "iterations": 4, "lr": 0.01, "lr_steps": [3], "mask_fraction": 0.5,
                  "device": "cpu", "threads": 1, "checkpoint_every": 4, "log_every": 2, "min_images": 2,
                  "eval_batch_size": 16},
        "evaluate": {"models": {"dlib-resnet": {"embedder": "dlib-resnet"},
                                "tiny": {"embedder": "sphereface",
                                         "checkpoint": "results/models/tiny-fold1-seed1/model.pt"}},
                     "n_impostors": 100, "threads": 1},
    }
    return cfg


@pytest.fixture(scope="module")
def run(lfw, tmp_path_factory):
    root = tmp_path_factory.mktemp("rerun")
    work = root / "work"
    work.mkdir()
    cfg = _build(lfw, root / "data")
    (work / "config.yaml").write_text(json.dumps(cfg))
    smk(work)
    return work, cfg


def _stamp(work: Path) -> dict:
    return {str(p.relative_to(work)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in (work / "results").rglob("*") if p.is_file()}


def _planned(work: Path, overlay: dict) -> tuple[dict, set]:
    """Snakemake's own plan after a config change: ({rule: jobs}, {output files})."""
    (work / "overlay.yaml").write_text(json.dumps(overlay))
    res = smk(work, "-n", "--configfile", str(work / "config.yaml"), str(work / "overlay.yaml"))
    text = res.stdout + res.stderr
    jobs = {}
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", text, re.S)
    if m:
        for line in m.group(1).splitlines():
            name, count = line.split()
            jobs[name] = int(count)
    outputs = set()
    for line in text.splitlines():
        if line.strip().startswith("output:"):
            outputs.update(o.strip() for o in line.split(":", 1)[1].split(","))
    return jobs, outputs


def test_complete_run_then_nothing_to_be_done(run):
    work, _ = run
    for f in ("results/eval/summary.md", "results/eval/dlib-resnet/tinylfw.json", "results/eval/tiny/tinylfw.json",
              "results/eval/dlib-resnet/secret.json", "results/models/tiny-fold1-seed1/fold_eval.json",
              "results/report/tables.html", "results/figures/mask_gallery.png"):
        assert (work / f).is_file(), f
    doc = json.loads((work / "results/eval/dlib-resnet/tinylfw.json").read_text())
    assert set(doc["protocols"]) == {"clean", "mixed", "masked"}   # dlib's masked variant: the redrawn masks
    # every job that may run on a GPU names its device (and torch) in its log
    logs = [work / "results/logs/align/tinylfw/fidelity.log", work / "results/logs/train_fold_eval/tiny-fold1-seed1.log",
            work / "results/logs/train/tiny-fold1-seed1.log",
            *(work / "results/logs/align/tinylfw").glob("shard-*.log"),
            *(work / "results/logs/extract_features").rglob("*.log")]
    for log in logs:
        text = log.read_text()
        assert "device cpu (" in text and "torch " in text, (log, text[-1500:])
    before = _stamp(work)
    again = smk(work)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert _stamp(work) == before


def test_mask_seed_reruns_masks_and_what_follows_never_alignment(run):
    work, _ = run
    jobs, outputs = _planned(work, {"mask": {"seed": 7}})
    assert {"mask_shard", "mask_merge", "train", "extract_features", "evaluate_model", "eval_summary"} <= set(jobs)
    assert not {"download", "raw_manifest", "pairs_manifest", "align_shard", "align_merge", "align_fidelity"} & set(jobs)
    # clean features of the reference model do not depend on masks; its masked ones do
    assert "results/features/dlib-resnet/tinylfw/masked.parquet" in outputs
    assert "results/features/dlib-resnet/tinylfw/clean.parquet" not in outputs
    assert "results/train_cache/tinylfw/clean.npy" not in outputs
    assert "results/train_cache/tinylfw/masked.npy" in outputs


def test_min_face_size_reruns_everything_from_alignment(run):
    work, _ = run
    jobs, outputs = _planned(work, {"align": {"min_face_size": 30}})
    assert {"align_shard", "align_merge", "mask_shard", "mask_merge", "train_cache", "train", "extract_features",
            "evaluate_model", "eval_summary", "report_tables"} <= set(jobs)
    assert jobs["align_shard"] == 4                                        # 2 datasets x 2 shards
    assert not {"download", "raw_manifest", "pairs_manifest"} & set(jobs)
    assert "results/features/dlib-resnet/tinylfw/clean.parquet" in outputs


def test_train_lr_reruns_training_and_what_follows_only(run):
    work, _ = run
    jobs, outputs = _planned(work, {"train": {"lr": 0.02}})
    assert {"train", "train_fold_eval", "train_summary"} <= set(jobs)
    assert not {"align_shard", "align_merge", "mask_shard", "mask_merge", "train_cache", "mask_gallery"} & set(jobs)
    feats = {o for o in outputs if o.startswith("results/features/")}
    assert feats and all(o.startswith("results/features/tiny/") for o in feats)   # the reference model is kept


def _secret_strings() -> list[bytes]:
    out = []
    for name in SECRET:
        out += [name.encode(), name.lower().encode(), name.replace("_", " ").encode()]
    return out


def _leaks(data: bytes) -> list[str]:
    return [s.decode() for s in _secret_strings() if s in data]


def test_private_set_never_reaches_report_or_shared_outputs(run):
    work, _ = run
    raw = (work / "results/manifests/secret/raw.parquet").read_bytes()
    assert _leaks(raw), "the check must be able to see the names where they legitimately are"
    res = smk(work, "--report", "report.zip")
    assert (work / "report.zip").is_file(), res.stdout + res.stderr
    with zipfile.ZipFile(work / "report.zip") as z:
        names = z.namelist()
        assert any(n.endswith("tables.html") for n in names) and any(n.endswith("mask_gallery.png") for n in names)
        assert any(n.endswith("_roc.png") for n in names) and any(n.endswith("curve.png") for n in names)
        for n in names:
            assert not _leaks(n.encode()), n
            assert not _leaks(z.read(n)), n
    tables = (work / "results/report/tables.html").read_text()
    assert "Evaluation summary" in tables and "<table>" in tables and "secret" in tables   # aggregates are there
    assert "faces found" in tables and "share of the crop covered, proper wear" in tables   # a results page,
    assert "coverage_by" not in tables and "status_counts" not in tables                    # not dotted keys
    for sub in ("eval", "figures", "report"):
        for f in (work / "results" / sub).rglob("*"):
            if f.is_file():
                assert not _leaks(f.read_bytes()), f
    smk(work, "--report", "report.html")
    assert not _leaks((work / "report.html").read_bytes())


def test_mask_seed_change_for_real(run):
    work, cfg = run
    before = _stamp(work)
    (work / "overlay.yaml").write_text(json.dumps({"mask": {"seed": 7}}))
    smk(work, "--configfile", str(work / "config.yaml"), str(work / "overlay.yaml"))
    after = _stamp(work)
    aligned = [k for k in before if k.startswith("results/aligned/") or k == "results/manifests/tinylfw/aligned.parquet"]
    assert aligned and all(after[k] == before[k] for k in aligned)           # alignment untouched
    assert after["results/masked/tinylfw/shard-0.parquet"] != before["results/masked/tinylfw/shard-0.parquet"]
    again = smk(work, "--configfile", str(work / "config.yaml"), str(work / "overlay.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr
