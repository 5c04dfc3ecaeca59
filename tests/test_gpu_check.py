"""The prepared GPU check (benchmarks/gpu_check.py) keeps working: its CPU dry mode runs every step at a tiny
size and writes its JSON and markdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_step(lfw, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--dry", "--out", str(tmp_path),
                          "--lfw", str(lfw)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {k for k, v in doc.items() if isinstance(v, dict) and "ok" in v}
    assert steps == {"environment", "cuda_tests", "train_throughput", "resume_bit_identical", "bf16_vs_fp32",
                     "alignment", "embedders", "reference_network", "chip_fine_tune", "ddp_2_ranks"}
    assert doc["resume_bit_identical"]["bit_identical"] and doc["alignment"]["compared"] >= 10
    assert doc["alignment"]["device_fed_same_boxes"] is True
    assert doc["reference_network"]["cpu_vs_dlib"]["min"] >= 0.999
    assert doc["chip_fine_tune"]["images"] >= 10 and min(doc["chip_fine_tune"]["cpu"]["distill"]) > 0
    assert "| resume_bit_identical | yes |" in (tmp_path / "gpu_check.md").read_text()
