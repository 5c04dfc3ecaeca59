"""Mask stage benchmark and acceptance numbers on LFW aligned faces.

    python benchmarks/bench_mask.py [--aligned 'results/aligned/lfw/shard-*.parquet'] [--n 1000] [--json out.json]

Faces: the first ``--n`` rows (by image_id) of aligned shards written by the workflow's align stage (MTCNN +
similarity to SphereFace's 112x96 template). Without shards, ``--n`` LFW photos (every k-th person) are
aligned here with maskface.align first (slow: ~15 photos/s).

Acceptance numbers (the stage's own code path, maskface.mask.stage.process_items, mask config defaults):
masked share with skips by reason; coverage of the 112x96 crop per wear; from each masked face's landmarks,
whether the mask polygon (rebuilt from the image's deterministic draws) contains the nose tip (0-based 30 =
1-based 31), mouth corners (48/54 = 49/55) and chin (8 = 9), and the same read off the occlusion map for
points inside the crop; a second run compared byte for byte, and a run with another seed.

Speed, one process, one thread (OpenCV and torch limited to one), CPU time (``time.process_time``) so that
other jobs on a shared machine count less; wall time printed too. Rates are crops per CPU-second, i.e. per
core:
  ours/core     decoded crops in memory -> landmarks and image statistics (batched, as the stage does) +
                checks + drawing + the two PNG encodes
  ours/e2e      + decoding the aligned PNGs: what a shard job does per crop
  baseline      the MaskTheFace way, per image: dlib HOG detector (upsample 1, as MaskTheFace calls it)
                on the crop + dlib's 68-point predictor + six target points + one cv2.findHomography +
                warpPerspective of a stock RGBA mask picture (drawn procedurally here, 600x420) + brightness
                matched on V + hard alpha edge (+ PNG encode / decode in the e2e variant)
The two are measured interleaved, in blocks of the stage's batch (mask.batch, 128 crops), so that load changes
on the machine hit both alike, after one warm-up call of each (model loads, numba compilation); the ratio
ours/baseline is printed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from maskface.fileio import write_text  # noqa: E402
from maskface.mask import face as F  # noqa: E402
from maskface.mask import landmarks as L  # noqa: E402
from maskface.mask import render as R  # noqa: E402
from maskface.mask import stage as S  # noqa: E402
from maskface.mask import style as ST  # noqa: E402
from maskface.mask.config import MaskConfig  # noqa: E402


# ------------------------------------------------------------------------------------------ the faces

def aligned_items(pattern: str, n: int, order: str = "sha1") -> list[dict]:
    """``n`` aligned crops (status ok): the first by sha1(image_id) (a fixed pseudo-random sample over
    all people) or by image_id (alphabetical: the first few hundred people)."""
    import hashlib
    paths = sorted(glob.glob(pattern))
    items = []
    for p in paths:
        items += [it for it in S.read_aligned_shard(p) if it["png"] is not None and it["status"] == "ok"]
    key = (lambda it: hashlib.sha1(it["image_id"].encode()).hexdigest()) if order == "sha1" else \
        (lambda it: it["image_id"])
    items.sort(key=key)
    return items[:n]


def align_here(n: int) -> list[dict]:
    import torch

    from maskface import align as A
    from maskface.imageio import load_rgb
    torch.set_num_threads(1)
    env = os.environ.get("MASKFACE_LFW")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "lfw"
    images = root / "images_deepfunneled"
    if not images.is_dir():
        sys.exit(f"no aligned shards and no LFW at {images} (set MASKFACE_LFW)")
    people = sorted(p.name for p in images.iterdir() if p.is_dir())
    step = max(len(people) // n, 1)
    det = A.Detector(20, (0.6, 0.7, 0.9), 0.85, "cpu")
    items = []
    for p in people[::step]:
        f = sorted((images / p).glob("*.jpg"))[0]
        rgb = load_rgb(f)
        boxes, pts = det.detect(rgb[None])[0]
        if len(boxes):
            crop, _ = A.align_face(rgb, pts[A.select_face(boxes, rgb.shape[:2], "center")], "sphereface_112x96")
            items.append({"image_id": f"{p}/{f.name}", "identity": p, "status": "ok",
                          "template": "sphereface_112x96", "png": S.encode_rgb_png(crop), "shard": 0})
        if len(items) == n:
            break
    return items


# ---------------------------------------------------------------------------------- acceptance numbers

def _inside(poly, p) -> bool:
    return cv2.pointPolygonTest(poly.astype(np.float32).reshape(-1, 1, 2), (float(p[0]), float(p[1])), False) >= 0


def acceptance(items: list[dict], cfg: MaskConfig) -> dict:
    t0 = time.perf_counter()
    recs = S.process_items(items, cfg)
    dt = time.perf_counter() - t0
    df = S.records_table(recs, False).to_pandas()
    summ = S.summarize(df)
    # geometry from the landmarks: rebuild each masked face's polygon from its deterministic draws
    want = {"proper": {30: True, 48: True, 54: True, 8: True},
            "nose_out": {30: False, 48: True, 54: True, 8: True},
            "chin": {30: False, 48: False, 54: False, 8: True}}
    poly_ok = {w: [0, 0] for w in want}
    pix_ok = {w: [0, 0] for w in want}
    for r in recs:
        if r["status"] != "ok":
            continue
        lm = np.asarray(r["landmarks68"], np.float64).reshape(68, 2)
        st = ST.draw_style(ST.image_rng(cfg, r["image_id"]), cfg)
        geo = R.build_geometry(R.FaceFrame(lm), st.mask_type, st.wear, st.params["jitter"])
        good = all(_inside(geo.outline, lm[i]) == v for i, v in want[r["wear"]].items())
        poly_ok[r["wear"]][0] += good
        poly_ok[r["wear"]][1] += 1
        occ = S.decode_occlusion(r["occlusion"])
        h, w = occ.shape
        pts = {i: v for i, v in want[r["wear"]].items()
               if 0 <= round(lm[i, 0]) < w and 0 <= round(lm[i, 1]) < h}
        good = all(bool(occ[int(round(lm[i, 1])), int(round(lm[i, 0]))]) == v for i, v in pts.items())
        pix_ok[r["wear"]][0] += good
        pix_ok[r["wear"]][1] += 1
    again = S.process_items(items, cfg)
    same = all(a["png"] == b["png"] and a["occlusion"] == b["occlusion"] for a, b in zip(recs, again))
    other = S.process_items(items, MaskConfig.from_mapping({**cfg.result_params(), "seed": cfg.seed + 1}))
    n_both = sum(1 for a, b in zip(recs, other) if a["png"] and b["png"])
    changed = sum(1 for a, b in zip(recs, other) if a["png"] and b["png"] and a["png"] != b["png"])
    reasons = {}
    for r in recs:
        if r["status"] == "skipped":
            reasons.setdefault(r["skip"], []).append(f"{r['image_id']}: {r['reason']}")
    return {"faces": len(items), "seconds_wall": dt, "summary": summ,
            "polygon_rule_ok": {w: f"{a}/{b}" for w, (a, b) in poly_ok.items()},
            "occlusion_map_rule_ok": {w: f"{a}/{b}" for w, (a, b) in pix_ok.items()},
            "identical_bytes_on_rerun": same, "seed_plus_1_changes": f"{changed}/{n_both}",
            "skipped": reasons}


# ------------------------------------------------------------------------------------------ baseline

def stock_mask(w: int = 600, h: int = 420) -> tuple[np.ndarray, np.ndarray]:
    """A stock RGBA surgical-mask picture (procedural: no download) and its six reference points in the
    order MaskTheFace uses: left top, nose bridge, right top, right bottom, chin, left bottom."""
    img = np.zeros((h, w, 4), np.uint8)
    top, bot = 60, h - 40
    poly = np.array([[20, top + 40], [w // 2, top], [w - 20, top + 40], [w - 40, bot - 60], [w // 2, bot],
                     [40, bot - 60]], np.int32)
    cv2.fillPoly(img, [poly], (200, 225, 240, 255))
    for k in range(3):
        y = top + 90 + 80 * k
        cv2.line(img, (40, y), (w - 40, y + 10), (150, 180, 200, 255), 6)
    pts = poly.astype(np.float32)
    return img, pts


_STOCK = stock_mask()
_HOG = None
_SP = None


def baseline_mask(crop: np.ndarray) -> np.ndarray | None:
    """The MaskTheFace way on one crop (see module doc). None when the detector finds no face."""
    global _HOG, _SP
    if _HOG is None:
        import dlib
        from maskface.resources import dlib_model_path
        _HOG = dlib.get_frontal_face_detector()
        _SP = dlib.shape_predictor(str(dlib_model_path("shape_predictor_68")))
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    rects = _HOG(gray, 1)
    if not len(rects):
        return None
    shape = _SP(crop, rects[0])
    lm = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
    # six target points from jaw, nose bridge and chin (as MaskTheFace's get_six_points does in spirit)
    dst = np.stack([lm[1], lm[28], lm[15], lm[12], lm[8], lm[4]]).astype(np.float32)
    m, _ = cv2.findHomography(_STOCK[1], dst)
    if m is None:
        return None
    h, w = crop.shape[:2]
    warped = cv2.warpPerspective(_STOCK[0], m, (w, h))
    alpha = warped[..., 3] > 127                               # hard alpha edge
    if not alpha.any():
        return crop.copy()
    hsv_face = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
    hsv_mask = cv2.cvtColor(np.ascontiguousarray(warped[..., :3]), cv2.COLOR_RGB2HSV)
    ratio = hsv_face[..., 2][alpha].mean() / max(hsv_mask[..., 2][alpha].mean(), 1.0)
    hsv_mask[..., 2] = np.clip(hsv_mask[..., 2] * ratio, 0, 255).astype(np.uint8)
    mask_rgb = cv2.cvtColor(hsv_mask, cv2.COLOR_HSV2RGB)
    out = crop.copy()
    out[alpha] = mask_rgb[alpha]
    return out


# ------------------------------------------------------------------------------------------------ speed

def speed(items: list[dict], cfg: MaskConfig, block: int = 0, rounds: int = 1) -> dict:
    F.limit_threads()
    block = block or cfg.batch          # the stage's own batch (landmarks are predicted batch by batch)
    crops = [S.decode_crop(it["png"]) for it in items]
    t5 = F.template_points("sphereface_112x96", (112, 96))
    box = L.face_box_from_points5(t5)
    acc = {k: [0.0, 0.0, 0] for k in ("ours_core", "ours_e2e", "base_core", "base_e2e")}
    base_found = 0

    def ours_core(idx):
        imgs = np.stack([crops[i] for i in idx])
        lms = F.landmark_crops(imgs, box, cfg)
        stats = R.image_stats_batch(imgs)
        for i, lm, st in zip(idx, lms, stats):
            rec = F.empty_record(items[i]["image_id"], "", 0, cfg.seed)
            S.mask_one(crops[i], lm, items[i]["image_id"], cfg, rec, template5=t5, stats=st)

    def ours_e2e(idx):
        S._process_chunk([items[i] for i in idx], cfg, {})

    def base_core(idx):
        nonlocal base_found
        for i in idx:
            out = baseline_mask(crops[i])
            base_found += out is not None

    def base_e2e(idx):
        for i in idx:
            out = baseline_mask(S.decode_crop(items[i]["png"]))
            if out is not None:
                S.encode_rgb_png(out)

    fns = {"ours_core": ours_core, "ours_e2e": ours_e2e, "base_core": base_core, "base_e2e": base_e2e}
    for fn in fns.values():           # warm up every path (model loads, imports, numba compilation)
        fn(list(range(min(4, len(items)))))
    base_found = 0
    for _ in range(rounds):
        for k0 in range(0, len(items), block):
            idx = list(range(k0, min(k0 + block, len(items))))
            for name, fn in fns.items():
                c, w = time.process_time(), time.perf_counter()
                fn(idx)
                acc[name][0] += time.process_time() - c
                acc[name][1] += time.perf_counter() - w
                acc[name][2] += len(idx)
    out = {k: {"crops": n, "per_cpu_s": n / max(c, 1e-9), "per_wall_s": n / max(w, 1e-9)}
           for k, (c, w, n) in acc.items()}
    out["ratio_core"] = out["ours_core"]["per_cpu_s"] / out["base_core"]["per_cpu_s"]
    out["ratio_e2e"] = out["ours_e2e"]["per_cpu_s"] / out["base_e2e"]["per_cpu_s"]
    out["baseline_detector_found"] = f"{base_found}/{acc['base_core'][2]}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aligned", default=str(REPO / "results" / "aligned" / "lfw" / "shard-*.parquet"),
                    help="glob of aligned shards (default: this checkout's workflow output)")
    ap.add_argument("--n", type=int, default=1000, help="faces for the acceptance numbers")
    ap.add_argument("--order", choices=["sha1", "image_id"], default="sha1",
                    help="which n faces: first by sha1(image_id) (pseudo-random, default) or by image_id")
    ap.add_argument("--speed-n", type=int, default=384, help="faces for the timing")
    ap.add_argument("--skip-acceptance", action="store_true")
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args(argv)
    F.limit_threads()
    items = aligned_items(args.aligned, args.n, args.order) if glob.glob(args.aligned) else []
    src = f"aligned shards {args.aligned} (first {args.n} by {args.order})"
    if not items:
        src = "LFW photos aligned here with maskface.align"
        items = align_here(args.n)
    print(f"{len(items)} faces from {src}")
    cfg = MaskConfig()
    res: dict = {"source": src, "config": cfg.result_params()}
    if not args.skip_acceptance:
        acc = acceptance(items, cfg)
        res["acceptance"] = acc
        s = acc["summary"]
        print(f"masked {s['masked']}/{s['crops']} = {100 * s['masked_rate']:.2f} %; skips {s['skips']}")
        for k, v in acc["skipped"].items():
            for line in v:
                print(f"   {k}: {line}")
        for w, c in s["coverage_by_wear"].items():
            if c:
                print(f"coverage {w:9s} n={c['n']:4d} mean {c['mean']:.3f} median {c['median']:.3f} "
                      f"p05 {c['p05']:.3f} p95 {c['p95']:.3f} min {c['min']:.3f} max {c['max']:.3f}")
        print("polygon covers what the wear should (tip 30, mouth corners 48/54, chin 8):", acc["polygon_rule_ok"])
        print("occlusion map agrees at those landmarks (inside the crop):", acc["occlusion_map_rule_ok"])
        print(f"identical bytes on a second run: {acc['identical_bytes_on_rerun']}; "
              f"seed+1 changes {acc['seed_plus_1_changes']} crops")
    sp = speed(items[: args.speed_n], cfg)
    res["speed"] = sp
    for k in ("ours_core", "base_core", "ours_e2e", "base_e2e"):
        v = sp[k]
        print(f"{k:10s} {v['per_cpu_s']:7.1f} crops/s/core (CPU time)   {v['per_wall_s']:7.1f} crops/s wall "
              f"({v['crops']} crops)")
    print(f"ratio ours/MaskTheFace-way: core {sp['ratio_core']:.1f}x, end-to-end {sp['ratio_e2e']:.1f}x; "
          f"baseline detector found {sp['baseline_detector_found']} faces")
    if args.json:
        write_text(json.dumps(res, indent=1, default=str, sort_keys=True) + "\n", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
