"""Stage 1 (maskface.align, maskface.shards) without real faces: geometry, selection, shards, bad inputs, merge,
CLI.

Real-face tests (detector parity with facenet-pytorch, the rotated/scaled face, the pipeline on LFW) are in
test_align_lfw.py and skip when LFW is absent.
"""
from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from maskface import align as A
from maskface import shards as S
from maskface.imageio import decode_png
from maskface.testing import BAD_INPUTS, write_bad_inputs


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([scale * r, [[tx], [ty]]])


# ----------------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("angle,scale", [(0, 1), (20, 0.7), (-35, 2.5), (170, 0.3)])
def test_similarity_recovers_known_transform(angle, scale):
    m = _similarity(angle, scale, 12.5, -7.0)
    src = A.SPHEREFACE_112x96 * 1.7 + 40
    dst = A.transform_points(m, src)
    est = A.similarity_transform(src, dst)
    np.testing.assert_allclose(est, m, atol=1e-9)


def test_similarity_is_least_squares_and_never_reflects():
    rng = np.random.default_rng(0)
    src = A.SPHEREFACE_112x96 + rng.normal(0, 2, (5, 2))
    mirrored = src * np.array([-1, 1])                      # a reflection would fit this exactly
    est = A.similarity_transform(mirrored, src)
    assert np.linalg.det(est[:, :2]) > 0                    # rotation * scale, no reflection
    # least squares: no small perturbation of the estimate lowers the squared residual
    def sse(m):
        return ((A.transform_points(m, src) - A.SPHEREFACE_112x96) ** 2).sum()
    best = A.similarity_transform(src, A.SPHEREFACE_112x96)
    for _ in range(50):
        a, s, tx, ty = rng.normal(0, [0.01, 0.01, 0.2, 0.2])
        pert = _similarity(math.degrees(a), 1 + s, 0, 0)
        m = np.vstack([best, [0, 0, 1]])
        m2 = (np.vstack([pert, [0, 0, 1]]) @ m)[:2] + np.array([[0, 0, tx], [0, 0, ty]])
        assert sse(m2) >= sse(best) - 1e-9


def test_similarity_rejects_degenerate_points():
    with pytest.raises(ValueError, match="degenerate"):
        A.similarity_transform(np.ones((5, 2)), A.SPHEREFACE_112x96)


def test_templates():
    pts, size = A.TEMPLATES["sphereface_112x96"]
    assert size == (112, 96)
    np.testing.assert_allclose(pts[0], [30.2946, 51.6963])
    np.testing.assert_allclose(pts[4], [62.7299, 92.2041])
    arc, arc_size = A.TEMPLATES["arcface_112x112"]
    assert arc_size == (112, 112)
    np.testing.assert_allclose(arc - pts, np.tile([8.0, 0.0], (5, 1)))


def test_warp_puts_landmarks_on_template():
    """A synthetic image with five dots; warping with the fitted similarity puts the dots on the template."""
    m_true = _similarity(20, 1 / 0.7, 60, 30)              # template -> image
    pts_img = A.transform_points(m_true, A.SPHEREFACE_112x96)
    img = np.zeros((250, 250, 3), np.uint8)
    for x, y in pts_img:
        xi, yi = int(round(x)), int(round(y))
        img[yi - 1:yi + 2, xi - 1:xi + 2] = 255
    crop, m = A.align_face(img, pts_img, "sphereface_112x96")
    assert crop.shape == (112, 96, 3)
    for x, y in A.SPHEREFACE_112x96:                        # every template point is bright in the crop
        assert crop[int(round(y)), int(round(x))].max() > 100
    np.testing.assert_allclose(A.transform_points(m, pts_img), A.SPHEREFACE_112x96, atol=1e-6)


def test_center_crop_points_is_the_lfw_layout_centred():
    p = A.center_crop_points(250, 250)
    np.testing.assert_allclose(p, A.CANONICAL_LANDMARKS * 250)
    q = A.center_crop_points(100, 300)                      # wide image: the centred 100x100 square
    np.testing.assert_allclose(q, A.CANONICAL_LANDMARKS * 100 + [100, 0])


# ---------------------------------------------------------------------------------------------- selection

def test_select_face_center_vs_largest():
    h = w = 250
    subject = [70, 60, 180, 190, 0.99]                      # central, big
    big_edge = [150, 0, 250, 120, 0.99]                     # bigger? no: edge face 100x120
    huge_corner = [0, 0, 140, 140, 0.99]                    # largest, far from centre
    tiny_centre = [118, 118, 132, 132, 0.95]                # exactly central, tiny
    boxes = np.array([huge_corner, subject, big_edge, tiny_centre])
    assert A.select_face(boxes, (h, w), "largest") == 0
    assert A.select_face(boxes, (h, w), "center") == 1      # size-weighted: the tiny central box loses
    with pytest.raises(ValueError):
        A.select_face(boxes, (h, w), "nearest")


def test_select_auto_follows_dataset_format():
    cfg = A.AlignConfig()
    assert cfg.select_for("lfw") == "center" and cfg.select_for("imagefolder") == "largest"
    assert A.AlignConfig(select="largest").select_for("lfw") == "largest"


def test_config_defaults_are_spherefaces_and_validated():
    cfg = A.AlignConfig.from_mapping({})
    assert (cfg.min_face_size, cfg.factor, cfg.thresholds) == (20, 0.85, (0.6, 0.7, 0.9))
    assert cfg.template == "sphereface_112x96" and cfg.on_no_face == "center_crop"
    assert cfg.resolved_batch("cpu") == 8 and cfg.resolved_batch("cuda") == 64
    assert A.AlignConfig.from_mapping({"threads": 3}).workers == 3
    for bad in ({"template": "x"}, {"factor": 1.2}, {"thresholds": [0.5, 0.5]}, {"on_no_face": "drop"},
                {"select": "first"}, {"device": "tpu"}, {"min_face_size": 2}, {"shards": 0}):
        with pytest.raises(ValueError):
            A.AlignConfig.from_mapping(bad)
    # the rule's params: only result-affecting keys, as builtin types
    assert cfg.result_params() == {"template": "sphereface_112x96", "min_face_size": 20,
                                   "thresholds": [0.6, 0.7, 0.9], "factor": 0.85, "select": "auto",
                                   "on_no_face": "center_crop", "shards": 8}
    assert A.AlignConfig.defaults()["workers"] == 2 and A.AlignConfig.defaults()["device"] == "auto"


# ------------------------------------------------------------------------------------------------- shards

def test_shard_assignment_is_deterministic_stable_and_balanced():
    ids = [f"Person_{i % 997}/Person_{i % 997}_{i:04d}.jpg" for i in range(8000)]
    s1 = [S.shard_of(i, 8) for i in ids]
    assert s1 == [S.shard_of(i, 8) for i in reversed(ids)][::-1]      # independent of order
    counts = np.bincount(s1, minlength=8)
    assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000
    # known values: a change of the hash would silently reshuffle every dataset
    assert [S.shard_of("Aaron_Eckhart/Aaron_Eckhart_0001.jpg", n) for n in (1, 2, 8)] == \
        [0, int(__import__("hashlib").sha1(b"Aaron_Eckhart/Aaron_Eckhart_0001.jpg").hexdigest()[:8], 16) % 2,
         int(__import__("hashlib").sha1(b"Aaron_Eckhart/Aaron_Eckhart_0001.jpg").hexdigest()[:8], 16) % 8]
    raw = pd.DataFrame({"image_id": ids})
    parts = [S.shard_rows(raw, s, 8) for s in range(8)]
    assert sum(len(p) for p in parts) == len(raw)
    assert set().union(*[set(p["image_id"]) for p in parts]) == set(ids)


# --------------------------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "Someone"
    write_bad_inputs(folder)
    (folder / "missing_link.jpg").symlink_to(folder / "does_not_exist.jpg")
    return folder


def _items(folder):
    files = sorted(p for p in folder.iterdir())
    return [{"image_id": f"Someone/{p.name}", "identity": "Someone", "src": str(p), "shard": 0} for p in files]


@pytest.mark.parametrize("on_no_face", ["center_crop", "skip"])
def test_every_bad_input_is_a_recorded_row_never_a_crash(bad_folder, on_no_face):
    items = _items(bad_folder)
    cfg = A.AlignConfig.from_mapping({"on_no_face": on_no_face, "device": "cpu", "workers": 1})
    recs = A.align_items(items, cfg, "largest", progress=False)
    assert [r["image_id"] for r in recs] == [it["image_id"] for it in items]
    by = {r["image_id"].split("/")[1]: r for r in recs}
    assert by["corrupt.jpg"]["status"] == "unreadable"
    assert by["zero.jpg"]["status"] == "empty"
    assert by["text.jpg"]["status"] == "not_an_image"
    assert by["notes.txt"]["status"] == "not_an_image"
    assert by["missing_link.jpg"]["status"] == "unreadable"
    decodable = [n for n, (st, _) in BAD_INPUTS.items() if st == "ok"]   # gray, CMYK, 16-bit, RGBA
    assert decodable
    for name in decodable:
        r = by[name]
        assert r["n_faces"] == 0 and r["src_width"] == 64     # decoded fine; random noise has no face
        if on_no_face == "center_crop":
            assert r["status"] == "center_crop" and r["fallback"] is True
            assert decode_png(r["png"]).shape == (112, 96, 3)
        else:
            assert r["status"] == "no_face" and r["png"] is None
    for r in recs:
        assert r["reason"] or r["status"] == "ok"
        if r["status"] not in A.ALIGNED_STATUSES:
            assert r["png"] is None


def test_shard_carries_raw_failures_and_merge_accounts_for_every_row(bad_folder, tmp_path):
    from maskface.datasets import scan

    root = bad_folder.parent
    raw = scan(root, root, threads=1)
    assert len(raw) == len(list(bad_folder.iterdir()))
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 1})
    shards = 3
    paths = []
    for s in range(shards):
        recs = A.align_shard(raw, root, "lfw", cfg, s, shards, progress=False)
        assert {r["shard"] for r in recs} <= {s}
        p = tmp_path / f"shard-{s}.parquet"
        S.write_shard(recs, A.SHARD_SCHEMA, p, {"stage": "test"})
        paths.append(p)
    merged = _merge(paths, raw)
    assert sorted(merged["image_id"]) == sorted(raw["image_id"])
    assert list(merged.columns) == A.MANIFEST_COLUMNS
    st = dict(zip(raw["image_id"], raw["status"]))
    for row in merged.itertuples():
        if st[row.image_id] != "ok":
            assert row.status == st[row.image_id]            # carried through with its raw status
        else:
            assert row.status in ("ok", "center_crop")
    # crops are readable by image_id, exactly those with an aligned status
    crops = {}
    for p in paths:
        crops.update(S.read_crops(p))
    assert set(crops) == set(merged.loc[merged["status"].isin(A.ALIGNED_STATUSES), "image_id"])
    assert pq.read_schema(paths[0]).field("png").type == "binary"
    # a lost shard or a duplicated one is an error, not a silent loss
    nonempty = [p for p in paths if pq.read_metadata(p).num_rows]
    with pytest.raises(ValueError, match="aligned manifest does not match the raw manifest: [1-9][0-9]* missing"):
        _merge([p for p in paths if p != nonempty[0]], raw)
    with pytest.raises(ValueError, match="more than one shard of the aligned manifest"):
        _merge(paths + nonempty[:1], raw)
    with pytest.raises(ValueError, match="0 missing .* 1 unexpected"):
        _merge(paths, raw.iloc[1:])
    s = A.summarize(merged)
    assert s["rows"] == len(raw) and s["faces_found"] == 0 and s["fallbacks"] == s["decoded_images"]


def _merge(paths, raw):
    return S.merge_shards(paths, A.MANIFEST_SCHEMA, raw["image_id"], what="aligned manifest", against="raw manifest")


def test_merge_of_no_shards_and_shard_rows_by_column(tmp_path):
    empty = S.merge_shards([], A.MANIFEST_SCHEMA)
    assert list(empty.columns) == A.MANIFEST_COLUMNS and len(empty) == 0
    recs = [A.empty_record(f"X/{k}.jpg", "X", "no_face", "r", "sphereface_112x96", 0) for k in (2, 1)]
    recs[0]["png"] = b"png-bytes"
    p = tmp_path / "shard-0.parquet"
    S.write_shard(recs, A.SHARD_SCHEMA, p)
    assert S.read_rows(p, ["image_id", "png", "not_a_column"]) == [{"image_id": "X/2.jpg", "png": b"png-bytes"},
                                                                  {"image_id": "X/1.jpg", "png": None}]
    assert S.read_crops(p) == {"X/2.jpg": b"png-bytes"} and S.read_crops(p, ["X/1.jpg"]) == {}
    assert list(S.merge_shards([p], A.MANIFEST_SCHEMA, ["X/1.jpg", "X/2.jpg"])["image_id"]) == ["X/1.jpg", "X/2.jpg"]


def test_shard_out_of_range():
    raw = pd.DataFrame({"image_id": [], "identity": [], "path": [], "width": [], "height": [], "status": [],
                        "reason": []})
    with pytest.raises(ValueError):
        A.align_shard(raw, "/", "lfw", A.AlignConfig(), 4, 4)
    assert A.align_shard(raw, "/", "lfw", A.AlignConfig(device="cpu"), 0, 4, progress=False) == []


def test_cli_on_a_folder(bad_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = A.cli_main([str(bad_folder.parent), "-o", str(out), "--on-no-face", "center_crop", "--workers", "1",
                     "--device", "cpu", "--no-progress"])
    assert rc == 0
    man = pd.read_parquet(out / "aligned.parquet")
    assert len(man) == len(list(bad_folder.iterdir()))
    assert set(man["status"]) == {"unreadable", "empty", "not_an_image", "center_crop"}
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(_png_name(i) for i in man.loc[man["status"] == "center_crop", "image_id"])
    assert "img/s" in capsys.readouterr().out
    assert A.cli_main(["/no/such/folder", "-o", str(out)]) == 2


def _png_name(image_id: str) -> str:
    """The CLI's output file of an image id (same relative path, .png)."""
    from pathlib import PurePosixPath
    return str(PurePosixPath(image_id).with_suffix(".png"))


class _FailingDetector:
    """Stands in for the MTCNN detector: a batch raises ``batch_exc``; one image at a time finds no face."""
    batch_exc: BaseException = RuntimeError("x")

    def __init__(self, *args, **kwargs):
        pass

    def detect(self, imgs):
        if len(imgs) > 1:
            raise type(self).batch_exc
        return [(np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32))]


def _noise_items(tmp_path, n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for k in range(n):
        p = tmp_path / f"n{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        items.append({"image_id": f"N/n{k}.png", "identity": "N", "src": str(p), "shard": 0})
    return items


def test_out_of_memory_on_a_batch_is_retried_image_by_image(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(A, "Detector", _FailingDetector)
    monkeypatch.setattr(_FailingDetector, "batch_exc", torch.cuda.OutOfMemoryError("CUDA out of memory"))
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 1, "batch_size": 8, "on_no_face": "skip"})
    recs = A.align_items(_noise_items(tmp_path), cfg, "largest", progress=False)
    assert [r["status"] for r in recs] == ["no_face"] * 3


@pytest.fixture()
def sticky_cuda_error(monkeypatch):
    """A detector whose every batch fails with a CUDA error that is not out-of-memory."""
    monkeypatch.setattr(A, "Detector", _FailingDetector)
    monkeypatch.setattr(_FailingDetector, "batch_exc",
                        RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_cuda_error_stops_the_job_instead_of_error_rows(tmp_path, sticky_cuda_error):
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 1, "batch_size": 8, "on_no_face": "skip"})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        A.align_items(_noise_items(tmp_path), cfg, "largest", progress=False)
    assert not A.device_failed(ValueError("CUDA error in a file name"))       # not a RuntimeError of torch


class _NoFaceDetector:
    """Stands in for the MTCNN detector on any device: no face in any image, batched or not."""

    def __init__(self, *args, **kwargs):
        pass

    def detect(self, imgs):
        return [(np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)) for _ in imgs]


def test_decoding_processes_only_feed_a_gpu():
    assert [A.decode_processes("cuda", w) for w in (1, 2, 4)] == [0, 1, 3]
    assert [A.decode_processes("cpu", w) for w in (1, 2, 4)] == [0, 0, 0]


def test_the_gpu_path_decodes_in_worker_processes_and_gives_the_records_of_one_process(bad_folder, tmp_path,
                                                                                       monkeypatch, caplog):
    """device cuda with 3 workers: the job's process detects (a stand-in detector: no CUDA here) while 2
    worker processes decode chunks of 2 images ahead of it; every record, bad inputs included, is the one the
    single-process path gives, in input order."""
    items = _items(bad_folder) + _noise_items(tmp_path, n=5)
    mapping = {"on_no_face": "center_crop", "workers": 3, "batch_size": 2}
    monkeypatch.setattr(A, "Detector", _NoFaceDetector)
    one = A.align_items(items, A.AlignConfig.from_mapping({**mapping, "device": "cpu", "workers": 1}), "largest",
                        progress=False)
    monkeypatch.setattr(A, "resolve_device", lambda device, key: "cuda")
    monkeypatch.setattr(A, "describe", lambda device: "device cuda (stand-in)")
    with caplog.at_level("INFO", logger=A.log.name):
        fed = A.align_items(items, A.AlignConfig.from_mapping({**mapping, "device": "cuda"}), "largest",
                            progress=False)
    assert "batch 2, 1 detecting process(es), 2 decoding" in caplog.text
    assert [r["image_id"] for r in fed] == [it["image_id"] for it in items]
    assert fed == one
    assert {r["status"] for r in fed} >= {"unreadable", "empty", "not_an_image", "center_crop"}


def test_a_detection_error_on_the_gpu_path_stops_the_decoders(tmp_path, sticky_cuda_error):
    cfg = A.AlignConfig.from_mapping({"device": "cpu", "workers": 1, "batch_size": 2, "on_no_face": "skip"})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        A.align_items(_noise_items(tmp_path, n=8), cfg, "largest", progress=False, decoders=2)
    assert not multiprocessing.active_children()      # the decoding workers were stopped, not left running
