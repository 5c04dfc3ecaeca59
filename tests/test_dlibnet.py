"""dlib's face recognition ResNet in torch (maskface.dlibnet): the file reader and agreement with dlib itself.

The agreement test cuts chips from real LFW faces (skipped when LFW is absent: set MASKFACE_LFW to the folder
holding images_deepfunneled/ and pairs.txt; default ../shared/data/lfw beside the repo)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskface import dlibnet as D
from maskface.resources import dlib_model_path

N_FACES = 40


@pytest.fixture(scope="module")
def model_path():
    return dlib_model_path("face_recognition_resnet")


@pytest.fixture(scope="module")
def parsed(model_path):
    return D.read_dlib_resnet(model_path)


@pytest.fixture(scope="module")
def model(parsed):
    torch.set_num_threads(1)
    return D.DlibResnet().load_dlib(parsed).eval()


# ------------------------------------------------------------------------------------------------- the reader

def test_file_parses_into_the_example_network(parsed, model_path):
    """The whole file is consumed, the records are those of anet_type, the input and loss records hold dlib's
    known values."""
    assert parsed.size == model_path.stat().st_size
    assert parsed.loss["name"] == "loss_metric_2"
    assert parsed.loss["distance_threshold"] == pytest.approx(0.6) and parsed.loss["margin"] == pytest.approx(0.04)
    assert parsed.input_size == (150, 150)
    np.testing.assert_array_equal(np.float32(parsed.input_mean), np.float32(D.DLIB_RESNET_MEAN_RGB))
    kinds = [layer.kind for layer in parsed.layers]
    assert kinds.count("con_") == 29 and kinds.count("affine_") == 29 and kinds.count("fc_") == 1
    assert kinds.count("add_prev_") == 14 and kinds.count("avg_pool_") == 5 and kinds.count("max_pool_") == 1
    # forward order: the stem first, the fc last; dlib's layer<i> indices count down to the output
    assert [layer.name for layer in parsed.layers[:4]] == ["con_4", "affine_", "relu_", "max_pool_2"]
    assert parsed.layers[0].index == len(D.RESNET_SPEC) - 1 and parsed.layers[-1].index == 1
    assert parsed.layers[0].params["weight"].shape == (32, 3, 7, 7)
    assert parsed.layers[-1].params["weight"].shape == (128, 256)
    n_params = sum(a.size for layer in parsed.layers for a in layer.params.values())
    assert n_params == sum(p.numel() for p in D.DlibResnet().parameters())


def test_truncated_file_names_the_layer(tmp_path, model_path):
    data = model_path.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.dat"
        bad.write_bytes(data[:cut])
        with pytest.raises(D.DlibModelError) as e:
            D.read_dlib_resnet(bad)
        err = e.value
        assert err.layer_index is not None and err.layer_name and err.offset is not None, str(err)
        assert 0 <= err.offset <= cut
        assert f"layer<{err.layer_index}>" in str(err) and str(bad) in str(err)
    # half way the file is inside some layer's weights: a con or the fc
    bad = tmp_path / "half.dat"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(D.DlibModelError, match=r"layer<\d+> \(con<\d+,3,3,\d,\d>: con_4\).*file ends"):
        D.read_dlib_resnet(bad)


def test_random_bytes_and_other_dlib_files_are_refused(tmp_path):
    bad = tmp_path / "random.dat"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(D.DlibModelError, match="layer<0>"):
        D.read_dlib_resnet(bad)
    # a dlib DNN of another type (the MMOD face detector: loss_mmod) and a non-DNN dlib file
    for key in ("mmod_detector", "shape_predictor_5"):
        with pytest.raises(D.DlibModelError):
            D.read_dlib_resnet(dlib_model_path(key))
    with pytest.raises(D.DlibModelError, match="cannot read"):
        D.read_dlib_resnet(tmp_path / "missing.dat")


def test_a_wrong_record_names_its_layer(tmp_path, model_path):
    """Renaming the first relu_ record (the stem's, dlib's layer<128>) is reported there."""
    data = bytearray(model_path.read_bytes())
    at = data.find(b"relu_")
    data[at:at + 5] = b"rulu_"
    bad = tmp_path / "renamed.dat"
    bad.write_bytes(bytes(data))
    with pytest.raises(D.DlibModelError, match=r"layer<128> \(relu: rulu_\).*'rulu_'") as e:
        D.read_dlib_resnet(bad)
    assert e.value.offset == at - 2   # the string's length integer (control byte + 1 byte)


def _pack_int(v: int) -> bytes:
    """dlib/serialize.h pack_int (signed)."""
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little") if v else b"\x00"
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def _pack_float(x: float) -> bytes:
    """dlib/float_details.h + serialize.h: mantissa then exponent, of a float32 (24 digits)."""
    x = float(np.float32(x))
    if math.isinf(x):
        return _pack_int(0) + _pack_int(32000 if x > 0 else 32001)
    if math.isnan(x):
        return _pack_int(0) + _pack_int(32002)
    m, e = math.frexp(x)
    mant, exp = int(m * (1 << 24)), e - 24
    while mant and mant & 0xFF == 0:
        mant >>= 8
        exp += 8
    return _pack_int(mant) + _pack_int(exp)


def test_integer_and_float_encodings():
    values = [0, 1, -1, 255, 256, -70000, 2**40 + 5]
    floats = [0.0, 0.04, -0.6, 122.782, 1e-30, -3.5e20, math.inf, -math.inf]
    blob = b"".join(_pack_int(v) for v in values) + b"".join(_pack_float(f) for f in floats)
    blob += b"1.5 " + b"ninf "                       # dlib's old ASCII float format
    r = D._Reader(blob, "mem")
    assert [r.int("int64") for _ in values] == values
    got = [r.float() for _ in floats]
    assert got == [float(np.float32(f)) for f in floats]
    assert r.float() == 1.5 and r.float() == -math.inf
    with pytest.raises(D.DlibModelError, match="control byte"):
        D._Reader(b"\x05\x00\x00\x00\x00\x00", "mem").int("int")    # 5 bytes for a 4-byte int
    with pytest.raises(D.DlibModelError, match="control byte"):
        D._Reader(b"\x81\x01", "mem").int("ulong")                   # sign bit on an unsigned
    with pytest.raises(D.DlibModelError, match="file ends"):
        D._Reader(b"\x02\x01", "mem").int("int")


# ---------------------------------------------------------------------------------------------- the network

def test_batch_equals_one_at_a_time(model):
    chips = np.random.default_rng(1).integers(0, 256, (8, 150, 150, 3), dtype=np.uint8)
    x = D.to_input(chips)
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert batch.shape == (8, 128)
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


def test_to_input_is_dlibs_normalisation():
    chips = np.zeros((1, 150, 150, 3), np.uint8)
    chips[..., 0], chips[..., 1], chips[..., 2] = 255, 128, 0
    x = D.to_input(chips)
    assert x.shape == (1, 3, 150, 150) and x.dtype == torch.float32
    want = [(255 - 122.782) / 256, (128 - 117.001) / 256, (0 - 104.298) / 256]
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), want, atol=1e-6)


@pytest.fixture(scope="module")
def lfw_chips(lfw):
    """dlib's own 150x150 chips (HOG detector, 5-point predictor, get_face_chip padding 0.25) of N_FACES LFW
    people, spread over the alphabet."""
    import dlib

    from maskface.imageio import load_rgb

    images = lfw / "images_deepfunneled"
    people = sorted(p for p in images.iterdir() if p.is_dir())
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(dlib_model_path("shape_predictor_5")))
    chips = []
    for person in people[::max(1, len(people) // (2 * N_FACES))]:
        files = sorted(person.glob("*.jpg"))
        if not files:
            continue
        img = load_rgb(files[0])
        dets = det(img, 1)
        if len(dets):
            chips.append(dlib.get_face_chip(img, sp(img, dets[0]), size=150, padding=0.25))
        if len(chips) == N_FACES:
            break
    if len(chips) < N_FACES // 2:
        pytest.skip(f"only {len(chips)} faces found in the LFW copy")
    return np.stack(chips)


@pytest.mark.lfw
def test_descriptors_agree_with_dlib(lfw_chips, model, model_path):
    import dlib

    ref = np.array([np.asarray(d) for d in dlib.face_recognition_model_v1(str(model_path))
                    .compute_face_descriptor(list(lfw_chips), 0)], dtype=np.float32)
    with torch.inference_mode():
        out = model(D.to_input(lfw_chips)).numpy()
    nr, no = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    cos = (ref * out).sum(1) / (nr * no)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min())
    assert np.all(np.abs(no / nr - 1) < 0.01)
    assert not np.allclose(nr, 1.0, atol=1e-3)   # dlib's descriptors are raw, not unit length
    # describe(): the same from uint8 chips, with the channels_last build too
    np.testing.assert_allclose(model.describe(lfw_chips[:5]), out[:5], atol=1e-5)
    cl = D.DlibResnet.from_dlib_file(model_path, channels_last=True)
    np.testing.assert_allclose(cl.describe(lfw_chips[:5]), out[:5], atol=1e-4)
