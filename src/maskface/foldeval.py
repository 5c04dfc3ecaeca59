"""The fold evaluation of a ``lfw_unrestricted`` training run, and the summaries over runs.

``evaluate_fold`` scores a trained model (maskface.train) on the LFW pairs of the fold its training left out,
from the same crop caches (maskface.train_data), with the 10-fold machinery of maskface.evaluate: clean, mixed
(right image masked) and masked (both) pairs; the threshold is chosen on the other nine folds (the protocol is
described in maskface.train). ``summarize_groups`` / ``summary_markdown`` give the mean and std over the runs'
fold accuracies, per group of runs (train.mask_fractions).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .devices import precision_policy, resolve_device
from .evaluate import ProtocolSettings, verify_10fold
from .models import load_model, preprocess
from .train_data import CROP_SHAPE, open_cache


@torch.inference_mode()
def embed_rows(net: nn.Module, images: np.ndarray, rows: np.ndarray, device: torch.device,
               batch_size: int = 256) -> np.ndarray:
    """Features [f(x), f(flip x)] (evaluation.m) of ``images[rows]`` with the training preprocessing."""
    out = []
    for s in range(0, len(rows), batch_size):
        r = rows[s:s + batch_size]
        order = np.argsort(r)
        chunk = np.empty((len(r),) + CROP_SHAPE, np.uint8)
        chunk[order] = images[r[order]]
        x = preprocess(torch.from_numpy(chunk).to(device))
        f = torch.cat([net(x).float(), net(x.flip(3)).float()], dim=1)
        out.append(f.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2 * net.feature_dim), np.float32)


def evaluate_fold(model_path: str | os.PathLike, pairs: pd.DataFrame, fold: int,
                  clean: tuple[str, str], masked: Optional[tuple[str, str]] = None, *, device: str = "auto",
                  batch_size: int = 256, threads: int = 2) -> dict:
    """LFW accuracy of one fold for a model trained without that fold's people (the protocol: maskface.train):
    protocols clean, mixed (b masked) and masked (both), threshold from the other nine folds' pairs."""
    torch.set_num_threads(max(1, threads))
    dev = torch.device(resolve_device(device, "train.device"))
    precision_policy(dev)                       # evaluation in true fp32
    net, meta = load_model(model_path, str(dev))
    variants = {"clean": open_cache(*clean)}
    if masked:
        variants["masked"] = open_cache(*masked)
    ids = sorted(set(pairs["a"].astype(str)) | set(pairs["b"].astype(str)))
    feats = {}
    for v, (arr, idx) in variants.items():
        row_of = dict(zip(idx["image_id"], idx["row"]))
        have = [i for i in ids if i in row_of]
        f = embed_rows(net, arr, np.array([row_of[i] for i in have], np.int64), dev, batch_size)
        feats[v] = dict(zip(have, f))
    dim = 2 * int(meta["feature_dim"])
    nan = np.full(dim, np.nan, np.float32)
    settings = ProtocolSettings()
    res = {"model": str(model_path), "fold": int(fold), "run": (meta.get("meta") or {}).get("run"),
           "settings": settings.to_dict(), "feature": "concat(f(x), f(flip x)), RGB, (p-127.5)/128",
           "protocols": {},
           "note": ("fold accuracy with the threshold chosen on the other nine folds' pairs scored by the same model "
                    "(those folds' people were training identities); seen_folds_mean is NOT a 10-fold result; a pair "
                    "whose image has no crop of the variant (e.g. mask skipped) counts as an error in accuracy and is "
                    "left out of accuracy_available_pairs")}
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
        res["protocols"][name] = {"accuracy": r["fold_accuracy"][k], "threshold": thr,
                                  "accuracy_available_pairs": float(np.mean(np.where(sm[ok], sc[ok] > thr, sc[ok] < thr)))
                                  if ok.any() else float("nan"),
                                  "n_pairs": int(in_fold.sum()),
                                  "n_missing": int((np.isnan(fa).any(1) | np.isnan(fb).any(1))[in_fold].sum()),
                                  "seen_folds_mean": float(np.mean(others))}
    return res


def summarize_evals(evals: Sequence[Mapping[str, Any]]) -> dict:
    """Mean and std (ddof=1) over runs of each protocol's fold accuracy."""
    out = {"runs": [e.get("run") for e in evals], "protocols": {}}
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
            "groups": {g: summarize_evals(evs) for g, evs in evals.items()}}


def summary_markdown(summary: Mapping[str, Any], title: str = "") -> str:
    lines = [f"# {title}" if title else "# Training runs", "",
             "LFW fold accuracy (lfw_unrestricted: threshold from the other nine folds, see maskface.train), "
             "mean ± std over runs, in percent."]
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
