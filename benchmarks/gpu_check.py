"""The GPU check: one script, about 8 minutes on one H100/H200, for a session that is lent a GPU.

    python benchmarks/gpu_check.py --out "$OUT"                  # on a GPU machine with this project installed
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check     # every step on the CPU at a tiny size
    bash benchmarks/gpu_check.sh "$OUT"                          # from the bundle (benchmarks/gpu_bundle.py)

Writes gpu_check.json and gpu_check.md to ``--out`` after every step (and the CUDA tests' output to
cuda_tests.log). Each step is measured on its own; a step that fails is recorded with its error and the others
still run; after ``--deadline`` seconds the rest are recorded as skipped; ``--steps a,b`` runs only those
(with the alignment the later steps need). Steps:

1. environment: driver, torch, CUDA, cuDNN, device names and count, bf16 support;
2. the CUDA tests: ``pytest -m cuda`` (skipped without CUDA);
3. SphereFace-20 training throughput at batch 512 (fp32; bf16 + channels_last; + torch.compile), img/s and
   peak memory, beside the training loader's own img/s (``benchmarks/bench_train.py``);
4. stop + resume with ``deterministic: true``: bit-identical weights;
5. bf16 and fp32 loss curves over 20 iterations;
6. MTCNN alignment of ``--n-align`` LFW images on the GPU and on the CPU: throughput, box IoU, landmark px;
7. SphereFace embedder throughput and CPU/GPU feature agreement (cosine) on the aligned crops of step 6;
8. the reference network (dlib-resnet, maskface.dlibnet) on dlib chips of step 6's faces: GPU img/s in fp32,
   bf16 and fp16, each one's cosine against the CPU fp32 descriptors, the CPU's against dlib's own run;
9. a fine-tune of the reference network as config/finetune.yaml runs it (frozen prefix, distillation on) on
   chips of step 6's faces: img/s, and on a GPU its loss curve and features against the same run on the CPU;
10. a 2-rank DDP run (NCCL) when 2 GPUs are visible, else recorded as skipped (``--dry``: gloo on the CPU).

Its data: ``--n-align`` LFW images read from ``--lfw`` (``$MASKFACE_LFW`` or ``../shared/data/lfw``; for a GPU
machine without them, the copy in the git-ignored bundle that ``benchmarks/gpu_bundle.py`` writes); synthetic
crops for the training steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from maskface.fileio import write_json, write_text  # noqa: E402 - after the path set-up


BUDGET_S = 480      # the check is sized for 8 minutes on one H100/H200 (a lent GPU's time is short)
STEPS = ("environment", "cuda_tests", "train_throughput", "resume_bit_identical", "bf16_vs_fp32", "alignment",
         "embedders", "reference_network", "chip_fine_tune", "ddp_2_ranks")
NEEDS = {"embedders": "alignment", "reference_network": "alignment", "chip_fine_tune": "alignment"}


class Check:
    """Runs the steps in order, each measured on its own: a step that fails is recorded with its error and the
    others still run; once ``deadline_s`` have passed the remaining steps are recorded as skipped. The JSON and
    markdown are written after every step, so a run cut short still leaves what it measured."""

    def __init__(self, out: Path, mode: str, device: str, deadline_s: float, only: set):
        self.out, self.device, self.deadline_s, self.only = out, device, deadline_s, only
        self.res: dict = {"mode": mode}
        self.t0 = time.perf_counter()

    def __call__(self, name: str, fn) -> None:
        if self.only and name not in self.only:
            return
        t0 = time.perf_counter()
        if t0 - self.t0 > self.deadline_s:
            self.res[name] = {"ok": False, "skipped": f"the check's deadline ({self.deadline_s:.0f} s) had passed"}
        else:
            try:
                self.res[name] = {"ok": True, **(fn() or {})}
            except Exception as exc:  # noqa: BLE001 - a failed step is a result
                self.res[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]}
            finally:
                _reset_process(self.device)
        r = self.res[name]
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        state = "ok" if r["ok"] else ("SKIPPED " + r["skipped"] if "skipped" in r else "FAILED " + r["error"])
        print(f"[gpu_check] {name}: {state} ({r['wall_s']} s)", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        self.res["total_s"] = time.perf_counter() - self.t0
        write_json(self.res, self.out / "gpu_check.json")
        write_text(markdown(self.res), self.out / "gpu_check.md")


def _reset_process(device: str) -> None:
    """What a training step leaves set for the whole process, put back for the next step's timings: deterministic
    algorithms, 2 threads (train.threads), cuDNN's autotuner off."""
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(os.cpu_count() or 1)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()


def environment() -> dict:
    out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "devices": [], "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        out["bf16_supported"] = torch.cuda.is_bf16_supported(including_emulation=False)   # native, as amp auto
        out["bf16_emulated"] = torch.cuda.is_bf16_supported() and not out["bf16_supported"]
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                                   "capability": f"{p.major}.{p.minor}"})
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        out["driver"] = None
    return out


def cuda_tests(lfw: Path, out: Path, gpu: bool) -> dict:
    """``pytest -m cuda``: each test body that runs on the CPU in the suite, here on the GPU, on ``lfw``; its whole
    output in ``cuda_tests.log``. On a GPU every test must run: a skip other than the 2-GPU tests' on one GPU
    (e.g. an LFW file missing from the bundle) fails the step."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    try:
        import pytest_timeout  # noqa: F401 - present: no single test may eat the check's time
        cmd.insert(3, "--timeout=120")
    except ImportError:
        pass
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "MASKFACE_LFW": str(lfw)})
    write_text(res.stdout + res.stderr, out / "cuda_tests.log")
    lines = [x for x in res.stdout.strip().splitlines() if x.strip()]
    if res.returncode not in (0, 5):            # 5: no test carries the marker (nothing collected)
        raise RuntimeError(f"pytest -m cuda exited with {res.returncode}: {lines[-1] if lines else ''}\n"
                           f"{res.stdout[-1500:]}{res.stderr[-500:]}")
    skips = [x for x in lines if x.startswith("SKIPPED") and "needs 2 GPUs" not in x]
    if gpu and (skips or res.returncode == 5):
        raise RuntimeError(f"pytest -m cuda on the GPU skipped tests: {skips[:5] or lines[-1:]}")
    return {"exit_code": res.returncode, "summary": lines[-1] if lines else "", "tail": res.stdout[-1500:]}


def train_throughput(device: torch.device, dry: bool) -> dict:
    import bench_train as bt

    depth, width, batch = (4, 0.125, 8) if dry else (20, 1.0, 512)
    steps, warmup = (1, 1) if dry else (20, 5)
    modes = ["fp32", "bf16+channels_last"] + ([] if dry else ["bf16+channels_last+compile"])
    model = [bt.bench_model(depth, width, batch, 10572, m, device, steps, warmup) for m in modes]
    with tempfile.TemporaryDirectory() as tmp:
        cache, decode = bt.synthetic_cache(Path(tmp), 64 if dry else 4000)
        loader = [bt.bench_loader(cache, batch, device, 3 if dry else 30, mf) for mf in (0.0, 0.5)]
    return {"model": model, "loader": loader, "png_decode_img_s": decode,
            "limit": "loader" if min(x["img_s"] for x in loader) < max(x["img_s"] for x in model) else "model"}


def _synthetic_source(folder: Path, n: int, ids: int) -> dict:
    import bench_train as bt

    cache, _ = bt.synthetic_cache(folder, n, ids=ids)
    return {"dataset": "syn", "manifest": str(folder / "aligned.parquet"), "clean": cache}


def _spec(src: dict, device: str, dry: bool, **train) -> dict:
    t = {"arch": {"depth": 4, "width": 0.125} if dry else {"depth": 20, "width": 0.5}, "iterations": 12,
         "batch_size": 8 if dry else 128, "lr": 0.05, "lr_steps": [8], "log_every": 1, "checkpoint_every": 4,
         "threads": 2, "prefetch": 2, "device": device, "min_images": 1}
    t.update(train)
    return {"run": "check", "seed": 3, "protocol": "external", "sources": [src], "train": t}


def resume_identical(device: str, dry: bool) -> dict:
    from maskface.train import train_run

    with tempfile.TemporaryDirectory() as tmp:
        src = _synthetic_source(Path(tmp), 200, 10)
        spec = _spec(src, device, dry, deterministic=True)
        train_run(spec, Path(tmp) / "full")
        train_run(spec, Path(tmp) / "cut", stop_after=6)
        train_run(spec, Path(tmp) / "cut")
        a = torch.load(Path(tmp) / "full" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(Path(tmp) / "cut" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
        differing = [k for k in a if not torch.equal(a[k], b[k])]
    return {"bit_identical": not differing, "tensors": len(a), "differing": differing[:10]}


def bf16_vs_fp32(device: str, dry: bool) -> dict:
    import pandas as pd

    from maskface.train import train_run

    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = _synthetic_source(Path(tmp), 400, 20)
        for amp in ("none", "bf16"):
            spec = _spec(src, device, dry, amp=amp, iterations=20, lr_steps=[15], checkpoint_every=20)
            train_run(spec, Path(tmp) / amp)
            losses[amp] = pd.read_csv(Path(tmp) / amp / "train_log.csv")["loss"].to_numpy()
    rel = np.abs(losses["bf16"] - losses["none"]) / np.maximum(np.abs(losses["none"]), 1e-9)
    return {"loss_fp32": losses["none"].round(4).tolist(), "loss_bf16": losses["bf16"].round(4).tolist(),
            "max_rel_diff": float(rel.max()), "mean_rel_diff": float(rel.mean()), "agree_within_5pct": bool(rel.max() < 0.05)}


def lfw_image_ids(lfw: Path, n: int) -> list[str]:
    """The first ``n`` LFW images in the check's order (people, then files, sorted by name)."""
    out = []
    for person in sorted(p for p in (lfw / "images_deepfunneled").iterdir() if p.is_dir()):
        for f in sorted(person.glob("*.jpg")):
            out.append(f"{person.name}/{f.name}")
            if len(out) == n:
                return out
    return out


def _lfw_images(lfw: Path, n: int) -> list[dict]:
    from PIL import Image

    out = []
    for iid in lfw_image_ids(lfw, n):
        f = lfw / "images_deepfunneled" / iid
        w, h = Image.open(f).size
        out.append({"image_id": iid, "identity": iid.split("/")[0], "src": str(f), "shard": 0, "width": w,
                    "height": h})
    return out


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def alignment(device: str, lfw: Path, n: int, cpu_workers: int) -> tuple[dict, list[dict]]:
    from maskface.align import AlignConfig, align_items

    items = _lfw_images(lfw, n)
    runs = {}
    # warm-up: CUDA's start, cuDNN's first kernels and the detector's load are not charged to the first timing
    align_items(items[:8], AlignConfig.from_mapping({"device": device, "workers": 1}), "center", progress=False,
                desc="align warm-up", decoders=0)
    # the device alone (decoding in its own process), the device fed by cpu_workers decoding processes (the
    # stage's layout on a GPU with align.threads = cpu_workers + 1), and cpu_workers CPU processes
    for name, cfg, decoders in (("device", AlignConfig.from_mapping({"device": device, "workers": 1}), 0),
                                ("device_fed", AlignConfig.from_mapping({"device": device}), cpu_workers),
                                ("cpu", AlignConfig.from_mapping({"device": "cpu", "workers": cpu_workers}), None)):
        t0 = time.perf_counter()
        recs = align_items(items, cfg, "center", progress=False, desc=f"align {name}", decoders=decoders)
        runs[name] = (recs, time.perf_counter() - t0)
    (dev, t_dev), (cpu, t_cpu) = runs["device"], runs["cpu"]
    # the fed layout must not change what is found: same statuses, the same boxes up to the device's own
    # run-to-run noise (cuDNN may pick other kernels), IoU >= 0.99 for every face
    fed = runs["device_fed"][0]
    fed_ious = [_iou(a["bbox"], b["bbox"]) for a, b in zip(fed, dev)
                if a.get("bbox") is not None and b.get("bbox") is not None]
    fed_same = (len(fed) == len(dev)
                and all(a["image_id"] == b["image_id"] and a["status"] == b["status"]
                        and (a.get("bbox") is None) == (b.get("bbox") is None) for a, b in zip(fed, dev))
                and all(v >= 0.99 for v in fed_ious))
    ious, px = [], []
    for a, b in zip(dev, cpu):
        if a.get("bbox") is not None and b.get("bbox") is not None and not a.get("fallback") and not b.get("fallback"):
            ious.append(_iou(a["bbox"], b["bbox"]))
            px.append(float(np.abs(np.asarray(a["landmarks5"]) - np.asarray(b["landmarks5"])).max()))
    return ({"images": len(items), "device_img_s": len(items) / t_dev,
             "device_fed_img_s": len(items) / runs["device_fed"][1], "device_fed_same_boxes": fed_same,
             "device_fed_box_iou_min": float(min(fed_ious)) if fed_ious else None,
             "cpu_img_s": len(items) / t_cpu,
             "cpu_workers": cpu_workers, "compared": len(ious), "box_iou_min": float(np.min(ious)) if ious else None,
             "box_iou_mean": float(np.mean(ious)) if ious else None,
             "landmarks_max_px_p99": float(np.percentile(px, 99)) if px else None,
             "landmarks_max_px_max": float(np.max(px)) if px else None}, dev)


def embedders(device: str, crops: list[dict], dry: bool) -> dict:
    from maskface.features import FaceInput, make_embedder
    from maskface.imageio import decode_png
    from maskface.models import save_model, sphereface_net

    faces = [FaceInput(decode_png(r["png"])) for r in crops if r.get("png") is not None]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        kwargs = {"depth": 4, "width": 0.125} if dry else {"depth": 20, "width": 1.0}
        net = sphereface_net(**kwargs)
        ck = Path(tmp) / "sphereface.pt"
        save_model(ck, net)      # random weights: agreement and speed, not accuracy
        feats = {}
        for dev in (device, "cpu") if device != "cpu" else ("cpu",):
            emb = make_embedder("sphereface", checkpoint=str(ck), device=dev)
            emb.embed(faces[:8])                       # warm-up (cuDNN autotune)
            t0 = time.perf_counter()
            feats[dev] = emb.embed(faces)
            out[f"sphereface_{dev}_img_s"] = len(faces) / (time.perf_counter() - t0)
        if device != "cpu":
            a, b = feats[device], feats["cpu"]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out.update(sphereface_cos_min=float(cos.min()), sphereface_cos_mean=float(cos.mean()))
    return {"faces": len(faces), **out}


def _cos_stats(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean and minimum cosine of the row pairs of ``a`` and ``b``."""
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(c.mean()), "min": float(c.min())}


def reference(device: str, recs: list[dict], lfw: Path, dry: bool) -> dict:
    """The reference network (dlib-resnet, the torch module): GPU throughput in fp32 / bf16 / fp16 and the
    agreement of each with the CPU fp32 descriptors and with dlib's own run, on dlib chips of LFW faces."""
    from maskface.dlibnet import DlibResnet
    from maskface.features import FaceInput, make_embedder
    from maskface.imageio import load_rgb

    n = 16 if dry else 512
    faces = [FaceInput(load_rgb(lfw / "images_deepfunneled" / r["image_id"]), r.get("bbox"))
             for r in recs[:n] if r.get("status") == "ok"]
    ref = make_embedder("dlib")
    chips = ref.chips(faces)
    d_dlib = ref.describe_chips_raw(chips[:64])
    cpu_net = DlibResnet.from_dlib_file().eval()
    with torch.inference_mode():
        d_cpu = cpu_net(cpu_net.to_input(chips)).numpy()

    out = {"faces": len(chips), "cpu_vs_dlib": _cos_stats(d_cpu[:64], d_dlib)}
    if device == "cpu":
        return out
    from maskface.devices import precision_policy

    out["precision"] = precision_policy(device)
    net = DlibResnet.from_dlib_file().to(device).eval()
    x = net.to_input(chips).to(device)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            net(x[:64])                                  # warm-up (cuDNN autotune)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                y = net(x)
            torch.cuda.synchronize()
            rate = reps * len(x) / (time.perf_counter() - t0)
        out[name] = {"img_s": rate, "vs_cpu_fp32": _cos_stats(y.float().cpu().numpy(), d_cpu)}
    emb = make_embedder("dlib-resnet", device=device, flip=True, batch_size=256)
    t0 = time.perf_counter()
    emb.embed(faces)
    out["end_to_end_one_process_img_s"] = len(faces) / (time.perf_counter() - t0)
    # the feature job's layout on a GPU: worker processes cut the chips, this process runs the network
    from maskface.features import SourceLoader, embed_all

    ok = [r for r in recs[:n] if r.get("status") == "ok"]
    load = SourceLoader(lfw / "images_deepfunneled", {r["image_id"]: list(r["bbox"]) for r in ok})
    workers = max(1, (os.cpu_count() or 2) - 1)
    t0 = time.perf_counter()
    embed_all(emb, [r["image_id"] for r in ok], load, "clean", chunk=32, workers=workers)
    out["end_to_end_chip_workers_img_s"] = len(ok) / (time.perf_counter() - t0)
    out["chip_workers"] = workers
    return out


def chip_fine_tune(device: str, recs: list[dict], lfw: Path, dry: bool) -> dict:
    """A fine-tune of dlib's network as config/finetune.yaml runs it (frozen prefix cached, CosFace on centred
    features, class-mean head, AdamW, distillation on) over dlib chips of step 6's faces, a grey block over the
    lower half standing in for the mask: its img/s and, on a GPU, its loss and distillation curves and final
    features against the same run on the CPU in fp32."""
    import pandas as pd

    from maskface.chipcache import build_prefix_cache
    from maskface.features import FaceInput, load_checkpoint, make_embedder
    from maskface.imageio import load_rgb
    from maskface.train import train_run

    n, k = (16, 10) if dry else (256, 10)
    ok = [r for r in recs[:n] if r.get("status") == "ok"]
    chips = make_embedder("dlib").chips([FaceInput(load_rgb(lfw / "images_deepfunneled" / r["image_id"]),
                                                   r.get("bbox")) for r in ok])
    masked = chips.copy()
    masked[:, 85:135, 25:125] = 128
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ids = [r["image_id"] for r in ok]
        for name, c in (("clean", chips), ("masked", masked)):     # the workflow's own prefix cache
            np.save(t / f"chips-{name}.npy", c)
            pd.DataFrame({"image_id": ids, "row": np.arange(len(ids))}).to_parquet(t / f"chips-{name}.parquet")
            build_prefix_cache((str(t / f"chips-{name}.npy"), str(t / f"chips-{name}.parquet")), t / f"{name}.npy",
                               t / f"{name}.parquet", init="dlib-resnet", frozen_blocks=k, device=device)
        man = pd.DataFrame({"image_id": ids, "identity": [i.split("/")[0] for i in ids], "status": "ok"})
        src = {"dataset": "lfw", "manifest": man, "clean": (str(t / "clean.npy"), str(t / "clean.parquet")),
               "masked": (str(t / "masked.npy"), str(t / "masked.parquet"))}
        train = {"init": "dlib-resnet", "frozen_blocks": k, "head": {"type": "cosface", "margin": 0.35, "scale": 30},
                 "center_features": True, "head_init": "class_means", "optimizer": "adamw", "lr": 1e-4,
                 "lr_mult": {"head": 10}, "lr_schedule": "cosine", "distill": 10, "mask_fraction": 0.5,
                 "iterations": 4 if dry else 20, "batch_size": 8 if dry else 64, "log_every": 1,
                 "checkpoint_every": 1000, "threads": 2, "prefetch": 2}
        runs = {}
        for dev in ([device] if device == "cpu" else [device, "cpu"]):
            spec = {"run": "chip", "seed": 1, "protocol": "external", "sources": [src],
                    "train": dict(train, device=dev, amp="none" if dev == "cpu" else "auto")}
            t0 = time.perf_counter()
            train_run(spec, t / dev)
            log = pd.read_csv(t / dev / "train_log.csv")
            model, _ = load_checkpoint(t / dev / "model.pt")
            with torch.inference_mode():
                feat = model.top(torch.from_numpy(np.load(t / "clean.npy")[:, 0].astype(np.float32)), k).numpy()
            runs[dev] = {"wall_s": time.perf_counter() - t0, "img_s": float(log["img_s"].iloc[1:].mean()),
                         "loss": log["loss"].round(4).tolist(), "distill": log["distill"].round(4).tolist(),
                         "feat": feat}
    out = {"images": len(ok), "frozen_blocks": k,
           **{dev: {key: v for key, v in r.items() if key != "feat"} for dev, r in runs.items()}}
    if device != "cpu":
        la, lb = np.array(runs[device]["loss"]), np.array(runs["cpu"]["loss"])
        out["gpu_vs_cpu"] = {"feature_cosine": _cos_stats(runs[device]["feat"], runs["cpu"]["feat"]),
                             "loss_max_rel_diff": float((np.abs(la - lb) / np.maximum(np.abs(lb), 1e-9)).max())}
    return out


def ddp(device: str, dry: bool) -> dict:
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and gpus < 2:
        return {"skipped": f"{gpus} GPU visible: a 2-rank run needs 2"}
    with tempfile.TemporaryDirectory() as tmp:
        src = _synthetic_source(Path(tmp), 200, 10)
        spec = _spec(src, device, dry, iterations=6, checkpoint_every=6)
        (Path(tmp) / "run").mkdir()
        (Path(tmp) / "run" / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "maskface.train", "run", "--spec", str(Path(tmp) / "run" / "spec.json")],
                             env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        return {"backend": "nccl" if device == "cuda" else "gloo", "ranks": 2,
                "model_written": (Path(tmp) / "run" / "model.pt").is_file()}


def markdown(res: dict) -> str:
    budget = "" if res["mode"] != "gpu" else (f" (budget {BUDGET_S} s: " + ("kept" if res["total_s"] <= BUDGET_S
                                                                             else "OVER") + ")")
    lines = ["# GPU check", "", f"mode: {res['mode']}, total {res['total_s']:.0f} s{budget}", ""]
    env = res.get("environment", {})
    lines += [f"- torch {env.get('torch')}, CUDA {env.get('cuda_build')}, cuDNN {env.get('cudnn')}, driver "
              f"{env.get('driver')}, devices {', '.join(d['name'] for d in env.get('devices', [])) or 'none'}, "
              f"bf16 {env.get('bf16_supported')}", ""]
    lines += ["| step | ok | s | result |", "|---|---|---:|---|"]
    for name, r in res.items():
        if not isinstance(r, dict) or "ok" not in r:
            continue
        body = r.get("error") or r.get("skipped") or json.dumps({k: v for k, v in r.items() if k not in ("ok", "wall_s", "traceback",
                                                                                    "tail")}, default=str)[:600]
        ok = "yes" if r["ok"] else ("skipped" if "skipped" in r else "NO")
        lines.append(f"| {name} | {ok} | {r['wall_s']} | {body.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="every step on the CPU at a tiny size")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/gpu_check"))
    ap.add_argument("--lfw", default=os.environ.get("MASKFACE_LFW", str(REPO.parent / "shared" / "data" / "lfw")))
    ap.add_argument("--n-align", type=int, default=None, help="LFW images to align (default 2000; --dry 12)")
    ap.add_argument("--deadline", type=float, default=540.0,
                    help="seconds after which the remaining steps are skipped (default 540: a 600 s command)")
    ap.add_argument("--steps", default="", help=f"comma-separated steps to run (default all: {', '.join(STEPS)})")
    a = ap.parse_args(argv)
    only = {x.strip() for x in a.steps.split(",") if x.strip()}
    if only - set(STEPS):
        ap.error(f"unknown step(s) {sorted(only - set(STEPS))}; steps: {', '.join(STEPS)}")
    only |= {NEEDS[x] for x in only if x in NEEDS} | ({"environment"} if only else set())
    # deterministic cuBLAS for the resume step's deterministic runs: read when CUDA makes its first handle
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        # the check has the whole machine: every GPU stays visible (a stage's own claim of one GPU would leave
        # the 2-rank step below a single device)
        from maskface.devices import gpu_device_count

        n = gpu_device_count()
        if n:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(k) for k in range(n))
    if not a.dry and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; use --dry for the CPU dry mode", file=sys.stderr)
        return 2
    device = "cpu" if a.dry else "cuda"
    n_align = a.n_align or (12 if a.dry else 2000)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    step = Check(out, "dry (CPU, tiny sizes)" if a.dry else "gpu", device, a.deadline, only)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    step("environment", lambda: environment())
    step("cuda_tests", lambda: cuda_tests(Path(a.lfw), out, not a.dry))
    step("train_throughput", lambda: train_throughput(torch.device(device), a.dry))
    step("resume_bit_identical", lambda: resume_identical(device, a.dry))
    step("bf16_vs_fp32", lambda: bf16_vs_fp32(device, a.dry))
    crops: list = []

    def align_step():
        r, recs = alignment(device, Path(a.lfw), n_align, max(1, (os.cpu_count() or 2) - 1))
        crops.extend(recs)
        return r

    step("alignment", align_step)
    step("embedders", lambda: embedders(device, crops[:512], a.dry))
    step("reference_network", lambda: reference(device, crops, Path(a.lfw), a.dry))
    step("chip_fine_tune", lambda: chip_fine_tune(device, crops, Path(a.lfw), a.dry))
    step("ddp_2_ranks", lambda: ddp(device, a.dry))
    step.write()
    print(markdown(step.res))
    return 0 if all(r.get("ok") for r in step.res.values() if isinstance(r, dict) and "ok" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
