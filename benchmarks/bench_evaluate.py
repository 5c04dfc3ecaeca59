"""Benchmark: LFW 10-fold evaluation from stored features (6,000 pairs).

    python benchmarks/bench_evaluate.py                       # synthetic 512-d and 1024-d features
    python benchmarks/bench_evaluate.py --features F.parquet --pairs results/manifests/lfw/pairs.parquet

Times (best of --repeat): reading the features Parquet, and the protocol itself (pair lookup, 10 folds of
mean subtraction + threshold search over 20,001 thresholds, ROC/AUC/TAR@FAR) for each scoring setting.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from maskface.datasets import parse_pairs
from maskface.evaluate import FeatureTable, ProtocolSettings, lfw_protocols
from maskface.features import features_frame, write_features


def synthetic(dim: int, seed: int = 0):
    """6,000 pairs in LFW's layout over 7,701-like distinct images, clean and masked features."""
    rng = np.random.default_rng(seed)
    fold = np.repeat(np.arange(1, 11), 600)
    same = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    rows = []
    for i, s in enumerate(same):
        a = f"p{i}/p{i}_0001.jpg"
        b = f"p{i}/p{i}_0002.jpg" if s else f"q{i}/q{i}_0001.jpg"
        rows.append((fold[i], a, b, s))
    pairs = pd.DataFrame(rows, columns=["fold", "a", "b", "same"])
    ids = sorted(set(pairs.a) | set(pairs.b))
    x = rng.normal(size=(len(ids), dim)).astype(np.float32)
    pos = {k: n for n, k in enumerate(ids)}
    for r in pairs[pairs.same].itertuples():
        x[pos[r.b]] = x[pos[r.a]] + 0.8 * rng.normal(size=dim)
    df = pd.concat([features_frame(ids, "clean", x), features_frame(ids, "masked", x + rng.normal(size=x.shape))])
    return df, pairs


def best_of(fn, repeat):
    """(best wall seconds, best CPU seconds of this process, result). On a shared machine the wall time
    includes waiting for a core; the process CPU time does not."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features")
    ap.add_argument("--pairs", help="pairs.parquet, or LFW's pairs.txt")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    settings = {"cosine + mean subtraction": ProtocolSettings(),
                "cosine, no mean subtraction": ProtocolSettings(mean_subtraction=False),
                "euclidean": ProtocolSettings(mean_subtraction=False, metric="euclidean")}
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.features:
            p = args.pairs
            pairs = pd.read_parquet(p) if p.endswith(".parquet") else parse_pairs(p)
            cases.append((args.features, pairs))
        else:
            for dim in (128, 512, 1024):
                df, pairs = synthetic(dim)
                path = str(Path(tmp) / f"features_{dim}.parquet")
                write_features(df, path)
                cases.append((path, pairs))
        for path, pairs in cases:
            t_read, c_read, table = best_of(lambda: FeatureTable.read(path), args.repeat)
            print(f"{Path(path).name}: {len(table.image_ids)} rows x {table.matrix.shape[1]}-d, "
                  f"variants {sorted(table.variants)}; read {1000 * t_read:.1f} ms wall, {1000 * c_read:.1f} ms CPU")
            for name, st in settings.items():
                t1, c1, r1 = best_of(lambda: lfw_protocols(table, pairs, st, protocols=["clean"]), args.repeat)
                t3, c3, r3 = best_of(lambda: lfw_protocols(table, pairs, st), args.repeat)
                print(f"  {name:28s} clean only {1000 * t1:6.1f} ms wall / {1000 * c1:6.1f} ms CPU; "
                      f"all {len(r3)} protocols {1000 * t3:6.1f} / {1000 * c3:6.1f} ms "
                      f"(clean mean {100 * r1['clean']['mean']:.2f}%)")
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
