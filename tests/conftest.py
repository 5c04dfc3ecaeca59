"""Shared fixtures. Real faces come from LFW: ``MASKFACE_LFW`` or ``../shared/data/lfw`` beside the repo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# deterministic cuBLAS for the CUDA variants of the bit-identical resume tests (read when CUDA makes its first
# cuBLAS handle, so set before any test runs; unused on the CPU)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def lfw_root() -> Path | None:
    """The LFW folder (holding images_deepfunneled/ and pairs.txt), or None when it is absent."""
    env = os.environ.get("MASKFACE_LFW")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "lfw"
    if (root / "images_deepfunneled").is_dir() and (root / "pairs.txt").is_file():
        return root
    return None


@pytest.fixture(scope="session")
def lfw() -> Path:
    root = lfw_root()
    if root is None:
        pytest.skip("real LFW not found: set MASKFACE_LFW to the folder holding images_deepfunneled/ and "
                    "pairs.txt (default ../shared/data/lfw beside the repo)")
    return root


# The device a test body runs on: "cpu" everywhere, "cuda" where a CUDA device is (benchmarks/gpu_check.py
# runs `pytest -m cuda`). One body for both, so the CPU run here proves the body that a GPU machine runs.
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="no CUDA device on this machine")])


@pytest.fixture(params=["cpu", CUDA])
def device(request) -> str:
    return request.param


def snakemake_run(workdir: Path, *args: str, check: bool = True, timeout: float = 600,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """This repo's workflow run for real in ``workdir`` (``--cores 2``); with ``check`` a failure raises with the
    tail of Snakemake's output. ``env``: variables added to the environment of the run."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env=None if env is None else {**os.environ, **env})
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res
