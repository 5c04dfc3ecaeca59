"""Stage 1 on real faces from LFW (skipped when LFW is absent: set MASKFACE_LFW to the folder holding
images_deepfunneled/ and pairs.txt; default ../shared/data/lfw beside the repo)."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from maskface import align as A
from maskface import mtcnn
from maskface import shards as S
from maskface.imageio import decode_png, load_rgb


# frontal, single-subject LFW images (deep-funneled), and one with several faces
FRONTAL = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0002.jpg"]
SAMPLE = FRONTAL + ["Zico/Zico_0001.jpg", "Zico/Zico_0002.jpg", "Zhu_Rongji/Zhu_Rongji_0001.jpg",
                    "Colin_Powell/Colin_Powell_0001.jpg", "Serena_Williams/Serena_Williams_0001.jpg",
                    "George_W_Bush/George_W_Bush_0001.jpg"]


@pytest.fixture(scope="module")
def lfw_images(lfw) -> Path:
    """images_deepfunneled/ of the shared ``lfw`` fixture (tests/conftest.py: MASKFACE_LFW or ../shared)."""
    imgs = lfw / "images_deepfunneled"
    missing = [i for i in SAMPLE if not (imgs / i).is_file()]
    if missing:
        pytest.skip(f"LFW copy lacks {missing[:3]}")
    return imgs


@pytest.fixture(scope="module")
def detector():
    import torch
    torch.set_num_threads(1)
    assert A.Detector is mtcnn.Detector          # maskface.align re-exports the detector
    return mtcnn.Detector(20, (0.6, 0.7, 0.9), 0.85, "cpu")


def test_detector_matches_facenet_pytorch(lfw_images, detector, device):
    """Same cascade, same numbers: boxes, scores and landmarks of the detector on ``device`` equal
    facenet-pytorch's MTCNN.detect on the CPU (on a GPU to a tenth of a pixel: other kernels, same fp32)."""
    from facenet_pytorch import MTCNN

    ref = MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.9], factor=0.85, select_largest=False)
    imgs = np.stack([load_rgb(lfw_images / i) for i in SAMPLE[:4]])
    rb, rp, rl = ref.detect(imgs, landmarks=True)
    det = detector if device == "cpu" else mtcnn.Detector(20, (0.6, 0.7, 0.9), 0.85, device)
    mine = det.detect(imgs)
    px, score = (0.01, 1e-4) if device == "cpu" else (0.1, 1e-3)
    for i in range(len(imgs)):
        boxes, points = mine[i]
        assert len(boxes) == len(rb[i]) >= 1
        np.testing.assert_allclose(boxes[:, :4], np.asarray(rb[i], dtype=float), atol=px)
        np.testing.assert_allclose(boxes[:, 4], np.asarray(rp[i], dtype=float), atol=score)
        np.testing.assert_allclose(points, np.asarray(rl[i], dtype=float), atol=px)


def test_rotated_and_scaled_face_aligns_back_onto_the_template(lfw_images, detector):
    """An LFW face rotated by 20 degrees and scaled by 0.7 aligns to (nearly) the same crop as the original."""
    name = FRONTAL[0]
    rgb = load_rgb(lfw_images / name)
    h, w = rgb.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 0.7)
    moved = cv2.warpAffine(rgb, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    cfg = A.AlignConfig(device="cpu")
    rec0 = A.finish_image(rgb, detector.detect(rgb[None])[0], A.empty_record(name, "", "", "", cfg.template, 0),
                          cfg, "center")
    rec1 = A.finish_image(moved, detector.detect(moved[None])[0],
                          A.empty_record(name, "", "", "", cfg.template, 0), cfg, "center")
    assert rec0["status"] == rec1["status"] == "ok"
    tpl = A.SPHEREFACE_112x96
    # the detected landmarks of the rotated face, mapped by the fitted similarity, land on the template
    err1 = np.linalg.norm(np.reshape(rec1["aligned_landmarks5"], (5, 2)) - tpl, axis=1)
    assert err1.mean() < 3.0 and err1.max() < 6.0
    # the fitted transform undoes the rotation and the scale: M1 o R == M0 (up to detector noise)
    m0 = np.reshape(rec0["transform"], (2, 3))
    m1 = np.reshape(rec1["transform"], (2, 3))
    comp = m1[:, :2] @ rot[:, :2]
    ang = math.degrees(math.atan2(comp[1, 0], comp[0, 0]) - math.atan2(m0[1, 0], m0[0, 0]))
    scale_ratio = math.sqrt(abs(np.linalg.det(comp))) / math.sqrt(abs(np.linalg.det(m0[:, :2])))
    assert abs(ang) < 2.0 and abs(scale_ratio - 1) < 0.05
    # and the two crops show the same face: re-detected landmarks agree within a few pixels
    c0, c1 = decode_png(rec0["png"]), decode_png(rec1["png"])
    diff = np.abs(c0.astype(int) - c1.astype(int))[20:100, 10:86].mean()
    assert diff < 15, diff
    pad = 48
    for crop in (c0, c1):
        big = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        boxes, pts = detector.detect(big[None])[0]
        assert len(boxes)
        p = pts[A.select_face(boxes, big.shape[:2], "center")] - pad
        assert np.linalg.norm(p - tpl, axis=1).mean() < 4.0


def test_shard_pipeline_on_lfw_images(lfw_images, tmp_path):
    """align_shard on a raw manifest of real LFW files: every face found, crops 112x96, centre selection."""
    ids = SAMPLE
    raw = pd.DataFrame({"image_id": ids, "identity": [i.split("/")[0] for i in ids], "path": ids,
                        "width": 250, "height": 250, "status": "ok", "reason": ""})
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 2})
    recs = A.align_shard(raw, lfw_images, "lfw", cfg, 0, 1, progress=False)
    df = A.records_frame(recs, False).to_pandas()
    assert (df["status"] == "ok").all(), df[["image_id", "status", "reason"]]
    for r in recs:
        crop = decode_png(r["png"])
        assert crop.shape == (112, 96, 3)
        # the kept face is the central subject of the LFW crop
        x1, y1, x2, y2 = r["bbox"]
        assert abs((x1 + x2) / 2 - 125) < 30 and abs((y1 + y2) / 2 - 125) < 40
        assert r["det_score"] > 0.9 and r["n_faces"] >= 1
    s = A.summarize(df)
    assert s["detection_rate"] == 1.0
    # arcface template: 112x112 crops, the same face 8 px to the right
    cfg2 = A.AlignConfig.from_mapping({"device": "cpu", "workers": 1, "template": "arcface_112x112"})
    r2 = A.align_shard(raw.iloc[:1], lfw_images, "lfw", cfg2, 0, 1, progress=False)[0]
    c96, c112 = decode_png(recs[0]["png"]), decode_png(r2["png"])
    assert c112.shape == (112, 112, 3)
    # two warps with different output sizes: the interpolation may round a pixel differently on another CPU
    diff = np.abs(c112[:, 8:104].astype(int) - c96.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_center_selection_on_a_multi_face_image(lfw_images, detector):
    """Two LFW faces side by side, the subject in the middle: center keeps it, largest keeps the bigger one."""
    a = load_rgb(lfw_images / FRONTAL[0])
    b = load_rgb(lfw_images / FRONTAL[1])
    canvas = np.zeros((250, 250, 3), np.uint8)
    canvas[:] = a                                                  # subject at the centre, full size
    small = cv2.resize(b, (100, 100), interpolation=cv2.INTER_AREA)
    canvas[0:100, 150:250] = small                                 # a smaller face in the top-right corner
    boxes, _ = detector.detect(canvas[None])[0]
    assert len(boxes) >= 2
    i = A.select_face(boxes, (250, 250), "center")
    cx, cy = (boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2
    assert abs(cx - 125) < 30 and abs(cy - 125) < 40


def test_fidelity_report_on_lfw(lfw_images, tmp_path):
    ids = SAMPLE[:4]
    raw = pd.DataFrame({"image_id": ids, "identity": [i.split("/")[0] for i in ids], "path": ids,
                        "width": 250, "height": 250, "status": "ok", "reason": ""})
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 1})
    recs = A.align_shard(raw, lfw_images, "lfw", cfg, 0, 1, progress=False)
    p = tmp_path / "shard-0.parquet"
    S.write_shard(recs, A.SHARD_SCHEMA, p)
    man = S.merge_shards([p], A.MANIFEST_SCHEMA, raw["image_id"])
    rep = A.fidelity_report(man, [p], cfg, sample=4)
    assert rep["transformed"]["n"] == 4 and rep["redetected"]["sample"] == 4
    assert rep["redetected"]["redetected"] == 4
    assert rep["transformed"]["mean_px"] < 4 and rep["redetected"]["mean_px"] < 5


def test_decoding_workers_feeding_one_detector_give_the_records_of_the_cpu_workers(lfw_images, device):
    """The GPU path's layout (one process detecting on ``device``, decoding worker processes ahead of it), with
    LFW faces in chunks of 2: the same faces, landmarks and crops as two CPU workers each decoding and
    detecting their own chunks (to float tolerance: the two paths run torch in different processes)."""
    items = [{"image_id": i, "identity": i.split("/")[0], "src": str(lfw_images / i), "shard": 0} for i in SAMPLE]
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 2, "batch_size": 2})
    ref = A.align_items(items, cfg, "center", progress=False)
    fed_cfg = A.AlignConfig.from_mapping({"device": device, "workers": 2, "batch_size": 2})
    fed = A.align_items(items, fed_cfg, "center", progress=False, decoders=2)
    assert [r["image_id"] for r in fed] == SAMPLE
    for a, b in zip(fed, ref):
        assert a["status"] == b["status"] == "ok" and a["n_faces"] == b["n_faces"]
        np.testing.assert_allclose(a["landmarks5"], b["landmarks5"], atol=0.05 if device == "cpu" else 0.1)
        diff = np.abs(decode_png(a["png"]).astype(int) - decode_png(b["png"]).astype(int))
        assert diff.max() <= 3 and (diff > 0).mean() < 0.05, (a["image_id"], diff.max(), (diff > 0).mean())
