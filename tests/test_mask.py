"""Stage 2, the mask stage: landmarks (dlib's model, compiled), geometry from the landmarks, determinism, bad
inputs, the command line and the Snakemake rules.

Tests on real faces use LFW (skipped when absent: set MASKFACE_LFW to the folder holding images_deepfunneled/
and pairs.txt; default ../shared/data/lfw beside the repo). Their crops are made here with the alignment
stage's own MTCNN + similarity warp (maskface.align), as the workflow makes them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import snakemake_run
from PIL import Image

from maskface.mask import face as F
from maskface.mask import landmarks as L
from maskface.mask import render as R
from maskface.mask import stage as S
from maskface.mask import style as ST
from maskface.mask import textures as TX
from maskface.mask.config import MASK_TYPES, WEARS, MaskConfig

TPL = F.TEMPLATES["sphereface_112x96"]
# Faces turned by more than ~45 deg (their aligned crops come out zoomed into half a face): must be skipped.
PROFILES = ["Roman_Polanski/Roman_Polanski_0003.jpg", "George_W_Bush/George_W_Bush_0145.jpg"]
N_FACES = 40


def _lfw_sample(images: Path, n: int) -> list[str]:
    """``n`` LFW images spread over the alphabet (every k-th person, first image), deterministic."""
    people = sorted(p.name for p in images.iterdir() if p.is_dir())
    step = max(len(people) // n, 1)
    out = []
    for p in people[::step]:
        files = sorted((images / p).glob("*.jpg"))
        if files:
            out.append(f"{p}/{files[0].name}")
        if len(out) == n:
            break
    return out


def _align(images: Path, ids: list[str]) -> dict[str, np.ndarray]:
    """MTCNN (SphereFace settings) + 5-point similarity to the 112x96 template, as maskface.align does.
    The crops are cached outside the repository ($MASKFACE_CACHE or ~/.cache/maskface), keyed by the image
    list and the alignment code, so that reruns of this file stay fast."""
    import torch

    from maskface import align as A
    from maskface.imageio import load_rgb
    from maskface.manifest import code_version
    key = hashlib.sha256(json.dumps([ids, code_version("align")]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MASKFACE_CACHE") or Path.home() / ".cache" / "maskface") / f"test_crops-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {str(k): z["crops"][i] for i, k in enumerate(z["ids"])}
    torch.set_num_threads(1)
    det = A.Detector(20, (0.6, 0.7, 0.9), 0.85, "cpu")
    rgbs = {i: load_rgb(images / i) for i in ids}
    out = {}
    for k in range(0, len(ids), 8):
        chunk = [i for i in ids[k:k + 8] if rgbs[i].shape == (250, 250, 3)]
        if not chunk:
            continue
        for i, (boxes, points) in zip(chunk, det.detect(np.stack([rgbs[i] for i in chunk]))):
            if len(boxes):
                sel = A.select_face(boxes, rgbs[i].shape[:2], "center")
                out[i], _ = A.align_face(rgbs[i], points[sel], "sphereface_112x96")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ids=np.array(list(out)), crops=np.stack(list(out.values())))
    except OSError:
        pass
    return out


@pytest.fixture(scope="module")
def crops(lfw) -> dict[str, np.ndarray]:
    images = lfw / "images_deepfunneled"
    return _align(images, _lfw_sample(images, N_FACES) + PROFILES)


@pytest.fixture(scope="module")
def frontal(crops) -> dict[str, np.ndarray]:
    return {k: v for k, v in crops.items() if k not in PROFILES}


@pytest.fixture(scope="module")
def landmarks(frontal) -> dict[str, np.ndarray]:
    cfg = MaskConfig()
    box = L.face_box_from_points5(TPL)
    ids = list(frontal)
    lms = F.landmark_crops(np.stack([frontal[i] for i in ids]), box, cfg)
    return dict(zip(ids, lms))


def _items(crops: dict[str, np.ndarray]) -> list[dict]:
    return [{"image_id": k, "identity": k.split("/")[0], "status": "ok", "reason": "",
             "template": "sphereface_112x96", "png": S.encode_rgb_png(v), "shard": 0} for k, v in crops.items()]


# ------------------------------------------------------------------------------ the landmark model

def _dlib_int(v: int) -> bytes:
    """dlib's serialisation of an integer (dlib/serialize.h pack_int)."""
    neg = v < 0
    v = abs(v)
    body = v.to_bytes(max((v.bit_length() + 7) // 8, 1), "little")
    return bytes([len(body) | (0x80 if neg else 0)]) + body


@pytest.mark.parametrize("lanes,margin", [(64, 4), (7, 32), (1, 1)])
def test_varint_stream_decoder_matches_sequential_reading(lanes, margin):
    """The lock-step chunked decoder (any lane count, margins so small that retries happen) returns exactly
    the integers written, in order."""
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.integers(-300, 300, 4000), rng.integers(-2**40, 2**40, 3000),
                           rng.integers(0, 2**62, 1000), [0, -1, 1, 2**63 - 1]])
    rng.shuffle(vals)
    buf = b"".join(_dlib_int(int(v)) for v in vals)
    out = L._decode_varints(buf, lanes=lanes, margin=margin)
    assert out.dtype == np.int64 and np.array_equal(out, vals)


def test_model_layout():
    m = L.load_model()
    assert m.initial_shape.shape == (68, 2)
    assert m.split_idx1.shape == (15, 500, 15) and m.depth == 4
    assert m.leaf_values.shape == (15, 500 * 16, 136)
    assert m.anchor_idx.shape == (15, 500) and m.deltas.shape == (15, 500, 2)
    # the mean shape lies in the unit box and looks like a face: eyes above the nose above the mouth
    s = m.initial_shape
    assert s.min() > -0.1 and s.max() < 1.1
    assert s[36:48, 1].mean() < s[30, 1] < s[48:68, 1].mean() < s[8, 1]


def test_face_box_follows_the_template():
    box = L.face_box_from_points5(TPL)
    assert np.allclose(box, [0.47, 24.31, 89.94, 113.78], atol=0.02)
    arc = L.face_box_from_points5(F.TEMPLATES["arcface_112x112"])
    assert np.allclose(arc - box, [8, 0, 8, 0], atol=1e-9)


@pytest.mark.lfw
def test_compiled_predictor_agrees_with_dlib(frontal):
    """Same model, same algorithm: after rounding (dlib returns integer points) most faces are identical to
    dlib.shape_predictor's and no point is more than 2 px off."""
    imgs = np.stack(list(frontal.values()))
    box = np.round(L.face_box_from_points5(TPL))
    rects = np.tile(box, (len(imgs), 1))
    ours = L.Landmarker("ert")(imgs, rects)
    ref = L.Landmarker("dlib")(imgs, rects)
    diff = np.abs(np.round(ours) - ref)
    assert diff.max() <= 2
    assert (diff == 0).all(axis=(1, 2)).mean() >= 0.7
    assert np.abs(ours - ref).mean() < 0.45          # rounding alone is up to 0.5


@pytest.mark.lfw
def test_landmarks_do_not_depend_on_the_batch(frontal):
    imgs = np.stack(list(frontal.values())[:9])
    box = L.face_box_from_points5(TPL)
    cfg = MaskConfig()
    together = F.landmark_crops(imgs, box, cfg)
    alone = np.stack([F.landmark_crops(im[None], box, cfg)[0] for im in imgs])
    assert np.array_equal(together, alone)


def test_yaw_sign_and_mirror_symmetry():
    rng = np.random.default_rng(1)
    base = L.load_model().initial_shape.astype(np.float64) * 100
    assert abs(L.yaw_from_landmarks(base)) < 3
    lm = base.copy()
    lm[27:31, 0] -= 8                       # nose line towards the image's left
    yaw = L.yaw_from_landmarks(lm)
    assert yaw > 10
    mirror = lm.copy()
    mirror[:, 0] = 100 - mirror[:, 0]
    # dlib's indices are left/right ordered: mirror the index order of symmetric points too
    perm = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
            + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40] + list(range(54, 47, -1))
            + [59, 58, 57, 56, 55] + [64, 63, 62, 61, 60] + [67, 66, 65])
    assert sorted(perm) == list(range(68))
    assert abs(L.yaw_from_landmarks(mirror[perm]) + yaw) < 1e-9
    more = base.copy()
    more[27:31, 0] -= 16
    assert L.yaw_from_landmarks(more) > yaw
    # roll does not change it
    th = np.radians(25)
    rot = (lm - 50) @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]).T + 50
    assert abs(L.yaw_from_landmarks(rot) - yaw) < 1e-6
    del rng


# ---------------------------------------------------------------------------------------- geometry

def _inside(poly: np.ndarray, p) -> bool:
    return cv2.pointPolygonTest(poly.astype(np.float32).reshape(-1, 1, 2), (float(p[0]), float(p[1])), False) >= 0


@pytest.mark.lfw
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_mask_outline_covers_what_each_wear_covers(landmarks, mask_type):
    """From the landmarks (0-based here; 1-based 31 = nose tip 30, 49/55 = mouth corners 48/54,
    9 = chin 8): proper covers nose tip, mouth corners and chin; nose_out leaves the nose tip out but covers
    mouth and chin; chin leaves the mouth out but covers the chin. No wear covers an eye."""
    cfg = MaskConfig()
    checked = 0
    for image_id, lm in landmarks.items():
        if F.face_checks(lm, (112, 96), cfg, TPL)[0] is not None:
            continue                        # the stage skips this face (never drawn)
        checked += 1
        face = R.FaceFrame(lm)
        jitter = {"apex": 0.0, "corner": 0.0, "side": 0.0, "chin": 0.0, "sag": 0.0}
        for wear in WEARS:
            poly = R.build_geometry(face, mask_type, wear, jitter).outline
            got = {i: _inside(poly, lm[i]) for i in (30, 48, 54, 8)}
            want = {"proper": {30: True, 48: True, 54: True, 8: True},
                    "nose_out": {30: False, 48: True, 54: True, 8: True},
                    "chin": {30: False, 48: False, 54: False, 8: True}}[wear]
            assert got == want, (image_id, mask_type, wear, got)
            assert not any(_inside(poly, lm[i]) for i in range(36, 48)), (image_id, mask_type, wear)
        # with the extreme jitters of draw_style the answers hold as well
        for ext in ({"apex": 0.06, "corner": 0.3, "side": -0.02, "chin": -0.04, "sag": -0.03},
                    {"apex": -0.06, "corner": -0.3, "side": 0.03, "chin": 0.06, "sag": 0.03}):
            p = R.build_geometry(face, mask_type, "proper", ext).outline
            assert all(_inside(p, lm[i]) for i in (30, 48, 54, 8))
            p = R.build_geometry(face, mask_type, "nose_out", ext).outline
            assert not _inside(p, lm[30]) and _inside(p, lm[48]) and _inside(p, lm[54])
    assert checked >= 0.9 * len(landmarks)


@pytest.mark.lfw
def test_rendered_masks_coverage_and_untouched_pixels(frontal, landmarks):
    """Coverage of the 112x96 crop: proper in 0.25-0.6 (mean 0.30-0.50), nose_out below proper, chin below
    nose_out; the occluded pixels changed; everything outside the drawn region is bit-identical."""
    cfg = MaskConfig()
    cov = {w: [] for w in WEARS}
    for image_id, lm in list(landmarks.items())[:12]:
        crop = frontal[image_id]
        for wear in WEARS:
            rng = ST.image_rng(cfg, image_id)
            st = ST.draw_style(rng, cfg, wear=wear)
            out = R.render(crop, lm, st.mask_type, st.wear, st.color, st.texture, st.params, rng)
            occ = out.occlusion
            cov[wear].append(occ.mean())
            x0, y0, x1, y1 = out.roi
            outside = np.ones(occ.shape, bool)
            outside[y0:y1, x0:x1] = False
            assert np.array_equal(out.image[outside], crop[outside])
            assert not occ[outside].any()
            changed = np.abs(out.image.astype(int) - crop.astype(int)).sum(-1) > 0
            assert changed[occ].mean() > 0.95
            # eyes stay visible: nothing drawn within 1 px of either eye's landmarks
            for eye in (lm[36:42], lm[42:48]):
                hull = np.zeros(occ.shape, np.uint8)
                cv2.fillConvexPoly(hull, np.round(eye).astype(np.int32), 1)
                hull = cv2.dilate(hull, np.ones((3, 3), np.uint8)).astype(bool)
                assert not occ[hull].any(), (image_id, wear)
    p, n, c = (np.array(cov[w]) for w in WEARS)
    assert ((p >= 0.25) & (p <= 0.6)).all() and 0.30 <= p.mean() <= 0.50, p
    assert (n < p).all() and (c < n).all()


@pytest.mark.lfw
def test_occlusion_maps_obey_the_wear_rules_for_every_type(frontal):
    """Read off the occlusion maps (accessories included: a respirator's filter cartridges must not reach
    the mouth of a mask pulled down to the chin): the eyes are never covered, proper covers nose tip and
    mouth corners, nose_out leaves the nose tip free, chin leaves the mouth corners free."""
    some = dict(list(frontal.items())[:6])
    want = {"proper": {30: True, 48: True, 54: True}, "nose_out": {30: False, 48: True, 54: True},
            "chin": {30: False, 48: False, 54: False}}
    for t in MASK_TYPES:
        for w in WEARS:
            for r in S.process_items(_items(some), MaskConfig(), mask_type=t, wear=w):
                if r["status"] != "ok":
                    continue
                lm = np.asarray(r["landmarks68"]).reshape(68, 2)
                occ = S.decode_occlusion(r["occlusion"])
                for i, v in list(want[w].items()) + [(i, False) for i in range(36, 48)]:
                    x, y = int(round(lm[i, 0])), int(round(lm[i, 1]))
                    assert bool(occ[y, x]) == v, (r["image_id"], t, w, i)


@pytest.mark.lfw
def test_mask_follows_a_rotated_face(frontal, landmarks):
    """Tilt: rotating crop and landmarks by 20 deg rotates the mask with them (outline covers the same
    landmarks; the mask's lowest point stays under the rotated chin)."""
    image_id, lm = next(iter(landmarks.items()))
    c = np.array([48.0, 56.0])
    th = np.radians(20)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    lm_r = (lm - c) @ rot.T + c
    for mask_type in MASK_TYPES:
        geo = R.build_geometry(R.FaceFrame(lm_r), mask_type, "proper", {})
        assert all(_inside(geo.outline, lm_r[i]) for i in (30, 48, 54, 8))
        geo0 = R.build_geometry(R.FaceFrame(lm), mask_type, "proper", {})
        assert np.allclose((geo0.outline - c) @ rot.T + c, geo.outline, atol=1e-6)


# ------------------------------------------------------------------------------- the stage, end to end

@pytest.mark.lfw
def test_stage_masks_real_faces_and_skips_profiles(crops):
    recs = S.process_items(_items(crops), MaskConfig())
    by_id = {r["image_id"]: r for r in recs}
    frontal = [r for i, r in by_id.items() if i not in PROFILES]
    ok = [r for r in frontal if r["status"] == "ok"]
    assert len(ok) >= 0.95 * len(frontal)
    for p in PROFILES:
        if p in by_id:
            assert by_id[p]["status"] == "skipped" and by_id[p]["skip"] == "yaw", by_id[p]
            assert by_id[p]["png"] is None and "yaw" in by_id[p]["reason"]
    for r in ok:
        img = S.decode_crop(r["png"])
        occ = S.decode_occlusion(r["occlusion"])
        assert img.shape == (112, 96, 3) and occ.shape == (112, 96)
        assert abs(occ.mean() - r["coverage"]) < 1e-9
        assert len(r["landmarks68"]) == 136 and r["mask_type"] in MASK_TYPES and r["wear"] in WEARS
        assert r["mask_color"] in TX.TYPE_COLORS[r["mask_type"]]
        assert r["mask_texture"] in TX.TYPE_TEXTURES[r["mask_type"]]
        # the occlusion PNG is a 1-bit PNG any reader opens
        assert Image.open(io.BytesIO(r["occlusion"])).mode == "1"
    df = S.records_table(recs, False).to_pandas()
    s = S.summarize(df)
    assert s["masked"] == len(ok) and s["crops"] == len(recs)


@pytest.mark.lfw
def test_centre_crop_fallback_of_a_real_face_is_masked(lfw, frontal):
    """A face the aligner missed (status center_crop: an unaligned centre crop) is verified with dlib's HOG
    detector on the crop and masked from that box; the same crop shifted off-template still works."""
    from maskface.imageio import load_rgb
    image_id = next(iter(frontal))
    rgb = load_rgb(lfw / "images_deepfunneled" / image_id)
    crop = cv2.resize(rgb[50:230, 40:210], (96, 112), interpolation=cv2.INTER_AREA)   # not on the template
    rec = S.process_items([{"image_id": image_id, "status": "center_crop", "png": S.encode_rgb_png(crop)}],
                          MaskConfig())[0]
    assert rec["status"] == "ok", rec
    assert rec["aligned_status"] == "center_crop"


@pytest.mark.lfw
def test_same_config_same_bytes_and_seed_changes_them(frontal):
    some = dict(list(frontal.items())[:8])
    items = _items(some)
    a = S.process_items(items, MaskConfig(batch=3))
    b = S.process_items(items[::-1], MaskConfig(batch=64))      # other order, other batches
    b = {r["image_id"]: r for r in b}
    for r in a:
        assert r["png"] == b[r["image_id"]]["png"] and r["occlusion"] == b[r["image_id"]]["occlusion"]
    c = S.process_items(items, MaskConfig(seed=1))
    differ = sum(x["png"] != y["png"] for x, y in zip(a, c) if x["png"] and y["png"])
    assert differ == sum(1 for x, y in zip(a, c) if x["png"] and y["png"]) > 0
    # any other result-affecting setting changes the draws too; threads do not change anything
    d = S.process_items(items, MaskConfig.from_mapping({"wear": {"proper": 1.0}}))
    assert all(r["wear"] == "proper" for r in d if r["status"] == "ok")
    e = S.process_items(items, MaskConfig(batch=3, threads=2))          # worker processes, compiled kernels
    assert [(r["png"], r["occlusion"]) for r in e] == [(r["png"], r["occlusion"]) for r in a]


def test_bad_inputs_are_recorded_never_fatal():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (112, 96, 3), dtype=np.uint8)
    grey = np.full((112, 96, 3), 128, np.uint8)
    items = [
        {"image_id": "tiny", "status": "ok", "png": S.encode_rgb_png(noise[:20, :16])},
        {"image_id": "noise", "status": "center_crop", "png": S.encode_rgb_png(noise)},
        {"image_id": "grey", "status": "center_crop", "png": S.encode_rgb_png(grey)},
        {"image_id": "corrupt", "status": "ok", "png": S.encode_rgb_png(noise)[:300]},
        {"image_id": "not_png", "status": "ok", "png": b"hello"},
        {"image_id": "no_face", "status": "no_face", "reason": "no face detected", "png": None},
        {"image_id": "raw_fail", "status": "unreadable", "reason": "decode failed", "png": None},
        {"image_id": "ok_but_empty", "status": "ok", "png": None},
    ]
    recs = {r["image_id"]: r for r in S.process_items(items, MaskConfig())}
    assert recs["tiny"]["status"] == "skipped" and recs["tiny"]["skip"] == "too_small"
    for k in ("noise", "grey"):                 # centre-crop fallbacks without a face
        assert recs[k]["status"] == "skipped" and recs[k]["skip"] == "no_face", recs[k]
    assert recs["corrupt"]["status"] == "unreadable" and recs["not_png"]["status"] == "unreadable"
    assert recs["no_face"]["status"] == "no_face" and recs["no_face"]["reason"] == "no face detected"
    assert recs["raw_fail"]["status"] == "unreadable" and recs["raw_fail"]["aligned_status"] == "unreadable"
    assert recs["ok_but_empty"]["status"] == "error"
    assert all(r["png"] is None for r in recs.values())


def test_landmarks_outside_the_image_are_skipped():
    cfg = MaskConfig()
    lm = L.load_model().initial_shape.astype(np.float64) * 90 + [0, 24]
    assert F.face_checks(lm, (112, 96), cfg)[0] is None
    shifted = lm + [0, 40]                                   # mouth and nose below the crop
    skip, _ = F.face_checks(shifted, (112, 96), cfg)
    assert skip.code == "landmarks_outside"
    skip, _ = F.face_checks(lm * 0.1, (112, 96), cfg)       # a face of 4 px
    assert skip.code == "too_small"
    bad = lm.copy()
    bad[48:68, 1] = bad[36:48, 1].mean()                     # mouth at eye height
    assert F.face_checks(bad, (112, 96), cfg)[0].code == "bad_landmarks"
    far = lm + [0, 0]
    far[30, 0] -= 30                                          # nose tip far out: a turned head
    assert F.face_checks(far, (112, 96), cfg)[0].code == "yaw"
    # template disagreement: landmarks of another face than the aligned one
    assert F.face_checks(lm + [25, 0], (112, 96), cfg, TPL)[0].code in ("landmarks_disagree", "landmarks_outside")


def test_config_weights_are_validated_and_restricted():
    with pytest.raises(ValueError, match="mask.types"):
        MaskConfig.from_mapping({"types": {"bandana": 1}})
    with pytest.raises(ValueError, match="mask.wear"):
        MaskConfig.from_mapping({"wear": {"proper": 0}})
    cfg = MaskConfig.from_mapping({"types": {"gas": 1}, "colors": {"pink": 1}})
    for i in range(30):
        st = ST.draw_style(ST.image_rng(cfg, str(i)), cfg)
        assert st.mask_type == "gas"
        assert st.color in TX.TYPE_COLORS["gas"]          # pink is not a respirator colour: the type's own
    cfg = MaskConfig.from_mapping({"types": {"cloth": 1}, "textures": {"checks": 1}})
    assert {ST.draw_style(ST.image_rng(cfg, str(i)), cfg).texture for i in range(10)} == {"checks"}
    # forcing a type leaves the other draws of the image unchanged
    a = ST.draw_style(ST.image_rng(MaskConfig(), "x"), MaskConfig())
    b = ST.draw_style(ST.image_rng(MaskConfig(), "x"), MaskConfig(), mask_type=a.mask_type)
    assert (a.wear, a.color, a.texture) == (b.wear, b.color, b.texture)


def test_config_params_digest_and_defaults():
    cfg = MaskConfig()
    params = cfg.result_params()
    assert list(params) == ["seed", "types", "colors", "textures", "wear", "upscale", "max_yaw_deg", "min_eye_px",
                            "landmarks"]                              # threads and batch never rerun anything
    assert params["types"] == {"cloth": 0.28, "gas": 0.1, "kn95": 0.2, "n95": 0.12, "surgical": 0.3}
    assert list(params["colors"]) == sorted(params["colors"])         # name order: the draw order
    # the digest seeds every image's draws: it must not move for the same settings however they are given
    assert cfg.digest() == "1bc6667357a4431a"
    again = MaskConfig.from_mapping({"types": dict(reversed(list(cfg.types.items()))), "max_yaw_deg": 45,
                                     "threads": 4, "batch": 3, "gallery": None})
    assert again.digest() == cfg.digest() and again.threads == 4 and again.batch == 3
    assert MaskConfig.from_mapping(params) == cfg
    listed = MaskConfig.from_mapping({"wear": ["proper", "chin"], "types": {"gas": 1, "n95": 0}})
    assert listed.weights("wear") == {"chin": 1.0, "proper": 1.0} and listed.weights("types") == {"gas": 1.0}
    assert MaskConfig.defaults()["threads"] == 1 and MaskConfig.defaults()["types"]["surgical"] == 0.30
    with pytest.raises(ValueError, match="mask.upscale"):
        MaskConfig.from_mapping({"upscale": 5})
    with pytest.raises(ValueError, match="mask.landmarks"):
        MaskConfig.from_mapping({"landmarks": "mtcnn"})


def test_mask_modules_import_only_downwards():
    """The flow is entry (stage, api; gallery reads shards through stage) -> face -> style / render ->
    landmarks / kernels; config and textures at the bottom. Neither entry imports the other."""
    import ast

    import maskface.mask as pkg
    level = {"kernels": 0, "textures": 0, "config": 1, "landmarks": 1, "render": 1, "style": 2, "face": 3,
             "stage": 4, "api": 4, "gallery": 5}
    folder = Path(pkg.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} - {"__init__"} == set(level)
    for name, lv in level.items():
        tree = ast.parse((folder / f"{name}.py").read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used |= {node.module} if node.module else {a.name for a in node.names}
        assert all(level[m] < lv for m in used), (name, sorted(used))


def test_wearing_masker_raises_when_nothing_is_masked():
    from maskface.mask.api import MaskFailed, wearing_masker
    masker = wearing_masker()
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    with pytest.raises(MaskFailed, match="not masked"):
        masker(noise, 3, "noise")
    assert issubclass(MaskFailed, ValueError)


@pytest.mark.lfw
def test_wearing_masker_masks_a_photo_deterministically(lfw):
    from maskface.imageio import load_rgb
    from maskface.mask.api import mask_image, wearing_masker
    rgb = load_rgb(lfw / "images_deepfunneled" / _lfw_sample(lfw / "images_deepfunneled", 1)[0])
    out = wearing_masker("chin")(rgb, 5, "x")
    assert out.shape == rgb.shape and out.dtype == np.uint8 and not np.array_equal(out, rgb)
    assert np.array_equal(out, mask_image(rgb, seed=5, image_id="x", wear="chin").image)
    assert np.array_equal(wearing_masker(None)(rgb, 5, "x"), mask_image(rgb, seed=5, image_id="x").image)

def test_textures_are_anti_aliased_and_in_range():
    v, u = np.mgrid[0:60, 0:50].astype(np.float32) / 30.0
    for tex in TX.TEXTURES:
        st = ST.draw_style(ST.image_rng(MaskConfig(), tex), MaskConfig(), mask_type="cloth", texture=tex)
        alb = TX.albedo(tex, "navy", st.params["texture"], u, v, 1 / 30.0)
        assert alb.shape == (3, 60, 50) and alb.dtype == np.float32
        assert alb.min() >= 0 and alb.max() <= 1.0 + 1e-6
        if tex in ("stripes", "checks", "dots"):
            # two colours and anti-aliased edge values between them (in the channel that differs most)
            ch = alb[int(np.argmax(alb.max(axis=(1, 2)) - alb.min(axis=(1, 2))))]
            assert ch.max() - ch.min() > 0.2
            assert ((ch > ch.min() + 0.05) & (ch < ch.max() - 0.05)).any()


def _stats_reference(img: np.ndarray) -> dict:
    """image_stats in plain numpy (sorts and full-array filters), the definition the compiled kernel follows."""
    y = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float64)
    h, w = y.shape
    sub = np.sort(y[::2, ::2].ravel())
    out = {"p90": sub[int(0.9 * (sub.size - 1))], "mean_rgb": img.reshape(-1, 3).mean(0), "noise": 0.0, "blur": 0.0}
    if h > 6 and w > 6:
        dx = y[:, :-2] - 2 * y[:, 1:-1] + y[:, 2:]
        dxy = dx[:-2] - 2 * dx[1:-1] + dx[2:]
        out["noise"] = np.sqrt(np.pi / 2) * np.abs(dxy).mean() / 6.0

        def grad(a):
            return np.sort((np.abs(a[1:-1, 2:] - a[1:-1, :-2]) + np.abs(a[2:, 1:-1] - a[:-2, 1:-1])).ravel())

        t = y[:, :-2] + 2 * y[:, 1:-1] + y[:, 2:]
        sm = (t[:-2] + 2 * t[1:-1] + t[2:]) / 16
        g0, g1 = grad(y), grad(sm)
        g0, g1 = g0[int(0.99 * (g0.size - 1))], g1[int(0.99 * (g1.size - 1))]
        r = min(g1 / max(g0, 1e-9), 0.99)
        out["blur"] = np.sqrt(max(0.367 * r * r / (1 - r * r) - 0.370, 0.0)) if g0 > 1e-3 else 0.0
    return out


@pytest.mark.parametrize("shape", [(112, 96), (7, 9), (5, 5), (240, 181)])
def test_image_statistics_kernel_matches_the_numpy_definition(shape):
    rng = np.random.default_rng(sum(shape))
    base = cv2.GaussianBlur(rng.integers(0, 256, shape + (3,), dtype=np.uint8), (0, 0), 1.2)
    for img in (base, np.clip(base.astype(int) + rng.integers(-9, 10, base.shape), 0, 255).astype(np.uint8)):
        got = R.image_stats(img)
        ref = _stats_reference(img)
        assert got["p90"] == ref["p90"]
        assert np.allclose(got["mean_rgb"], ref["mean_rgb"], rtol=1e-6)
        assert got["noise"] == pytest.approx(ref["noise"], rel=1e-9, abs=1e-12)
        assert got["blur"] == pytest.approx(ref["blur"], rel=1e-9, abs=1e-12)
    batch = R.image_stats_batch(np.stack([base, base[::-1].copy()]))
    assert batch[0]["p90"] == R.image_stats(base)["p90"] and batch[1]["blur"] == R.image_stats(base[::-1].copy())["blur"]


def test_face_light_is_the_least_squares_fit_of_the_log_luminance():
    """The compiled normal equations give the same quadratic as numpy's lstsq on the selected grid points,
    and a photo lit from the left gives a mask brighter on the left."""
    h, w = 112, 96
    yy, xx = np.mgrid[0:h, 0:w]
    lum = 60 + 120 * (1 - xx / w) + 10 * np.sin(yy / 7.0)
    img = np.repeat(lum[..., None], 3, axis=2).astype(np.uint8)
    a_body = np.zeros((50, 60), np.float32)
    cv2.ellipse(a_body, (30, 25), (26, 20), 0, 0, 360, 1.0, -1)
    x0, y0 = 18, 55
    light = R._face_light(img, (x0, y0, x0 + 60, y0 + 50), a_body)
    assert light[25, 5] > 1.1 > 0.9 > light[25, 55]
    # reference: grid points under the mask, 20th-98th percentile of luminance, lstsq on the monomials
    gy, gx = np.mgrid[1:h:3, 1:w:3]
    luma = cv2.cvtColor(np.ascontiguousarray(img[1::3, 1::3]), cv2.COLOR_RGB2GRAY).astype(float)
    ry, rx = gy - y0, gx - x0
    inside = (ry >= 0) & (ry < 50) & (rx >= 0) & (rx < 60)
    cover = np.zeros_like(inside)
    cover[inside] = a_body[ry[inside], rx[inside]] > 0.5
    vals = np.sort(luma[cover])
    keep = cover & (luma >= vals[int(0.2 * (vals.size - 1))]) & (luma <= vals[int(0.98 * (vals.size - 1))])
    s = 1.0 / max(h, w)
    X, Y = (gx[keep] - w / 2) * s, (gy[keep] - h / 2) * s
    M = np.stack([np.ones_like(X), X, Y, X * X, X * Y, Y * Y], 1)
    yv = np.log(luma[keep] + 5.0)
    coef = np.linalg.lstsq(M, yv, rcond=None)[0]
    Yr, Xr = (np.mgrid[y0:y0 + 50, x0:x0 + 60] - np.array([h / 2, w / 2])[:, None, None]) * s
    fit = coef[0] + coef[1] * Xr + coef[2] * Yr + coef[3] * Xr ** 2 + coef[4] * Xr * Yr + coef[5] * Yr ** 2
    ref = np.exp(np.clip(fit - yv.mean(), -0.51, 0.372))
    assert np.abs(light - ref).max() < 1e-3


# --------------------------------------------------------------------------------- photos and the CLI

def test_mask_image_without_a_face_returns_the_photo_unchanged():
    from maskface.mask import mask_image
    img = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    res = mask_image(img, seed=3)
    assert res.status == "no_face" and not res.masked and np.array_equal(res.image, img)
    res = mask_image(img[:10, :10], seed=3)
    assert res.status == "skipped"


@pytest.mark.lfw
def test_cli_masks_a_folder_of_photos_deterministically(lfw, tmp_path):
    images = lfw / "images_deepfunneled"
    src = tmp_path / "in"
    for i in _lfw_sample(images, 3):
        (src / i).parent.mkdir(parents=True, exist_ok=True)
        (src / i).write_bytes((images / i).read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    args = ["mask", str(src), str(tmp_path / "out"), "--type", "surgical", "--wear", "proper", "--seed", "7",
            "--occlusion", "--no-progress"]
    from maskface.cli import main
    assert main(args) == 0
    man = pd.read_parquet(tmp_path / "out" / "masked.parquet")
    assert set(man["image_id"]) == {*(_lfw_sample(images, 3)), "broken.jpg"}
    assert man.loc[man["image_id"] == "broken.jpg", "status"].item() == "unreadable"
    ok = man[man["status"] == "ok"]
    assert len(ok) >= 2 and set(ok["mask_type"]) == {"surgical"} and set(ok["wear"]) == {"proper"}
    outs = sorted((tmp_path / "out").rglob("*.png"))
    assert any(p.name.endswith("_occlusion.png") for p in outs)
    first = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in outs}
    assert main(["mask", str(src), str(tmp_path / "out2")] + args[3:]) == 0
    second = {p.relative_to(tmp_path / "out2"): p.read_bytes() for p in (tmp_path / "out2").rglob("*.png")}
    assert first == second
    # one file in, one file out (original frame kept)
    one = sorted(src.rglob("*_0001.jpg"))[0]
    assert main(["mask", str(one), str(tmp_path / "one.png"), "--seed", "1", "--no-progress"]) == 0
    out = np.asarray(Image.open(tmp_path / "one.png"))
    assert out.shape == np.asarray(Image.open(one)).shape


@pytest.mark.lfw
def test_gallery_figure(frontal, landmarks, tmp_path):
    from maskface.mask import gallery as G
    faces = [{"image_id": i, "crop": frontal[i], "lm": landmarks[i], "template5": TPL} for i in list(landmarks)[:8]]
    info = G.render_gallery(faces, MaskConfig(), tmp_path / "g.png", title="test")
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape[1] == info["size"][0] and img.shape[0] == info["size"][1]
    rows = {c["row"] for c in info["cells"]}
    assert set(MASK_TYPES) <= rows
    assert {(c["mask_type"], c["wear"]) for c in info["cells"] if c["row"] in MASK_TYPES} == \
        {(t, w) for t in MASK_TYPES for w in WEARS}


# ------------------------------------------------------------------------------------------ workflow

def _smk(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return snakemake_run(workdir, *args, check=check, timeout=900)


def test_bad_mask_config_stops_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text(json.dumps({
        "datasets": {"tiny": {"source": str(tmp_path), "format": "imagefolder"}},
        "mask": {"types": {"bandana": 1.0}}}))
    res = _smk(tmp_path, "-n", "mask", check=False)
    assert res.returncode != 0
    assert "bandana" in res.stdout + res.stderr


@pytest.fixture
def own_tmp():
    """A temporary folder outside pytest's rotating basetemp (other pytest sessions on a shared machine
    prune old basetemps, which can pull the folder from under a long workflow run)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="maskface-test-mask-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.lfw
@pytest.mark.slow
def test_workflow_mask_stage(crops, own_tmp):
    """The rules for real (mask_shard with 2 processes, mask_merge, mask_gallery) on two aligned shards in
    the alignment stage's layout, made here from real LFW crops (a profile and a failed row included); only
    the mask rules may run, so no detector is needed. No row is lost; a rerun does nothing; the processes'
    bytes equal a one-process run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    work = own_tmp / "work"
    ids = sorted(crops)[:5] + [PROFILES[0]]
    rows = [{"image_id": i, "identity": i.split("/")[0], "status": "ok", "reason": "", "template": "sphereface_112x96",
             "png": S.encode_rgb_png(crops[i])} for i in ids if i in crops]
    rows.append({"image_id": "Zed/broken.jpg", "identity": "Zed", "status": "unreadable", "reason": "decode failed",
                 "template": "sphereface_112x96", "png": None})
    (work / "results/aligned/tiny").mkdir(parents=True)
    (work / "results/manifests/tiny").mkdir(parents=True)
    for k in range(2):
        part = rows[k::2]
        pq.write_table(pa.table({c: [r[c] for r in part] for c in rows[0]} | {"shard": [k] * len(part)}),
                       work / f"results/aligned/tiny/shard-{k}.parquet")
    pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows]}),
                   work / "results/manifests/tiny/aligned.parquet")
    (own_tmp / "pairs.txt").write_text("1\t0\n")     # a config's local paths must exist
    (work / "config.yaml").write_text(json.dumps({
        "datasets": {"tiny": {"source": str(own_tmp), "format": "lfw", "pairs": str(own_tmp / "pairs.txt")}},
        "align": {"shards": 2}, "mask": {"seed": 5, "threads": 2, "batch": 2}}))
    only = ["--allowed-rules", "mask_shard", "mask_merge", "mask_gallery", "mask"]
    _smk(work, "mask", *only)
    masked = pd.read_parquet(work / "results/manifests/tiny/masked.parquet")
    assert list(masked["image_id"]) == sorted(r["image_id"] for r in rows)           # no row lost
    assert set(masked.columns) >= {"image_id", "identity", "status", "reason", "mask_type", "mask_color",
                                    "mask_texture", "wear", "coverage", "landmarks68", "seed", "shard"}
    st = dict(zip(masked["image_id"], masked["status"]))
    assert st["Zed/broken.jpg"] == "unreadable"
    if PROFILES[0] in crops:
        assert st[PROFILES[0]] == "skipped"
    assert sum(v == "ok" for v in st.values()) >= 4
    summary = json.loads((work / "results/masked/tiny/summary.json").read_text())
    assert summary["masked"] == sum(v == "ok" for v in st.values())
    cells = json.loads((work / "results/figures/mask_gallery.json").read_text())
    assert {(c["mask_type"], c["wear"]) for c in cells["cells"] if c["row"] in MASK_TYPES} == \
        {(t, w) for t in MASK_TYPES for w in WEARS}
    assert (work / "results/figures/mask_gallery.png").stat().st_size > 10000
    again = _smk(work, "mask", *only)
    assert "Nothing to be done" in again.stdout + again.stderr
    # the jobs ran 2 processes on batches of 2; masking the same aligned shards here, in one process and
    # one batch, gives the same bytes
    cfg = MaskConfig.from_mapping({"seed": 5})
    for k in range(2):
        items = S.read_aligned_shard(work / f"results/aligned/tiny/shard-{k}.parquet")
        here = {r["image_id"]: r for r in S.process_items(items, cfg)}
        job = pd.read_parquet(work / f"results/masked/tiny/shard-{k}.parquet")
        for row in job.itertuples():
            assert row.png == here[row.image_id]["png"] and row.occlusion == here[row.image_id]["occlusion"]
