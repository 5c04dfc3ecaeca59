"""Evaluation: LFW 10-fold verification (SphereFace's evaluation.m), ROC / AUC / TAR@FAR, SphereFace's angular
Fisher score, identification on folder-per-identity sets, the open-set metrics of the demo's test video (DIR /
FAR), and the writers of results (JSON, markdown tables, ROC plot, summary across models and runs).

LFW 10-fold verification (``verify_10fold``), exactly as wy1iu/sphereface ``test/code/evaluation.m``:

* folds are the consecutive blocks of 600 pairs of pairs.txt (here: the ``fold`` column, 1..10);
* for held-out fold k, the mean feature of the other nine folds (over the left *and* right features of their
  5,400 pairs) is subtracted from every feature (``mean_subtraction``; off in most PyTorch ports);
* features are L2-normalised and the score is the cosine ``sum(fL .* fR)``;
* ``getThreshold``: thresholds ``(-10000:10000)/10000`` (20,001 values over [-1, 1]) are tried on the nine
  other folds; the accuracy at threshold t is ``(#{genuine: s > t} + #{impostor: s < t}) / n`` (both strict, so
  a score equal to t is an error either way); the threshold is the *mean* of all thresholds reaching the best
  accuracy (MATLAB ``mean(thresholds(accuracys==max(accuracys)))``) and is applied to fold k (``getAccuracy``);
* the result is the ten per-fold accuracies, their mean and standard deviation (``ddof=1``, as MATLAB's std).

Per-embedder settings (:class:`ProtocolSettings`): ``mean_subtraction`` on/off and ``metric`` ``cosine`` or
``euclidean``. With ``euclidean`` (dlib's descriptor is metric-learned for Euclidean distance, threshold 0.6)
features are *not* normalised (``normalize`` forces it) and the score is ``-distance``, so "greater is more
alike" holds for both metrics; the 20,001 candidate thresholds are ``linspace(min, max)`` of the scores of the
nine training folds (the held-out fold never shapes its grid), and the same fold logic applies. Thresholds
are reported in the metric's own units: a cosine similarity, or a distance (= -score threshold) for euclidean.

The search counts with sorted scores and ``searchsorted`` (exact integer counts, so ties are found exactly),
O(T log n) per fold instead of MATLAB's O(T n): 6,000 pairs evaluate in milliseconds.

A pair whose feature is missing (NaN) is an error whatever the threshold (NaN compares false both ways, as in
MATLAB), counts in the denominator, is excluded from means and from ROC, and is reported as ``n_missing``.

ROC / AUC / TAR@FAR (``roc_curve``, ``auc``, ``tar_at_far``) are computed on the held-out scores: each pair is
scored as it was in its test fold (with that fold's mean subtracted). A pair is accepted when ``score >=
threshold`` (scikit-learn's convention); TAR@FAR is the highest TPR over the ROC points with FPR <= FAR.
On LFW's 3,000 impostor pairs, FAR 1e-3 means at most 3 accepted impostors: a coarse, noisy figure.

Protocols on LFW (``lfw_protocols``): ``clean`` (both faces unmasked), ``mixed`` (pair's ``b`` masked, the
probe; ``a`` clean), ``masked`` (both masked). Features come from a Parquet table with one row per
(``image_id``, ``variant``) where variant is ``clean`` or ``masked`` (see maskface.features).

Open-set metrics of a demo run against a ground truth (:func:`open_set_metrics`; the test video of
:mod:`maskface.testvideo`, the detections of :mod:`maskface.demo`), per face appearance in a frame, split by
clean / masked probes:

* detection-and-identification rate (DIR): share of gallery-person faces that are detected (IoU >= 0.3
  with the true box) and labelled with the right name (best identity right and score >= threshold);
* false-alarm rate (FAR): share of unknown-person faces that are detected and accepted as someone;
* also the detection rate, rank-1 (detected with the right best identity, whatever the score: DIR without
  the threshold), misidentifications (a gallery person accepted as another), detections matching no true
  face, a threshold sweep, and appearance-level rates (majority of an appearance's frames).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .fileio import atomic_path, read_json, write_json, write_text

METRICS = ("cosine", "euclidean")
PROTOCOLS = {  # name -> (variant of pair side a, variant of pair side b)
    "clean": ("clean", "clean"),
    "mixed": ("clean", "masked"),
    "masked": ("masked", "masked"),
}
FARS = (1e-2, 1e-3)
SWEEP = tuple(round(t, 2) for t in np.arange(0.0, 1.0001, 0.01))   # open-set thresholds


def far_key(far: float) -> str:
    """1e-2 -> "1e-2" (the key used in JSON)."""
    exp = int(round(math.log10(far)))
    return f"1e{exp}" if math.isclose(10.0 ** exp, far) else repr(far)


@dataclass(frozen=True)
class ProtocolSettings:
    """How verification scores a pair: the per-embedder part of the protocol.

    ``n_thresholds`` must be odd for cosine: the grid is ``(-K:K)/K`` with ``K = (n_thresholds - 1) / 2``
    (evaluation.m: K = 10000).
    """
    mean_subtraction: bool = True
    metric: str = "cosine"
    normalize: Optional[bool] = None  # None: True for cosine (always), False for euclidean
    n_thresholds: int = 20001
    std_ddof: int = 1

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.n_thresholds < 3 or self.n_thresholds % 2 == 0:
            raise ValueError(f"n_thresholds must be odd and >= 3, got {self.n_thresholds}")
        if self.metric == "cosine" and self.normalize is False:
            raise ValueError("cosine scores are always on L2-normalised features; normalize=False is euclidean-only")

    @property
    def l2(self) -> bool:
        return True if self.metric == "cosine" else bool(self.normalize)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["normalize"] = self.l2
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ProtocolSettings":
        d = dict(d or {})
        known = {k: d[k] for k in ("mean_subtraction", "metric", "normalize", "n_thresholds", "std_ddof") if k in d}
        return cls(**known)


# ------------------------------------------------------------------------------------------ threshold search

def threshold_grid(settings: ProtocolSettings, train_scores: np.ndarray) -> np.ndarray:
    """The candidate thresholds, in score units (score = cosine, or -distance)."""
    if settings.metric == "cosine":
        k = (settings.n_thresholds - 1) // 2
        return np.arange(-k, k + 1, dtype=np.float64) / k  # exactly MATLAB's (-thrNum:thrNum)/thrNum
    finite = train_scores[np.isfinite(train_scores)]
    if finite.size == 0:
        return np.zeros(1)
    return np.linspace(finite.min(), finite.max(), settings.n_thresholds)


def correct_counts(scores: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: #{genuine with s > t} + #{impostor with s < t} (NaN scores never count)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    ok = ~np.isnan(scores)
    pos = np.sort(scores[same & ok])
    neg = np.sort(scores[~same & ok])
    t = np.asarray(thresholds, dtype=np.float64)
    tp = pos.size - np.searchsorted(pos, t, side="right")
    tn = np.searchsorted(neg, t, side="left")
    return tp + tn


def best_threshold(scores: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> float:
    """evaluation.m getThreshold: the mean of every threshold reaching the best accuracy."""
    counts = correct_counts(scores, same, thresholds)
    return float(np.mean(np.asarray(thresholds, dtype=np.float64)[counts == counts.max()]))


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """evaluation.m getAccuracy: (#{genuine: s > t} + #{impostor: s < t}) / n, NaN scores wrong."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if scores.size == 0:
        return float("nan")
    right = np.where(same, scores > threshold, scores < threshold)
    return float(right.sum() / scores.size)


# ----------------------------------------------------------------------------------------------- scoring

def pair_scores(fa: np.ndarray, fb: np.ndarray, metric: str) -> np.ndarray:
    """Score of each row pair: cosine of (already normalised) features, or minus the Euclidean distance."""
    if metric == "cosine":
        return np.einsum("ij,ij->i", fa, fb)
    return -np.linalg.norm(fa - fb, axis=1)


def _to_metric_units(threshold: float, metric: str) -> float:
    return threshold if metric == "cosine" else -threshold


def verify_10fold(fa: np.ndarray, fb: np.ndarray, same: np.ndarray, fold: np.ndarray,
                  settings: ProtocolSettings = ProtocolSettings()) -> dict:
    """LFW 10-fold verification (see the module docstring). ``fa``, ``fb``: (n, d) features of each pair's two
    images (NaN rows = missing); ``same``: bool (n,); ``fold``: fold label per pair (any values; one fold per
    distinct value, in sorted order).

    Returns fold_accuracy, mean, std, threshold (per fold, metric units), folds, n_pairs, n_missing, and the
    held-out ``scores`` (score units) with ``same`` for ROC.
    """
    fa = np.asarray(fa)
    fb = np.asarray(fb)
    same = np.asarray(same, dtype=bool)
    fold = np.asarray(fold)
    if not (fa.shape == fb.shape and fa.ndim == 2 and len(same) == len(fa) == len(fold)):
        raise ValueError(f"shape mismatch: fa {fa.shape}, fb {fb.shape}, same {same.shape}, fold {fold.shape}")
    folds, fold_idx = np.unique(fold, return_inverse=True)
    if len(folds) < 2:
        raise ValueError("need at least two folds (one to pick the threshold, one to test it)")
    # Scores of every pair for every held-out fold from Gram terms: with mu the training folds' mean feature,
    # (a-mu).(b-mu) = a.b - a.mu - b.mu + mu.mu and |a-mu|^2 = a.a - 2 a.mu + mu.mu, so the ten folds cost
    # one (n x d) @ (d x 10) product instead of re-centring and re-normalising 12,000 vectors per fold (same
    # numbers up to rounding: tests compare with a literal transcription of evaluation.m).
    ok_a = np.isfinite(fa).all(axis=1)
    ok_b = np.isfinite(fb).all(axis=1)
    missing = ~(ok_a & ok_b)
    a0 = fa.astype(np.float64, copy=True)
    b0 = fb.astype(np.float64, copy=True)
    a0[~ok_a] = 0.0
    b0[~ok_b] = 0.0
    g_ab = np.einsum("ij,ij->i", a0, b0)
    g_aa = np.einsum("ij,ij->i", a0, a0)
    g_bb = np.einsum("ij,ij->i", b0, b0)
    if settings.mean_subtraction:
        onehot = np.zeros((len(folds), len(fa)))
        onehot[fold_idx, np.arange(len(fa))] = 1.0
        fold_sum = onehot @ a0 + onehot @ b0  # (K, d): sum of the valid features of each fold
        fold_cnt = onehot @ (ok_a.astype(np.float64) + ok_b)
        train_cnt = np.maximum(fold_cnt.sum() - fold_cnt, 1.0)
        mus = (fold_sum.sum(0) - fold_sum) / train_cnt[:, None]  # (K, d): mean of the other folds
        ma, mb = a0 @ mus.T, b0 @ mus.T  # (n, K)
        mm = np.einsum("ij,ij->i", mus, mus)
    held_out = np.full(len(fa), np.nan)
    accs, thrs = [], []
    for j, k in enumerate(folds):
        test = fold_idx == j
        train = ~test
        if settings.mean_subtraction:
            ab = g_ab - ma[:, j] - mb[:, j] + mm[j]
            aa = g_aa - 2.0 * ma[:, j] + mm[j]
            bb = g_bb - 2.0 * mb[:, j] + mm[j]
        else:
            ab, aa, bb = g_ab, g_aa, g_bb
        with np.errstate(invalid="ignore", divide="ignore"):
            if settings.l2:
                cos = ab / np.sqrt(aa * bb)
                s = cos if settings.metric == "cosine" else -np.sqrt(np.maximum(2.0 - 2.0 * cos, 0.0))
            else:
                s = -np.sqrt(np.maximum(aa + bb - 2.0 * ab, 0.0))
        s = np.where(missing, np.nan, s)
        grid = threshold_grid(settings, s[train])
        thr = best_threshold(s[train], same[train], grid)
        accs.append(accuracy_at(s[test], same[test], thr))
        thrs.append(_to_metric_units(thr, settings.metric))
        held_out[test] = s[test]
    accs_arr = np.array(accs)
    return {
        "folds": [f.item() if hasattr(f, "item") else f for f in folds],
        "fold_accuracy": accs_arr.tolist(),
        "mean": float(accs_arr.mean()),
        "std": float(accs_arr.std(ddof=settings.std_ddof)) if len(accs_arr) > settings.std_ddof else 0.0,
        "threshold": thrs,
        "n_pairs": int(len(fa)),
        "n_missing": int(np.isnan(held_out).sum()),
        "scores": held_out,
        "same": same,
    }


# --------------------------------------------------------------------------------------- ROC / AUC / TAR

def roc_curve(scores: np.ndarray, same: np.ndarray):
    """(fpr, tpr, thresholds) like ``sklearn.metrics.roc_curve(same, scores, drop_intermediate=False)``:
    one point per distinct score (descending), a pair accepted when score >= threshold, starting at (0, 0)
    with threshold +inf. NaN scores are dropped."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    ok = ~np.isnan(scores)
    scores, same = scores[ok], same[ok]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both genuine and impostor pairs")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s[last]]
    return fpr, tpr, thr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC by the trapezoidal rule."""
    return float(np.trapezoid(tpr, fpr))


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """Highest TPR (true accept rate) over the ROC points whose FPR (false accept rate) is <= ``far``."""
    ok = fpr <= far + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_summary(scores: np.ndarray, same: np.ndarray, fars: Sequence[float] = FARS) -> dict:
    fpr, tpr, _ = roc_curve(scores, same)
    return {"auc": auc(fpr, tpr), "tar_at_far": {far_key(f): tar_at_far(fpr, tpr, f) for f in fars}}


# -------------------------------------------------------------------------------------- angular Fisher

def angular_fisher_score(features: np.ndarray, labels: Sequence, normalize: bool = False) -> float:
    """SphereFace (Liu et al. 2017) Appendix E: AFS = S_w / S_b (smaller is more discriminative), with
    S_w = sum_i sum_{x in X_i} (1 - cos<x, m_i>), S_b = sum_i n_i (1 - cos<m_i, m>), m_i the mean feature
    of class i, m the mean of all features. ``normalize``: L2-normalise the features first (the paper uses
    the features as they are)."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} features but {len(labels)} labels")
    ok = ~np.isnan(x).any(axis=1)
    x, labels = x[ok], labels[ok]
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    codes, inv = np.unique(labels, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    sums = np.zeros((len(codes), x.shape[1]))
    np.add.at(sums, inv, x)
    means = sums / counts[:, None]
    m = x.mean(axis=0)

    def cos(a, b):
        return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    s_w = float(np.sum(1.0 - cos(x, means[inv])))
    s_b = float(np.sum(counts * (1.0 - cos(means, np.broadcast_to(m, means.shape)))))
    return s_w / s_b if s_b > 0 else float("inf")


# ---------------------------------------------------------------------------------- features and pairs

def identity_of(image_id: str) -> str:
    """The identity of an image_id ``<identity>/<file>`` (folder per identity)."""
    return image_id.rsplit("/", 1)[0]


class FeatureTable:
    """Features by (image_id, variant) from the features Parquet: columns image_id, variant, feature."""

    def __init__(self, image_ids: Sequence[str], variants: Sequence[str], matrix: np.ndarray):
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(image_ids) or len(image_ids) != len(variants):
            raise ValueError(f"features: {len(image_ids)} ids, {len(variants)} variants, matrix {matrix.shape}")
        self.image_ids = list(image_ids)
        self.variant_of = list(variants)
        self.matrix = matrix
        self.index = {(i, v): k for k, (i, v) in enumerate(zip(self.image_ids, self.variant_of))}
        if len(self.index) != len(self.image_ids):
            raise ValueError("features: duplicate (image_id, variant) rows")

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "FeatureTable":
        missing = {"image_id", "variant", "feature"} - set(df.columns)
        if missing:
            raise ValueError(f"features table lacks columns {sorted(missing)}")
        feats = [np.asarray(f, dtype=np.float32) for f in df["feature"]]
        matrix = np.stack(feats) if feats else np.zeros((0, 0), np.float32)
        return cls(df["image_id"].astype(str).tolist(), df["variant"].astype(str).tolist(), matrix)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "FeatureTable":
        """Read the features Parquet (the list column is flattened without a per-row Python loop)."""
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["image_id", "variant", "feature"])
        col = table.column("feature").combine_chunks()
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        matrix = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
        return cls(table.column("image_id").to_pylist(), table.column("variant").to_pylist(), matrix)

    @property
    def variants(self) -> set:
        return set(self.variant_of)

    def lookup(self, image_ids: Sequence[str], variant: str) -> np.ndarray:
        """(n, d) float32 features, a NaN row for an image without a feature of that variant."""
        get = self.index.get
        rows = np.fromiter((get((i, variant), -1) for i in image_ids), dtype=np.int64, count=len(image_ids))
        if len(self.matrix) == 0:
            return np.full((len(image_ids), 0), np.nan, dtype=np.float32)
        out = self.matrix[np.maximum(rows, 0)]
        out[rows < 0] = np.nan
        return out


def lfw_protocols(features: FeatureTable, pairs: pd.DataFrame, settings: ProtocolSettings,
                  protocols: Iterable[str] = tuple(PROTOCOLS), fars: Sequence[float] = FARS,
                  keep_scores: bool = False) -> dict:
    """Run each protocol whose variants exist in ``features`` on ``pairs`` (fold, a, b, same).
    Returns {protocol: result}, each result as :func:`verify_10fold` plus auc and tar_at_far."""
    out = {}
    have = features.variants
    for name in protocols:
        va, vb = PROTOCOLS[name]
        if va not in have or vb not in have:
            continue
        fa = features.lookup(pairs["a"].tolist(), va)
        fb = features.lookup(pairs["b"].tolist(), vb)
        res = verify_10fold(fa, fb, pairs["same"].to_numpy(bool), pairs["fold"].to_numpy(), settings)
        res.update(roc_summary(res["scores"], res["same"], fars))
        if not keep_scores:
            res.pop("scores"), res.pop("same")
        out[name] = res
    return out


# --------------------------------------------------------------------------------------- identification

def identification_split(image_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Gallery: the first image (sorted image_id) of each identity; probes: all the others."""
    by_id: dict[str, list[str]] = {}
    for i in sorted(image_ids):
        by_id.setdefault(identity_of(i), []).append(i)
    gallery = [v[0] for v in by_id.values()]
    probes = [x for v in by_id.values() for x in v[1:]]
    return gallery, probes


def _similarity(q: np.ndarray, g: np.ndarray, settings: ProtocolSettings) -> np.ndarray:
    if settings.l2:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    if settings.metric == "cosine":
        return q @ g.T
    d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
    return -np.sqrt(np.maximum(d2, 0.0))


def rank_accuracy(sim: np.ndarray, truth_col: np.ndarray, ranks: Sequence[int] = (1, 5)) -> dict:
    """Rank-k accuracy: fraction of probes whose true gallery column scores among the k best. A tie with the
    true column counts against it (pessimistic). Probes with a NaN row count as misses."""
    true = sim[np.arange(len(sim)), truth_col]
    better = (sim > true[:, None]).sum(1) + ((sim == true[:, None]).sum(1) - 1)
    better = np.where(np.isnan(true), np.iinfo(np.int64).max, better)
    return {f"rank{k}": float(np.mean(better < k)) if len(sim) else float("nan") for k in ranks}


def identification(features: FeatureTable, image_ids: Sequence[str], settings: ProtocolSettings,
                   probe_variants: Sequence[str] = ("clean", "masked"), ranks: Sequence[int] = (1, 5),
                   n_impostors: int = 200_000, seed: int = 0, fars: Sequence[float] = FARS,
                   chunk: int = 4096, curves: Optional[dict] = None) -> dict:
    """Closed-set identification and verification on a folder-per-identity set (aggregates only: no image or
    identity name is returned, so a private set's results can be shared). ``curves``: a dict to receive
    {variant: (scores, same)} of the verification pairs, for :func:`plot_roc`.

    Gallery: first clean image per identity; probes: the other images, per probe variant. Verification: all
    genuine pairs (same identity, i < j) and ``n_impostors`` sampled impostor pairs (fixed seed); side j
    carries the probe variant, side i is clean (``clean`` variant: both clean).
    """
    gallery, probes = identification_split(image_ids)
    g_ids = [identity_of(i) for i in gallery]
    col = {name: k for k, name in enumerate(g_ids)}
    g = features.lookup(gallery, "clean")
    out: dict[str, Any] = {"n_identities": len(gallery), "n_probes": len(probes), "protocols": {}}
    all_ids = sorted(image_ids)
    labels = np.array([col[identity_of(i)] for i in all_ids])
    rng = np.random.default_rng(seed)
    # genuine pairs: i < j within identity
    starts = np.r_[0, np.flatnonzero(np.diff(labels)) + 1, len(labels)]
    gi, gj = [], []
    for s, e in zip(starts[:-1], starts[1:]):
        if e - s > 1:
            a, b = np.triu_indices(e - s, k=1)
            gi.append(a + s), gj.append(b + s)
    gen_i = np.concatenate(gi) if gi else np.zeros(0, int)
    gen_j = np.concatenate(gj) if gj else np.zeros(0, int)
    imp_i = rng.integers(0, len(all_ids), n_impostors)
    imp_j = rng.integers(0, len(all_ids), n_impostors)
    keep = labels[imp_i] != labels[imp_j]
    imp_i, imp_j = imp_i[keep], imp_j[keep]
    clean_all = features.lookup(all_ids, "clean")
    for variant in probe_variants:
        if variant not in features.variants:
            continue
        q = features.lookup(probes, variant)
        truth = np.array([col[identity_of(p)] for p in probes], dtype=int)
        ranks_acc = {f"rank{k}": 0.0 for k in ranks}
        for s in range(0, len(q), chunk):
            sim = _similarity(q[s:s + chunk], g, settings)
            r = rank_accuracy(sim, truth[s:s + chunk], ranks)
            for k in r:
                ranks_acc[k] += r[k] * len(sim)
        res: dict[str, Any] = {k: (v / len(q) if len(q) else float("nan")) for k, v in ranks_acc.items()}
        res["n_missing_probes"] = int(np.isnan(q).any(axis=1).sum())
        probe_all = clean_all if variant == "clean" else features.lookup(all_ids, variant)
        ii, jj = np.r_[gen_i, imp_i], np.r_[gen_j, imp_j]
        same = np.r_[np.ones(len(gen_i), bool), np.zeros(len(imp_i), bool)]
        ca, pb = clean_all, probe_all
        if settings.l2:
            ca = ca / np.linalg.norm(ca, axis=1, keepdims=True)
            pb = pb / np.linalg.norm(pb, axis=1, keepdims=True)
        scores = np.empty(len(ii))
        step = 32768  # pairs per block: bounded memory for 10^6 pairs of 1024-d features
        for s in range(0, len(ii), step):
            scores[s:s + step] = pair_scores(ca[ii[s:s + step]], pb[jj[s:s + step]], settings.metric)
        res["n_genuine"], res["n_impostor"] = int(len(gen_i)), int(len(imp_i))
        if len(gen_i) and len(imp_i) and np.isfinite(scores).any():
            res.update(roc_summary(scores, same, fars))
            if curves is not None:
                fin = np.isfinite(scores)
                curves[variant] = (scores[fin], same[fin])
        out["protocols"][variant] = res
    return out


# ------------------------------------------------------------------------------- open-set (the demo's video)

def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a (n, 4) and b (m, 4)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: np.clip(z[:, 2] - z[:, 0], 0, None) * np.clip(z[:, 3] - z[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_detections(det: pd.DataFrame, gt: pd.DataFrame, iou_min: float = 0.3) -> pd.DataFrame:
    """Ground truth rows with the matched detection's best_identity, score, iou (greedy by IoU per frame;
    a detection matches at most one true face). Unmatched: NaN score. Adds ``det_index``."""
    gt = gt.reset_index(drop=True).copy()
    gt["det_index"] = -1
    gt["iou"] = 0.0
    gt["best_identity"] = None
    gt["score"] = np.nan
    det = det.reset_index(drop=True)
    dby = {f: g for f, g in det.groupby("frame")}
    for f, g in gt.groupby("frame"):
        d = dby.get(f)
        if d is None or not len(d):
            continue
        gb = np.stack([np.asarray(b, float) for b in g["bbox"]])
        db = d[["x1", "y1", "x2", "y2"]].to_numpy(float)
        m = _iou(gb, db)
        pairs = sorted(((m[i, j], i, j) for i in range(m.shape[0]) for j in range(m.shape[1])
                        if m[i, j] >= iou_min), reverse=True)
        used_g, used_d = set(), set()
        for v, i, j in pairs:
            if i in used_g or j in used_d:
                continue
            used_g.add(i)
            used_d.add(j)
            gi, dj = g.index[i], d.index[j]
            gt.loc[gi, ["det_index", "iou", "best_identity", "score"]] = [int(dj), float(v),
                                                                          det.at[dj, "best_identity"],
                                                                          float(det.at[dj, "score"])]
    gt["det_index"] = gt["det_index"].astype(int)
    return gt


def _rates(m: pd.DataFrame, t: float) -> dict:
    known, unk = m[m["known"]], m[~m["known"]]
    det_k = known["det_index"] >= 0
    acc_k = det_k & (known["score"] >= t)
    rank1 = det_k & (known["best_identity"] == known["identity"])
    right = acc_k & rank1
    det_u = unk["det_index"] >= 0
    fa = det_u & (unk["score"] >= t)
    nk, nu = len(known), len(unk)
    return {
        "known_faces": nk, "dir": float(right.mean()) if nk else None,
        "rank1": float(rank1.mean()) if nk else None,
        "known_detected": float(det_k.mean()) if nk else None,
        "misidentified": float((acc_k & ~right).mean()) if nk else None,
        "known_rejected": float((det_k & ~acc_k).mean()) if nk else None,
        "unknown_faces": nu, "far": float(fa.mean()) if nu else None,
        "unknown_detected": float(det_u.mean()) if nu else None,
    }


def _appearance_rates(m: pd.DataFrame, t: float) -> dict:
    """Per appearance: identified when the right name is given in more than half of its frames; a false
    alarm when an unknown appearance is accepted as someone in more than half of its frames."""
    if "appearance" not in m.columns or not len(m):
        return {}
    mm = m.assign(ok=(m["det_index"] >= 0) & (m["score"] >= t) & (m["best_identity"] == m["identity"]),
                  acc=(m["det_index"] >= 0) & (m["score"] >= t))
    g = mm.groupby("appearance").agg(known=("known", "first"), ok=("ok", "mean"), acc=("acc", "mean"))
    k, u = g[g["known"]], g[~g["known"]]
    return {"known_appearances": int(len(k)), "dir": float((k["ok"] > 0.5).mean()) if len(k) else None,
            "unknown_appearances": int(len(u)), "far": float((u["acc"] > 0.5).mean()) if len(u) else None}


def open_set_metrics(det: pd.DataFrame, gt: pd.DataFrame, threshold: float, *, iou_min: float = 0.3,
                     sweep: Sequence[float] = SWEEP, frames: Optional[int] = None) -> dict:
    """DIR / FAR (and more) at ``threshold`` for all, clean and masked probes; a threshold sweep.
    ``frames``: only the first ``frames`` frames were processed (the ground truth of later ones is ignored)."""
    if frames is not None:
        gt = gt[gt["frame"] < frames]
    m = match_detections(det, gt, iou_min)
    subsets = {"all": m, "clean": m[~m["masked"]], "masked": m[m["masked"]]}
    matched = set(m.loc[m["det_index"] >= 0, "det_index"])
    extra = det.reset_index(drop=True)
    extra = extra[~extra.index.isin(matched)]
    res: dict[str, Any] = {
        "threshold": float(threshold), "iou_min": iou_min,
        "at_threshold": {k: _rates(v, threshold) for k, v in subsets.items()},
        "appearances": {k: _appearance_rates(v, threshold) for k, v in subsets.items()},
        "unmatched_detections": int(len(extra)),
        "unmatched_accepted": int((extra["score"] >= threshold).sum()) if len(extra) else 0,
        "sweep": [{"threshold": float(t), **{f"{k}_{q}": _rates(v, t)[q] for k, v in subsets.items()
                                              for q in ("dir", "far")}} for t in sweep],
    }
    return res


def metrics_markdown(res: Mapping[str, Any]) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"Open-set results at cosine threshold {res['threshold']:.4f} (IoU >= {res['iou_min']}):", "",
             "| probes | gallery-person faces | DIR | detected | rank-1 (no threshold) | misidentified | "
             "unknown faces | FAR | appearance DIR | appearance FAR |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in res["at_threshold"].items():
        a = res["appearances"].get(k, {})
        lines.append(f"| {k} | {r['known_faces']} | {pct(r['dir'])} | {pct(r['known_detected'])} | "
                     f"{pct(r['rank1'])} | "
                     f"{pct(r['misidentified'])} | {r['unknown_faces']} | {pct(r['far'])} | {pct(a.get('dir'))} | "
                     f"{pct(a.get('far'))} |")
    lines.append("")
    lines.append(f"Detections matching no true face: {res['unmatched_detections']} "
                 f"({res['unmatched_accepted']} accepted as someone).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- writers

def fmt_pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.2f}"


def markdown_table(protocols: Mapping[str, Mapping[str, Any]], title: Optional[str] = None) -> str:
    """SphereFace-README style table: one row per protocol, fold 1..10 accuracies and AVE, in percent."""
    n = max((len(r["fold_accuracy"]) for r in protocols.values()), default=10)
    folds = next((r["folds"] for r in protocols.values() if len(r.get("folds") or ()) == n), range(1, n + 1))
    head = "| protocol | " + " | ".join(str(k) for k in folds) + " | AVE |"
    sep = "|---|" + "---:|" * (n + 1)
    rows = [f"| {name} | " + " | ".join(fmt_pct(a) for a in r["fold_accuracy"]) + f" | {fmt_pct(r['mean'])} |"
            for name, r in protocols.items()]
    lines = ([f"**{title}**", ""] if title else []) + [head, sep] + rows
    extra = ["", "| protocol | mean | std | AUC | TAR@FAR=1e-2 | TAR@FAR=1e-3 | missing pairs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in protocols.items():
        t = r.get("tar_at_far", {})
        extra.append(f"| {name} | {fmt_pct(r['mean'])} | {fmt_pct(r['std'])} | {r.get('auc', float('nan')):.5f} | "
                     f"{fmt_pct(t.get('1e-2', float('nan')))} | {fmt_pct(t.get('1e-3', float('nan')))} | "
                     f"{r.get('n_missing', 0)} |")
    return "\n".join(lines + extra) + "\n"


def plot_roc(curves: Mapping[str, tuple], path: str | os.PathLike, title: str = "") -> None:
    """ROC plot (log FAR axis) of {label: (scores, same)} to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for label, (scores, same) in curves.items():
        fpr, tpr, _ = roc_curve(scores, same)
        ax.plot(np.maximum(fpr, 1e-4), tpr, label=f"{label} (AUC {auc(fpr, tpr):.4f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _jsonable(result: Mapping[str, Any]) -> dict:
    return {k: v for k, v in result.items() if k not in ("scores", "same")}


def evaluate_lfw_features(features: FeatureTable, pairs: pd.DataFrame, settings: ProtocolSettings, *,
                          model: str, dataset: str, run: Optional[str] = None, fars: Sequence[float] = FARS,
                          out_json: Optional[str] = None, out_md: Optional[str] = None,
                          out_png: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None) -> dict:
    """Everything for one model on one LFW-format dataset: protocols, Fisher score (clean), writers."""
    res = lfw_protocols(features, pairs, settings, fars=fars, keep_scores=True)
    doc: dict[str, Any] = {"model": model, "dataset": dataset, "run": run, "settings": settings.to_dict(),
                           "protocols": {k: _jsonable(v) for k, v in res.items()}}
    if "clean" in features.variants:
        ids = sorted(set(pairs["a"]) | set(pairs["b"]))
        x = features.lookup(ids, "clean")
        ok = ~np.isnan(x).any(axis=1)
        doc["angular_fisher_score"] = {
            "clean": angular_fisher_score(x[ok], [identity_of(i) for i, k in zip(ids, ok) if k]),
            "images": int(ok.sum()), "note": "SphereFace Appendix E, over the distinct pair images, raw features",
        }
    if extra:
        doc.update(extra)
    if out_json:
        write_json(doc, out_json)
    if out_md:
        write_text(markdown_table(doc["protocols"], title=f"{model} on {dataset} ({settings_label(settings)})"), out_md)
    if out_png:
        plot_roc({k: (v["scores"], v["same"]) for k, v in res.items()}, out_png, title=f"{model} on {dataset}")
    return doc


def identification_markdown(res: Mapping[str, Any], model: str, dataset: str) -> str:
    """The table of :func:`identification`'s result: rank-1/5, AUC and TAR@FAR per probe variant."""
    lines = [f"**{model} on {dataset}: identification ({res['n_identities']} identities, "
             f"{res['n_probes']} probes)**", "", "| probes | rank-1 | rank-5 | AUC | TAR@1e-2 | TAR@1e-3 |",
             "|---|---:|---:|---:|---:|---:|"]
    for v, r in res["protocols"].items():
        t = r.get("tar_at_far", {})
        lines.append(f"| {v} | {100 * r['rank1']:.2f} | {100 * r['rank5']:.2f} | {r.get('auc', float('nan')):.4f} | "
                     f"{100 * t.get('1e-2', float('nan')):.2f} | {100 * t.get('1e-3', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def evaluate_identification_features(features: FeatureTable, settings: ProtocolSettings, *, model: str,
                                     dataset: str, n_impostors: int, out_json: str, out_md: str, out_png: str,
                                     extra: Optional[Mapping[str, Any]] = None) -> dict:
    """Everything for one model on one folder-per-identity dataset: identification over its clean images, the
    verification ROC of all genuine pairs, and the writers."""
    ids = sorted({i for i, v in zip(features.image_ids, features.variant_of) if v == "clean"})
    curves: dict = {}
    res = identification(features, ids, settings, n_impostors=n_impostors, curves=curves)
    plot_roc(curves, out_png, title=f"{model} on {dataset}: verification, all genuine pairs")
    doc = {"model": model, "dataset": dataset, "settings": settings.to_dict(), "identification": res,
           **(extra or {})}
    write_json(doc, out_json)
    write_text(identification_markdown(res, model, dataset), out_md)
    return doc


def settings_label(s: ProtocolSettings | Mapping[str, Any]) -> str:
    d = s.to_dict() if isinstance(s, ProtocolSettings) else dict(s)
    metric = d.get("metric", "cosine")
    if metric == "euclidean" and d.get("normalize"):
        metric = "euclidean (L2-normalised)"
    return f"{metric}, mean subtraction {'on' if d.get('mean_subtraction', True) else 'off'}"


_RUN_SUFFIX = re.compile(r"[-_.]?run[-_]?\d+$")


def model_group(model: str, run: Optional[str] = None) -> str:
    """The group over which repeated runs are averaged: the model name less a trailing ``-runN`` suffix."""
    return _RUN_SUFFIX.sub("", model) if model else model


def _cell(value: Any) -> str:
    """A markdown table cell's text: a '|' of a name escaped."""
    return str(value).replace("|", "\\|")


def _side_by_side(rows: list[dict], order: Mapping[str, int]) -> list[str]:
    """One line per model (run, dataset): every protocol's accuracy ± std, AUC and TAR at FAR 1e-3 next to each
    other, the models one under another (markdown lines, a blank line after)."""
    protos = sorted({r["protocol"] for r in rows}, key=lambda p: (order.get(p, len(order)), p))
    if not protos:
        return []
    keyed: dict[tuple, dict] = {}      # one line per result file (and scoring)
    for r in rows:
        keyed.setdefault((r["source"], r["model"], r["run"], r["dataset"], r["settings"]), {})[r["protocol"]] = r
    slash = " / ".join(protos)
    lines = ["## Side by side", "",
             f"| model | run | dataset | scoring | {' | '.join(protos)} | AUC {slash} | TAR@1e-3 {slash} |",
             "|---|---|---|---|" + "---:|" * len(protos) + "---|---|"]
    for (_, model, run, ds, st), by in keyed.items():
        acc = [("–" if p not in by else fmt_pct(by[p]["mean"]) if by[p]["n_folds"] < 2 else
                f"{fmt_pct(by[p]['mean'])} ± {fmt_pct(by[p]['std'])}") for p in protos]
        auc = " / ".join(f"{by[p]['auc']:.4f}" if p in by else "–" for p in protos)
        tar = " / ".join(fmt_pct(by[p]["tar3"]) if p in by else "–" for p in protos)
        lines.append(f"| {_cell(model)} | {_cell(run)} | {_cell(ds)} | {st} | {' | '.join(acc)} | {auc} | {tar} |")
    return lines + [""]


def summarize(json_paths: Iterable[str | os.PathLike]) -> str:
    """Markdown summary: the models side by side (a line per model/run and dataset, the protocols as columns);
    one row per model/run, dataset and protocol (clean, mixed, masked in that order); then, where a model was
    run more than once, mean ± std over its repeated runs."""
    rows, ident = [], []
    for p in sorted(map(str, json_paths)):
        doc = read_json(p)
        model = doc.get("model") or Path(p).parent.name
        for variant, r in (doc.get("identification") or {}).get("protocols", {}).items():
            ident.append((model, doc.get("run") or "", doc.get("dataset") or Path(p).stem, variant, r))
        if "protocols" not in doc:
            continue
        # an evaluation of per-fold models that ran on some folds only says which (never filled in)
        partial = (f"fold{'s' if len(doc['folds_run']) > 1 else ''} {', '.join(map(str, doc['folds_run']))} only"
                   if doc.get("folds_not_run") else "")
        for proto, r in doc["protocols"].items():
            if "fold_accuracy" not in r:
                continue
            rows.append({
                "source": p, "group": doc.get("group") or model_group(model), "model": model,
                "run": str(doc.get("run") or partial),
                "dataset": doc.get("dataset") or Path(p).stem, "protocol": proto,
                "settings": settings_label(doc.get("settings", {})), "mean": r["mean"], "std": r["std"],
                "n_folds": len(r["fold_accuracy"]),
                "auc": r.get("auc", float("nan")),
                "tar2": r.get("tar_at_far", {}).get("1e-2", float("nan")),
                "tar3": r.get("tar_at_far", {}).get("1e-3", float("nan")),
            })
    order = {name: k for k, name in enumerate(PROTOCOLS)}     # clean, mixed, masked; any other after them
    rows.sort(key=lambda r: (r["model"], r["run"], r["dataset"], order.get(r["protocol"], len(order)),
                             r["protocol"]))
    lines = ["# Evaluation summary", "",
             "Accuracies in percent (10-fold mean and std); AUC; TAR at FAR 1e-2 / 1e-3 in percent.", ""]
    lines += _side_by_side(rows, order)
    lines += ["## Every protocol", "",
              "| model | run | dataset | protocol | scoring | accuracy | std | AUC | TAR@1e-2 | TAR@1e-3 |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['run']} | {r['dataset']} | {r['protocol']} | {r['settings']} | "
                     f"{fmt_pct(r['mean'])} | {fmt_pct(r['std'])} | {r['auc']:.5f} | {fmt_pct(r['tar2'])} | "
                     f"{fmt_pct(r['tar3'])} |")
    df = pd.DataFrame(rows)
    if rows and df.groupby(["group", "dataset", "protocol", "settings"]).size().max() > 1:
        lines += ["", "## Over repeated runs (mean ± std of the runs' 10-fold means)", "",
                  "| model | dataset | protocol | scoring | runs | accuracy | AUC |", "|---|---|---|---|---:|---:|---:|"]
        for (g, ds, proto, st), sub in df.groupby(["group", "dataset", "protocol", "settings"], sort=True):
            m, a = sub["mean"].to_numpy(), sub["auc"].to_numpy()
            sd = m.std(ddof=1) if len(m) > 1 else 0.0
            sa = a.std(ddof=1) if len(a) > 1 else 0.0
            lines.append(f"| {g} | {ds} | {proto} | {st} | {len(sub)} | {100 * m.mean():.2f} ± {100 * sd:.2f} | "
                         f"{a.mean():.5f} ± {sa:.5f} |")
    if ident:
        lines += ["", "## Identification (gallery: first clean image per identity; probes: the rest)", "",
                  "| model | run | dataset | probes | rank-1 | rank-5 | AUC | TAR@1e-2 | TAR@1e-3 |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for model, run, ds, variant, r in ident:
            t = r.get("tar_at_far", {})
            lines.append(f"| {model} | {run} | {ds} | {variant} | {fmt_pct(r.get('rank1'))} | "
                         f"{fmt_pct(r.get('rank5'))} | {r.get('auc', float('nan')):.5f} | "
                         f"{fmt_pct(t.get('1e-2', float('nan')))} | {fmt_pct(t.get('1e-3', float('nan')))} |")
    return "\n".join(lines) + "\n"
