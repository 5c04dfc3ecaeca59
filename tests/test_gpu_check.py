"""The prepared GPU check keeps working as a lent GPU machine runs it: `benchmarks/gpu_bundle.py` packs the
wheels, dlib's model files and the LFW images it needs, and `benchmarks/gpu_check.sh` runs
`benchmarks/gpu_check.py` from that bundle alone; here in its CPU dry mode (every step on the CPU at a tiny
size), which writes the same JSON and markdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_check_runs_every_step_from_its_bundle(lfw, tmp_path):
    bundle = tmp_path / "bundle"
    made = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_bundle.py"), "--out", str(bundle), "--lfw",
                           str(lfw), "--n-align", "12", "--python-version", "%d.%d" % sys.version_info[:2]],
                          capture_output=True, text=True, timeout=600)
    if made.returncode != 0 and "could not download" in made.stderr:
        pytest.skip(f"no package index reachable for the bundle's wheels: {made.stderr[-300:]}")
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    images = bundle / "lfw" / "images_deepfunneled"
    assert (images / "Zico" / "Zico_0001.jpg").is_file()                        # named by a test
    assert len(list(images.glob("*/*.jpg"))) < 100 and (bundle / "lfw" / "pairs.txt").is_file()
    assert {p.name for p in (bundle / "models").iterdir()} == {"shape_predictor_5_face_landmarks.dat",
                                                               "dlib_face_recognition_resnet_model_v1.dat"}
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MASKFACE_LFW", "PYTHONPATH")}
    res = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), str(out), "--dry"], capture_output=True,
                         text=True, timeout=600, env={**env, "PYTHON": sys.executable,
                                                      "MASKFACE_GPU_BUNDLE": str(bundle)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = {k for k, v in doc.items() if isinstance(v, dict) and "ok" in v}
    assert steps == {"environment", "cuda_tests", "train_throughput", "resume_bit_identical", "bf16_vs_fp32",
                     "alignment", "embedders", "reference_network", "chip_fine_tune", "ddp_2_ranks"}
    # the CUDA tests were collected from every test module (none failed to import), and skipped without CUDA
    assert "skipped" in doc["cuda_tests"]["summary"] and "error" not in doc["cuda_tests"]["summary"]
    assert doc["resume_bit_identical"]["bit_identical"] and doc["alignment"]["compared"] >= 10
    assert doc["alignment"]["images"] == 12 and doc["alignment"]["device_fed_same_boxes"] is True
    assert doc["reference_network"]["cpu_vs_dlib"]["min"] >= 0.999
    assert doc["chip_fine_tune"]["images"] >= 10 and min(doc["chip_fine_tune"]["cpu"]["distill"]) > 0
    assert "| resume_bit_identical | yes |" in (out / "gpu_check.md").read_text()
    assert "deselected" in (out / "cuda_tests.log").read_text()                  # the CUDA tests' whole output
    assert "[gpu_check] ddp_2_ranks: ok" in (out / "gpu_check.log").read_text()   # the run's own log
