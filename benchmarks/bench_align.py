"""Alignment throughput: the pipeline (maskface.align) against the naive facenet-pytorch baseline.

    python benchmarks/bench_align.py [--lfw DIR] [--n 512] [--workers 2] [--json out.json]

The same ``--n`` LFW images (evenly spaced over the sorted file list) go through
  * baseline: ``facenet_pytorch.MTCNN()`` with its default settings, ``detect`` called once per image (PIL
    image), one process, torch's default intra-op threads; it only detects (no alignment, no output);
  * pipeline: ``maskface.align.align_items`` (decode, MTCNN cascade, face selection, similarity warp, PNG
    encode) with ``--workers`` processes, once with the SphereFace defaults (min face 20, factor 0.85,
    thresholds 0.6/0.7/0.9) and once with the ``fast`` preset (min face 40, otherwise the same).
The baseline runs before and after the pipeline runs (the machine is shared; the ratio uses their mean).
Detection counts are images with at least one face. Prints img/s for each and the ratios. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lfw_images(arg: str | None) -> Path:
    root = Path(arg or os.environ.get("MASKFACE_LFW") or REPO.parent / "shared" / "data" / "lfw")
    imgs = root / "images_deepfunneled" if (root / "images_deepfunneled").is_dir() else root
    if not imgs.is_dir():
        sys.exit(f"LFW not found at {root} (pass --lfw or set MASKFACE_LFW)")
    return imgs


def pick(imgs: Path, n: int) -> list[Path]:
    files = sorted(imgs.glob("*/*.jpg"))
    if len(files) < n:
        sys.exit(f"only {len(files)} images under {imgs}")
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def baseline(files: list[Path], threads: int | None) -> dict:
    import torch
    from facenet_pytorch import MTCNN
    from PIL import Image

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        mtcnn = MTCNN(device="cpu")
        mtcnn.detect(Image.open(files[0]).convert("RGB"))      # warm-up (not timed)
        found = 0
        t0 = time.perf_counter()
        for f in files:
            boxes, _ = mtcnn.detect(Image.open(f).convert("RGB"))
            found += boxes is not None and len(boxes) > 0
        dt = time.perf_counter() - t0
        return {"img_s": len(files) / dt, "seconds": dt, "detected": int(found),
                "torch_threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(prev)


def pipeline(files: list[Path], imgs: Path, workers: int, **cfg) -> dict:
    from maskface.align import AlignConfig, align_items

    items = [{"image_id": f.relative_to(imgs).as_posix(), "identity": f.parent.name, "src": str(f), "shard": 0,
              "width": 250, "height": 250} for f in files]
    conf = AlignConfig.from_mapping(dict(cfg, device="cpu", workers=workers))
    t0 = time.perf_counter()
    recs = align_items(items, conf, "center", progress=False)
    dt = time.perf_counter() - t0
    ok = sum(r["status"] == "ok" for r in recs)
    return {"img_s": len(files) / dt, "seconds": dt, "detected": int(ok), "workers": workers,
            "config": conf.result_subset(), "fallbacks": sum(r["status"] == "center_crop" for r in recs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lfw", help="LFW folder (holding images_deepfunneled/) or the images folder itself")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline-threads", type=int, default=0,
                    help="torch threads of the baseline (0: torch's default); also runs a 1-thread baseline "
                         "with --also-1thread")
    ap.add_argument("--also-1thread", action="store_true", help="also time the baseline with 1 torch thread")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    imgs = lfw_images(a.lfw)
    files = pick(imgs, a.n)
    print(f"{len(files)} LFW images from {imgs}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    res: dict = {"n": len(files), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    res["baseline_1"] = baseline(files, a.baseline_threads or None)
    print(f"baseline (MTCNN.detect per image, defaults, {res['baseline_1']['torch_threads']} torch threads): "
          f"{res['baseline_1']['img_s']:.1f} img/s, {res['baseline_1']['detected']}/{len(files)} detected")
    res["pipeline_sphereface"] = pipeline(files, imgs, a.workers)
    res["pipeline_fast"] = pipeline(files, imgs, a.workers, min_face_size=40)
    for k in ("pipeline_sphereface", "pipeline_fast"):
        r = res[k]
        print(f"{k} ({a.workers} workers, {r['config']}): {r['img_s']:.1f} img/s, "
              f"{r['detected']}/{len(files)} detected, {r['fallbacks']} centre-crop fallbacks")
    res["baseline_2"] = baseline(files, a.baseline_threads or None)
    print(f"baseline again: {res['baseline_2']['img_s']:.1f} img/s")
    if a.also_1thread:
        res["baseline_1thread"] = baseline(files, 1)
        print(f"baseline, 1 torch thread: {res['baseline_1thread']['img_s']:.1f} img/s")
    base = (res["baseline_1"]["img_s"] + res["baseline_2"]["img_s"]) / 2
    res["baseline_mean_img_s"] = base
    for k in ("pipeline_sphereface", "pipeline_fast"):
        res[k]["ratio"] = res[k]["img_s"] / base
        print(f"RATIO {k} / baseline = {res[k]['ratio']:.2f}x "
              f"(detected {res[k]['detected']} vs {res['baseline_1']['detected']})")
    res["load_after"] = os.getloadavg()
    print(f"load average after: {res['load_after']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
