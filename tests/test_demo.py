"""Open-set video demo (maskface.demo) and its LFW test video (maskface.testvideo).

The tests without LFW check the bad inputs, the metrics and the thresholds on synthetic data; the LFW tests
build a small test video (3 s, 320x240, 8 fps, two faces at a time: 48 face appearances) from real LFW
photographs in a temporary folder, run the demo on it once, and check the outputs and sane lower bounds on
the open-set rates at the dlib-resnet threshold measured on LFW (see DLIB_THRESHOLD).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from maskface import demo as D
from maskface.evaluate import open_set_metrics
from maskface.testing import write_bad_inputs
from maskface.mask.api import MaskFailed, wearing_masker
from maskface.testvideo import VideoSpec, build_test_video, plan_appearances

REPO = Path(__file__).resolve().parents[1]
# dlib-resnet's cosine threshold at LFW FAR 1e-3, measured with maskface.demo.calibrate_on_lfw (400 people,
# seed 0; 79,800 impostor pairs); the report gives the command.
DLIB_THRESHOLD = D.DLIB_RESNET_THRESHOLD


def _write_video(path: Path, n: int = 10, size=(160, 120), fps: float = 8.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert w.isOpened()
    for _ in range(n):
        w.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    w.release()
    return path


# ------------------------------------------------------------------------------------ no LFW needed

def test_colours_are_stable_distinct_and_unknown_is_grey():
    names = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Serena_Williams", "Jacques_Chirac"]
    cols = [D.colour_for(n) for n in names]
    assert cols == [D.colour_for(n) for n in names]          # same name, same colour, every call
    assert len(set(cols)) == len(cols)
    assert all(max(c) == 255 for c in cols)                  # bright, saturated
    assert D.colour_for(D.UNKNOWN) == D.UNKNOWN_COLOUR_BGR


def test_bad_videos_give_clear_errors(tmp_path):
    with pytest.raises(D.VideoError, match="video not found"):
        D.open_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(D.VideoError, match="empty"):
        D.open_video(tmp_path / "empty.mp4")
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all " * 200)
    with pytest.raises(D.VideoError, match="cannot open video"):
        D.open_video(tmp_path / "garbage.mp4")
    good = _write_video(tmp_path / "good.mp4")
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])   # mp4v: the index is at the end
    with pytest.raises(D.VideoError):
        D.open_video(tmp_path / "cut.mp4")
    with pytest.raises(D.VideoError, match="not a file"):
        D.open_video(tmp_path)


def test_frame_batches_cover_every_frame_once(tmp_path):
    cap, info = D.open_video(_write_video(tmp_path / "v.mp4", n=11))
    assert (info.width, info.height, info.fps) == (160, 120, 8.0)
    got = [(s, len(f)) for s, f in D.iter_frame_batches(cap, info, 4)]
    assert got == [(0, 4), (4, 4), (8, 3)]
    cap, info = D.open_video(tmp_path / "v.mp4")
    assert sum(len(f) for _, f in D.iter_frame_batches(cap, info, 4, max_frames=6)) == 6


def test_gallery_folder_errors(tmp_path):
    with pytest.raises(D.GalleryError, match="not found"):
        D.scan_gallery(tmp_path / "nope")
    (tmp_path / "g").mkdir()
    with pytest.raises(D.GalleryError, match="holds no images"):
        D.scan_gallery(tmp_path / "g")
    (tmp_path / "g" / "Alice").mkdir()
    (tmp_path / "g" / "Alice" / "notes.txt").write_text("no pictures here")
    with pytest.raises(D.GalleryError, match="holds no images"):
        D.scan_gallery(tmp_path / "g")
    (tmp_path / "g" / "Alice" / "a.jpg").write_bytes(b"x")
    (tmp_path / "g" / "Bob.png").write_bytes(b"x")
    assert [(i, p.name) for i, p in D.scan_gallery(tmp_path / "g")] == [("Alice", "a.jpg"), ("Bob", "Bob.png")]


@pytest.fixture(scope="module")
def detector():
    return D.make_detector(D.DemoConfig(device="cpu"))


class _NoEmbedder:
    input_kind = "source"

    def embed(self, faces):
        raise AssertionError("nothing should reach the embedder")


def test_gallery_photo_without_face_or_corrupt_is_an_error(tmp_path, detector):
    rng = np.random.default_rng(0)
    g = tmp_path / "g"
    (g / "Nobody").mkdir(parents=True)
    cv2.imwrite(str(g / "Nobody" / "wall.png"), np.full((120, 120, 3), 128, np.uint8)
                + rng.integers(0, 8, (120, 120, 3), dtype=np.uint8))
    with pytest.raises(D.GalleryError, match=r"wall\.png: no face detected"):
        D.load_gallery(g, detector, _NoEmbedder())
    # skip mode drops the photograph, but an identity left without any photograph is still an error
    with pytest.raises(D.GalleryError, match="without any usable face photograph"):
        D.load_gallery(g, detector, _NoEmbedder(), on_no_face="skip")
    bad = tmp_path / "bad"
    write_bad_inputs(bad / "X")
    for f in ("gray.png", "cmyk.jpg", "gray16.png", "rgba.png", "notes.txt", "zero.jpg", "text.jpg"):
        (bad / "X" / f).unlink()
    with pytest.raises(D.GalleryError, match=r"corrupt\.jpg: .*unreadable"):
        D.load_gallery(bad, detector, _NoEmbedder())


def test_cli_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    assert D.cli_main([str(tmp_path / "missing.mp4"), str(tmp_path), str(tmp_path / "out"), "--threshold", "0.9",
                       "--no-progress"]) == 2
    assert "video not found" in capsys.readouterr().err
    video = _write_video(tmp_path / "v.mp4")
    (tmp_path / "empty_gallery").mkdir()
    assert D.cli_main([str(video), str(tmp_path / "empty_gallery"), str(tmp_path / "out"), "--threshold", "0.9",
                       "--no-progress"]) == 2
    assert "holds no images" in capsys.readouterr().err
    # through the package's command dispatcher too
    res = subprocess.run([sys.executable, "-m", "maskface.cli", "demo", str(tmp_path / "corrupt.mp4"),
                          str(tmp_path), str(tmp_path / "o"), "--threshold", "0.9"], capture_output=True, text=True)
    assert res.returncode == 2 and "video not found" in res.stderr


def test_threshold_at_far_accepts_at_most_far():
    imp = np.linspace(0.0, 0.999, 1000).astype(np.float32)     # scores are float32
    t = D.threshold_at_far_scores(imp, 1e-2)
    assert (imp >= t).sum() == 10 and (imp.astype(np.float64) >= t).sum() == 10
    assert t == np.float32(t) and np.nextafter(np.float32(t), np.float32(-1)) == np.sort(imp)[-11]  # just above
    assert (imp >= D.threshold_at_far_scores(imp, 0.0)).sum() == 0
    assert (imp >= D.threshold_at_far_scores(imp, 0.5)).mean() == 0.5


def test_built_in_threshold_only_for_the_settings_it_was_measured_with():
    class Emb:
        name, flip, num_jitters = "dlib-resnet", False, 0
    assert D.resolve_threshold(None, Emb())[0] == D.DLIB_RESNET_THRESHOLD
    assert D.resolve_threshold(0.5, Emb()) == (0.5, {"kind": "config"})
    Emb.flip = True
    with pytest.raises(D.DemoError, match="no threshold"):
        D.resolve_threshold(None, Emb())


def _lfw_trained_checkpoint(path: Path, fold: int, validation: str = "next_fold", dataset: str = "lfw") -> dict:
    """dlib's network saved as a model fine-tuned on ``dataset`` under LFW's unrestricted protocol for ``fold``
    (the meta maskface.train writes; the weights are dlib's own, which is all the demo's checks read)."""
    from maskface.chipcache import save_chip_model
    from maskface.dlibnet import DlibResnet

    net = DlibResnet.from_dlib_file(None)
    save_chip_model(path, net, {"mean": net.input_mean.tolist(), "std": [256.0] * 3},
                    {"protocol": "lfw_unrestricted", "fold": fold, "validation": validation, "datasets": [dataset]},
                    eval={"mean_subtraction": True, "metric": "cosine"})
    return {"name": "ft", "embedder": "dlib-resnet", "checkpoint": str(path)}


def test_a_model_fine_tuned_on_lfw_meets_only_people_it_never_trained_on(tmp_path):
    """model_held_out reads the folds a fine-tune never trained on from its meta (test fold + validation fold,
    the last fold wrapping to the first); check_never_trained_on stops on anyone else, naming the key."""
    from maskface.datasets import parse_pairs

    lines = ["3\t1"]
    for k in (1, 2, 3):     # fold k: people Ak, Bk (matched pair of Ak, mismatched Ak-Bk)
        lines += [f"A{k}\t1\t2", f"A{k}\t1\tB{k}\t1"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs = parse_pairs(tmp_path / "pairs.txt")
    assert D.fold_people(pairs, [1, 3]) == {"A1", "B1", "A3", "B3"}
    ft = _lfw_trained_checkpoint(tmp_path / "ft.pt", fold=3)
    assert D.model_held_out(ft, "lfw", pairs) == [3, 1]                       # wraps to fold 1
    assert D.model_held_out(ft, "other", pairs) is None                       # trained on another set's people
    assert D.model_held_out({"embedder": "dlib-resnet"}, "lfw", pairs) is None
    one = _lfw_trained_checkpoint(tmp_path / "one.pt", fold=2, validation="none")
    assert D.model_held_out(one, "lfw", pairs) == [2]
    D.check_never_trained_on(ft, "lfw", pairs, ["A3", "B1"], "test video's people", "demo.video_folds")
    D.check_never_trained_on({"embedder": "dlib-resnet"}, "lfw", pairs, ["A2"], "people", "demo.video_folds")
    D.check_evaluation_threshold({"embedder": "dlib-resnet"}, "lfw", pairs)
    with pytest.raises(D.DemoError, match=r"threshold_from evaluation.*calibration_folds: \[1\]"):
        D.check_evaluation_threshold(ft, "lfw", pairs)
    with pytest.raises(D.DemoError, match=r"trained on the lfw people outside folds \[3, 1\]; 2 of the 3 test "
                                          r"video's people .*Set demo.video_folds"):
        D.check_never_trained_on(ft, "lfw", pairs, ["A3", "A2", "Nobody"], "test video's people",
                                 "demo.video_folds")


@pytest.mark.slow
def test_snakemake_demo_calibrates_a_fine_tuned_model_on_its_held_out_people(lfw, tmp_path):
    """`snakemake demo_threshold` with a model fine-tuned on LFW: calibrating on every LFW person stops with the
    key to set; demo.calibration_folds [its validation fold] calibrates on that fold's people only. The demo
    on a test video of people it trained on stops likewise; demo.video_folds [its test fold] runs."""
    from conftest import snakemake_run
    from maskface.datasets import parse_pairs

    model = _lfw_trained_checkpoint(tmp_path / "ft.pt", fold=1)
    cfg = {"datasets": {"lfw": {"source": str(lfw), "format": "lfw", "role": "test", "md5": None,
                                "images_subdir": "images_deepfunneled", "pairs": str(lfw / "pairs.txt")}},
           "train": {"max_cpu_hours": 10 ** 6},
           "evaluate": {"models": {"ft": {k: v for k, v in model.items() if k != "name"}}},
           "demo": {"model": "ft", "calibration_people": 12, "device": "cpu"}}
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    res = snakemake_run(tmp_path, "demo_threshold", "--configfile", str(tmp_path / "config.yaml"), check=False)
    log = (tmp_path / "results/logs/demo/threshold.log").read_text()
    assert res.returncode != 0 and "Set demo.calibration_folds to folds it never trained on" in log, log[-2000:]
    cfg["demo"]["calibration_folds"] = [2]
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    snakemake_run(tmp_path, "demo_threshold", "--configfile", str(tmp_path / "config.yaml"))
    doc = json.loads((tmp_path / "results/demo/threshold.json").read_text())
    assert doc["folds"] == [2] and doc["people"] >= 10 and doc["n_impostor"] == doc["people"] * (doc["people"] - 1) // 2
    assert -1 <= doc["threshold"] <= 1
    fold2 = D.fold_people(parse_pairs(lfw / "pairs.txt"), [2])
    assert len(doc["drawn"]) == 12 and set(doc["drawn"]) <= fold2 and len(fold2) > 12
    # the demo on the test video (a fixed threshold: no threshold job): its people must be of fold 1
    cfg["demo"].update(threshold=0.5, test_video={k: SMALL[k] for k in SMALL if k != "masked_fraction"} | {"seconds": 1})
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    res = snakemake_run(tmp_path, "demo", "--configfile", str(tmp_path / "config.yaml"), check=False)
    log = (tmp_path / "results/logs/demo/run.log").read_text()
    assert res.returncode != 0 and "test video's people are among them" in log and "Set demo.video_folds" in log, log[-2000:]
    cfg["demo"]["video_folds"] = [1]
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    snakemake_run(tmp_path, "demo", "--configfile", str(tmp_path / "config.yaml"))
    spec = json.loads((tmp_path / "results/demo/testvideo/spec.json").read_text())
    assert set(spec["known"]) | set(spec["unknown"]) <= D.fold_people(parse_pairs(lfw / "pairs.txt"), [1])
    assert json.loads((tmp_path / "results/demo/run/metrics.json").read_text())
    assert "demo detector: device cpu (" in (tmp_path / "results/logs/demo/run.log").read_text()


def test_threshold_from_evaluation_features(tmp_path):
    from maskface.features import features_frame, write_features
    rng = np.random.default_rng(0)
    ids = [f"P{i}/P{i}_{j}.jpg" for i in range(40) for j in range(2)]
    base = {f"P{i}": rng.normal(size=16) for i in range(40)}
    feats = np.stack([base[i.split("/")[0]] + 0.3 * rng.normal(size=16) for i in ids])
    write_features(features_frame(ids, "clean", feats), tmp_path / "f.parquet")
    same = [(f"P{i}/P{i}_0.jpg", f"P{i}/P{i}_1.jpg", True) for i in range(40)]
    diff = [(f"P{i}/P{i}_0.jpg", f"P{k}/P{k}_1.jpg", False) for i in range(40) for k in range(40) if k != i]
    pairs = pd.DataFrame(same + diff, columns=["a", "b", "same"])
    r = D.threshold_at_far(tmp_path / "f.parquet", pairs, 0.01)
    assert r["n_impostor"] == 1560 and r["far_achieved"] <= 0.01 and r["tar"] > 0.8


def test_settings_from_the_config_section():
    cfg = D.DemoConfig.from_mapping({"det_thresholds": [0.5, 0.6, 0.7], "threads": 2, "far": 1e-3},
                                    threshold=0.9, device=None)
    assert cfg.det_thresholds == (0.5, 0.6, 0.7) and cfg.threshold == 0.9 and cfg.device == "auto"
    assert "device" not in cfg.result_params() and cfg.result_params()["det_thresholds"] == [0.5, 0.6, 0.7]
    with pytest.raises(ValueError, match="gallery_no_face"):
        D.DemoConfig.from_mapping({"gallery_no_face": "ignore"})
    assert VideoSpec.from_mapping({"seconds": 2, "mask_wear": None}, strict=True).mask_wear is None
    with pytest.raises(ValueError, match="unknown settings"):
        VideoSpec.from_mapping({"seconds": 2, "colour": "red"}, strict=True)


def test_test_video_plan_alternates_known_unknown_and_masks():
    people = {f"P{i:02d}": [f"P{i:02d}/P{i:02d}_{j}.jpg" for j in range(8 if i < 5 else 1)] for i in range(20)}
    spec = VideoSpec(seconds=12, appearance_s=1.0, fps=8, n_known=3, n_unknown=3)
    known, unknown, gallery, apps = plan_appearances(spec, people, np.random.default_rng(0), masks_on=True)
    assert set(known) <= {f"P{i:02d}" for i in range(5)} and not set(known) & set(unknown)
    assert all(len(v) == 1 and v[0].startswith(k) for k, v in gallery.items())
    ka = [a for a in apps if a["known"]]
    assert abs(len(ka) - len(apps) / 2) <= 1
    for p in known:   # every gallery person is seen both masked and clean
        assert {a["masked"] for a in ka if a["identity"] == p} == {True, False}
    assert abs(sum(a["masked"] for a in apps) - len(apps) / 2) <= 2
    with pytest.raises(ValueError, match="does not fit"):
        VideoSpec(tile=200).validate()


def test_snakemake_demo_dry_run_and_not_in_all(tmp_path):
    data = tmp_path / "data"
    (data / "imgs" / "A").mkdir(parents=True)
    cv2.imwrite(str(data / "imgs" / "A" / "A_0001.jpg"), np.zeros((20, 20, 3), np.uint8))
    (data / "pairs.txt").write_text("1\t1\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text(json.dumps(
        {"datasets": {"tiny": {"source": str(data), "format": "lfw", "pairs": str(data / "pairs.txt")}},
         "train": {"max_cpu_hours": 10 ** 6}}))       # a dry run: the default SphereFace-20 runs are only planned
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "1", "-n"]
    res = subprocess.run(base + ["demo"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for rule in ("demo_test_video", "demo_threshold", "demo_run"):
        assert rule in res.stdout
    res = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "demo_run" not in res.stdout
    for over, ok in (({"threshold": 0.9}, True), ({"threshold": 3}, False),
                     ({"video_folds": [1], "calibration_folds": [1]}, True), ({"video_folds": [0]}, False)):
        thr = over.get("threshold")
        (work / "over.yaml").write_text(json.dumps({"demo": over}))
        res = subprocess.run(base + ["demo", "--configfile", str(work / "config.yaml"), str(work / "over.yaml")],
                             capture_output=True, text=True, timeout=300)
        if ok:   # a configured threshold: no threshold job
            assert res.returncode == 0 and ("demo_threshold" in res.stdout) == (thr is None), res.stderr[-2000:]
        elif thr is not None:    # out of [-1, 1]: stopped by the schema, naming the key
            assert res.returncode != 0 and "demo.threshold: 3 is greater than the maximum of 1" in res.stdout + res.stderr
        else:    # folds count from 1
            assert res.returncode != 0 and "demo.video_folds" in res.stdout + res.stderr


# ------------------------------------------------------------------------------------------- real LFW

SMALL = dict(n_known=3, n_unknown=3, width=320, height=240, fps=8, seconds=3, lanes=2, appearance_s=1.5,
             masked_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def small_run(lfw, tmp_path_factory):
    """The small LFW test video, built once, and the demo run on it at DLIB_THRESHOLD."""
    root = tmp_path_factory.mktemp("demo")
    doc = build_test_video(lfw / "images_deepfunneled", root / "tv", SMALL)
    cfg = D.DemoConfig(threshold=DLIB_THRESHOLD, device="cpu", snapshots=2)
    summary = D.run_demo(root / "tv" / "video.mp4", root / "tv" / "gallery", root / "out", cfg, progress=False)
    det = pd.read_parquet(root / "out" / "detections.parquet")
    gt = pd.read_parquet(root / "tv" / "ground_truth.parquet")
    return root, doc, summary, det, gt, open_set_metrics(det, gt, DLIB_THRESHOLD)


def test_test_video_and_ground_truth(small_run, lfw):
    root, doc, _, _, gt, _ = small_run
    cap, info = D.open_video(root / "tv" / "video.mp4")
    cap.release()
    assert (info.width, info.height, info.fps) == (320, 240, 8.0)
    assert doc["n_frames"] == 24 and len(gt) == 48 and set(gt["frame"]) == set(range(24))
    assert gt["known"].any() and (~gt["known"]).any()
    gallery_files = {f for fs in doc["gallery"].values() for f in fs}
    assert not gallery_files & set(gt["image_id"])          # probes are other photographs than the gallery's
    assert set(gt.loc[gt["known"], "identity"]) <= set(doc["known"])
    assert not set(gt.loc[~gt["known"], "identity"]) & set(doc["known"])
    for p, fs in doc["gallery"].items():
        assert (root / "tv" / "gallery" / p / Path(fs[0]).name).read_bytes() == (lfw / "images_deepfunneled" / fs[0]).read_bytes()
    x1, y1, x2, y2 = np.stack(gt["bbox"]).T
    assert (x2 > x1).all() and (y2 > y1).all() and (x1 > -5).all() and (x2 < 325).all()


def test_test_video_people_from_chosen_folds(lfw, tmp_path):
    """only_people (demo.video_folds): gallery and unknown people are all of the given folds' people."""
    from maskface.datasets import parse_pairs

    fold1 = D.fold_people(parse_pairs(lfw / "pairs.txt"), [1])
    doc = build_test_video(lfw / "images_deepfunneled", tmp_path / "tv", {**SMALL, "seconds": 1},
                           only_people=fold1, people_note="the people of pairs.txt folds [1]")
    assert set(doc["known"]) | set(doc["unknown"]) <= fold1 and len(doc["known"]) == 3
    assert doc["people_from"] == "the people of pairs.txt folds [1]"
    gt = pd.read_parquet(tmp_path / "tv" / "ground_truth.parquet")
    assert set(gt["identity"]) <= fold1


def test_demo_outputs(small_run):
    root, doc, summary, det, gt, _ = small_run
    out = root / "out"
    for f in ("annotated.mp4", "detections.parquet", "detections.csv", "summary.json", "snapshot.png"):
        assert (out / f).is_file(), f
    cap, info = D.open_video(out / "annotated.mp4")
    assert (info.width, info.height) == (320, 240)
    assert sum(len(f) for _, f in D.iter_frame_batches(cap, info, 8)) == 24
    assert list(det.columns) == D.DET_COLUMNS
    assert set(det["identity"]) <= set(doc["known"]) | {D.UNKNOWN}
    assert (det["known"] == (det["score"] >= DLIB_THRESHOLD)).all()
    csv = pd.read_csv(out / "detections.csv")
    assert len(csv) == len(det)
    assert summary["frames"] == 24 and summary["fps"] > 0 and len(summary["snapshots"]) == 2
    snap = cv2.imread(str(out / "snapshot.png"))
    assert snap.shape == (240, 320, 3)
    # the snapshot shows the identity colours of the faces known in it
    best = min(summary["snapshots"])
    frame = int(best.split("_")[1].split(".")[0])
    for name in set(det.loc[(det["frame"] == frame) & det["known"], "identity"]):
        col = np.array(D.colour_for(name))
        assert (np.abs(cv2.imread(str(out / best)).astype(int) - col).sum(axis=2) == 0).sum() > 20


def test_open_set_rates_on_clean_probes(small_run):
    *_, res = small_run
    clean = res["at_threshold"]["clean"]
    assert clean["known_faces"] >= 10 and clean["unknown_faces"] >= 10
    assert clean["known_detected"] >= 0.9
    assert clean["dir"] >= 0.6, res["at_threshold"]
    assert clean["far"] <= 0.2, res["at_threshold"]


def test_open_set_rates_on_masked_probes(small_run):
    _, doc, *_, res = small_run
    if not doc["masks_available"]:
        pytest.skip(f"masked probes not built: {doc['masks_reason']}")
    masked = res["at_threshold"]["masked"]
    assert masked["known_faces"] >= 5 and masked["unknown_faces"] >= 5
    # masks cost detection and recognition: dlib-resnet never saw a mask and its scores for masked faces
    # bunch up just below the LFW FAR-1e-3 threshold (see the report), so DIR at that threshold is not
    # bounded here; but a masked gallery person is still found and ranked first most of the time, and
    # masked strangers are not taken for someone
    assert masked["known_detected"] >= 0.5, res["at_threshold"]
    assert masked["rank1"] >= 0.5, res["at_threshold"]
    assert masked["far"] <= 0.3, res["at_threshold"]


def test_masked_probes_are_never_faked(lfw, tmp_path):
    from maskface.imageio import load_rgb

    fn = wearing_masker()
    rgb = load_rgb(lfw / "images_deepfunneled" / "Tony_Blair" / "Tony_Blair_0002.jpg")
    assert not np.array_equal(fn(rgb, 0, "Tony_Blair/Tony_Blair_0002.jpg"), rgb)
    with pytest.raises(MaskFailed):    # nothing to mask: an error, never the photo passed off as masked
        fn(np.full((200, 200, 3), 120, np.uint8), 0, "blank")


def test_masked_gallery(small_run):
    root, doc, *_ = small_run
    det = D.make_detector(D.DemoConfig(device="cpu"))
    emb = D.embedder_from_model({"embedder": "dlib-resnet"}, "cpu")
    clean = D.load_gallery(root / "tv" / "gallery", det, emb)
    masked = D.load_gallery(root / "tv" / "gallery", det, emb, masked=True)
    assert masked.names == clean.names == sorted(doc["known"])
    cos = (clean.embeddings * masked.embeddings).sum(1)
    assert (cos < 0.999).all() and (cos > 0.5).all()       # a different picture of the same face


def test_sphereface_checkpoint_runs_on_aligned_crops(small_run, tmp_path):
    """The aligned-input path: an (untrained) SphereFace-4 model file; crops aligned from the frames."""
    from maskface.models import save_model, sphereface_net
    root, doc, *_ = small_run
    save_model(tmp_path / "model.pt", sphereface_net(depth=4, width=0.125, feature_dim=16))
    emb = D.embedder_from_model({"embedder": "sphereface", "checkpoint": str(tmp_path / "model.pt")}, "cpu")
    assert emb.input_kind == "aligned"
    faces = D.face_inputs(emb, np.zeros((240, 320, 3), np.uint8), np.array([[100, 60, 180, 160, 1.0]]),
                          np.array([[[125, 100], [155, 100], [140, 118], [128, 135], [152, 135]]], float))
    assert faces[0].image.shape == (112, 96, 3)
    with pytest.raises(D.DemoError, match="no threshold"):
        D.run_demo(root / "tv" / "video.mp4", root / "tv" / "gallery", tmp_path / "out", D.DemoConfig(device="cpu"),
                   embedder=emb, progress=False)
    s = D.run_demo(root / "tv" / "video.mp4", root / "tv" / "gallery", tmp_path / "out",
                   D.DemoConfig(threshold=0.5, device="cpu", max_frames=4), embedder=emb, progress=False)
    assert s["frames"] == 4 and s["faces"] >= 4 and s["embedder"]["name"] == "sphereface"
