"""Fine-tuning a pretrained network (train.init): dlib's ResNet split at its frozen blocks, the mirrored
activation caches, learning-rate groups, the validation fold, the per-fold models as one evaluation, and the
whole path through a real `snakemake` run on real faces (chips cut in worker processes, prefix cache, m50 and
m0 runs, fold evaluation, results/eval/<group>/<dataset>.json), whose model the evaluation's own embedder reads."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maskface.dlibnet import DlibResnet, DlibResnetTop
from maskface.foldeval import lfw_evaluation
from maskface.train import lr_multiplier, make_schedule, param_groups, train_run
from maskface.train_config import merged, with_preset
from maskface.train_data import StreamSampler, TrainData, build_data, held_out_folds, validation_fold

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def dlib_net() -> DlibResnet:
    return DlibResnet.from_dlib_file()


def test_prefix_then_top_is_the_network(dlib_net):
    x = dlib_net.to_input(np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8))
    with torch.no_grad():
        whole = dlib_net(x)
        for k in (0, 7, 10, 14):
            h = dlib_net.prefix(x, k)
            assert tuple(h.shape[1:]) == dlib_net.prefix_shape(k)
            torch.testing.assert_close(dlib_net.top(h, k), whole, rtol=1e-4, atol=1e-5)
    top = DlibResnetTop.from_network(dlib_net, 10)
    trainable = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.10.", "blocks.11.", "blocks.12.", "blocks.13.", "fc.")) for n in trainable)
    assert set(top.state_dict()) == set(dlib_net.state_dict())      # the whole network's state
    with pytest.raises(ValueError, match="frozen_blocks"):
        DlibResnetTop(15)
    center = torch.linspace(-1, 1, 128)
    shifted = DlibResnet(feature_center=center.tolist())
    shifted.load_state_dict(dlib_net.state_dict())          # the centre is an argument, not state
    with torch.no_grad():
        torch.testing.assert_close(shifted(x), whole - center)


def test_lr_mult_groups_freeze_and_keep_the_sphereface_groups():
    assert lr_multiplier("head.weight", {"head": 10}) == 10
    assert lr_multiplier("net.blocks.10.conv1.weight", {"net.blocks": 2, "net.blocks.10": 0.5}) == 0.5
    assert lr_multiplier("net.blocks.1.conv1.weight", {"net.blocks.10": 0.5}) == 1.0   # a prefix ends at a dot
    module = torch.nn.ModuleDict({"net": torch.nn.Linear(4, 3), "head": torch.nn.Linear(3, 2)})
    cfg = merged({"lr": 0.1})
    plain = param_groups(module, cfg)       # the SphereFace groups: weights, then biases at x2 without decay
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in plain] == [(2, 0.1, 0.0005), (2, 0.2, 0.0)]
    groups = param_groups(module, merged({"lr": 0.1, "lr_mult": {"head": 10, "net.bias": 0}}))
    assert sorted((round(g["lr"], 6), len(g["params"])) for g in groups) == [(0.1, 1), (1.0, 1), (2.0, 1)]
    assert not module["net"].bias.requires_grad
    opt = torch.optim.SGD(groups, lr=0.1)
    sched = make_schedule(opt, merged({"lr_schedule": "cosine", "iterations": 4}))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"] / groups[0]["initial_lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.5 - 0.5 * np.cos(np.pi / 4)])


def _mirrored(tmp: Path, n: int = 8) -> dict:
    """A mirrored cache: row i = [plain, mirror] with values i and -i, so a gather shows what it took."""
    arr = np.zeros((n, 2, 2, 3, 3), np.float16)
    for i in range(n):
        arr[i, 0], arr[i, 1] = i, -i
    np.save(tmp / "c.npy", arr)
    np.save(tmp / "m.npy", arr[1:] + np.float16(100))
    ids = [f"P{i % 4}/P{i % 4}_{i:04d}.jpg" for i in range(n)]
    pd.DataFrame({"image_id": ids, "row": np.arange(n)}).to_parquet(tmp / "c.parquet")
    pd.DataFrame({"image_id": ids[1:], "row": np.arange(n - 1)}).to_parquet(tmp / "m.parquet")  # one unmasked
    man = pd.DataFrame({"image_id": ids, "identity": [i.split("/")[0] for i in ids], "status": "ok"})
    return {"dataset": "d", "manifest": man, "clean": (tmp / "c.npy", tmp / "c.parquet"),
            "masked": (tmp / "m.npy", tmp / "m.parquet")}


def test_mirrored_caches_serve_the_mirror_row_and_the_masked_one(tmp_path):
    data = TrainData.from_sources([_mirrored(tmp_path)], mirrored=True, need_masked=True)
    assert data.mirrored and data.sample_shape == (2, 3, 3) and data.dtype == np.float16
    idx = np.array([3, 5, 0, 2])
    assert not data.has_masked[0] and data.has_masked[1:].all()            # sample 0 has no masked row
    out = data.gather(idx, np.array([False, True, False, True]), np.array([True, False, True, True]))
    # samples are sorted by image_id: 3 = P1_0005 (row 5), 5 = P2_0006 (6), 0 = P0_0000 (0), 2 = P1_0001 (1)
    assert [float(o[0, 0, 0]) for o in out] == [-5.0, 106.0, 0.0, 99.0]
    with pytest.raises(ValueError, match="does not match"):
        TrainData.from_sources([_mirrored(tmp_path)], mirrored=False)      # not 112x96 crops


def test_masked_variants_serve_the_variant_the_stream_drew(tmp_path):
    """A masked cache of three variants (index column ``variant``, variant after variant): gather takes the
    row of the asked variant, default the mask stage's (0); the stream draws variants uniformly among the
    samples served masked, seeded; one variant gives the stream it gave before variants existed."""
    src = _mirrored(tmp_path)
    n, m = 8, 7
    arr = np.load(tmp_path / "m.npy")
    np.save(tmp_path / "m3.npy", np.concatenate([arr, arr + np.float16(100), arr + np.float16(200)]))
    idx = pd.read_parquet(tmp_path / "m.parquet")
    pd.DataFrame({"image_id": list(idx["image_id"]) * 3, "variant": np.repeat(np.arange(3), m),
                  "row": np.arange(3 * m)}).to_parquet(tmp_path / "m3.parquet")
    data = TrainData.from_sources([dict(src, masked=(tmp_path / "m3.npy", tmp_path / "m3.parquet"))],
                                  mirrored=True, need_masked=True)
    assert data.variants == 3 and data.masked_row.shape == (n, 3) and not data.has_masked[0]
    pick = np.array([3, 5, 2])      # 3 = P1_0005 (value 5), 5 = P2_0006 (6), 2 = P1_0001 (1)
    out = data.gather(pick, np.ones(3, bool), np.zeros(3, bool), variant=np.array([2, 0, 1]))
    assert [float(o[0, 0, 0]) for o in out] == [305.0, 106.0, 201.0]
    assert [float(o[0, 0, 0]) for o in data.gather(pick, np.ones(3, bool))] == [105.0, 106.0, 101.0]
    has = np.ones(3000, bool)
    s3 = StreamSampler(3000, 5, 0.5, has, True, variants=3)
    i3, m3, f3, v3 = s3.take(0, 6000)
    assert set(np.unique(v3)) == {0, 1, 2} and all(0.3 < (v3[m3] == k).mean() < 0.37 for k in range(3))
    i1, m1, f1, v1 = StreamSampler(3000, 5, 0.5, has, True).take(0, 6000)
    for a, b in ((i1, i3), (m1, m3), (f1, f3)):                  # the variant draw comes last
        np.testing.assert_array_equal(a, b)
    assert not v1.any()
    np.testing.assert_array_equal(StreamSampler(3000, 5, 0.5, has, True, variants=3).take(2500, 1000)[3], v3[2500:3500])


def test_validation_fold_people_never_train(tmp_path):
    pairs = pd.DataFrame({"fold": [1, 2, 3], "a": ["P0/P0_0000.jpg", "P1/P1_0001.jpg", "Q/Q_1.jpg"],
                          "b": ["P0/P0_0004.jpg", "P1/P1_0005.jpg", "Q/Q_2.jpg"], "same": True})
    assert [validation_fold(pairs, k) for k in (1, 2, 3)] == [2, 3, 1]
    assert held_out_folds({"exclude_fold": 3, "train": {"validation": "next_fold"}}, pairs) == [3, 1]
    assert held_out_folds({"exclude_fold": 3, "train": {}}, pairs) == [3]
    src = _mirrored(tmp_path)
    spec = {"exclude_fold": 1, "pairs": pairs, "sources": [src],
            "train": {"validation": "next_fold", "init": "dlib-resnet", "mask_fraction": 0.5}}
    data = build_data(spec)
    assert data.classes == ["d/P2", "d/P3"] and len(data) == 4 and data.mirrored     # folds 1 and 2 held out
    spec["train"]["validation"] = "none"
    assert build_data(spec).classes == ["d/P1", "d/P2", "d/P3"]


def test_per_fold_models_as_one_evaluation_never_fill_in_missing_folds():
    def fold(k, acc, scores, same):
        proto = {"accuracy": acc, "threshold": 0.3, "n_pairs": len(scores), "n_missing": 0, "scores": scores,
                 "same": same}
        return {"fold": k, "model": f"m{k}", "settings": {"metric": "cosine"}, "note": "n", "feature": "f",
                "protocols": {"clean": proto, "masked": dict(proto, accuracy=acc - 0.1)}}
    evals = [fold(3, 0.9, [0.9, 0.1, 0.8, 0.2], [True, False, True, False]),
             fold(1, 0.8, [0.7, 0.6, None, 0.1], [True, False, True, False])]
    doc = lfw_evaluation(evals, model="g-m50", dataset="lfw", all_folds=range(1, 11))
    assert doc["folds_run"] == [1, 3] and doc["folds_not_run"] == [2, 4, 5, 6, 7, 8, 9, 10]
    c = doc["protocols"]["clean"]
    assert c["folds"] == [1, 3] and c["fold_accuracy"] == [0.8, 0.9] and len(c["threshold"]) == 2
    assert c["mean"] == pytest.approx(0.85) and c["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert 0.5 < c["auc"] <= 1.0 and c["n_pairs"] == 8
    with pytest.raises(ValueError, match="same fold"):
        lfw_evaluation(evals + [evals[0]], model="g", dataset="lfw", all_folds=range(1, 11))


def _prefix_spec(tmp: Path, net: DlibResnet, k: int = 12, **train) -> tuple[dict, np.ndarray]:
    """(a chip run's spec over 12 random chips' frozen-prefix activations, plain and mirrored; those
    activations). The masked cache is the chips with a grey block over the lower half, as a mask would be."""
    rng = np.random.default_rng(1)
    chips = rng.integers(0, 256, (12, 150, 150, 3), dtype=np.uint8)
    masked = chips.copy()
    masked[:, 85:130, 30:120] = 128

    def prefix(c):
        with torch.no_grad():
            return np.stack([net.prefix(net.to_input(x), k).numpy()
                             for x in (c, np.ascontiguousarray(c[:, :, ::-1]))], axis=1).astype(np.float16)
    pre = prefix(chips)
    np.save(tmp / "p.npy", pre)
    np.save(tmp / "pm.npy", prefix(masked))
    ids = [f"P{i % 3}/P{i % 3}_{i:04d}.jpg" for i in range(12)]
    for name in ("p", "pm"):
        pd.DataFrame({"image_id": ids, "row": np.arange(12)}).to_parquet(tmp / f"{name}.parquet")
    man = pd.DataFrame({"image_id": ids, "identity": [i.split("/")[0] for i in ids], "status": "ok"})
    src = {"dataset": "d", "manifest": man, "clean": (str(tmp / "p.npy"), str(tmp / "p.parquet")),
           "masked": (str(tmp / "pm.npy"), str(tmp / "pm.parquet"))}
    cfg = {"init": "dlib-resnet", "frozen_blocks": k, "head": {"type": "cosface"}, "center_features": True,
           "head_init": "class_means", "optimizer": "adamw", "lr": 1e-3, "lr_mult": {"head": 10},
           "lr_schedule": "cosine", "iterations": 6, "batch_size": 6, "mask_fraction": 0.5,
           "device": "cpu", "log_every": 2, "checkpoint_every": 2, "prefetch": 2}
    cfg.update(train)
    return {"run": "ft", "seed": 2, "sources": [src], "train": cfg}, pre


def test_a_fine_tune_resumes_bit_identically(tmp_path, dlib_net):
    """A chip run stopped at a checkpoint and resumed ends with the weights of an uncut run (distillation on)."""
    k = 12
    spec, pre = _prefix_spec(tmp_path, dlib_net, k, distill=1.0)
    train_run(spec, tmp_path / "a")
    train_run(spec, tmp_path / "b", stop_after=4)
    train_run(spec, tmp_path / "b")
    from maskface.features import load_checkpoint
    net_a, meta = load_checkpoint(tmp_path / "a" / "model.pt")
    net_b, _ = load_checkpoint(tmp_path / "b" / "model.pt")
    assert isinstance(net_a, DlibResnet) and meta["input"]["height"] == 150
    assert meta["eval"] == {"mean_subtraction": True, "metric": "cosine"} and meta["meta"]["init"] == "dlib-resnet"
    # the network subtracts its mean training descriptor: the training chips' features (clean and masked, as
    # mask_fraction > 0) average to 0
    assert net_a.centred and len(meta["arch_kwargs"]["feature_center"]) == 128
    with torch.no_grad():
        f = torch.cat([net_a.top(torch.from_numpy(a[:, 0].astype(np.float32)), k)
                       for a in (pre, np.load(tmp_path / "pm.npy"))])
    assert f.mean(0).abs().max() < 1e-5 * f.abs().max()
    for (n, a), (_, b) in zip(net_a.state_dict().items(), net_b.state_dict().items()):
        assert torch.equal(a, b), n
    moved = [n for n, v in net_a.state_dict().items() if not torch.equal(v, dlib_net.state_dict()[n])]
    assert moved and all(n.startswith(("blocks.12.", "blocks.13.", "fc.")) for n in moved)   # the frozen part stayed
    log_a = pd.read_csv(tmp_path / "a" / "train_log.csv")
    log_b = pd.read_csv(tmp_path / "b" / "train_log.csv")
    assert log_a["distill"].gt(0).all() and meta["meta"]["distill"] == 1.0
    np.testing.assert_allclose(log_b["distill"], log_a["distill"], rtol=1e-9)  # the cut window restored once


def test_wise_alpha_saves_the_weight_average_and_finishes_from_the_kept_checkpoint(tmp_path, dlib_net, caplog):
    """train.wise_alpha: the saved network is alpha x fine-tuned + (1 - alpha) x dlib's, every weight (the
    frozen ones exactly dlib's); a run
    finished again with another alpha resumes its checkpoint at the end (no training) and recomputes the mean
    feature it subtracts under the averaged weights."""
    import logging

    from maskface.features import load_checkpoint
    from maskface.train import spec_digest

    k = 12
    spec, pre = _prefix_spec(tmp_path, dlib_net, k)
    train_run(spec, tmp_path / "r")
    ft, _ = load_checkpoint(tmp_path / "r" / "model.pt")
    wise = {**spec, "train": {**spec["train"], "wise_alpha": 0.7}}
    assert spec_digest(wise) == spec_digest(spec)        # the training is the same: its checkpoint resumes
    with caplog.at_level(logging.INFO, logger="maskface.train"):
        summary = train_run(wise, tmp_path / "r")
    assert "resumed ft at iteration 6" in caplog.text and summary["iterations"] == 6
    net, meta = load_checkpoint(tmp_path / "r" / "model.pt")
    assert meta["meta"]["wise_alpha"] == 0.7
    start, tuned, mixed = dlib_net.state_dict(), ft.state_dict(), net.state_dict()
    moved = [n for n in tuned if not torch.equal(tuned[n], start[n])]
    assert moved and all(n.startswith(("blocks.12.", "blocks.13.", "fc.")) for n in moved)
    for n in moved:
        torch.testing.assert_close(mixed[n], 0.7 * tuned[n] + 0.3 * start[n], rtol=1e-5, atol=1e-6)
    for n in set(tuned) - set(moved):
        assert torch.equal(mixed[n], start[n]), n         # bit for bit: the frozen part is dlib's own
    # the subtracted mean is the averaged network's own: its training features (clean and masked) average to 0
    with torch.no_grad():
        f = torch.cat([net.top(torch.from_numpy(a[:, 0].astype(np.float32)), k)
                       for a in (pre, np.load(tmp_path / "pm.npy"))])
    assert f.mean(0).abs().max() < 1e-5 * f.abs().max()
    assert not torch.allclose(net.feature_center, ft.feature_center)
    # the checkpoint still holds the fine-tuned weights: alpha 1 gives the first model back
    train_run(spec, tmp_path / "r")
    again, _ = load_checkpoint(tmp_path / "r" / "model.pt")
    for n, v in again.state_dict().items():
        assert torch.equal(v, tuned[n]), n
    with pytest.raises(ValueError, match="wise_alpha 0.5 needs train.init"):
        with_preset({"wise_alpha": 0.5}, gpu_here=False)
    with pytest.raises(ValueError, match=r"wise_alpha must be in \[0, 1\]"):
        with_preset({"wise_alpha": 1.5, "init": "dlib-resnet"}, gpu_here=False)


def test_distillation_targets_and_what_the_term_keeps(tmp_path, dlib_net):
    """The targets are the initial network's clean features, plain and mirrored; a strong distillation term keeps
    the features of the clean and the masked chips near them, where the head alone lets both drift."""
    from maskface.features import load_checkpoint
    from maskface.train import build_network, distill_term, teacher_targets

    k = 12
    spec, pre = _prefix_spec(tmp_path, dlib_net, k)
    data = TrainData.from_sources(spec["sources"], mirrored=True, need_masked=True)
    net, _ = build_network(merged(spec["train"]))
    targets, var = teacher_targets(net, data, torch.device("cpu"))
    with torch.no_grad():
        ref = [dlib_net.top(torch.from_numpy(pre[data.clean_row, m].astype(np.float32)), k).numpy() for m in (0, 1)]
    np.testing.assert_allclose(targets[:, 0], ref[0], atol=1e-5)
    np.testing.assert_allclose(targets[:, 1], ref[1], atol=1e-5)
    flat = targets.reshape(-1, targets.shape[2])
    assert var == pytest.approx(((flat - flat.mean(0)) ** 2).sum(1).mean(), rel=1e-6)
    t = torch.from_numpy(targets[:, 0])
    assert float(distill_term(t, t, var)) == 0 and float(distill_term(t + 0.1, t, var)) > 0

    def drift(out):
        """Mean squared distance to the targets over the teacher's variance: (clean, masked) chips, plain."""
        model, meta = load_checkpoint(out / "model.pt")
        centre = torch.tensor(meta["arch_kwargs"]["feature_center"])
        res = []
        for arr in (pre, np.load(tmp_path / "pm.npy")):
            with torch.no_grad():
                f = model.top(torch.from_numpy(arr[data.clean_row, 0].astype(np.float32)), k) + centre
            res.append(float(distill_term(f, t, var)))
        return res

    # 10 AdamW steps at 1e-4: without the term the raw features drift ~66 variances away (the cosine head does
    # not see their scale), with it ~6 (clean) and ~11 (masked); the masked chips start ~6 away
    train_run(_prefix_spec(tmp_path, dlib_net, k, distill=0.0, lr=1e-4, iterations=10)[0], tmp_path / "off")
    train_run(_prefix_spec(tmp_path, dlib_net, k, distill=50.0, lr=1e-4, iterations=10)[0], tmp_path / "on")
    (clean_off, masked_off), (clean_on, masked_on) = drift(tmp_path / "off"), drift(tmp_path / "on")
    assert clean_on < 0.3 * clean_off, (clean_on, clean_off)
    assert masked_on < 0.3 * masked_off, (masked_on, masked_off)


# ------------------------------------------------------------------------- the workflow, for real

def _tiny_lfw(lfw: Path, root: Path) -> Path:
    """12 LFW people with at least 3 photos, 3 folds of pairs (4 people each): fold 1's model trains on fold
    3's people, fold 2 gives its threshold."""
    people = []
    for d in sorted((lfw / "images_deepfunneled").iterdir()):
        if d.is_dir() and len(list(d.glob("*.jpg"))) >= 3:
            people.append(d.name)
            if len(people) == 12:
                break
    tiny = root / "tinylfw"
    for p in people:
        (tiny / "images_deepfunneled" / p).mkdir(parents=True)
        for k in (1, 2, 3):
            shutil.copy(lfw / "images_deepfunneled" / p / f"{p}_{k:04d}.jpg", tiny / "images_deepfunneled" / p)
    lines = ["3\t4"]
    for f in range(3):
        P = people[4 * f:4 * f + 4]
        lines += [f"{p}\t1\t2" for p in P]
        lines += [f"{P[i]}\t3\t{P[(i + 1) % 4]}\t3" for i in range(4)]
    (tiny / "pairs.txt").write_text("\n".join(lines) + "\n")
    return tiny


@pytest.mark.lfw
@pytest.mark.slow
def test_fine_tune_through_snakemake_on_real_faces(lfw, tmp_path):
    from conftest import snakemake_run

    tiny = _tiny_lfw(lfw, tmp_path)
    cfg = {
        "datasets": {"tinylfw": {"source": str(tiny), "format": "lfw", "role": "test",
                                 "images_subdir": "images_deepfunneled", "pairs": str(tiny / "pairs.txt")}},
        "align": {"shards": 2, "threads": 1},
        "mask": {"threads": 1},
        "evaluate": {"models": {}, "chunk": 8},            # chips in chunks of 8: several chunks, 2 workers
        "train": {"protocol": "lfw_unrestricted", "preset": "none", "name": "tft", "mask_fractions": [0.5, 0.0],
                  "folds": [1], "validation": "next_fold", "init": "dlib-resnet", "frozen_blocks": 12,
                  "head": {"type": "cosface"}, "center_features": True, "head_init": "class_means",
                  "optimizer": "adamw", "lr": 1e-4, "lr_mult": {"head": 10}, "lr_schedule": "cosine", "distill": 5,
                  "mask_variants": 2, "stage": str(tmp_path / "scratch"),
                  "iterations": 4, "batch_size": 8, "min_images": 2, "device": "cpu", "threads": 2,
                  "checkpoint_every": 2, "log_every": 2, "eval_batch_size": 8},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    snakemake_run(tmp_path, "train_all", "--configfile", str(tmp_path / "config.yaml"))
    res = tmp_path / "results"
    clean = pd.read_parquet(res / "train_cache/tinylfw/chips-clean.parquet")
    assert len(clean) == 36 and np.load(res / "train_cache/tinylfw/chips-clean.npy", mmap_mode="r").shape == (36, 150, 150, 3)
    masked = pd.read_parquet(res / "train_cache/tinylfw/chips-masked.parquet")
    mask_ok = pd.read_parquet(res / "manifests/tinylfw/masked.parquet").query("status == 'ok'")
    assert set(masked["image_id"]) == set(mask_ok["image_id"])       # a skipped mask gets no masked chip
    # mask_variants 2: the stage's own masks (variant 0), then a second draw on the same faces (variant 1)
    n_m = len(mask_ok)
    assert list(masked["variant"]) == [0] * n_m + [1] * n_m and list(masked["row"]) == list(range(2 * n_m))
    assert list(masked["image_id"][:n_m]) == list(masked["image_id"][n_m:])
    chips_m = np.load(res / "train_cache/tinylfw/chips-masked.npy", mmap_mode="r").astype(np.float32)
    diff = np.abs(chips_m[:n_m] - chips_m[n_m:])
    upper, lower = diff[:, :45].mean((1, 2, 3)), diff[:, 95:].mean((1, 2, 3))
    assert np.median(lower) > 5 and np.median(upper) < np.median(lower) / 3, (upper, lower)
    pre = np.load(res / "train_cache/tinylfw/prefix-clean.npy", mmap_mode="r")
    assert pre.shape == (36, 2, 256, 4, 4) and pre.dtype == np.float16
    assert np.load(res / "train_cache/tinylfw/prefix-masked.npy", mmap_mode="r").shape == (2 * n_m, 2, 256, 4, 4)
    for group in ("tft-m50", "tft-m0"):
        fe = json.loads((res / f"models/{group}-fold1-seed1/fold_eval.json").read_text())
        assert fe["validation_fold"] == 2 and set(fe["protocols"]) == {"clean", "mixed", "masked"}
        assert fe["protocols"]["clean"]["validation"]["fold"] == 2 and 0 <= fe["protocols"]["clean"]["validation"]["auc"] <= 1
        doc = json.loads((res / f"eval/{group}/tinylfw.json").read_text())
        assert doc["folds_run"] == [1] and doc["folds_not_run"] == [2, 3]
        assert doc["protocols"]["clean"]["fold_accuracy"] == [fe["protocols"]["clean"]["accuracy"]]
        assert (res / f"eval/{group}/tinylfw.md").read_text().count("| clean |") == 2
    # train.stage: each job trained on local copies of its prefix caches, and removed them at its end
    for group, n_files in (("tft-m50", 2), ("tft-m0", 1)):
        log_text = (res / f"logs/train/{group}-fold1-seed1.log").read_text()
        assert f"staged {n_files} cache file(s)" in log_text and str(tmp_path / "scratch") in log_text, log_text[-2000:]
    assert list((tmp_path / "scratch").iterdir()) == []
    prefix_logs = list((res / "logs/prefix_cache/tinylfw").glob("*.log"))        # a job that may use a GPU
    assert prefix_logs and all("device cpu (" in p.read_text() for p in prefix_logs)
    log = pd.read_csv(res / "models/tft-m50-fold1-seed1/train_log.csv")
    assert list(log["iteration"]) == [2, 4] and log["masked_share"].gt(0).all() and log["distill"].gt(0).all()
    assert pd.read_csv(res / "models/tft-m0-fold1-seed1/train_log.csv")["masked_share"].eq(0).all()
    # the chips the fold evaluation scores are the evaluation's own: its dlib-resnet embedder reads the model
    from maskface.features import DlibResnetEmbedder, SourceLoader
    from maskface.foldeval import embed_chip_rows
    model = res / "models/tft-m50-fold1-seed1/model.pt"
    emb = DlibResnetEmbedder(device="cpu", checkpoint=str(model), flip=True)
    aligned = pd.read_parquet(res / "manifests/tinylfw/aligned.parquet").set_index("image_id")
    ids = list(clean["image_id"][:4])
    load = SourceLoader(tiny / "images_deepfunneled", {i: (list(aligned.loc[i, "bbox"])
                                                           if aligned.loc[i, "status"] == "ok" else None) for i in ids})
    want = emb.embed([load(i) for i in ids])
    from maskface.chipcache import open_chips
    arr, _ = open_chips(res / "train_cache/tinylfw/chips-clean.npy", res / "train_cache/tinylfw/chips-clean.parquet")
    from maskface.features import load_checkpoint
    net, meta = load_checkpoint(model)
    got = embed_chip_rows(net, meta["input"], arr, np.arange(4), torch.device("cpu"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # nothing to do afterwards; a fold added trains that fold only (the runs already trained stay)
    again = snakemake_run(tmp_path, "-n", "train_all", "--configfile", str(tmp_path / "config.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr
    cfg["train"]["folds"] = [1, 2]
    (tmp_path / "more.yaml").write_text(json.dumps(cfg))
    plan = snakemake_run(tmp_path, "-n", "train_all", "--configfile", str(tmp_path / "more.yaml"))
    out = plan.stdout + plan.stderr
    trained = set(re.findall(r"output: results/models/([\w.-]+)/model\.pt", out))
    assert trained == {"tft-m50-fold2-seed1", "tft-m0-fold2-seed1"}, trained
    # train.wise_alpha: the two runs finish again from their kept checkpoints (no caches rebuilt, no training)
    # and save the weight average; the fold evaluations follow
    before = {n: v.clone() for n, v in load_checkpoint(model)[0].state_dict().items()}
    cfg["train"]["wise_alpha"] = 0.5
    (tmp_path / "wise.yaml").write_text(json.dumps(cfg))
    out = snakemake_run(tmp_path, "train_all", "--configfile", str(tmp_path / "wise.yaml"))
    jobs = set(re.findall(r"^(?:local)?rule (\w+):", out.stdout + out.stderr, re.M))
    assert jobs <= {"train", "train_fold_eval", "train_lfw_eval", "train_summary", "train_all"}, jobs
    for group in ("tft-m50", "tft-m0"):
        log_text = (res / f"logs/train/{group}-fold1-seed1.log").read_text()
        assert f"resumed {group}-fold1-seed1 at iteration 4" in log_text, log_text[-2000:]
    net, meta = load_checkpoint(model)
    assert meta["meta"]["wise_alpha"] == 0.5
    start = DlibResnet.from_dlib_file().state_dict()
    for n, v in net.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[n] + 0.5 * start[n], rtol=1e-5, atol=1e-6)
    fe = json.loads((res / "models/tft-m50-fold1-seed1/fold_eval.json").read_text())
    assert fe["protocols"]["clean"]["validation"]["fold"] == 2
    # train.people_fraction: the runs train again on a share of fold 1's training people (fold 3's four)
    from maskface.train_data import people_subset
    trainees = sorted({line.split("\t")[0] for line in (tiny / "pairs.txt").read_text().splitlines()[17:]
                       if len(line.split("\t")) == 3})
    assert len(trainees) == 4
    frac = next(f for f in (0.25, 0.5, 0.75) if 0 < len(people_subset(trainees, f)) < 4)
    cfg["train"].update(wise_alpha=1.0, people_fraction=frac)
    (tmp_path / "share.yaml").write_text(json.dumps(cfg))
    snakemake_run(tmp_path, "train_all", "--configfile", str(tmp_path / "share.yaml"))
    meta = load_checkpoint(model)[1]["meta"]
    assert meta["people_fraction"] == frac and meta["classes"] == len(people_subset(trainees, frac)), meta
