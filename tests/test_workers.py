"""Worker processes (maskface.workers), the one mechanism every stage uses to run work in several processes.

* Unit level: results in task order; a task's exception re-raised; a worker killed mid-task, or one whose
  initializer fails, stops the caller within seconds with a WorkerError naming the cause (never a hang); a
  script run the way Snakemake runs ``script:`` files (its ``__file__`` pointing at a copy without the
  preamble) is never re-run by the workers.
* As users run it: every stage with a worker setting (manifest.threads, align.threads, mask.threads,
  evaluate.threads) through a real ``snakemake`` invocation on a tiny real-face set, with chunk sizes shrunk
  so that every job has several chunks; 2 workers give the same outputs as 1; a worker killed mid-job fails
  the job with a clear message in its log, and the workflow then reruns cleanly.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, snakemake_run

from maskface.workers import KILL_ENV, WorkerError, imap


def _fail_init(msg):
    raise RuntimeError(msg)


def test_results_in_task_order_from_several_processes():
    tasks = [float(i) for i in range(9)]
    assert list(imap(math.sqrt, tasks, 2)) == [math.sqrt(t) for t in tasks]
    assert list(imap(math.sqrt, [], 2)) == []


def _touch(path: str) -> str:
    Path(path).touch()
    return path


def test_ahead_bounds_the_tasks_started_before_the_caller_takes_their_results(tmp_path):
    tasks = [str(tmp_path / f"t{i}") for i in range(10)]
    gen = imap(_touch, tasks, 2, ahead=3)
    assert next(gen) == tasks[0]          # 3 submitted; taking the first submits one more
    time.sleep(2.0)                        # far longer than the workers need for every task
    started = len(list(tmp_path.iterdir()))
    assert 1 <= started <= 4, started      # the bound: never all 10 (the lower end depends on the load)
    assert list(gen) == tasks[1:]          # the rest, in order
    gen = imap(_touch, [str(tmp_path / f"u{i}") for i in range(10)], 2, ahead=2)
    next(gen)
    gen.close()                            # a caller that stops early stops the workers
    assert not multiprocessing.active_children()


def test_a_task_error_is_raised_in_the_caller():
    with pytest.raises(ValueError, match="math domain error"):
        list(imap(math.sqrt, [1.0, -1.0, 4.0], 2))


def test_a_killed_worker_stops_the_caller_within_seconds(monkeypatch):
    monkeypatch.setenv(KILL_ENV, "1")     # the worker that takes task 1 kills itself with SIGKILL
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="SIGKILL") as err:
        list(imap(math.sqrt, [float(i) for i in range(6)], 2, what="test"))
    assert time.monotonic() - t0 < 60
    assert "SIGTERM" not in str(err.value)     # the survivors the executor stopped are not the cause


def test_a_worker_that_cannot_start_stops_the_caller(capfd):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"could not start \(ended during its start \(its set-up raised\)\)"):
        list(imap(math.sqrt, [1.0, 2.0, 3.0], 2, initializer=_fail_init, initargs=("no model here",)))
    assert time.monotonic() - t0 < 60
    assert "no model here" in capfd.readouterr().err     # the worker's own traceback, for the log


def test_a_snakemake_style_script_is_not_rerun_by_the_workers(tmp_path):
    """Snakemake runs a copy of the script with the ``snakemake`` object prepended and ``__file__`` set to the
    original, which has no such object: a worker that re-imported it would die with a NameError (the hang of
    the LFW run). Here the job must finish, once, with every worker's result."""
    original = tmp_path / "rule_script.py"
    body = textwrap.dedent("""\
        import math, os
        from maskface.workers import imap
        print("job body ran in", os.getpid(), flush=True)
        print("results", list(imap(math.sqrt, [float(v) for v in job_object], 2)), flush=True)
        """)
    original.write_text(body)
    runner = tmp_path / "tmp_runner.py"
    runner.write_text(f"job_object = [1, 4, 9, 16]; __real_file__ = __file__; __file__ = {str(original)!r};\n"
                      + body)
    res = subprocess.run([sys.executable, str(runner)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("job body ran") == 1
    assert "results [1.0, 2.0, 3.0, 4.0]" in res.stdout
    assert "NameError" not in res.stderr


# ------------------------------------------------------------------------------------ through snakemake

PEOPLE = 12
TIMEOUT = 900   # seconds: a hung worker pool would hold the run until this bound and fail the test

def _tiny_lfw(lfw: Path, root: Path) -> Path:
    """12 LFW people x 2 photos, LFW format, one fold of 2 matched and 2 mismatched pairs."""
    people = []
    for d in sorted((lfw / "images_deepfunneled").iterdir()):
        if d.is_dir() and (d / f"{d.name}_0002.jpg").is_file():
            people.append(d.name)
            if len(people) == PEOPLE:
                break
    for p in people:
        (root / "images_deepfunneled" / p).mkdir(parents=True)
        for k in (1, 2):
            shutil.copy(lfw / "images_deepfunneled" / p / f"{p}_{k:04d}.jpg", root / "images_deepfunneled" / p)
    P = people
    (root / "pairs.txt").write_text(f"1\t2\n{P[0]}\t1\t2\n{P[1]}\t1\t2\n{P[2]}\t1\t{P[3]}\t2\n{P[4]}\t2\t{P[5]}\t1\n")
    return root


TARGETS = ["results/manifests/tiny/raw.parquet", "results/manifests/tiny/masked.parquet",
           "results/features/dlib-resnet/tiny/clean.parquet", "results/features/dlib-resnet/tiny/masked.parquet"]


def _workdir(root: Path, data: Path, threads: int) -> Path:
    work = root / f"w{threads}"
    work.mkdir()
    cfg = {
        "datasets": {"tiny": {"source": str(data), "format": "lfw", "role": "test",
                              "images_subdir": "images_deepfunneled", "pairs": str(data / "pairs.txt")}},
        # chunks: raw manifest 8 files (3 chunks), align 4 images (6), mask 4 crops (6), features 8 images (3)
        "manifest": {"threads": threads, "chunk": 8},
        "align": {"shards": 1, "threads": threads, "batch_size": 4, "device": "cpu"},
        "mask": {"threads": threads, "batch": 4},
        "evaluate": {"models": {"dlib-resnet": {"embedder": "dlib-resnet", "options": {"flip": True}}},
                     "threads": threads, "chunk": 8, "lfw_images": "all", "device": "cpu"},
    }
    (work / "config.yaml").write_text(json.dumps(cfg))
    return work


def _smk(work: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return snakemake_run(work, *args, check=check, timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def runs(lfw, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    data = _tiny_lfw(lfw, root / "data")
    out = {}
    for threads in (1, 2):
        work = _workdir(root, data, threads)
        t0 = time.monotonic()
        _smk(work, *TARGETS)
        out[threads] = (work, time.monotonic() - t0)
    return out


def _assert_same_features(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same ids, face sources and vectors (dlib in another process: equal up to float rounding)."""
    assert list(a.image_id) == list(b.image_id) and list(a.face) == list(b.face)
    np.testing.assert_allclose(np.stack(a.feature), np.stack(b.feature), atol=1e-6)


def _forced_target(runs, k: int, variant: str) -> tuple[Path, str, pd.DataFrame, Path]:
    """(workdir, target, its features now, its job's log, deleted so that what is read is the next run's)."""
    work, _ = runs[2]
    target = TARGETS[k]
    log = work / f"results/logs/extract_features/dlib-resnet/tiny/{variant}.log"
    log.unlink()
    return work, target, _table(work / target), log


def _table(path: Path, drop=()) -> pd.DataFrame:
    df = pd.read_parquet(path)
    return df.drop(columns=[c for c in drop if c in df.columns]).sort_values("image_id").reset_index(drop=True)


@pytest.mark.lfw
@pytest.mark.slow
def test_every_stage_with_two_workers_gives_the_outputs_of_one(runs):
    (w1, t1), (w2, t2) = runs[1], runs[2]
    for log in ("raw_manifest/tiny.log", "align/tiny/shard-0.log", "mask/tiny/shard-0.log",
                "extract_features/dlib-resnet/tiny/clean.log"):
        assert (w2 / "results/logs" / log).is_file(), log
    # raw manifest: every row, hashes and sizes
    pd.testing.assert_frame_equal(_table(w1 / TARGETS[0]), _table(w2 / TARGETS[0]))
    assert len(pd.read_parquet(w2 / TARGETS[0])) == 2 * PEOPLE
    # aligned crops and masked crops: the same bytes (each chunk runs the same one-thread code in any process)
    for stage in ("aligned", "masked"):
        a = _table(w1 / f"results/{stage}/tiny/shard-0.parquet")
        b = _table(w2 / f"results/{stage}/tiny/shard-0.parquet")
        assert len(a) == 2 * PEOPLE
        pd.testing.assert_frame_equal(a, b)
    assert (pd.read_parquet(w2 / TARGETS[1])["status"] == "ok").sum() >= PEOPLE   # most faces masked
    # features, clean and masked: same ids, same face sources, same vectors
    for target in TARGETS[2:]:
        a, b = _table(w1 / target), _table(w2 / target)
        assert len(a) >= PEOPLE
        _assert_same_features(a, b)
    print(f"tiny workflow: 1 worker {t1:.0f} s, 2 workers {t2:.0f} s")


@pytest.mark.lfw
@pytest.mark.slow
def test_a_killed_worker_fails_the_job_clearly_and_the_workflow_reruns_cleanly(runs):
    work, target, before, log_file = _forced_target(runs, 2, "clean")
    t0 = time.monotonic()
    # --forcerun takes every word after it as a rule or file, so the target goes first
    res = _smk(work, target, "--forcerun", "extract_features", check=False, env={KILL_ENV: "1"})
    assert res.returncode != 0
    assert time.monotonic() - t0 < TIMEOUT
    log = log_file.read_text()
    assert "WorkerError" in log and "killed by SIGKILL" in log, log[-3000:]
    assert not (work / target).exists()          # the failed job leaves no output behind
    _smk(work, target)                           # the same command again, nothing cleaned by hand
    _assert_same_features(before, _table(work / target))
    again = _smk(work, *TARGETS)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.lfw
@pytest.mark.slow
def test_after_a_sigkill_of_snakemake_unlock_then_the_same_command_finishes(runs):
    """The README's way back after a crash: `snakemake --unlock`, then the same command again."""
    work, target, before, log = _forced_target(runs, 3, "masked")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2",
           target, "--forcerun", "extract_features"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (log.is_file() and "faces" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)     # the job is embedding: kill Snakemake, the job and its workers at once
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    locked = _smk(work, target, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    _smk(work, "--unlock")
    _smk(work, target)
    _assert_same_features(before, _table(work / target))
