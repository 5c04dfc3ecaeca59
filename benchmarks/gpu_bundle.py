"""The GPU check's bundle: what ``benchmarks/gpu_check.py`` needs on a GPU machine whose python3 has torch with
CUDA, numpy, pandas, pyarrow, opencv-python-headless, numba, Pillow, pytest and PyYAML, but not this project's
other dependencies, no way to download them, and no LFW beside the repository.

    python benchmarks/gpu_bundle.py                   # here: writes .gpucheck/ (git-ignored), checks its size
    bash benchmarks/gpu_check.sh "$OUT"                # there, in the repository root, with .gpucheck/ beside it

``.gpucheck/`` holds:

- ``wheels/``: dlib-bin, facenet-pytorch, jsonschema and what jsonschema needs beyond those packages, for the
  GPU machine's Python (``--python-version``, default 3.12), at the versions installed here;
- ``models/``: dlib's 5-point predictor and its face recognition ResNet (31 MB), read through
  ``$MASKFACE_DLIB_MODELS`` (``maskface.resources``); the 68-point predictor (100 MB) is left out: no step
  of the check draws masks;
- ``lfw/``: ``pairs.txt`` and the LFW images the check aligns (the first ``--n-align`` in its order) and those
  the tests name (every ``Person/Person_0001.jpg`` written in ``tests/*.py``).

The working tree and the bundle travel together, so the script fails when both exceed ``--max-mib``.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

# packages the GPU machine lacks; jsonschema (maskface.configcheck) with its own needs beyond attrs
WHEELS = ("dlib-bin", "facenet-pytorch", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
MODELS = ("shape_predictor_5", "face_recognition_resnet")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
NAMED_FACE = re.compile(r"[A-Za-z][\w.'-]*/[A-Za-z][\w.'-]*_\d{4}\.jpg")


def tree_bytes() -> int:
    """Bytes of what travels besides the bundle: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def download_wheels(dest: Path, python_version: str) -> list[str]:
    pins = [f"{name}=={md.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    res = subprocess.run(cmd + pins, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"gpu_bundle: pip could not download {' '.join(pins)} for Python {python_version}:\n"
                         f"{res.stderr[-2000:]}")
    return pins


def lfw_files(lfw: Path, n_align: int) -> list[str]:
    """The check's first ``n_align`` images (its own order) and every LFW file a test names."""
    from gpu_check import lfw_image_ids

    named = set()
    for test in sorted((REPO / "tests").glob("*.py")):
        named.update(NAMED_FACE.findall(test.read_text()))
    images = lfw / "images_deepfunneled"
    return sorted(set(lfw_image_ids(lfw, n_align)) | {f for f in named if (images / f).is_file()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / ".gpucheck"))
    ap.add_argument("--lfw", default=None, help="LFW folder (default $MASKFACE_LFW or ../shared/data/lfw)")
    ap.add_argument("--n-align", type=int, default=2000, help="LFW images for the check's alignment step")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    ap.add_argument("--max-mib", type=float, default=60.0, help="limit on the working tree plus the bundle")
    a = ap.parse_args(argv)
    lfw = Path(a.lfw or os.environ.get("MASKFACE_LFW") or REPO.parent / "shared" / "data" / "lfw")
    if not (lfw / "pairs.txt").is_file() or not (lfw / "images_deepfunneled").is_dir():
        raise SystemExit(f"gpu_bundle: no LFW at {lfw} (images_deepfunneled/ and pairs.txt): pass --lfw")
    out = Path(a.out)
    if out.exists():
        if any(out.iterdir()) and not (out / "wheels").is_dir():
            raise SystemExit(f"gpu_bundle: {out} exists and is not a bundle: name another --out")
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    pins = download_wheels(out / "wheels", a.python_version)

    from maskface.resources import DLIB_MODELS, dlib_model_path

    (out / "models").mkdir()
    for key in MODELS:
        shutil.copyfile(dlib_model_path(key), out / "models" / DLIB_MODELS[key])

    files = lfw_files(lfw, a.n_align)
    for f in files:
        dst = out / "lfw" / "images_deepfunneled" / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lfw / "images_deepfunneled" / f, dst)
    for name in ("pairs.txt", "README.txt"):
        if (lfw / name).is_file():
            shutil.copyfile(lfw / name, out / "lfw" / name)

    sizes = {name: folder_bytes(out / name) for name in ("wheels", "models", "lfw")}
    tree = tree_bytes()
    total = (tree + sum(sizes.values())) / 2 ** 20
    print(f"gpu_bundle: {out}: wheels {sizes['wheels'] / 2**20:.1f} MiB ({', '.join(pins)}; Python "
          f"{a.python_version}), models {sizes['models'] / 2**20:.1f} MiB, lfw {len(files)} images "
          f"{sizes['lfw'] / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) {total:.1f} MiB")
    if total > a.max_mib:
        raise SystemExit(f"gpu_bundle: {total:.1f} MiB is over {a.max_mib} MiB: lower --n-align")
    return 0


if __name__ == "__main__":
    sys.exit(main())
