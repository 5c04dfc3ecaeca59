"""Shared fixtures. Real faces come from LFW: ``MASKFACE_LFW`` or ``../shared/data/lfw`` beside the repo."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
