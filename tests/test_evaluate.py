"""LFW 10-fold protocol (evaluation.m), ROC / AUC / TAR@FAR, angular Fisher score, identification, writers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maskface.evaluate import (FeatureTable, ProtocolSettings, accuracy_at, angular_fisher_score, auc,
                               best_threshold, evaluate_identification_features, evaluate_lfw_features,
                               identification, identification_split, lfw_protocols, markdown_table,
                               metrics_markdown, model_group, open_set_metrics, plot_roc, roc_curve, roc_summary,
                               summarize, tar_at_far, verify_10fold)


def _layout(per_fold: int = 600, n_folds: int = 10):
    """LFW's layout: consecutive folds, each half genuine then half impostor."""
    fold = np.repeat(np.arange(1, n_folds + 1), per_fold)
    same = np.tile(np.r_[np.ones(per_fold // 2, bool), np.zeros(per_fold // 2, bool)], n_folds)
    return fold, same


def _angle_pairs(cosines):
    """2-d unit feature pairs whose cosine is exactly the given value (a = e1, b = (c, sqrt(1 - c^2)))."""
    c = np.asarray(cosines, dtype=np.float64)
    fa = np.stack([np.ones_like(c), np.zeros_like(c)], 1)
    fb = np.stack([c, np.sqrt(1.0 - c ** 2)], 1)
    return fa, fb


def matlab_reference(fa, fb, same, fold, mean_subtraction=True, thr_num=10000):
    """A literal transcription of sphereface test/code/evaluation.m (loops, direct centring, O(T n))."""
    accs, thrs = [], []
    thresholds = np.arange(-thr_num, thr_num + 1) / thr_num
    for k in np.unique(fold):
        val, test = fold != k, fold == k
        L, R = fa.copy(), fb.copy()
        if mean_subtraction:
            mu = np.concatenate([L[val], R[val]]).mean(0)
            L, R = L - mu, R - mu
        L = L / np.sqrt((L ** 2).sum(1, keepdims=True))
        R = R / np.sqrt((R ** 2).sum(1, keepdims=True))
        scores = (L * R).sum(1)

        def get_acc(s, f, t):  # t may be a column of thresholds: one accuracy per row
            t = np.atleast_1d(t)[:, None]
            return (((s[f] > t).sum(1) + (s[~f] < t).sum(1)) / len(s)).squeeze()

        acc = get_acc(scores[val], same[val], thresholds)
        thr = thresholds[acc == acc.max()].mean()
        thrs.append(thr)
        accs.append(get_acc(scores[test], same[test], thr))
    return np.array(accs), np.array(thrs)


# ------------------------------------------------------------------------------------- 10-fold protocol

@pytest.mark.parametrize("mean_subtraction", [True, False])
def test_matches_literal_evaluation_m(mean_subtraction):
    rng = np.random.default_rng(1)
    fold, same = _layout(per_fold=16)
    n, d = len(fold), 6
    base = rng.normal(size=(n, d)) + 0.7  # an offset, so mean subtraction changes the scores
    fa = base + 0.3 * rng.normal(size=(n, d))
    fb = np.where(same[:, None], base + 1.2 * rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.7)
    ref_acc, ref_thr = matlab_reference(fa, fb, same, fold, mean_subtraction)
    res = verify_10fold(fa, fb, same, fold, ProtocolSettings(mean_subtraction=mean_subtraction))
    assert 0.5 < res["mean"] < 1.0  # not a trivial case
    np.testing.assert_allclose(res["fold_accuracy"], ref_acc, atol=1e-12)
    np.testing.assert_allclose(res["threshold"], ref_thr, atol=1e-9)
    assert res["mean"] == pytest.approx(ref_acc.mean())
    assert res["std"] == pytest.approx(ref_acc.std(ddof=1))


def test_separable_scores_give_100_percent():
    fold, same = _layout()
    fa, fb = _angle_pairs(np.where(same, 0.8, -0.2))
    res = verify_10fold(fa, fb, same, fold, ProtocolSettings(mean_subtraction=False))
    assert res["fold_accuracy"] == [1.0] * 10
    assert res["mean"] == 1.0 and res["std"] == 0.0
    # every threshold strictly between -0.2 and 0.8 is best: their mean is the midpoint
    assert res["threshold"] == pytest.approx([0.3] * 10, abs=1e-4)


def test_known_held_out_accuracy():
    # training folds: genuine 0.9, impostor 0.1 -> threshold 0.5; fold 4: 200 of its 300 genuine pairs at 0.6
    # (right), 100 at 0.4 (wrong); impostors at 0.45 (right) -> (200 + 300) / 600.
    fold, same = _layout()
    c = np.where(same, 0.9, 0.1)
    f4 = fold == 4
    g4 = np.flatnonzero(f4 & same)
    c[g4[:200]], c[g4[200:]] = 0.6, 0.4
    c[f4 & ~same] = 0.45
    fa, fb = _angle_pairs(c)
    res = verify_10fold(fa, fb, same, fold, ProtocolSettings(mean_subtraction=False))
    assert res["threshold"][3] == pytest.approx(0.5, abs=1e-4)
    assert res["fold_accuracy"][3] == pytest.approx(500 / 600)
    # the other folds see fold 4 in training: their threshold must separate 0.6 / 0.45 too -> (0.45, 0.6)
    assert res["fold_accuracy"][0] == 1.0
    assert res["mean"] == pytest.approx((9 + 500 / 600) / 10)


@pytest.mark.parametrize("mean_subtraction", [True, False])
def test_fold_threshold_uses_only_the_other_nine(mean_subtraction):
    rng = np.random.default_rng(2)
    fold, same = _layout(per_fold=40)
    n, d = len(fold), 5
    fa = rng.normal(size=(n, d)) + 0.5
    fb = np.where(same[:, None], fa + rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5)
    st = ProtocolSettings(mean_subtraction=mean_subtraction)
    before = verify_10fold(fa, fb, same, fold, st)
    fa2, fb2 = fa.copy(), fb.copy()
    k = fold == 3
    fa2[k] = rng.normal(size=(k.sum(), d)) * 5 + 3  # scramble fold 3 only
    fb2[k] = rng.normal(size=(k.sum(), d)) * 5 - 3
    after = verify_10fold(fa2, fb2, same, fold, st)
    assert after["threshold"][2] == before["threshold"][2]  # its own threshold: the other nine only
    assert after["fold_accuracy"][2] != before["fold_accuracy"][2]
    # ...while the other folds, which train on fold 3, do see the change
    assert any(a != b for i, (a, b) in enumerate(zip(after["threshold"], before["threshold"])) if i != 2)


def test_ties_take_the_mean_of_the_best_thresholds():
    scores = np.array([0.5, 0.6, -0.2, 0.1])
    same = np.array([True, True, False, False])
    grid = np.arange(-10000, 10001) / 10000
    # best accuracy for every t in (0.1, 0.5): thresholds 0.1001 .. 0.4999, mean 0.3
    assert best_threshold(scores, same, grid) == pytest.approx(0.3, abs=1e-12)
    # two disjoint optimal plateaus: MATLAB's mean falls between them
    scores = np.array([0.0, 0.9, -0.9, 0.5])
    same = np.array([True, True, False, False])
    grid = np.array([-0.7, -0.25, 0.25, 0.7])  # 3 right at -0.7, -0.25 and 0.7; 2 at 0.25
    assert best_threshold(scores, same, grid) == pytest.approx((-0.7 - 0.25 + 0.7) / 3)


def test_score_equal_to_threshold_is_an_error_both_ways():
    assert accuracy_at(np.array([0.5]), np.array([True]), 0.5) == 0.0
    assert accuracy_at(np.array([0.5]), np.array([False]), 0.5) == 0.0
    assert accuracy_at(np.array([0.5, 0.4]), np.array([True, False]), 0.45) == 1.0


def test_euclidean_threshold_in_distance_units():
    fold, same = _layout()
    rng = np.random.default_rng(3)
    dist = np.where(same, 0.3, 0.9)
    fa = rng.normal(size=(len(fold), 4))
    direction = rng.normal(size=(len(fold), 4))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    fb = fa + dist[:, None] * direction
    st = ProtocolSettings(mean_subtraction=False, metric="euclidean")
    res = verify_10fold(fa, fb, same, fold, st)
    assert res["mean"] == 1.0
    assert res["threshold"] == pytest.approx([0.6] * 10, abs=1e-3)  # midpoint of 0.3 and 0.9, a distance
    # mean subtraction does not change raw Euclidean distances
    res2 = verify_10fold(fa, fb, same, fold, ProtocolSettings(mean_subtraction=True, metric="euclidean"))
    np.testing.assert_allclose(res2["scores"], res["scores"], atol=1e-9)


def test_euclidean_grid_comes_from_training_folds_only():
    fold, same = _layout(per_fold=20)
    rng = np.random.default_rng(4)
    fa = rng.normal(size=(len(fold), 3))
    fb = np.where(same[:, None], fa + 0.2 * rng.normal(size=fa.shape), rng.normal(size=fa.shape))
    st = ProtocolSettings(mean_subtraction=False, metric="euclidean")
    before = verify_10fold(fa, fb, same, fold, st)
    fb2 = fb.copy()
    fb2[(fold == 5) & ~same] += 100.0  # an extreme distance in fold 5 would stretch a grid that peeked at it
    after = verify_10fold(fa, fb2, same, fold, st)
    assert after["threshold"][4] == before["threshold"][4]
    assert after["threshold"][0] != before["threshold"][0]


def test_missing_features_count_as_errors():
    fold, same = _layout()
    fa, fb = _angle_pairs(np.where(same, 0.8, -0.2))
    fa[0] = np.nan  # a genuine pair of fold 1
    fb[450] = np.nan  # an impostor pair of fold 1
    res = verify_10fold(fa, fb, same, fold, ProtocolSettings())
    assert res["n_missing"] == 2
    assert res["fold_accuracy"][0] == pytest.approx(598 / 600)
    assert res["fold_accuracy"][1:] == [1.0] * 9


def test_settings_validation():
    with pytest.raises(ValueError):
        ProtocolSettings(metric="manhattan")
    with pytest.raises(ValueError):
        ProtocolSettings(n_thresholds=20000)
    with pytest.raises(ValueError):
        ProtocolSettings(metric="cosine", normalize=False)
    assert ProtocolSettings.from_dict({"metric": "euclidean", "mean_subtraction": False}).l2 is False


# ----------------------------------------------------------------------------------------- ROC and AUC

@pytest.mark.parametrize("round_to", [None, 1])
def test_roc_matches_sklearn(round_to):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    same = rng.random(3000) < 0.5
    scores = rng.normal(size=3000) + 1.2 * same
    if round_to is not None:
        scores = np.round(scores, round_to)  # many ties
    fpr, tpr, thr = roc_curve(scores, same)
    f2, t2, th2 = sk.roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert auc(fpr, tpr) == pytest.approx(sk.roc_auc_score(same, scores), abs=1e-12)
    # TAR@FAR: the best TPR with FPR <= FAR, checked against sklearn's curve
    for far in (1e-2, 1e-3, 0.1):
        assert tar_at_far(fpr, tpr, far) == pytest.approx(t2[f2 <= far].max())


def test_tar_at_far_known_values():
    # 1000 impostors: the 10 highest above every genuine score but one -> TAR@1e-2 = all genuine
    same = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    scores = np.r_[np.linspace(0.5, 0.9, 100), np.linspace(-1, 0.4, 990), np.full(10, 0.95)]
    s = roc_summary(scores, same)
    assert s["tar_at_far"]["1e-2"] == 1.0
    assert s["tar_at_far"]["1e-3"] == 0.0  # one accepted impostor is FAR 1e-3; the 10 tie above all genuine
    assert s["auc"] == pytest.approx(0.99)


# ------------------------------------------------------------------------------------- Fisher score

def test_angular_fisher_score():
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)
    assert angular_fisher_score(x, ["a", "a", "b", "b"]) == pytest.approx(0.0)
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 20)
    tight = centers[labels] + 0.1 * rng.normal(size=(100, 16))
    loose = centers[labels] + 1.0 * rng.normal(size=(100, 16))
    assert angular_fisher_score(tight, labels) < angular_fisher_score(loose, labels)

    def reference(x, y):
        m = x.mean(0)
        cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
        sw = sb = 0.0
        for c in np.unique(y):
            xc = x[y == c]
            mc = xc.mean(0)
            sw += sum(1 - cos(v, mc) for v in xc)
            sb += len(xc) * (1 - cos(mc, m))
        return sw / sb

    assert angular_fisher_score(loose, labels) == pytest.approx(reference(loose, labels))


# ----------------------------------------------------------------------------------- identification

def _id_features(n_ids=30, per_id=4, d=32, seed=7, masked_noise=None):
    rng = np.random.default_rng(seed)
    ids, rows = [], []
    centers = rng.normal(size=(n_ids, d))
    for k in range(n_ids):
        for j in range(per_id):
            ids.append(f"person_{k:03d}/img_{j}.jpg")
            rows.append(centers[k] + 0.2 * rng.normal(size=d))
    x = np.array(rows)
    variants = ["clean"] * len(ids)
    all_ids = list(ids)
    if masked_noise is not None:
        xm = x + masked_noise * rng.normal(size=x.shape)
        x = np.concatenate([x, xm])
        all_ids = ids + ids
        variants += ["masked"] * len(ids)
    return ids, FeatureTable(all_ids, variants, x)


def test_identification_split_takes_first_image_as_gallery():
    g, p = identification_split(["b/2.jpg", "a/1.jpg", "b/1.jpg", "a/3.jpg", "c/9.jpg", "a/2.jpg"])
    assert g == ["a/1.jpg", "b/1.jpg", "c/9.jpg"]
    assert sorted(p) == ["a/2.jpg", "a/3.jpg", "b/2.jpg"]


def test_identification_metrics():
    ids, table = _id_features(masked_noise=3.0)
    st = ProtocolSettings(mean_subtraction=False)
    res = identification(table, ids, st, n_impostors=5000)
    clean = res["protocols"]["clean"]
    assert res["n_identities"] == 30 and res["n_probes"] == 90
    assert clean["rank1"] == 1.0 and clean["rank5"] == 1.0
    assert clean["n_genuine"] == 30 * 6
    assert clean["auc"] > 0.999
    masked = res["protocols"]["masked"]
    assert masked["rank1"] < clean["rank1"]
    assert masked["rank1"] <= masked["rank5"]
    assert set(res) == {"n_identities", "n_probes", "protocols"}  # aggregates only: nothing names an image
    # one probe moved onto another identity's centre: exactly one rank-1 miss
    x = table.matrix.copy()
    probe = table.index[("person_000/img_1.jpg", "clean")]
    x[probe] = x[table.index[("person_005/img_0.jpg", "clean")]]
    moved = identification(FeatureTable(table.image_ids, table.variant_of, x), ids, st, probe_variants=["clean"])
    assert moved["protocols"]["clean"]["rank1"] == pytest.approx(89 / 90)


def test_identification_outputs(tmp_path):
    ids, table = _id_features(masked_noise=3.0)
    st = ProtocolSettings(mean_subtraction=False)
    out = {k: str(tmp_path / f"r.{k}") for k in ("json", "md", "png")}
    doc = evaluate_identification_features(table, st, model="m", dataset="d", n_impostors=5000,
                                           out_json=out["json"], out_md=out["md"], out_png=out["png"],
                                           extra={"run": None})
    assert doc["identification"] == identification(table, ids, st, n_impostors=5000)
    assert json.loads(Path(out["json"]).read_text())["identification"]["n_probes"] == 90
    assert Path(out["md"]).read_text().startswith("**m on d: identification (30 identities, 90 probes)**")
    assert Path(out["png"]).stat().st_size > 1000 and not list(tmp_path.glob(".*"))   # no temporary file left


# --------------------------------------------------------------------------- LFW protocols and writers

def _lfw_like(per_fold=60, d=16, seed=8):
    """Pairs over fake identities, features per (image, variant); masked features are noisier."""
    rng = np.random.default_rng(seed)
    fold, same = _layout(per_fold)
    rows, feats = [], {}
    for i, (f, s) in enumerate(zip(fold, same)):
        a = f"p{i}/p{i}_0001.jpg"
        b = f"p{i}/p{i}_0002.jpg" if s else f"q{i}/q{i}_0001.jpg"
        rows.append((f, a, b, s))
        c = rng.normal(size=d)
        feats[a] = c + 0.3 * rng.normal(size=d)
        feats[b] = (c if s else rng.normal(size=d)) + 0.3 * rng.normal(size=d)
    pairs = pd.DataFrame(rows, columns=["fold", "a", "b", "same"])
    ids = list(feats)
    clean = np.array([feats[i] for i in ids])
    masked = clean + 1.5 * rng.normal(size=clean.shape)
    table = FeatureTable(ids + ids, ["clean"] * len(ids) + ["masked"] * len(ids), np.concatenate([clean, masked]))
    return pairs, table


def test_protocols_clean_mixed_masked(tmp_path):
    pairs, table = _lfw_like()
    res = lfw_protocols(table, pairs, ProtocolSettings())
    assert list(res) == ["clean", "mixed", "masked"]
    assert res["clean"]["mean"] > res["mixed"]["mean"] > res["masked"]["mean"]
    only_clean = FeatureTable([i for i, v in zip(table.image_ids, table.variant_of) if v == "clean"],
                              ["clean"] * (len(table.image_ids) // 2), table.matrix[: len(table.image_ids) // 2])
    assert list(lfw_protocols(only_clean, pairs, ProtocolSettings())) == ["clean"]


def test_mixed_probe_is_side_b():
    pairs, table = _lfw_like()
    x = table.matrix.copy()
    b_ids = set(pairs["b"])
    rng = np.random.default_rng(9)
    for k, (i, v) in enumerate(zip(table.image_ids, table.variant_of)):
        if v == "masked" and i not in b_ids:
            x[k] = rng.normal(size=x.shape[1]) * 10  # garbage on masked side-a images: mixed must not see them
    t2 = FeatureTable(table.image_ids, table.variant_of, x)
    assert lfw_protocols(t2, pairs, ProtocolSettings())["mixed"] == lfw_protocols(table, pairs, ProtocolSettings())["mixed"]


def test_outputs_json_markdown_png_and_summary(tmp_path):
    pairs, table = _lfw_like()
    out = tmp_path / "eval" / "sphere20a-run1"
    doc = evaluate_lfw_features(table, pairs, ProtocolSettings(), model="sphere20a-run1", dataset="lfw", run="1",
                                out_json=str(out / "lfw.json"), out_md=str(out / "lfw.md"),
                                out_png=str(out / "lfw_roc.png"))
    saved = json.loads((out / "lfw.json").read_text())
    for proto in ("clean", "mixed", "masked"):
        r = saved["protocols"][proto]
        assert len(r["fold_accuracy"]) == 10 and len(r["threshold"]) == 10
        assert set(r["tar_at_far"]) == {"1e-2", "1e-3"}
        assert 0.0 <= r["auc"] <= 1.0
        assert r["mean"] == pytest.approx(np.mean(r["fold_accuracy"]))
    assert "scores" not in saved["protocols"]["clean"]
    assert saved["angular_fisher_score"]["clean"] > 0
    md = (out / "lfw.md").read_text()
    header = [l for l in md.splitlines() if l.startswith("| protocol | 1 |")][0]
    assert header.count("|") == 13 and header.endswith("| 10 | AVE |")
    clean_row = [l for l in md.splitlines() if l.startswith("| clean | ")][0]
    assert clean_row.split("|")[-2].strip() == f"{100 * doc['protocols']['clean']['mean']:.2f}"
    assert (out / "lfw_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run of the same model and a different model -> mean ± std over the runs
    doc2 = json.loads((out / "lfw.json").read_text())
    doc2["run"] = "2"
    doc2["model"] = "sphere20a-run2"
    for r in doc2["protocols"].values():
        r["mean"] = r["mean"] - 0.02
    p2 = tmp_path / "eval" / "sphere20a-run2" / "lfw.json"
    p2.parent.mkdir(parents=True)
    p2.write_text(json.dumps(doc2))
    text = summarize([out / "lfw.json", p2])
    m1 = doc["protocols"]["clean"]["mean"]
    line = [l for l in text.splitlines() if l.startswith("| sphere20a | lfw | clean |")][0]
    expect_sd = np.std([m1, m1 - 0.02], ddof=1)
    assert f"{100 * (m1 - 0.01):.2f} ± {100 * expect_sd:.2f}" in line
    assert "| 2 |" in line
    assert model_group("sphere20a-run12") == "sphere20a" and model_group("dlib-resnet") == "dlib-resnet"
    # identification results get their own section
    ids, table = _id_features(masked_noise=3.0)
    p3 = tmp_path / "eval" / "dlib-resnet" / "private600.json"
    p3.parent.mkdir(parents=True)
    p3.write_text(json.dumps({"model": "dlib-resnet", "dataset": "private600", "identification":
                              identification(table, ids, ProtocolSettings(mean_subtraction=False))}))
    text = summarize([out / "lfw.json", p2, p3])
    assert "| dlib-resnet |  | private600 | clean | 100.00 | 100.00 |" in text
    assert "| dlib-resnet |  | private600 | masked |" in text


def test_markdown_table_values():
    r = {"fold_accuracy": [0.99] * 9 + [0.98], "mean": 0.989, "std": 0.00316, "auc": 0.999,
         "tar_at_far": {"1e-2": 0.98, "1e-3": 0.9}}
    md = markdown_table({"clean": r})
    assert "| clean | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | 98.00 | 98.90 |" in md


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(10)
    same = rng.random(200) < 0.5
    plot_roc({"clean": (rng.normal(size=200) + same, same)}, tmp_path / "roc.png", title="t")
    assert (tmp_path / "roc.png").stat().st_size > 1000


# ------------------------------------------------------------------ open-set metrics (the demo's video)

def _gt_row(frame, app, ident, known, masked, box):
    return {"frame": frame, "appearance": app, "lane": 0, "identity": ident, "known": known, "masked": masked,
            "image_id": f"{ident}/x.jpg", "bbox": list(map(float, box)), "tile": list(map(float, box))}


def _det_row(frame, box, best, score, thr):
    return {"frame": frame, "time_s": frame / 8, "face": 0, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
            "det_score": 0.99, "identity": best if score >= thr else "unknown", "best_identity": best,
            "score": score, "known": score >= thr}


def test_open_set_metrics_by_hand():
    A, B = (0, 0, 40, 50), (100, 0, 140, 50)
    gt = pd.DataFrame([
        _gt_row(0, 0, "Ann", True, False, A),     # right, accepted            -> identified
        _gt_row(1, 0, "Ann", True, False, A),     # right, below threshold     -> rejected
        _gt_row(2, 1, "Ann", True, True, A),      # wrong name above threshold -> misidentified (masked)
        _gt_row(3, 1, "Ann", True, True, A),      # not detected (masked)
        _gt_row(0, 2, "Zed", False, False, B),    # unknown accepted           -> false alarm
        _gt_row(1, 2, "Zed", False, False, B),    # unknown rejected
        _gt_row(2, 3, "Yan", False, True, B),     # unknown not detected
    ])
    t = 0.8
    det = pd.DataFrame([
        _det_row(0, (2, 1, 41, 52), "Ann", 0.9, t), _det_row(1, A, "Ann", 0.7, t), _det_row(2, A, "Bob", 0.95, t),
        _det_row(0, (101, 0, 139, 49), "Bob", 0.85, t), _det_row(1, B, "Bob", 0.5, t),
        _det_row(3, (200, 200, 240, 250), "Bob", 0.99, t),   # matches no true face
    ])
    r = open_set_metrics(det, gt, t)
    a, c, m = (r["at_threshold"][k] for k in ("all", "clean", "masked"))
    assert a["known_faces"] == 4 and a["dir"] == 0.25 and a["known_detected"] == 0.75 and a["rank1"] == 0.5
    assert a["misidentified"] == 0.25 and a["known_rejected"] == 0.25
    assert a["unknown_faces"] == 3 and a["far"] == pytest.approx(1 / 3)
    assert c["dir"] == 0.5 and c["far"] == 0.5 and m["dir"] == 0.0 and m["far"] == 0.0
    assert r["unmatched_detections"] == 1 and r["unmatched_accepted"] == 1
    sweep = {s["threshold"]: s for s in r["sweep"]}
    assert sweep[0.0]["all_dir"] == 0.5 and sweep[0.0]["all_far"] == pytest.approx(2 / 3)
    assert sweep[1.0]["all_dir"] == 0.0 and sweep[1.0]["all_far"] == 0.0
    assert r["appearances"]["all"]["known_appearances"] == 2
    assert "| clean |" in metrics_markdown(r)
    first2 = open_set_metrics(det, gt, t, frames=2)["at_threshold"]["all"]   # a run cut after 2 frames
    assert first2["known_faces"] == 2 and first2["unknown_faces"] == 2 and first2["dir"] == 0.5


def test_summary_puts_the_models_side_by_side_in_protocol_order(tmp_path):
    def doc(model, accs, auc, tar3, **extra):
        protos = {}
        for name in ("masked", "clean", "mixed"):        # stored out of order, as sorted JSON keys would be
            a = np.array(accs[name])
            protos[name] = {"fold_accuracy": a.tolist(), "mean": float(a.mean()),
                            "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "auc": auc[name],
                            "tar_at_far": {"1e-2": 0.5, "1e-3": tar3[name]}}
        p = tmp_path / model / "lfw.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"model": model, "dataset": "lfw", "settings": {"metric": "cosine"},
                                 "protocols": protos, **extra}))
        return p
    a = doc("dlib-resnet", {"clean": [0.99, 0.98], "mixed": [0.90, 0.88], "masked": [0.84, 0.82]},
            {"clean": 0.9992, "mixed": 0.97, "masked": 0.93}, {"clean": 0.955, "mixed": 0.39, "masked": 0.127})
    b = doc("ft-m50", {"clean": [0.98], "mixed": [0.93], "masked": [0.91]},
            {"clean": 0.9986, "mixed": 0.9855, "masked": 0.9758}, {"clean": 0.93, "mixed": 0.547, "masked": 0.556},
            folds_run=[4], folds_not_run=[1, 2, 3, 5, 6, 7, 8, 9, 10])
    text = summarize([b, a])
    side = text.split("## Side by side")[1].split("##")[0]
    assert "| clean | mixed | masked | AUC clean / mixed / masked | TAR@1e-3 clean / mixed / masked |" in side
    assert ("| dlib-resnet |  | lfw | cosine, mean subtraction on | 98.50 ± 0.71 | 89.00 ± 1.41 | 83.00 ± 1.41 | "
            "0.9992 / 0.9700 / 0.9300 | 95.50 / 39.00 / 12.70 |") in side
    # one fold: no std to show, and the row says which fold it is
    assert ("| ft-m50 | fold 4 only | lfw | cosine, mean subtraction on | 98.00 | 93.00 | 91.00 | "
            "0.9986 / 0.9855 / 0.9758 | 93.00 / 54.70 / 55.60 |") in side
    every = [line.split(" | ")[3] for line in text.split("## Every protocol")[1].splitlines()
             if line.startswith("| dlib-resnet |")]
    assert every == ["clean", "mixed", "masked"]
    assert "Over repeated runs" not in text                    # every model ran once
    # a '|' in a name stays one cell, in the markdown and on the report page; a run number is no trouble
    c = doc("ft|v2", {"clean": [0.97], "mixed": [0.9], "masked": [0.8]}, {"clean": 0.99, "mixed": 0.9, "masked": 0.8},
            {"clean": 0.9, "mixed": 0.5, "masked": 0.4}, run=3)
    text = summarize([a, b, c])
    line = [ln for ln in text.split("## Every protocol")[0].splitlines() if ln.startswith("| ft\\|v2 ")]
    assert len(line) == 1 and line[0].count(" | ") == 8 and "| 3 |" in line[0]
    from maskface.report import markdown_to_html
    assert "<td class=\"\">ft|v2</td>" in markdown_to_html(text) or ">ft|v2</td>" in markdown_to_html(text)
