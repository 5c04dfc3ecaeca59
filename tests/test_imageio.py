import numpy as np
import pytest

from maskface.imageio import ImageDecodeError, decode_png, encode_png, load_rgb
from maskface.testing import BAD_INPUTS, write_bad_inputs


@pytest.fixture()
def bad(tmp_path):
    write_bad_inputs(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_every_bad_input_decodes_to_rgb_or_raises_with_status(bad, name):
    status, _ = BAD_INPUTS[name]
    path = bad / name
    if status == "ok":
        arr = load_rgb(path)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert arr.shape[:2] == (64, 64)
    elif status == "empty":
        with pytest.raises(ImageDecodeError):
            load_rgb(path)
    else:
        with pytest.raises(ImageDecodeError) as err:
            load_rgb(path)
        if name.endswith(".jpg"):
            assert err.value.status == status


def test_16bit_png_is_scaled_not_clipped(bad):
    arr = load_rgb(bad / "gray16.png")
    # write_bad_inputs stores the green channel of its seed-0 noise * 257: >> 8 restores it exactly,
    # where clipping the 16-bit values to 255 would saturate nearly every pixel.
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(arr[..., 0], rgb[..., 1])
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_png_roundtrip_is_lossless_and_deterministic():
    rgb = np.random.default_rng(1).integers(0, 256, (112, 96, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert encode_png(rgb) == data
    assert np.array_equal(decode_png(data), rgb)
