"""Benchmark of the open-set video demo on the LFW test video: frames per second, where the time goes, and the
open-set rates (DIR / FAR, clean and masked probes) at the threshold.

    python benchmarks/bench_demo.py [--seconds 30] [--threshold T] [--out results/benchmarks/demo_bench]
        [--embedders dlib-resnet,dlib] [--video-folds 1 --calibrate-folds 2]

A trained model joins as NAME=CHECKPOINT (a dlib-resnet checkpoint, e.g. a fine-tune of train.init):
``--embedders dlib-resnet,dlib-ft-m50=results/models/dlib-ft-m50-fold1-seed1/model.pt``. A model trained on LFW
people must not meet them in the video: ``--video-folds`` draws the video's people from those folds of pairs.txt
only, and ``--calibrate-folds`` measures each embedder's threshold at LFW FAR ``--far`` (calibrate_on_lfw, 400
people, one photograph each) on those folds' people only (for the fold-1 model of config/finetune.yaml:
video fold 1, calibration fold 2; neither was trained on).

The video is built from real LFW (MASKFACE_LFW or ../shared/data/lfw) under --out (results/ is git-ignored).
Each embedder of --embedders runs the demo on the same video, one after the other in this run (the reference
network as a torch module, dlib-resnet, and dlib's own run of it, dlib); the last line gives each one's frames/s
and embedding seconds and the ratio to the first. Prints one JSON document per embedder (also written to
OUT/<embedder>/bench.json) and its metrics table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import pandas as pd  # noqa: E402

from maskface import demo as D  # noqa: E402
from maskface.evaluate import metrics_markdown, open_set_metrics  # noqa: E402
from maskface.features import embedder_from_model  # noqa: E402
from maskface.fileio import read_json, write_json  # noqa: E402
from maskface.testvideo import build_test_video  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", default=os.environ.get("MASKFACE_LFW", str(REPO.parent / "shared" / "data" / "lfw")))
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "demo_bench"))
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--n-known", type=int, default=4)
    ap.add_argument("--n-unknown", type=int, default=4)
    ap.add_argument("--appearance-s", type=float, default=1.5, help="seconds one appearance lasts")
    ap.add_argument("--masked", type=float, default=0.5, help="share of masked appearances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None, help="cosine (default: the embedder's measured one)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--reuse", action="store_true", help="reuse a video already built under --out")
    ap.add_argument("--embedders", default="dlib-resnet,dlib",
                    help="comma-separated names, or NAME=CHECKPOINT for a dlib-resnet checkpoint")
    ap.add_argument("--video-folds", default=None, help="the video's people: those of these folds of pairs.txt")
    ap.add_argument("--calibrate-folds", default=None,
                    help="threshold per embedder at --far on the people of these folds (calibrate_on_lfw)")
    ap.add_argument("--far", type=float, default=1e-3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("bench_demo")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tv = out / "testvideo"
    t0 = time.perf_counter()
    if args.reuse and (tv / "spec.json").exists():
        doc = read_json(tv / "spec.json")
    else:
        doc = build_test_video(Path(args.lfw) / "images_deepfunneled", tv, dict(
            seconds=args.seconds, fps=args.fps, width=args.width, height=args.height, n_known=args.n_known,
            n_unknown=args.n_unknown, appearance_s=args.appearance_s, masked_fraction=args.masked, seed=args.seed),
            only_people=_fold_people(args, args.video_folds),
            people_note=f"the people of pairs.txt folds {args.video_folds}" if args.video_folds else "")
    t_build = time.perf_counter() - t0
    cfg = D.DemoConfig(threshold=args.threshold, batch_size=args.batch_size)
    rows = []
    for item in [e.strip() for e in args.embedders.split(",") if e.strip()]:
        name, _, checkpoint = item.partition("=")
        model = {"embedder": "dlib-resnet", "checkpoint": checkpoint} if checkpoint else {"embedder": name}
        run = out / name
        source = None
        if args.calibrate_folds:
            embedder = embedder_from_model(model, "auto")
            cal = D.calibrate_on_lfw(Path(args.lfw) / "images_deepfunneled", D.make_detector(cfg), embedder,
                                     args.far, only=_fold_people(args, args.calibrate_folds), progress=False)
            source = {"kind": "calibrate_on_lfw", "folds": args.calibrate_folds, **cal}
            cfg_run = replace(cfg, threshold=cal["threshold"])
            log.info("%s: threshold %.4f at FAR %g on folds %s (%d people, TAR %.3f)", name, cal["threshold"],
                     args.far, args.calibrate_folds, cal["people"], cal["tar"] or float("nan"))
        else:
            cfg_run = cfg
        summary = D.run_demo(tv / "video.mp4", tv / "gallery", run / "run", cfg_run, model=model,
                             progress=False, threshold_source=source)
        det = pd.read_parquet(run / "run" / "detections.parquet")
        res = open_set_metrics(det, pd.read_parquet(tv / "ground_truth.parquet"), summary["threshold"],
                               frames=summary["frames"])
        bench = {
            "embedder": name,
            "video": {"frames": summary["frames"], "size": [summary["video"]["width"], summary["video"]["height"]],
                      "faces_true": doc["counts"], "masks_available": doc["masks_available"],
                      "masks_reason": doc["masks_reason"]},
            "threads": args.threads, "batch_size": args.batch_size, "build_s": round(t_build, 2),
            "fps": round(summary["fps"], 3), "faces_per_s": round(summary["faces_per_s"], 3),
            "seconds": summary["seconds"], "threshold": summary["threshold"],
            "threshold_source": summary["threshold_source"], "at_threshold": res["at_threshold"],
            "appearances": res["appearances"], "unmatched_detections": res["unmatched_detections"],
            "unmatched_accepted": res["unmatched_accepted"],
        }
        write_json(res, run / "run" / "metrics.json")
        write_json(bench, run / "bench.json")
        print(json.dumps(bench, indent=1, default=str))
        print(metrics_markdown(res))
        rows.append((name, summary["fps"], summary["seconds"].get("embed")))
    first = rows[0][1]
    print("; ".join(f"{n}: {fps:.2f} frames/s, embedding {emb} s, {fps / first:.2f}x" for n, fps, emb in rows))
    return 0


def _fold_people(args, folds: str | None) -> set[str] | None:
    """The people of these folds (comma-separated) of LFW's pairs.txt; None without folds (every person)."""
    from maskface.datasets import parse_pairs

    if not folds:
        return None
    return D.fold_people(parse_pairs(Path(args.lfw) / "pairs.txt"), [int(k) for k in folds.split(",")])


if __name__ == "__main__":
    sys.exit(main())
