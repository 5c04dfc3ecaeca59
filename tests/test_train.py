"""Training stage: crop caches, the sample stream (mask_fraction, flip), exact resume (in-process stop and
SIGKILL), protocol selection, fold evaluation, model file compatibility, and a loss that falls on real LFW."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maskface.imageio import encode_png
from maskface.testing import synthetic_crops, write_training_workdir
from maskface.foldeval import evaluate_fold, summarize_evals
from maskface.train import spec_digest, train_run
from maskface.train_config import merged, run_names
from maskface.train_data import (BatchStream, StreamSampler, TrainData, build_cache, fold_identities, open_cache,
                                 people_subset, select_training)

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def _write_dataset(root: Path, n_id: int = 6, per_id: int = 5, seed: int = 0, masked: bool = True) -> dict:
    """Synthetic 112x96 crops (maskface.testing.synthetic_crops) in shards and caches; P0's first image has no
    masked crop and P1's first is a center_crop."""
    root.mkdir(parents=True, exist_ok=True)
    clean_rows, masked_rows, man = [], [], []
    for iid, identity, img, m in synthetic_crops(n_id, per_id, seed):
        clean_rows.append({"image_id": iid, "png": encode_png(img), "status": "ok"})
        if iid != "P0/P0_0001.jpg":  # one image without a masked crop
            masked_rows.append({"image_id": iid, "masked_png": encode_png(m)})
        man.append({"image_id": iid, "identity": identity, "status": "ok" if iid != "P1/P1_0001.jpg" else "center_crop"})
    half = len(clean_rows) // 2
    pd.DataFrame(clean_rows[:half]).to_parquet(root / "shard-0.parquet")
    pd.DataFrame(clean_rows[half:]).to_parquet(root / "shard-1.parquet")
    pd.DataFrame(masked_rows).to_parquet(root / "mshard-0.parquet")
    pd.DataFrame(man).to_parquet(root / "aligned.parquet")
    build_cache([root / "shard-0.parquet", root / "shard-1.parquet"], root / "clean.npy", root / "clean.parquet")
    src = {"dataset": "syn", "manifest": str(root / "aligned.parquet"),
           "clean": [str(root / "clean.npy"), str(root / "clean.parquet")]}
    if masked:
        build_cache([root / "mshard-0.parquet"], root / "masked.npy", root / "masked.parquet")
        src["masked"] = [str(root / "masked.npy"), str(root / "masked.parquet")]
    return src


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> dict:
    return _write_dataset(tmp_path_factory.mktemp("syn"))


def _spec(src: dict, **train) -> dict:
    t = {"arch": {"depth": 4, "width": 0.125}, "iterations": 12, "batch_size": 6, "lr": 0.05, "lr_steps": [8],
         "log_every": 3, "checkpoint_every": 3, "threads": 2, "prefetch": 2, "device": "cpu"}
    t.update(train)      # on the CPU unless a test asks for its ``device`` (a GPU machine runs both)
    return {"run": "t", "seed": 3, "protocol": "external", "sources": [src], "train": t}


# --------------------------------------------------------------------------------------------- caches

def test_cache_round_trip_pixels(syn):
    arr, idx = open_cache(*syn["clean"])
    assert arr.shape == (30, 112, 96, 3) and arr.dtype == np.uint8
    assert list(idx["image_id"]) == sorted(idx["image_id"]) and list(idx["row"]) == list(range(30))
    shard = pd.read_parquet(Path(syn["clean"][0]).parent / "shard-1.parquet")
    from maskface.imageio import decode_png
    r = shard.iloc[3]
    np.testing.assert_array_equal(arr[int(idx.set_index("image_id").loc[r["image_id"], "row"])], decode_png(r["png"]))
    m_arr, m_idx = open_cache(*syn["masked"])  # binary column found by type ("masked_png")
    assert len(m_idx) == 29 and (m_arr[:, 60:] == 128).all()


def test_cache_rejects_wrong_crop_size(tmp_path):
    pd.DataFrame({"image_id": ["a/a_0001.jpg"], "png": [encode_png(np.zeros((112, 112, 3), np.uint8))]}).to_parquet(
        tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="112x96"):
        build_cache([tmp_path / "s.parquet"], tmp_path / "c.npy", tmp_path / "c.parquet")


# --------------------------------------------------------------------------------------- sample stream

def test_stream_epochs_are_permutations_and_deterministic():
    has = np.ones(10, bool)
    s = StreamSampler(10, 7, 0.5, has, True)
    idx, msk, flp, _ = s.take(0, 30)
    for e in range(3):
        assert sorted(idx[10 * e:10 * e + 10]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:20])  # fresh each epoch
    # any split of the stream gives the same samples, masks and flips (resume never shifts the data)
    a = StreamSampler(10, 7, 0.5, has, True).take(7, 9)
    b = [np.concatenate(p) for p in zip(StreamSampler(10, 7, 0.5, has, True).take(7, 4),
                                         StreamSampler(10, 7, 0.5, has, True).take(11, 5))]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a[0], idx[7:16])
    assert not np.array_equal(StreamSampler(10, 8, 0.5, has, True).take(0, 10)[0], idx[:10])


def test_stream_mask_fraction_is_per_sample_and_respects_missing_masks():
    n = 4000
    has = np.ones(n, bool)
    has[:1000] = False
    s = StreamSampler(n, 1, 0.5, has, False)
    idx, msk, flp, _ = s.take(0, 2 * n)
    assert not flp.any()
    assert not msk[np.isin(idx, np.arange(1000))].any()
    share = msk[~np.isin(idx, np.arange(1000))].mean()
    assert 0.47 < share < 0.53
    # fresh draws each epoch: a sample is not masked in both epochs at a 50% rate
    e0 = dict(zip(idx[:n], msk[:n]))
    e1 = dict(zip(idx[n:], msk[n:]))
    assert 0.4 < np.mean([e0[i] != e1[i] for i in range(1000, n)]) < 0.6
    assert not StreamSampler(n, 1, 0.0, has, True).take(0, n)[1].any()
    assert 0.45 < StreamSampler(n, 1, 0.0, has, True).take(0, n)[2].mean() < 0.55


def test_train_data_selection_and_masked_gather(syn):
    data = TrainData.from_sources([syn], statuses=["ok"])
    assert len(data) == 29 and data.num_classes == 6  # the center_crop image is left out
    assert data.has_masked.sum() == 28
    i = np.arange(len(data))
    both = data.gather(i, data.has_masked)
    assert (both[data.has_masked][:, 60:] == 128).all()
    clean = data.gather(i, np.zeros(len(data), bool))
    assert not (clean[:, 60:] == 128).all(axis=(1, 2, 3)).any()
    few = TrainData.from_sources([syn], statuses=["ok", "center_crop"], min_images=5)
    assert len(few) == 30
    assert TrainData.from_sources([syn], min_images=5).num_classes == 5  # P1 keeps 4 "ok" images
    with pytest.raises(ValueError, match="masked"):
        TrainData.from_sources([dict(syn, masked=None)], need_masked=True)


def test_ddp_slices_cover_the_global_batch(syn):
    data = TrainData.from_sources([syn])
    s = StreamSampler(len(data), 1, 0.0, data.has_masked, False)
    full = next(iter(BatchStream(data, s, 2, 3, 8)))
    parts = [next(iter(BatchStream(data, s, 2, 3, 8, rank=r, world=2))) for r in range(2)]
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full[1])
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), full[2])


def test_protocol_helpers():
    pairs = pd.DataFrame({"fold": [1, 1, 2], "a": ["A/A_0001.jpg", "B/B_0001.jpg", "C/C_0001.jpg"],
                          "b": ["A/A_0002.jpg", "D/D_0003.jpg", "C/C_0002.jpg"], "same": [True, False, True]})
    assert fold_identities(pairs, 1) == {"A", "B", "D"}
    with pytest.raises(ValueError):
        fold_identities(pairs, 3)
    man = pd.DataFrame({"image_id": ["A/1", "C/1", "C/2", "E/1"], "identity": ["A", "C", "C", "E"],
                        "status": ["ok", "ok", "ok", "no_face"]})
    assert list(select_training(man, exclude_identities={"A"})["identity"]) == ["C", "C"]
    m = {"mask_fraction": 0.0, "group": "x"}
    assert run_names({"folds": [1, 2], "seeds": [1, 2], "name": "x"}) == {
        "x-fold1-seed1": {"fold": 1, "seed": 1, **m}, "x-fold2-seed1": {"fold": 2, "seed": 1, **m},
        "x-fold1-seed2": {"fold": 1, "seed": 2, **m}, "x-fold2-seed2": {"fold": 2, "seed": 2, **m}}
    assert list(run_names({"protocol": "external", "seeds": [1, 2, 3, 4, 5]})) == [f"sphereface-seed{s}" for s in range(1, 6)]
    assert merged({"head": {"type": "cosface"}})["head"]["lambda"]["base"] == 1000.0


# ---------------------------------------------------------------------------------------------- resume

def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a / "model.pt"), _weights(b / "model.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(a / "checkpoint.pt", weights_only=False)
    sb = torch.load(b / "checkpoint.pt", weights_only=False)
    for k in sa["head"]:
        assert torch.equal(sa["head"][k], sb["head"][k])
    mom_a = [v["momentum_buffer"] for v in sa["optimizer"]["state"].values()]
    mom_b = [v["momentum_buffer"] for v in sb["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    la, lb = pd.read_csv(a / "train_log.csv"), pd.read_csv(b / "train_log.csv")
    pd.testing.assert_frame_equal(la.drop(columns="img_s"), lb.drop(columns="img_s"))


@pytest.fixture()
def deterministic(device):
    """``train.deterministic`` for a run on ``device``: on a GPU the run asks for deterministic kernels (a
    process-wide torch setting, restored afterwards); on the CPU the kernels are deterministic already."""
    yield device == "cuda"
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
@pytest.mark.parametrize("grad", ["exact", "caffe"])
def test_resume_after_interrupt_equals_uninterrupted(syn, tmp_path, grad, device, deterministic):
    spec = _spec(syn, mask_fraction=0.5, head={"type": "asoftmax", "grad": grad}, device=device,
                 deterministic=deterministic)
    full = train_run(spec, tmp_path / "full")
    assert full["iterations"] == 12 and "stopped" not in full
    part = train_run(spec, tmp_path / "cut", stop_after=5)  # checkpoints at 3 and at the stop (5), mid log window
    assert part.get("stopped") and not (tmp_path / "cut" / "model.pt").exists()
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["iteration"] == 5 and ck["data"]["position"] == 30 and ck["data"]["epoch"] == 1
    train_run(spec, tmp_path / "cut")
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    # the weights moved after the cut: comparing them can fail
    assert not torch.equal(ck["model"]["fc5.weight"], _weights(tmp_path / "full" / "model.pt")["fc5.weight"])


@pytest.mark.slow
def test_resume_after_sigkill(syn, tmp_path):
    spec = _spec(syn, iterations=20, checkpoint_every=2, log_every=2, batch_size=4, mask_fraction=0.5)
    ref = tmp_path / "ref"
    train_run(spec, ref)
    run = tmp_path / "killed"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "maskface.train", "run", "--spec", str(run / "spec.json")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        ck = run / "checkpoint.pt"
        if ck.exists():
            try:
                it = torch.load(ck, weights_only=False)["iteration"]
            except Exception:  # noqa: BLE001 - replaced while reading
                it = 0
            if it >= 4:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed_at = it
                break
        time.sleep(0.05)
    assert killed_at is not None and killed_at < 20, "the run finished before it could be killed"
    assert not (run / "model.pt").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed" in res.stderr
    _assert_same_run(ref, run)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torchrun_ddp_matches_one_process(syn, tmp_path, device, compiled):
    """2 processes (gloo on the CPU, NCCL on two GPUs), each half of the global batch: the same weights as one
    eager process, up to float summation order; also with ``train.compile`` (the network compiled inside the
    module that DDP wraps)."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    spec = _spec(syn, iterations=4, batch_size=8, mask_fraction=0.5, threads=1, log_every=2, device=device)
    train_run(spec, tmp_path / "one")
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ddp" / "spec.json").write_text(json.dumps({**spec, "train": {**spec["train"], "compile": compiled}}))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "maskface.train", "run", "--spec", str(tmp_path / "ddp" / "spec.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "model.pt"), _weights(tmp_path / "ddp" / "model.pt")
    gpu = device == "cuda"          # other kernels per batch size, TF32 convolutions in training
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3 if gpu else 1e-4, atol=1e-4 if gpu else 1e-5)
    la, lb = pd.read_csv(tmp_path / "one" / "train_log.csv"), pd.read_csv(tmp_path / "ddp" / "train_log.csv")
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-3 if gpu else 1e-5)
    np.testing.assert_array_equal(la["masked_share"], lb["masked_share"])


def _torchrun(spec_path: Path, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "maskface.train", "run", "--spec", str(spec_path), *extra],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_ddp_resume_mid_log_window_gives_the_rows_of_an_uncut_run(syn, tmp_path):
    """2 processes (gloo), cut at iteration 3 inside a 4-iteration log window, then resumed: the log rows equal
    those of the uncut 2-process run (the window is summed over the ranks before it is saved, restored once)."""
    spec = _spec(syn, iterations=8, batch_size=8, mask_fraction=0.5, threads=1, log_every=4, checkpoint_every=100)
    for name in ("uncut", "cut"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_text(json.dumps(spec))
    _torchrun(tmp_path / "uncut" / "spec.json")
    _torchrun(tmp_path / "cut" / "spec.json", "--stop-after", "3")
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["iteration"] == 3 and ck["window"]["n"] == 3 * 8      # both ranks' samples of iterations 1-3
    _torchrun(tmp_path / "cut" / "spec.json")
    a, b = pd.read_csv(tmp_path / "uncut" / "train_log.csv"), pd.read_csv(tmp_path / "cut" / "train_log.csv")
    assert list(a["iteration"]) == list(b["iteration"]) == [4, 8]
    np.testing.assert_array_equal(a["masked_share"], b["masked_share"])
    np.testing.assert_allclose(a[["loss", "accuracy"]], b[["loss", "accuracy"]], rtol=1e-6)


def test_rng_state_holds_the_run_device_only(monkeypatch):
    """A checkpoint keeps the CUDA generator of the device the run uses, so a resume that sees fewer GPUs works;
    earlier checkpoints (every visible device's state) still restore the run's own."""
    from maskface import train as T

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.zeros(4))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, int(state[0]))))
    dev = torch.device("cuda", 1)
    st = T._rng_state(dev)
    assert calls == [("get", dev)] and st["cuda"].shape == (4,)
    T._set_rng_state(st, dev)
    assert calls[-1] == ("set", dev, 0)
    old = dict(st, cuda=[torch.full((4,), 7), torch.full((4,), 9)])      # saved with 2 visible GPUs
    T._set_rng_state(old, torch.device("cuda", 0))
    assert calls[-1] == ("set", torch.device("cuda", 0), 7)
    n = len(calls)
    T._set_rng_state(old, torch.device("cuda", 3))                       # that device's state was never saved
    assert len(calls) == n


def test_a_staged_run_reads_local_copies_and_trains_the_same_weights(syn, tmp_path, monkeypatch):
    """train.stage: the job copies the caches to the folder, the run opens the copies, the result is the run's
    (stage is not in the digest: the same checkpoint resumes either way), and the copies go when the job ends."""
    import maskface.train_data as TD
    from maskface.train import launch, spec_digest

    opened = []
    real = TD.open_cache
    monkeypatch.setattr(TD, "open_cache", lambda npy, *a, **k: opened.append(str(npy)) or real(npy, *a, **k))
    local = tmp_path / "local"
    spec = _spec(syn, mask_fraction=0.5, iterations=6, stage=str(local))
    launch(spec, tmp_path / "staged")
    assert len(opened) == 2 and all(Path(p).parent.parent == local for p in opened), opened
    assert list(local.iterdir()) == []
    opened.clear()
    launch(_spec(syn, mask_fraction=0.5, iterations=6, stage="none"), tmp_path / "in_place")
    assert opened == [syn["clean"][0], syn["masked"][0]]
    assert spec_digest(spec) == spec_digest(_spec(syn, mask_fraction=0.5, iterations=6, stage="none"))
    wa, wb = _weights(tmp_path / "staged" / "model.pt"), _weights(tmp_path / "in_place" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _stop_with_sigterm(job: subprocess.Popen, ready, settle: float = 0.0, wait: float = 120.0) -> str:
    """Send SIGTERM to ``job`` once ``ready()`` (then ``settle`` seconds more); return its stderr once it ended."""
    try:
        deadline = time.time() + wait
        while time.time() < deadline and not ready():
            assert job.poll() is None, job.stderr.read()
            time.sleep(0.1)
        assert ready(), "never ready"
        time.sleep(settle)
        assert job.poll() is None
        job.send_signal(signal.SIGTERM)
        return job.communicate(timeout=wait)[1]
    finally:
        if job.poll() is None:
            job.kill()


# launch (the Snakemake job of a run) in a child process: spec JSON path, run folder
_LAUNCH = ("import json, logging, sys; logging.basicConfig(level=logging.INFO); "
           "from maskface.train import launch; launch(json.load(open(sys.argv[1])), sys.argv[2])")


def _launch_and_stop(spec_path: Path, out: Path, log_line: str) -> tuple[int, str]:
    """launch in a child, SIGTERM once its log holds ``log_line``; (exit status, its log)."""
    err_file = out.parent / f"{out.name}.stderr.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    with open(err_file, "w") as err_out:
        job = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(spec_path), str(out)], stderr=err_out,
                               text=True, env=env)
        _stop_with_sigterm(job, lambda: log_line in err_file.read_text())
    return job.returncode, err_file.read_text()


def test_a_job_stopped_by_sigterm_removes_its_staged_copies(syn, tmp_path):
    """scancel and a SLURM time limit send SIGTERM: the job exits (143) through its finally
    blocks, so the copies on the node's disk go with it."""
    local = tmp_path / "local"
    spec = _spec(syn, mask_fraction=0.5, iterations=100000, checkpoint_every=100000, stage=str(local))
    (tmp_path / "spec.json").write_text(json.dumps(spec, default=list))
    job = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(tmp_path / "spec.json"), str(tmp_path / "run")],
                           stderr=subprocess.PIPE, text=True)
    # SIGTERM 3 s after both copies are there: in the training loop
    err = _stop_with_sigterm(job, lambda: bool(list(local.glob("maskface-staged-*/1-*"))), settle=3.0)
    assert job.returncode == 143, err[-2000:]
    assert "staged 2 cache file(s)" in err and "stopped by signal 15" in err
    assert list(local.iterdir()) == []


def test_a_stopped_multi_gpu_job_passes_sigterm_on_to_torchrun(tmp_path):
    """launch runs torchrun as a child: a SIGTERM to the job reaches it (it stops its ranks), then the job exits."""
    child = ("import pathlib, signal, sys, time; d = pathlib.Path(sys.argv[1]); "
             "signal.signal(signal.SIGTERM, lambda *a: ((d / 'child-stopped').write_text(''), sys.exit(0))); "
             "(d / 'child-ready').write_text(''); time.sleep(120)")
    parent = ("import sys; from maskface.train import _run_child, _stop_signals\n"
              "with _stop_signals() as hold:\n"
              f"    _run_child([sys.executable, '-c', {child!r}, sys.argv[1]], hold=hold)")
    job = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path)], stderr=subprocess.PIPE, text=True)
    err = _stop_with_sigterm(job, (tmp_path / "child-ready").exists)
    assert job.returncode == 143, err[-2000:]
    assert (tmp_path / "child-stopped").exists()


# ------------------------------------------------------------------ signals at the moments between two steps

@pytest.fixture()
def sigterm_guard():
    """A SIGTERM that reaches the test process without the code's own handler fails the test instead of
    killing pytest."""
    def _unhandled(signum, frame):
        raise AssertionError(f"signal {signum} reached the test process unhandled")

    before = signal.signal(signal.SIGTERM, _unhandled)
    yield
    signal.signal(signal.SIGTERM, before)


def _signal_self(signum: int) -> None:
    """Send ``signum`` to this process and give its handler the time to run (it runs inside the sleep)."""
    os.kill(os.getpid(), signum)
    time.sleep(0.5)


def test_hold_defers_sigterm_and_ctrl_c_to_its_end(sigterm_guard):
    from maskface.train import _stop_signals
    for signum, raised in ((signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)):
        reached = []
        with pytest.raises(raised) as e:
            with _stop_signals() as hold:
                with hold():
                    _signal_self(signum)
                    reached.append(True)            # the block runs to its end ...
                reached.append(False)               # ... and the signal is raised there
        assert reached == [True], signum
        if raised is SystemExit:
            assert e.value.code == 143
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_while_torchrun_is_being_started_still_reaches_it(tmp_path, monkeypatch, sigterm_guard):
    """The signal lands inside Popen (the child exists, launch does not know it yet): the child is stopped
    all the same, then the job exits 143. Without the hold, the child was left running."""
    import maskface.train as T
    child = ("import pathlib, signal, sys, time; d = pathlib.Path(sys.argv[1]); "
             "signal.signal(signal.SIGTERM, lambda *a: ((d / 'child-stopped').write_text(''), sys.exit(0))); "
             "(d / 'child-ready').write_text(''); time.sleep(120)")
    real, started = subprocess.Popen, []

    def popen_then_signal(*args, **kwargs):
        p = real(*args, **kwargs)
        started.append(p)
        deadline = time.time() + 60
        while not (tmp_path / "child-ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        _signal_self(signal.SIGTERM)
        return p

    monkeypatch.setattr(T.subprocess, "Popen", popen_then_signal)
    try:
        with pytest.raises(SystemExit) as e:
            with T._stop_signals() as hold:
                T._run_child([sys.executable, "-c", child, str(tmp_path)], grace=30, hold=hold)
        assert e.value.code == 143
        assert (tmp_path / "child-stopped").exists()
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_sigterm_between_the_copies_and_the_run_leaves_no_copies(syn, tmp_path, monkeypatch, sigterm_guard):
    """The signal lands after the caches are copied, before launch has the mapping in hand: the copies go."""
    import maskface.train as T
    real = T.stage

    def stage_then_signal(*args, **kwargs):
        copies = real(*args, **kwargs)
        assert len(copies) == 2
        _signal_self(signal.SIGTERM)
        return copies

    monkeypatch.setattr(T, "stage", stage_then_signal)
    local = tmp_path / "local"
    with pytest.raises(SystemExit) as e:
        T.launch(_spec(syn, mask_fraction=0.5, stage=str(local)), tmp_path / "run")
    assert e.value.code == 143
    assert list(local.iterdir()) == [] and not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("nohup", [False, True])
def test_sighup_stops_a_job_like_sigterm_unless_it_runs_under_nohup(tmp_path, nohup):
    code = ("import os, signal, sys, time, logging; logging.basicConfig(); from maskface.train import _stop_signals\n"
            f"signal.signal(signal.SIGHUP, signal.{'SIG_IGN' if nohup else 'SIG_DFL'})\n"
            "with _stop_signals():\n"
            "    os.kill(os.getpid(), signal.SIGHUP); time.sleep(1)\n"
            "print('went on')")
    job = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if nohup:
        assert job.returncode == 0 and "went on" in job.stdout, job.stderr[-2000:]
    else:
        assert job.returncode == 129 and "stopped by signal 1" in job.stderr, job.stderr[-2000:]


def test_other_spec_starts_over(syn, tmp_path):
    spec = _spec(syn)
    train_run(spec, tmp_path / "r", stop_after=3)
    other = _spec(syn, lr=0.01)
    assert spec_digest(other) != spec_digest(spec)
    assert spec_digest(_spec(syn, threads=1, checkpoint_every=6)) == spec_digest(spec)
    train_run(other, tmp_path / "r")
    train_run(other, tmp_path / "fresh")
    _assert_same_run(tmp_path / "r", tmp_path / "fresh")


def test_a_rebuilt_index_with_new_provenance_keeps_the_digest(tmp_path):
    """The digest reads a Parquet input's table, not its bytes: the same rows written again with another
    provenance record (a cache rebuilt after a code change) keep it; other rows change it."""
    from maskface.manifest import write_parquet

    df = pd.DataFrame({"image_id": ["a/1", "b/1"], "row": [0, 1]})
    spec = {"run": "t", "sources": [{"dataset": "d", "manifest": str(tmp_path / "m.parquet")}]}
    write_parquet(df, tmp_path / "m.parquet", {"code": "one"})
    first = spec_digest(spec)
    write_parquet(df, tmp_path / "m.parquet", {"code": "two", "created": "later"})
    assert spec_digest(spec) == first
    write_parquet(df.assign(row=[1, 0]), tmp_path / "m.parquet", {"code": "one"})
    assert spec_digest(spec) != first


def test_an_init_checkpoint_file_is_in_the_digest_by_its_content(tmp_path):
    """train.init naming a checkpoint file: a run started from other weights under the same path starts over."""
    init = tmp_path / "init.pt"
    init.write_bytes(b"one")
    spec = {"run": "t", "train": {"init": str(init)}, "sources": []}
    first = spec_digest(spec)
    assert spec_digest(spec) == first
    init.write_bytes(b"two")
    assert spec_digest(spec) != first
    assert spec_digest({**spec, "train": {"init": "dlib-resnet"}}) != first


def test_an_option_added_later_keeps_the_digest_of_runs_that_do_not_use_it(tmp_path, monkeypatch):
    """train.mask_variants came after runs existed: at 1 it is left out of the digest, so a half-done run
    resumes its checkpoint under the new code; at 3 the digest changes."""
    import maskface.train_config as tc

    spec = {"run": "t", "train": {"init": "dlib-resnet"}, "sources": []}
    with monkeypatch.context() as m:
        m.delitem(tc.DEFAULTS, "mask_variants")         # the defaults before the option existed
        before = spec_digest(spec)
    assert spec_digest(spec) == before == spec_digest({**spec, "train": {"init": "dlib-resnet", "mask_variants": 1}})
    assert spec_digest({**spec, "train": {"init": "dlib-resnet", "mask_variants": 3}}) != before


def test_people_fraction_keeps_nested_shares_of_the_people_after_min_images_and_the_held_out_folds():
    """train.people_fraction (data-size curves): a share of the training people chosen by their names, the
    smaller share's people among the larger one's, applied after min_images and the held-out folds; at 1 it is
    left out of the digest (runs that existed before it resume)."""
    import maskface.train_config as tc

    people = [f"P{i:04d}" for i in range(2000)]
    half, quarter = people_subset(people, 0.5), people_subset(people, 0.25)
    assert quarter < half and 900 < len(half) < 1100 and 400 < len(quarter) < 600
    assert people_subset(reversed(people), 0.25) == quarter and people_subset(people, 1.0) == set(people)
    man = pd.DataFrame({"image_id": [f"{p}/{k}" for p in people for k in range(2)] + ["Solo/1"],
                        "identity": [p for p in people for _ in range(2)] + ["Solo"], "status": "ok"})
    excl = set(people[:1000])
    sel = select_training(man, min_images=2, exclude_identities=excl, people_fraction=0.5)
    kept = set(sel["identity"])
    assert kept == people_subset(set(people) - excl, 0.5) and "Solo" not in kept
    assert (sel.groupby("identity").size() == 2).all()          # whole people, every image of each
    with pytest.raises(ValueError, match="people_fraction 1e-06 keeps none of the 4 training people"):
        select_training(man.head(8), people_fraction=1e-6)
    with pytest.raises(ValueError, match=r"people_fraction must be in \(0, 1\]"):
        tc.with_preset({"people_fraction": 0}, gpu_here=False)
    spec = {"run": "t", "train": {"init": "dlib-resnet"}, "sources": []}
    with pytest.MonkeyPatch.context() as m:
        m.delitem(tc.DEFAULTS, "people_fraction")
        before = spec_digest(spec)
    assert spec_digest({**spec, "train": {"init": "dlib-resnet", "people_fraction": 1.0}}) == before
    assert spec_digest({**spec, "train": {"init": "dlib-resnet", "people_fraction": 0.5}}) != before


# ------------------------------------------------------------------------------------ outputs, masks

def test_outputs_log_and_mask_share(syn, tmp_path):
    res = train_run(_spec(syn, mask_fraction=0.5, iterations=24, log_every=12, batch_size=10, lr_steps=[12]),
                    tmp_path / "m")
    log = pd.read_csv(tmp_path / "m" / "train_log.csv")
    assert list(log.columns) == ["iteration", "loss", "accuracy", "lambda", "lr", "img_s", "masked_share", "distill"]
    assert log["distill"].eq(0).all()  # train.distill off
    assert list(log["iteration"]) == [12, 24]
    assert log["lambda"].iloc[0] == pytest.approx(1000 / (1 + 0.12 * 12))
    assert log["lr"].tolist() == pytest.approx([0.05, 0.005])
    assert 0.3 < log["masked_share"].mean() < 0.7
    assert (tmp_path / "m" / "curve.png").stat().st_size > 5000
    clean = train_run(_spec(syn, mask_fraction=0.0, iterations=6, log_every=6), tmp_path / "c")
    assert clean["final"]["masked_share"] == 0.0
    assert res["classes"] == 6


def test_model_file_is_the_features_embedder_format(syn, tmp_path):
    train_run(_spec(syn, iterations=3), tmp_path / "r")
    from maskface.models import load_model
    net, meta = load_model(tmp_path / "r" / "model.pt")
    assert meta["input"]["channel_order"] == "RGB" and meta["meta"]["iterations"] == 3
    assert meta["meta"]["arch"]["depth"] == 4
    features = pytest.importorskip("maskface.features")
    emb = features.SphereFaceEmbedder(tmp_path / "r" / "model.pt", device="cpu")
    arr, idx = open_cache(*syn["clean"])
    got = emb.embed([features.FaceInput(np.asarray(arr[i])) for i in range(4)])
    from maskface.foldeval import embed_rows
    mine = embed_rows(net, arr, np.arange(4), torch.device("cpu"))
    np.testing.assert_allclose(got, mine, rtol=1e-4, atol=1e-4)  # same preprocessing, same flip concat


def test_evaluate_fold_and_summary(syn, tmp_path):
    train_run(_spec(syn, iterations=6), tmp_path / "r")
    arr, idx = open_cache(*syn["clean"])
    ids = list(idx["image_id"])
    pairs = []
    for f in (1, 2):
        for c in range(3):
            p = (3 * (f - 1) + c)
            pairs.append((f, f"P{p}/P{p}_0001.jpg", f"P{p}/P{p}_0002.jpg", True))
            q = (p + 1) % 6
            pairs.append((f, f"P{p}/P{p}_0003.jpg", f"P{q}/P{q}_0004.jpg", False))
    pairs = pd.DataFrame(pairs, columns=["fold", "a", "b", "same"])
    assert set(pairs["a"]) <= set(ids)
    res = evaluate_fold(tmp_path / "r" / "model.pt", pairs, 1, syn["clean"], syn["masked"], device="cpu")
    assert set(res["protocols"]) == {"clean", "mixed", "masked"}
    for p in res["protocols"].values():
        assert p["n_pairs"] == 6 and 0.0 <= p["accuracy"] <= 1.0
    assert res["protocols"]["masked"]["n_missing"] == 1  # P0_0001 has no masked crop
    assert 0.0 <= res["protocols"]["masked"]["accuracy_available_pairs"] <= 1.0
    s = summarize_evals([res, res])
    assert s["protocols"]["clean"]["n"] == 2 and s["protocols"]["clean"]["std"] == 0.0


# ------------------------------------------------------------------------------------------ real LFW

def _centre_crop(path: Path) -> np.ndarray:
    """A centre 112x96 crop of a resized deep-funneled LFW image: for loader / loss-falls tests ONLY (the real
    crops come from the alignment stage)."""
    from PIL import Image
    img = Image.open(path).convert("RGB").crop((70, 62, 180, 190)).resize((96, 112), Image.BILINEAR)
    return np.asarray(img)


@pytest.mark.lfw
def test_lfw_folds_are_identity_disjoint(lfw):
    from maskface.datasets import parse_pairs
    pairs = parse_pairs(lfw / "pairs.txt")
    people = {k: fold_identities(pairs, k) for k in range(1, 11)}
    for i in range(1, 11):
        for j in range(i + 1, 11):
            assert not people[i] & people[j], (i, j)


@pytest.mark.lfw
@pytest.mark.slow
def test_loss_falls_on_real_lfw_subset(lfw, tmp_path):
    root = lfw / "images_deepfunneled"
    people = sorted(p for p in os.listdir(root) if len(os.listdir(root / p)) >= 12)[:12]
    rows, man = [], []
    for p in people:
        for f in sorted(os.listdir(root / p))[:12]:
            iid = f"{p}/{f}"
            rows.append({"image_id": iid, "png": encode_png(_centre_crop(root / p / f))})
            man.append({"image_id": iid, "identity": p, "status": "ok"})
    pd.DataFrame(rows).to_parquet(tmp_path / "shard-0.parquet")
    pd.DataFrame(man).to_parquet(tmp_path / "aligned.parquet")
    build_cache([tmp_path / "shard-0.parquet"], tmp_path / "c.npy", tmp_path / "c.parquet")
    src = {"dataset": "lfw", "manifest": str(tmp_path / "aligned.parquet"),
           "clean": [str(tmp_path / "c.npy"), str(tmp_path / "c.parquet")]}
    spec = _spec(src, iterations=60, batch_size=24, lr=0.05, lr_steps=[1000], log_every=10, checkpoint_every=60,
                 arch={"depth": 4, "width": 0.25}, head={"type": "asoftmax", "margin": 4})
    train_run(spec, tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    first, last = log["loss"].iloc[0], log["loss"].iloc[-2:].mean()
    assert np.isfinite(log["loss"]).all()
    assert last < 0.6 * first, log[["iteration", "loss", "accuracy"]].to_string()
    assert log["accuracy"].iloc[-2:].mean() > log["accuracy"].iloc[0] + 0.2


# ----------------------------------------------------------------------------------------- config, rules

def test_schema_defaults_mirror_train_defaults():
    import yaml

    from maskface.train_config import DEFAULTS
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

    def defaults(props):
        return {k: defaults(v["properties"]) if v.get("type") == "object" and "properties" in v else v.get("default")
                for k, v in props.items()}

    assert defaults(schema["properties"]["train"]["properties"]) == DEFAULTS
    for name in ("cpu-quick.yaml", "casia.yaml", "cpu-quick-m0.yaml", "finetune.yaml", "casia-finetune.yaml"):
        cfg = yaml.safe_load((REPO / "config" / name).read_text())
        assert set(cfg["train"]) <= set(DEFAULTS), name


def _dry_run_training(tmp_path: Path, train: dict, cores: int = 1, ok: bool = True) -> str:
    """`snakemake -n train_all` with the upstream stages' outputs present (it plans the training stage only)."""
    write_training_workdir(tmp_path, train)
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-n", "--cores", str(cores), "train_all"], capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert (res.returncode == 0) == ok, out[-3000:]
    return out


def test_a_multi_gpu_run_asks_for_one_node_and_threads_and_memory_per_gpu(tmp_path):
    out = _dry_run_training(tmp_path, {"folds": [1], "name": "t", "gpus": 4, "threads": 3, "device": "cuda"},
                            cores=64)
    job = out[out.index("rule train:"):]
    job = job[:job.index("\n\n")]
    assert "threads: 12" in job
    assert "nodes=1" in job and "gpu=4" in job and "mem_mb=40960" in job, job


def test_a_multi_gpu_run_becomes_one_slurm_job_of_one_node_one_task_and_n_gpus(tmp_path):
    """The planned train job's resources (train.gpus 4) through snakemake-executor-plugin-slurm's own
    functions: sbatch asks for one node, 4 GPUs, the threads as cpus of one task (no --ntasks-per-gpu, which
    would start the script once per GPU), and the job step's srun is one task that sees all 4 GPUs (torchrun
    then starts the 4 ranks). Checked on the generated lines, for 4 GPUs; tests/test_slurm.py runs a 2-GPU train
    job on the local test cluster's stand-in GPUs."""
    from types import SimpleNamespace

    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_cpu_setting, get_gpu_setting, get_node_setting

    out = _dry_run_training(tmp_path, {"folds": [1], "name": "t", "gpus": 4, "threads": 3, "device": "cuda"},
                            cores=64)
    job = out[out.index("rule train:"):]
    job = job[:job.index("\n\n")]
    threads = int(job.split("threads: ")[1].split()[0])
    res = {}
    for part in job.split("resources: ")[1].splitlines()[0].split(", "):
        k, v = part.split("=", 1)
        res[k] = int(v) if v.isdigit() else v

    class Resources(dict):
        __getattr__ = dict.__getitem__

    # tasks_per_gpu=0: no --ntasks-per-gpu from the plugin's versions 1.6 to 2.7.0 either
    assert res["tasks_per_gpu"] == 0 and res["gpu"] == 4, res
    fake = SimpleNamespace(resources=Resources(res), threads=threads, name="train", wildcards={})
    sbatch = get_submit_command(fake, {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "",
                                       "partition": "", "workdir": str(tmp_path)}) + set_gres_string(fake)
    assert "--nodes=1" in sbatch and "--cpus-per-task=12" in sbatch and "--gpus=4" in sbatch, sbatch
    assert "--ntasks-per-gpu" not in sbatch and "--ntasks=" not in sbatch, sbatch     # one task: SLURM's default
    srun = " ".join(["srun -n1", get_cpu_setting(fake, True), get_gpu_setting(fake), get_node_setting(fake)])
    assert srun == "srun -n1 --cpus-per-task=12 --gpus=4 --nodes=1", srun


def test_long_cpu_training_is_refused_before_any_job_with_the_estimate_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU: device auto would train on it")
    out = _dry_run_training(tmp_path, {"folds": [1, 2], "name": "t"}, cores=2, ok=False)   # SphereFace-20, 8000 x 256
    assert "train: 2 SphereFace-20 run(s) (width 1.0) of 8,000 iterations x 256 images would train on the CPU" in out
    assert "more than train.max_cpu_hours (1)" in out and "--configfile config/cpu-quick.yaml" in out
    assert "Job stats" not in out
    # a GPU asked for, a CPU-sized run, or the runs already trained: planned as usual
    _dry_run_training(tmp_path, {"folds": [1, 2], "name": "t", "device": "cuda"})
    _dry_run_training(tmp_path, {"folds": [1], "name": "t", "arch": {"depth": 4, "width": 0.5}, "iterations": 1200,
                                 "batch_size": 64, "threads": 1}, cores=2)
    for run in ("t-fold1-seed1", "t-fold2-seed1"):
        (tmp_path / "results/models" / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / "results/models" / run / "model.pt").write_bytes(b"")
    _dry_run_training(tmp_path, {"folds": [1, 2], "name": "t"}, cores=2)


def test_cpu_estimate_matches_the_networks():
    """The torch-free estimate counts the multiply-accumulates of the real network (conv and fc weights applied at
    each output position)."""
    from maskface.models import sphereface_net
    from maskface.train_config import forward_gmacs

    for depth, width in ((4, 0.5), (20, 1.0)):
        net = sphereface_net(depth, width)
        macs = 0

        def hook(m, inp, out):
            nonlocal macs
            w = m.weight
            macs += w.numel() * (out.shape[2] * out.shape[3] if out.dim() == 4 else 1)

        hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, 112, 96))
        for h in hs:
            h.remove()
        assert abs(forward_gmacs({"depth": depth, "width": width}) - macs / 1e9) / (macs / 1e9) < 0.02, (depth, macs)


@pytest.mark.slow
def test_dry_run_builds_the_training_dag(tmp_path):
    out = _dry_run_training(tmp_path, {"folds": [1, 2], "seeds": [1, 2], "mask_fraction": 0.5, "name": "t",
                                       "max_cpu_hours": 10 ** 6})     # SphereFace-20 on this CPU: accepted
    for run in ("t-fold1-seed1", "t-fold2-seed1", "t-fold1-seed2", "t-fold2-seed2"):
        assert f"results/models/{run}/model.pt" in out and f"results/models/{run}/fold_eval.json" in out
    stats = dict(line.split()[:2] for line in out.splitlines() if line.startswith(("train ", "train_fold_eval ",
                                                                                   "train_summary ")))
    assert stats == {"train": "4", "train_fold_eval": "4", "train_summary": "1"}, out[-3000:]


def test_amp_auto_is_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """amp auto: bf16 on GPUs with native bf16 (A100, H100), fp32 on those that only emulate it (V100, T4) and
    on the CPU; bf16 asked for is bf16."""
    from maskface import train as T

    cuda = torch.device("cuda", 0)
    for native, want in ((True, torch.bfloat16), (False, None)):
        # emulated bf16 counts as supported only when emulation is included
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert T.amp_dtype_for("auto", cuda) is want
    assert T.amp_dtype_for("auto", torch.device("cpu")) is None
    assert T.amp_dtype_for("bf16", cuda) is torch.bfloat16 and T.amp_dtype_for("none", cuda) is None



@pytest.mark.slow
def test_bf16_training_follows_fp32_with_the_margin_head_in_true_fp32(syn, tmp_path, device, caplog):
    """amp bf16 on ``device``: the loss curve of 12 iterations stays within 5% of the fp32 run's, the job's
    first log line and model.pt's provenance name the device, AMP and world size, and the margin head's logits are fp32 and
    equal an fp64 computation from the same features (TF32 in the head's matmul would be off by ~1e-3)."""
    import copy
    import logging

    from maskface.models import load_model
    from maskface.train import _setup

    losses = {}
    for amp in ("none", "bf16"):
        with caplog.at_level(logging.INFO, logger="maskface.train"):
            train_run(_spec(syn, amp=amp, device=device, mask_fraction=0.5), tmp_path / amp)
        losses[amp] = pd.read_csv(tmp_path / amp / "train_log.csv")["loss"].to_numpy()
        trained_on = load_model(tmp_path / amp / "model.pt")[1]["meta"]["trained_on"]      # the provenance
        assert {k: trained_on[k] for k in ("device", "amp", "world_size")} == {"device": device, "amp": amp,
                                                                              "world_size": 1}
        if device == "cuda":
            assert trained_on["conv_tf32"] is True and trained_on["matmul_tf32"] is False, trained_on
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run t: device"))
        assert f"device {device} (" in line and f"torch {torch.__version__}" in line, line
        assert f"amp {amp}" in line and "world size 1" in line, line
        if device == "cuda":
            assert torch.cuda.get_device_name(0) in line and "TF32 conv on, matmul off" in line, line
        caplog.clear()
    rel = np.abs(losses["bf16"] - losses["none"]) / losses["none"]
    assert len(rel) == 4 and rel.max() < 0.05, (losses, rel)

    run = _setup(_spec(syn, amp="bf16", device=device), tmp_path / "head", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 112, 96, generator=g).to(run.device)
    labels = torch.randint(0, run.data.num_classes, (6,), generator=g).to(run.device)
    logits, feat = run.module(x, labels, 5, with_features=True)
    assert logits.dtype == feat.dtype == torch.float32
    head64 = copy.deepcopy(run.head).cpu().double()
    ref = head64(run.module._centred(feat).detach().cpu().double(), labels.cpu(), 5)
    err = (logits.detach().cpu().double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, float(err)


def test_presets_and_mask_fraction_groups():
    """preset auto: the GPU size where a GPU trains, else the CPU size, under the user's own keys, in the run
    name; mask_fractions: the same runs with and without masks, grouped."""
    from maskface.train_config import with_preset

    cpu = with_preset({"preset": "auto", "iterations": 600}, gpu_here=False)
    assert cpu["preset"] == "cpu" and cpu["name"] == "sphereface-cpu" and cpu["folds"] == [1]
    assert cpu["arch"] == {"depth": 4, "width": 0.5, "feature_dim": 512} and cpu["iterations"] == 600   # user wins
    gpu = with_preset({"preset": "auto"}, gpu_here=True)
    assert gpu["preset"] == "gpu" and gpu["arch"]["depth"] == 20 and len(gpu["folds"]) == 10
    assert with_preset({"name": "x"}, gpu_here=False)["name"] == "x"             # preset none: as written
    own = with_preset({"preset": "cpu", "arch": {"depth": 20}}, gpu_here=False)     # a key set replaces the preset's
    assert own["arch"] == {"depth": 20, "width": 1.0, "feature_dim": 512} and own["iterations"] == 1200
    with pytest.raises(ValueError, match="preset"):
        with_preset({"preset": "tpu"}, gpu_here=False)
    with pytest.raises(ValueError, match="distill 1.0 needs train.init"):
        with_preset({"distill": 1.0}, gpu_here=False)
    assert with_preset({"distill": 1.0, "init": "dlib-resnet"}, gpu_here=False)["distill"] == 1.0
    with pytest.raises(ValueError, match="mask_variants 3 needs train.init"):
        with_preset({"mask_variants": 3}, gpu_here=False)
    assert with_preset({"mask_variants": 3, "init": "dlib-resnet"}, gpu_here=False)["mask_variants"] == 3
    runs = run_names({**cpu, "mask_fractions": [0.5, 0.0]})
    assert runs == {"sphereface-cpu-m50-fold1-seed1": {"fold": 1, "seed": 1, "mask_fraction": 0.5,
                                                       "group": "sphereface-cpu-m50"},
                    "sphereface-cpu-m0-fold1-seed1": {"fold": 1, "seed": 1, "mask_fraction": 0.0,
                                                      "group": "sphereface-cpu-m0"}}
    with pytest.raises(ValueError, match="same run name"):
        run_names({"mask_fractions": [0.5, 0.501]})


def test_summary_of_groups_side_by_side():
    from maskface.foldeval import summarize_groups, summary_markdown

    def ev(clean, masked):
        return {"protocols": {"clean": {"accuracy": clean}, "masked": {"accuracy": masked}}}

    s = summarize_groups({"x-m50": [ev(0.88, 0.86)], "x-m0": [ev(0.89, 0.75)]})
    md = summary_markdown(s, "x")
    assert "| protocol | x-m50 | x-m0 |" in md
    assert "| masked | 86.00 ± 0.00 (1 run) | 75.00 ± 0.00 (1 run) |" in md
    assert "groups" not in summarize_groups({"x": [ev(0.88, 0.86)]})
    assert "protocols" not in s          # no pooled mean over runs with and without masks
    assert "threshold from the other nine folds" in md
    held = summary_markdown(summarize_groups({"x": [{**ev(0.9, 0.8), "validation_fold": 2}]}), "x")
    assert "threshold and mean feature from the next fold" in held and "other nine" not in held


@pytest.mark.slow
def test_a_job_stopped_by_sigterm_writes_its_checkpoint_and_the_next_run_ends_bit_identical(syn, tmp_path):
    """scancel or a SLURM time limit mid-run: the iteration under way finishes, the checkpoint of it is
    written (none was due: checkpoint_every is larger than the run), the job exits 143; the next run resumes
    at that iteration and ends with the weights and log of a run never stopped."""
    spec = _spec(syn, mask_fraction=0.5, iterations=400, checkpoint_every=10 ** 6, log_every=4, batch_size=4)
    train_run(spec, tmp_path / "ref")
    (tmp_path / "spec.json").write_text(json.dumps(spec, default=list))
    run = tmp_path / "run"
    rc, err = _launch_and_stop(tmp_path / "spec.json", run, "it 20/400")
    assert rc == 143, err[-2000:]
    m = re.search(r"stopped after iteration (\d+) of 400: checkpoint written", err)
    assert m and "stopped by signal 15" in err, err[-2000:]
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 20 <= ck["iteration"] == int(m.group(1)) < 400 and not (run / "model.pt").exists()
    res = train_run(spec, run)
    assert res["iterations"] == 400
    _assert_same_run(tmp_path / "ref", run)


@pytest.mark.slow
def test_a_stopped_multi_gpu_job_checkpoints_every_rank_at_the_same_iteration(syn, tmp_path):
    """2 ranks (gloo on CPU) under launch and torchrun: SIGTERM to the job reaches torchrun, which passes it on
    to the ranks; they agree on one iteration, write its checkpoint (the log window summed over both), and
    the job exits 143. Resumed, the run's log equals that of a 2-rank run never stopped."""
    from maskface.train import STOP_CHECK
    spec = _spec(syn, iterations=300, batch_size=8, mask_fraction=0.5, threads=1, log_every=4,
                 checkpoint_every=10 ** 6, gpus=2, device="cpu")
    for name in ("uncut", "cut"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_text(json.dumps(spec))
    _torchrun(tmp_path / "uncut" / "spec.json")
    rc, err = _launch_and_stop(tmp_path / "cut" / "spec.json", tmp_path / "cut", "it 20/300")
    assert rc == 143, err[-3000:]
    m = re.findall(r"stopped after iteration (\d+) of 300: checkpoint written", err)
    assert len(m) == 1, err[-3000:]                    # rank 0 says it once
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    done = int(m[0])
    assert ck["iteration"] == done and 20 <= done < 300 and done % STOP_CHECK == 0, (ck["iteration"], m)
    assert ck["window"]["n"] == (done % 4) * 8          # both ranks' samples of the open log window
    assert not (tmp_path / "cut" / "model.pt").exists()
    _torchrun(tmp_path / "cut" / "spec.json")
    a, b = pd.read_csv(tmp_path / "uncut" / "train_log.csv"), pd.read_csv(tmp_path / "cut" / "train_log.csv")
    assert list(a["iteration"]) == list(b["iteration"])
    np.testing.assert_array_equal(a["masked_share"], b["masked_share"])
    np.testing.assert_allclose(a[["loss", "accuracy"]], b[["loss", "accuracy"]], rtol=1e-6)
    wa, wb = _weights(tmp_path / "uncut" / "model.pt"), _weights(tmp_path / "cut" / "model.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_a_signal_held_over_a_step_that_fails_lets_the_step_s_own_error_go_on(sigterm_guard):
    """A SIGTERM waiting for the end of a held block whose body then fails (out of memory, a NaN loss) must not
    replace that error with a clean-looking stop: the step is half done, no checkpoint may be written of it."""
    from maskface.train import _stop_signals

    with pytest.raises(ValueError, match="the step's own error"):
        with _stop_signals() as hold:
            with hold(ctrl_c=False):
                _signal_self(signal.SIGTERM)
                raise ValueError("the step's own error")
    # the same with a body that ends: the signal is raised at its end
    with pytest.raises(SystemExit):
        with _stop_signals() as hold:
            with hold(ctrl_c=False):
                _signal_self(signal.SIGTERM)


def test_hold_off_the_main_thread_does_nothing_and_takes_the_same_arguments():
    from maskface.train import _stop_signals

    errors = []

    def body():
        try:
            with _stop_signals() as hold:
                with hold(ctrl_c=False):
                    pass
                with hold():
                    pass
        except Exception as e:  # noqa: BLE001 - reported to the test's thread
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert errors == []
