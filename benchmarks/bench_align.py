"""Alignment throughput: the pipeline (maskface.align) against the naive facenet-pytorch baseline.

    python benchmarks/bench_align.py [--lfw DIR] [--n 512] [--workers 2] [--json out.json]

The same ``--n`` LFW images (evenly spaced over the sorted file list) go through
  * baseline: ``facenet_pytorch.MTCNN()`` with its default settings, ``detect`` called once per image (PIL
    image), one process, torch's default intra-op threads; it only detects (no alignment, no output);
  * pipeline: ``maskface.align.align_items`` (decode, MTCNN cascade, face selection, similarity warp, PNG
    encode) with ``--workers`` processes, once with the SphereFace defaults (min face 20, factor 0.85,
    thresholds 0.6/0.7/0.9) and once with the ``fast`` preset (min face 40, otherwise the same).
The baseline runs before and after the pipeline runs (the machine is shared; the ratio uses their mean).
CPU time (process + joined workers) is recorded too: on a shared machine wall-clock rates swing with other
jobs (torch's 2 intra-op threads suffer most from oversubscription), images per CPU-second much less.
Detection counts are images with at least one face. Prints img/s for each and the ratios. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool workers are joined before we read it)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rates(n: int, wall: float, cpu: float) -> dict:
    return {"img_s": n / wall, "seconds": wall, "cpu_seconds": cpu, "img_per_cpu_s": n / max(cpu, 1e-9),
            "load_avg_1min": os.getloadavg()[0]}


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
        t0, c0 = time.perf_counter(), cpu_seconds()
        for f in files:
            boxes, _ = mtcnn.detect(Image.open(f).convert("RGB"))
            found += boxes is not None and len(boxes) > 0
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        return dict(_rates(len(files), dt, dc), detected=int(found), torch_threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(prev)


def pipeline(files: list[Path], imgs: Path, workers: int, **cfg) -> dict:
    from maskface.align import AlignConfig, align_items

    items = [{"image_id": f.relative_to(imgs).as_posix(), "identity": f.parent.name, "src": str(f), "shard": 0,
              "width": 250, "height": 250} for f in files]
    conf = AlignConfig.from_mapping(dict(cfg, device="cpu", workers=workers))
    t0, c0 = time.perf_counter(), cpu_seconds()
    recs = align_items(items, conf, "center", progress=False)
    dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    ok = sum(r["status"] == "ok" for r in recs)
    return dict(_rates(len(files), dt, dc), detected=int(ok), workers=workers, config=conf.result_params(),
                fallbacks=sum(r["status"] == "center_crop" for r in recs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lfw", help="LFW folder (holding images_deepfunneled/) or the images folder itself")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline-threads", type=int, default=0,
                    help="torch threads of the baseline (0: torch's default, as facenet-pytorch runs out of the box)")
    ap.add_argument("--also-1thread", action="store_true", help="also time the baseline with 1 torch thread")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    imgs = lfw_images(a.lfw)
    files = pick(imgs, a.n)
    print(f"{len(files)} LFW images from {imgs}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    res: dict = {"n": len(files), "cpus": os.cpu_count(), "load_before": os.getloadavg()}

    def show(name, r):
        print(f"{name}: {r['img_s']:.1f} img/s wall, {r['img_per_cpu_s']:.1f} img per CPU-second, "
              f"{r['detected']}/{len(files)} detected (1-min load {r['load_avg_1min']:.1f})", flush=True)

    res["baseline_1"] = baseline(files, a.baseline_threads or None)
    show(f"baseline (MTCNN.detect per image, defaults, {res['baseline_1']['torch_threads']} torch threads)",
         res["baseline_1"])
    if a.also_1thread:
        res["baseline_1thread"] = baseline(files, 1)
        show("baseline, 1 torch thread", res["baseline_1thread"])
    res["pipeline_sphereface"] = pipeline(files, imgs, a.workers)
    show(f"pipeline, SphereFace defaults, {a.workers} workers", res["pipeline_sphereface"])
    res["pipeline_fast"] = pipeline(files, imgs, a.workers, min_face_size=40)
    show(f"pipeline, fast preset (min_face_size 40), {a.workers} workers", res["pipeline_fast"])
    res["baseline_2"] = baseline(files, a.baseline_threads or None)
    show("baseline again", res["baseline_2"])
    base = (res["baseline_1"]["img_s"] + res["baseline_2"]["img_s"]) / 2
    base_cpu = (res["baseline_1"]["img_per_cpu_s"] + res["baseline_2"]["img_per_cpu_s"]) / 2
    res["baseline_mean_img_s"] = base
    for k in ("pipeline_sphereface", "pipeline_fast"):
        r = res[k]
        r["ratio"] = r["img_s"] / base
        r["ratio_per_cpu_s"] = r["img_per_cpu_s"] / base_cpu
        line = (f"RATIO {k} / baseline = {r['ratio']:.2f}x wall, {r['ratio_per_cpu_s']:.2f}x per CPU-second "
                f"(detected {r['detected']} vs {res['baseline_1']['detected']})")
        if "baseline_1thread" in res:
            r["ratio_vs_1thread"] = r["img_s"] / res["baseline_1thread"]["img_s"]
            line += f"; vs the 1-thread baseline {r['ratio_vs_1thread']:.2f}x wall"
        print(line)
    res["load_after"] = os.getloadavg()
    print(f"load average after: {res['load_after']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
