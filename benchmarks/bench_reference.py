"""Benchmark: the reference face network, dlib's own run of it (embedder ``dlib``) against the torch module
(embedder ``dlib-resnet``, maskface.dlibnet), measured side by side in one run on one core.

    python benchmarks/bench_reference.py --lfw ../shared/data/lfw --n 500

Faces: the first image of every k-th LFW person (deep-funneled), located by MTCNN as stage 1 does (the most
central face; the centred fallback box where none is found). Both embedders cut the same dlib chips (5-point
landmarks inside the converted box, 150x150, padding 0.25) and use the mirror image as the evaluation does.

- agreement: cosine of the two networks' descriptors of the same chips (no mirror), mean and minimum;
- network alone: chips given, descriptors only, faces/s on one thread (torch batch --batch);
- end to end: ``Embedder.embed`` on the decoded images (landmarks, chips, network on the chip and its mirror),
  faces/s on one thread, which is the per-process rate of the feature jobs' worker processes.

Each speed is the best of --repeat passes, the two embedders alternating so that both see the same machine.
The last line: ``agreement mean_cos=... min_cos=...; speed end_to_end=...x network=...x``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from maskface.features import FaceInput, make_embedder
from maskface.imageio import load_rgb

REPO = Path(__file__).resolve().parents[1]


def lfw_faces(lfw: Path, n: int) -> tuple[list[str], list[np.ndarray]]:
    root = lfw / "images_deepfunneled"
    if not root.is_dir():
        sys.exit(f"bench_reference: no LFW images at {root} (--lfw)")
    people = sorted(p for p in os.listdir(root) if (root / p).is_dir())
    step = max(1, len(people) // n)
    ids = [f"{p}/{sorted(os.listdir(root / p))[0]}" for p in people[::step][:n]]
    return ids, [load_rgb(root / i) for i in ids]


def mtcnn_boxes(images: list[np.ndarray]) -> list:
    """The most central MTCNN face of each image (stage 1's choice for LFW), or None."""
    from facenet_pytorch import MTCNN

    m = MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.9], factor=0.85, device="cpu")
    out = []
    for im in images:
        boxes, _ = m.detect(im)
        if boxes is None or not len(boxes):
            out.append(None)
            continue
        c = (boxes[:, :2] + boxes[:, 2:]) / 2 - np.array([im.shape[1], im.shape[0]]) / 2
        out.append([float(v) for v in boxes[int(np.argmin((c ** 2).sum(1)))]])
    return out


def best_rate(fn, n_items: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_items / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", default=os.environ.get("MASKFACE_LFW", str(REPO.parent / "shared" / "data" / "lfw")))
    ap.add_argument("--n", type=int, default=500, help="faces (default 500)")
    ap.add_argument("--n-speed", type=int, default=128, help="faces per timed pass (default 128)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="torch batch size (default 64)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    ids, images = lfw_faces(Path(a.lfw), a.n)
    t = time.perf_counter()
    boxes = mtcnn_boxes(images)
    print(f"{len(ids)} LFW faces, MTCNN boxes in {time.perf_counter() - t:.0f} s "
          f"({sum(b is None for b in boxes)} without a detection: centred box)")
    faces = [FaceInput(im, b) for im, b in zip(images, boxes)]

    t = time.perf_counter()
    ref = make_embedder("dlib", flip=True)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    mod = make_embedder("dlib-resnet", flip=True, device="cpu", batch_size=a.batch)
    t_mod = time.perf_counter() - t
    print(f"load: dlib {t_ref:.2f} s, torch module (reads dlib's model file) {t_mod:.2f} s")

    chips = ref.chips(faces)
    d_ref, d_mod = ref.describe_chips_raw(chips), mod.describe_chips_raw(chips)
    cos = (d_ref * d_mod).sum(1) / np.linalg.norm(d_ref, axis=1) / np.linalg.norm(d_mod, axis=1)
    dist = np.abs(np.linalg.norm(d_ref[:, None] - d_ref[None], axis=2) - np.linalg.norm(d_mod[:, None] - d_mod[None],
                                                                                          axis=2))
    print(f"agreement on {len(chips)} chips: cosine mean {cos.mean():.8f}, min {cos.min():.8f}; "
          f"largest |difference| of a pairwise distance {dist.max():.2e}")

    k = min(a.n_speed, len(faces))
    sub_chips, sub_faces = chips[:k], faces[:k]
    rates: dict = {}
    for _ in range(a.repeat):      # alternate, so that both embedders see the same machine
        for name, emb in (("dlib", ref), ("dlib-resnet", mod)):
            net = best_rate(lambda: emb.describe_chips_raw(sub_chips), k, 1)
            e2e = best_rate(lambda: emb.embed(sub_faces), k, 1)
            r = rates.setdefault(name, {"network": 0.0, "end_to_end": 0.0})
            r["network"], r["end_to_end"] = max(r["network"], net), max(r["end_to_end"], e2e)
    print(f"\nspeed, one thread, best of {a.repeat} passes of {k} faces (faces/s per core):\n")
    print("| embedder | network alone (chips given, no mirror) | end to end (chips + chip and mirror) |")
    print("|---|---:|---:|")
    for name in ("dlib", "dlib-resnet"):
        print(f"| {name} | {rates[name]['network']:.1f} | {rates[name]['end_to_end']:.1f} |")
    net_x = rates["dlib-resnet"]["network"] / rates["dlib"]["network"]
    e2e_x = rates["dlib-resnet"]["end_to_end"] / rates["dlib"]["end_to_end"]
    print(f"| ratio | {net_x:.1f}x | {e2e_x:.1f}x |\n")
    print(f"agreement mean_cos={cos.mean():.8f} min_cos={cos.min():.8f}; speed end_to_end={e2e_x:.1f}x "
          f"network={net_x:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
