"""Benchmark: SphereFace training throughput (img/s) and the input pipeline.

    python benchmarks/bench_train.py                                   # CPU: batch 16, SphereFace-20 and -4
    python benchmarks/bench_train.py --device cuda --batch 512         # GPU: the paper's batch
    python benchmarks/bench_train.py --cache results/train_cache/lfw/clean.npy results/train_cache/lfw/clean.parquet

Measures, each after ``--warmup`` steps, the mean over ``--steps`` timed steps (CUDA synchronised):

* ``model``: a full training step (forward, A-Softmax head over ``--classes`` classes (CASIA: 10,572),
  cross-entropy, backward, SGD step) on a batch already on the device, in each precision mode:
  ``fp32`` (contiguous NCHW) and ``bf16+channels_last`` (autocast bf16 for the network, fp32 head);
  on CUDA also ``bf16+channels_last+compile`` with ``--compile``.
* ``loader``: the training loader alone (maskface.train_data.BatchStream: memory-mapped uint8 cache gather in a
  prefetch thread, pinned on CUDA, host->device copy, flip and normalisation on the device): img/s it can
  deliver; it must exceed the model's img/s for decoding/loading never to starve the GPU.
  Real crops with ``--cache NPY INDEX``; otherwise a synthetic cache of ``--images`` crops is built
  from random PNG shards (which also times ``build_cache``, the one-off PNG decode).

Prints one JSON object (and writes it to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from maskface.fileio import write_json
from maskface.imageio import encode_png
from maskface.models import make_head, preprocess, sphereface_net
from maskface.train import TrainModule
from maskface.train_data import BatchStream, StreamSampler, TrainData, build_cache, open_cache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(depth: int, width: float, batch: int, classes: int, mode: str, device: torch.device, steps: int,
                warmup: int) -> dict:
    torch.manual_seed(0)
    net = sphereface_net(depth, width)
    head = make_head({"type": "asoftmax"}, 512, classes)
    bf16 = mode.startswith("bf16")
    cl = "channels_last" in mode
    module = TrainModule(net, head, torch.bfloat16 if bf16 else None, "compile" in mode).to(device)
    if cl:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xb = torch.randint(0, 256, (batch, 112, 96, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    x = preprocess(xb)
    x = x if cl else x.contiguous()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        loss = F.cross_entropy(module(x, y, i + 1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    dt = float(np.mean(times))
    res = {"depth": depth, "width": width, "batch": batch, "classes": classes, "mode": mode,
           "step_s": dt, "img_s": batch / dt, "steps": steps}
    if device.type == "cuda":
        res["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
    return res


def synthetic_cache(folder: Path, n: int, ids: int = 100) -> tuple[list[str], float]:
    rng = np.random.default_rng(0)
    rows, man = [], []
    base = rng.integers(0, 256, (112, 96, 3), dtype=np.uint8)
    for i in range(n):
        img = np.clip(base.astype(np.int16) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
        iid = f"p{i % ids}/p{i % ids}_{i:06d}.jpg"
        rows.append({"image_id": iid, "png": encode_png(img)})
        man.append({"image_id": iid, "identity": f"p{i % ids}", "status": "ok"})
    pd.DataFrame(rows).to_parquet(folder / "shard-0.parquet")
    pd.DataFrame(man).to_parquet(folder / "aligned.parquet")
    t = time.perf_counter()
    build_cache([folder / "shard-0.parquet"], folder / "c.npy", folder / "c.parquet", threads=2)
    dt = time.perf_counter() - t
    return [str(folder / "c.npy"), str(folder / "c.parquet")], n / dt


def bench_loader(cache: list[str], batch: int, device: torch.device, steps: int, mask_fraction: float) -> dict:
    arr, idx = open_cache(*cache)
    man = pd.DataFrame({"image_id": idx["image_id"], "identity": idx["image_id"].str.rsplit("/", n=1).str[0],
                        "status": "ok"})
    src = {"dataset": "bench", "manifest": man, "clean": cache}
    if mask_fraction > 0:
        src["masked"] = cache  # the same crops stand in for the masked ones: same gather cost
    data = TrainData.from_sources([src], need_masked=mask_fraction > 0)
    sampler = StreamSampler(len(data), 1, mask_fraction, data.has_masked, True)
    stream = BatchStream(data, sampler, 0, steps + 2, batch, prefetch=4, pin=device.type == "cuda")
    it = iter(stream)
    next(it)
    sync(device)
    t = time.perf_counter()
    n = 0
    for _, xb, yb, fb, _, _ in it:
        x = xb.to(device, non_blocking=True)
        f = fb.to(device, non_blocking=True)
        x = preprocess(torch.where(f.view(-1, 1, 1, 1), x.flip(2), x))
        n += len(x)
    sync(device)
    dt = time.perf_counter() - t
    return {"images": len(data), "batch": batch, "img_s": n / dt, "mask_fraction": mask_fraction,
            "cache": cache[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="default: 512 on CUDA, 16 on CPU")
    ap.add_argument("--classes", type=int, default=10572)
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="default: 20 (and 4 on CPU)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", nargs=2, metavar=("NPY", "INDEX"), help="real crops cache for the loader benchmark")
    ap.add_argument("--images", type=int, default=2000, help="synthetic cache size")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = a.batch or (512 if cuda else 16)
    steps = a.steps or (20 if cuda else 3)
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 1)
    depths = a.depths or ([20] if cuda else [20, 4])
    out = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'x86'}, "
                                                                       f"{a.threads} threads)",
           "torch": torch.__version__, "model": [], "loader": []}
    if not a.skip_model:
        modes = ["fp32", "bf16+channels_last"] + (["bf16+channels_last+compile"] if a.compile and cuda else [])
        for d in depths:
            for mode in modes:
                r = bench_model(d, a.width, batch, a.classes, mode, device, steps, warmup)
                print(f"SphereFace-{d} w{a.width} batch {batch} {mode}: {r['img_s']:.1f} img/s", file=sys.stderr)
                out["model"].append(r)
    with tempfile.TemporaryDirectory() as tmp:
        if a.cache:
            cache = list(a.cache)
        else:
            cache, dec = synthetic_cache(Path(tmp), a.images)
            out["build_cache_decode_img_s"] = dec
            print(f"build_cache (PNG decode, 2 threads): {dec:.0f} img/s", file=sys.stderr)
        for mf in (0.0, 0.5):
            r = bench_loader(cache, batch if cuda else max(batch, 64), device, 30 if cuda else 20, mf)
            print(f"loader batch {r['batch']} mask_fraction {mf}: {r['img_s']:.0f} img/s", file=sys.stderr)
            out["loader"].append(r)
    print(json.dumps(out, indent=2))
    if a.out:
        write_json(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
