"""The fold evaluation of a ``lfw_unrestricted`` training run, and the summaries over runs.

``evaluate_fold`` scores a trained model (maskface.train) on the LFW pairs of the fold its training left out,
from the same crop caches (maskface.train_data), with the 10-fold machinery of maskface.evaluate: clean, mixed
(right image masked) and masked (both) pairs; the threshold is chosen on the other nine folds (the protocol is
described in maskface.train), or with ``train.validation: next_fold`` on the validation fold, which the model
never saw. A chip network's fold (``train.init``) is scored from the 150x150 chip caches of maskface.chipcache,
with the evaluation's own dlib-resnet arithmetic (mean of the chip's and its mirror's descriptor).
``lfw_evaluation`` turns the fold evaluations of a group's per-fold models into one evaluation in the
evaluation stage's format. ``summarize_groups`` / ``summary_markdown`` give the mean and std over the runs'
fold accuracies, per group of runs (train.mask_fractions).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .devices import describe, precision_policy, resolve_device
from .chipcache import CHIP_SHAPE, open_chips, stage_masks
from .evaluate import ProtocolSettings, pair_scores, roc_summary, verify_10fold
from .models import load_model, preprocess
from .train_data import open_cache

log = logging.getLogger("maskface.foldeval")


def row_batches(images: np.ndarray, rows: np.ndarray, batch_size: int):
    """``images[rows]`` in batches of ``batch_size``, each read in row order (kinder to a memory map)."""
    for s in range(0, len(rows), batch_size):
        r = rows[s:s + batch_size]
        order = np.argsort(r)
        chunk = np.empty((len(r),) + images.shape[1:], images.dtype)
        chunk[order] = images[r[order]]
        yield chunk


@torch.inference_mode()
def embed_rows(net: nn.Module, images: np.ndarray, rows: np.ndarray, device: torch.device,
               batch_size: int = 256) -> np.ndarray:
    """Features [f(x), f(flip x)] (evaluation.m) of ``images[rows]`` with the training preprocessing."""
    out = []
    for chunk in row_batches(images, rows, batch_size):
        x = preprocess(torch.from_numpy(chunk).to(device))
        f = torch.cat([net(x).float(), net(x.flip(3)).float()], dim=1)
        out.append(f.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2 * net.feature_dim), np.float32)


@torch.inference_mode()
def embed_chip_rows(net: nn.Module, normalisation: Mapping[str, Any], chips: np.ndarray, rows: np.ndarray,
                    device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Descriptors of dlib chips ``chips[rows]``: the mean of the chip's and its mirror image's, as the
    evaluation's dlib-resnet embedder with ``flip`` (DlibChipEmbedder.describe_chips)."""
    mean = torch.tensor(normalisation["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(normalisation["std"], dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for chunk in row_batches(chips, rows, batch_size):
        desc = []
        for c in (chunk, np.ascontiguousarray(chunk[:, :, ::-1])):
            x = torch.as_tensor(c).permute(0, 3, 1, 2).to(torch.float32)
            desc.append(net(((x - mean) / std).to(device)).float().cpu().numpy())
        out.append((desc[0] + desc[1]) / 2.0)
    return np.concatenate(out) if out else np.zeros((0, 128), np.float32)


def _fold_features(model_path, variants: Mapping[str, tuple[np.ndarray, pd.DataFrame]], ids: list[str],
                   dev: torch.device, batch_size: int) -> tuple[dict, int, str]:
    """({variant: {image_id: feature}}, feature size, what the feature is) of a SphereFace model (112x96 crop
    caches) or of a chip network (150x150 chip caches)."""
    chip = next(iter(variants.values()))[0].shape[1:] == CHIP_SHAPE
    if chip:
        from .features import load_checkpoint

        net, meta = load_checkpoint(model_path, str(dev))
        dim, what = int(meta["feature_dim"]), "mean(f(chip), f(mirrored chip)), dlib's 150x150 chips"
    else:
        net, meta = load_model(model_path, str(dev))
        dim, what = 2 * int(meta["feature_dim"]), "concat(f(x), f(flip x)), RGB, (p-127.5)/128"
    feats = {}
    for v, (arr, idx) in variants.items():
        idx = stage_masks(idx)      # the mask stage's own masks, never a training-only redraw
        row_of = dict(zip(idx["image_id"], idx["row"]))
        have = [i for i in ids if i in row_of]
        rows = np.array([row_of[i] for i in have], np.int64)
        f = (embed_chip_rows(net, meta["input"], arr, rows, dev, min(batch_size, 64)) if chip
             else embed_rows(net, arr, rows, dev, batch_size))
        feats[v] = dict(zip(have, f))
    return feats, dim, what


def evaluate_fold(model_path: str | os.PathLike, pairs: pd.DataFrame, fold: int,
                  clean: tuple[str, str], masked: Optional[tuple[str, str]] = None, *, device: str = "auto",
                  batch_size: int = 256, threads: int = 2, validation: Optional[int] = None) -> dict:
    """LFW accuracy of one fold for a model trained without that fold's people (the protocol: maskface.train):
    protocols clean, mixed (b masked) and masked (both). The threshold and the mean feature come from the
    other nine folds' pairs, or with ``validation`` from that fold's pairs only (a fold whose people the model
    never saw either). ``clean``/``masked``: the crop caches (SphereFace) or the chip caches (a chip network).
    The fold's held-out scores are kept (``scores``), for a ROC over folds."""
    torch.set_num_threads(max(1, threads))
    dev = torch.device(resolve_device(device, "train.device"))
    precision_policy(dev)                       # evaluation in true fp32
    log.info("fold %s evaluation: %s", fold, describe(dev))
    if validation is not None:
        pairs = pairs[pairs["fold"].isin([int(fold), int(validation)])].reset_index(drop=True)
    opener = open_chips if np.load(clean[0], mmap_mode="r").shape[1:] == CHIP_SHAPE else open_cache
    variants = {"clean": opener(*clean)}
    if masked:
        variants["masked"] = opener(*masked)
    ids = sorted(set(pairs["a"].astype(str)) | set(pairs["b"].astype(str)))
    feats, dim, what = _fold_features(model_path, variants, ids, dev, batch_size)
    nan = np.full(dim, np.nan, np.float32)
    settings = ProtocolSettings()
    if validation is None:
        note = ("fold accuracy with the threshold chosen on the other nine folds' pairs scored by the same model "
                "(those folds' people were training identities); seen_folds_mean is NOT a 10-fold result")
    else:
        note = (f"threshold and mean feature from fold {validation}'s pairs, whose people were held out of "
                f"training as well (train.validation: next_fold): nothing of either fold was trained on")
    res = {"model": str(model_path), "fold": int(fold), "validation_fold": validation,
           "settings": settings.to_dict(), "feature": what, "protocols": {},
           "note": note + ("; a pair whose image has no crop of the variant (e.g. mask skipped) counts as an error "
                           "in accuracy and is left out of accuracy_available_pairs")}
    for name, (va, vb) in {"clean": ("clean", "clean"), "mixed": ("clean", "masked"),
                           "masked": ("masked", "masked")}.items():
        if va not in feats or vb not in feats:
            continue
        fa = np.stack([feats[va].get(i, nan) for i in pairs["a"].astype(str)])
        fb = np.stack([feats[vb].get(i, nan) for i in pairs["b"].astype(str)])
        r = verify_10fold(fa, fb, pairs["same"].to_numpy(bool), pairs["fold"].to_numpy(), settings)
        k = r["folds"].index(int(fold))
        others = [a for j, a in enumerate(r["fold_accuracy"]) if j != k]
        in_fold = (pairs["fold"] == fold).to_numpy()
        sc, sm = np.asarray(r["scores"])[in_fold], pairs["same"].to_numpy(bool)[in_fold]
        ok = ~np.isnan(sc)
        thr = r["threshold"][k]
        thr_score = thr if settings.metric == "cosine" else -thr
        res["protocols"][name] = {
            "accuracy": r["fold_accuracy"][k], "threshold": thr,
            "accuracy_available_pairs": float(np.mean(np.where(sm[ok], sc[ok] > thr_score, sc[ok] < thr_score)))
            if ok.any() else float("nan"),
            "n_pairs": int(in_fold.sum()),
            "n_missing": int((np.isnan(fa).any(1) | np.isnan(fb).any(1))[in_fold].sum()),
            "scores": [None if np.isnan(v) else float(v) for v in sc], "same": [bool(v) for v in sm]}
        if validation is None:
            res["protocols"][name]["seen_folds_mean"] = float(np.mean(others))
        else:   # for choosing a schedule without the test fold: the validation fold alone, its own mean
            res["protocols"][name]["validation"] = _fold_roc(fa, fb, pairs, int(validation))
    return res


def _fold_roc(fa: np.ndarray, fb: np.ndarray, pairs: pd.DataFrame, fold: int) -> dict:
    """AUC and TAR@FAR of one fold's pairs, cosine after subtracting that fold's own mean feature."""
    sel = (pairs["fold"] == fold).to_numpy()
    a, b, same = fa[sel], fb[sel], pairs["same"].to_numpy(bool)[sel]
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    mu = np.concatenate([a[ok], b[ok]]).mean(0)
    a, b = a[ok] - mu, b[ok] - mu
    cos = pair_scores(a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True),
                      "cosine")
    return {"fold": fold, "n_pairs": int(sel.sum()), **roc_summary(cos, same[ok])}


def lfw_evaluation(evals: Sequence[Mapping[str, Any]], *, model: str, dataset: str,
                   all_folds: Sequence[int]) -> dict:
    """The fold evaluations of one group's runs (one per fold, each with its own model) as an evaluation in
    the evaluation stage's format (maskface.evaluate.evaluate_lfw_features): per protocol the folds' accuracies,
    mean and std over the folds that were run, thresholds, and AUC / TAR@FAR over those folds' held-out
    scores. ``folds_not_run`` names the folds of ``all_folds`` without a run: they are never filled in."""
    evals = sorted(evals, key=lambda e: int(e["fold"]))
    folds = [int(e["fold"]) for e in evals]
    if len(set(folds)) != len(folds):
        raise ValueError(f"{model}: two runs of the same fold {folds} (one evaluation per seed)")
    doc = {"model": model, "dataset": dataset, "run": None, "settings": evals[0]["settings"],
           "folds_run": folds, "folds_not_run": [int(k) for k in all_folds if int(k) not in folds],
           "per_fold_models": [e["model"] for e in evals], "feature": evals[0].get("feature"),
           "note": "one model per fold, trained without the fold's people; " + evals[0]["note"], "protocols": {}}
    for name in ("clean", "mixed", "masked"):
        parts = [e["protocols"][name] for e in evals if name in e["protocols"]]
        if len(parts) != len(evals):
            continue
        accs = np.array([p["accuracy"] for p in parts])
        scores = np.array([np.nan if v is None else v for p in parts for v in p["scores"]], float)
        same = np.array([v for p in parts for v in p["same"]], bool)
        ok = ~np.isnan(scores)
        doc["protocols"][name] = {
            "folds": folds, "fold_accuracy": accs.tolist(), "mean": float(accs.mean()),
            "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "threshold": [p["threshold"] for p in parts], "n_pairs": int(sum(p["n_pairs"] for p in parts)),
            "n_missing": int(sum(p["n_missing"] for p in parts)), **roc_summary(scores[ok], same[ok])}
    return doc


def write_lfw_evaluation(evals: Sequence[Mapping[str, Any]], *, model: str, dataset: str,
                         all_folds: Sequence[int], out_json: str, out_md: str, out_png: str) -> dict:
    """:func:`lfw_evaluation` written as the evaluation stage writes one: JSON, markdown table, ROC plot."""
    from .evaluate import markdown_table, plot_roc, settings_label
    from .fileio import write_json, write_text

    doc = lfw_evaluation(evals, model=model, dataset=dataset, all_folds=all_folds)
    write_json(doc, out_json)
    folds = ", ".join(map(str, doc["folds_run"]))
    title = (f"{model} on {dataset} ({settings_label(doc['settings'])}; one model per fold, folds {folds}"
             + (f"; not run: {', '.join(map(str, doc['folds_not_run']))}" if doc["folds_not_run"] else "") + ")")
    write_text(markdown_table(doc["protocols"], title=title), out_md)
    curves = {}
    for name in doc["protocols"]:
        sc = np.array([np.nan if v is None else v for e in evals for v in e["protocols"][name]["scores"]], float)
        sm = np.array([v for e in evals for v in e["protocols"][name]["same"]], bool)
        curves[name] = (sc[~np.isnan(sc)], sm[~np.isnan(sc)])
    plot_roc(curves, out_png, title=f"{model} on {dataset} (folds {folds})")
    return doc


def _threshold_from(evals: Sequence[Mapping[str, Any]]) -> str:
    """Where the runs' thresholds came from: ``next_fold`` (train.validation: a fold held out of training as
    well), ``other_folds`` (the other nine, the model's training people), or ``mixed``."""
    kinds = {"next_fold" if e.get("validation_fold") is not None else "other_folds" for e in evals}
    return kinds.pop() if len(kinds) == 1 else "mixed"


THRESHOLD_FROM = {
    "next_fold": "threshold and mean feature from the next fold, whose people were held out of training too "
                 "(train.validation: next_fold)",
    "other_folds": "threshold from the other nine folds, whose people the model trained on; see maskface.train",
    "mixed": "some runs with the threshold from the next fold (held out), others from the other nine folds",
}


def summarize_evals(evals: Sequence[Mapping[str, Any]]) -> dict:
    """Mean and std (ddof=1) over runs of each protocol's fold accuracy."""
    out = {"runs": [e.get("run") for e in evals], "threshold_from": _threshold_from(evals), "protocols": {}}
    for name in ("clean", "mixed", "masked"):
        accs = [e["protocols"][name]["accuracy"] for e in evals if name in e.get("protocols", {})]
        if accs:
            out["protocols"][name] = {"accuracies": accs, "mean": float(np.mean(accs)),
                                      "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "n": len(accs)}
    return out


def summarize_groups(evals: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """{group: its runs' evals} (e.g. the same runs with and without masks) -> the summary of all runs, with
    each group's own under ``groups``."""
    if len(evals) == 1:
        return summarize_evals(next(iter(evals.values())))
    # no pooled mean over the groups: runs with and without masks are different models
    return {"runs": [e.get("run") for evs in evals.values() for e in evs],
            "threshold_from": _threshold_from([e for evs in evals.values() for e in evs]),
            "groups": {g: summarize_evals(evs) for g, evs in evals.items()}}


def summary_markdown(summary: Mapping[str, Any], title: str = "") -> str:
    lines = [f"# {title}" if title else "# Training runs", "",
             f"LFW fold accuracy (lfw_unrestricted: "
             f"{THRESHOLD_FROM[summary.get('threshold_from', 'other_folds')]}), mean ± std over runs, in percent."]
    groups = summary.get("groups")
    if groups:
        names = list(groups)
        lines[-1] += (" The groups differ only in their mask fraction (train.mask_fractions): the same folds, "
                      "seeds and schedule.")
        lines += ["", "| protocol | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for proto in ("clean", "mixed", "masked"):
            cells = [groups[g]["protocols"].get(proto) for g in names]
            if any(cells):
                lines.append(f"| {proto} | " + " | ".join(
                    f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f} ({c['n']} run{'s' if c['n'] > 1 else ''})"
                    if c else "" for c in cells) + " |")
        lines += ["", "| group | protocol | per run |", "|---|---|---|"]
        for g in names:
            for proto, p in groups[g]["protocols"].items():
                lines.append(f"| {g} | {proto} | " + ", ".join(f"{100 * a:.2f}" for a in p["accuracies"]) + " |")
        return "\n".join(lines) + "\n"
    lines += ["", "| protocol | runs | mean | std | per run |", "|---|---|---|---|---|"]
    for name, p in summary["protocols"].items():
        lines.append(f"| {name} | {p['n']} | {100 * p['mean']:.2f} | {100 * p['std']:.2f} | "
                     + ", ".join(f"{100 * a:.2f}" for a in p["accuracies"]) + " |")
    return "\n".join(lines) + "\n"
