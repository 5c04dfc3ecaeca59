"""SLURM for real: a one-node cluster on this machine (tests/slurm/local_slurm.sh: Debian's munge, slurmctld,
slurmd) runs the `manifests` target of a tiny dataset through profiles/slurm, then is torn down.

The three jobs (download, raw_manifest, pairs_manifest) are submitted as one group job: one sbatch, each rule
an srun step inside it. Submitted one by one they take about twice as long (every job is two Snakemake
starts, each parsing the workflow, plus the plugin's status polls at 10, 30, 60, 100 s after submission),
which on a busy 2-CPU machine came to ~4.5 minutes.

Root only: it installs the Debian packages when they are missing and starts daemons; skipped, with the reason,
when not root or when they cannot be installed. Every step is bounded (BUDGET_S for lock, setup and workflow,
DOWN_S for the teardown), and the teardown runs whatever happened.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskface.testing import write_training_workdir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "slurm" / "local_slurm.sh"
PROFILE = REPO / "profiles" / "slurm"
LOCK = Path("/run/lock/gugugirls-local-slurm.lock")   # the one local_slurm.sh takes
BUDGET_S = 270          # lock wait + up + workflow; the teardown has its own DOWN_S on top
DOWN_S = 60
PARTITION = "alt"       # the cluster's non-default partition, from the config's slurm.partition
RULES = ("raw_manifest", "pairs_manifest")   # grouped into one sbatch job; download is a local rule
SUBMITTED = re.compile(r"Job \S+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _run(cmd, log: Path, timeout: float, env=None) -> tuple[int | None, str]:
    """Run cmd in its own process group, output to a file (no pipe a daemon could hold open); on timeout kill
    the whole group. Returns (returncode, or None on timeout; output)."""
    with open(log, "w") as out:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=REPO, start_new_session=True)
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            rc = None
    return rc, log.read_text(errors="replace")


def _script(action: str, log: Path, timeout: float, env=None) -> tuple[int | None, str]:
    env = {**(env or os.environ), "LOCAL_SLURM_LOCK_HELD": "1"}   # this test holds the lock for its whole run
    return _run(["bash", SCRIPT, action], log, timeout, env)


@contextlib.contextmanager
def _cluster_lock(timeout: float):
    """One SLURM test (or local_slurm.sh run) at a time on this machine; skip if another one keeps it."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    pytest.skip(f"another local SLURM run kept {LOCK} for {timeout:.0f} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("Alice_A", "Bob_B"):
        (root / "imgs" / name).mkdir(parents=True)
        for i in (1, 2):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                root / "imgs" / name / f"{name}_{i:04d}.jpg")
    (root / "pairs.txt").write_text("1\t1\nAlice_A\t1\t2\nAlice_A\t1\tBob_B\t2\n")


def _job(jobid: str) -> dict[str, str]:
    """`scontrol show job` as a dict (MinJobAge=300 keeps ended jobs)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def _mib(value: str) -> int:
    num, unit = re.fullmatch(r"([\d.]+)([MGT]?)", value).groups()
    return round(float(num) * {"": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[unit])


def _pids(*pidfiles: str) -> list[int]:
    pids = []
    for f in pidfiles:
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(Path(f).read_text().strip()))
    return pids


def _need_root_and_slurm() -> None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux: installs Debian's slurm packages, writes /etc/slurm, starts daemons")
    if not shutil.which("apt-get") and not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("SLURM (slurmctld, slurmd, sbatch, munged) not installed and no apt-get to install it")


@contextlib.contextmanager
def _local_cluster(logs: Path, left, gpus: int = 0, proctrack: str = "linuxproc"):
    """The one-node cluster for the body of the with-block (`gpus` stand-in GPUs: gres/gpu on /dev/null
    copies; `proctrack`: linuxproc, or cgroup as on most production clusters), torn down afterwards whatever
    happened; then checks that the machine is left clean: daemons gone,
    no pid file (a stale /run/slurmctld.pid breaks purging the packages), no generated config."""
    with _cluster_lock(timeout=60):
        try:
            env = {**os.environ, "LOCAL_SLURM_GPUS": str(gpus), "LOCAL_SLURM_PROCTRACK": proctrack}
            rc, out = _script("up", logs / "up.log", timeout=min(240, left()), env=env)
            if rc == 77:
                pytest.skip(f"no local SLURM possible here: {out.strip().splitlines()[-1]}")
            assert rc == 0, f"local_slurm.sh up {'timed out' if rc is None else f'failed ({rc})'}:\n{out[-3000:]}"
            yield
        finally:
            daemons = _pids("/run/slurmctld.pid", "/run/slurmd.pid", "/run/munge/munged.pid")
            rc, down = _script("down", logs / "down.log", timeout=DOWN_S)
        assert rc == 0, f"local_slurm.sh down {'timed out' if rc is None else f'failed ({rc})'}:\n{down[-3000:]}"
        assert not [p for p in daemons if Path(f"/proc/{p}").exists()], down
        for f in ("/run/slurmctld.pid", "/run/slurmd.pid", "/run/munge/munged.pid", "/etc/slurm/slurm.conf",
                  "/etc/slurm/gres.conf", "/etc/slurm/cgroup.conf", "/run/gugugirls-fake-gpus",
                  f"/sys/fs/cgroup/freezer/slurm_{socket.gethostname().split('.')[0]}"):
            assert not Path(f).exists(), f


def _snakemake(work: Path, logs: Path, budget: float, *args: str) -> str:
    """snakemake through profiles/slurm in `work`; returns its output (asserts it ended within the budget)."""
    env = {k: v for k, v in os.environ.items() if k != "MASKFACE_SLURM_PARTITION"}
    cmd = [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", work, "--profile", PROFILE,
           "--slurm-keep-successful-logs", *args]
    rc, out = _run(cmd, logs / "snakemake.log", timeout=budget, env=env)
    assert rc is not None, f"snakemake through SLURM not done in {budget:.0f} s:\n{out[-4000:]}"
    return out if rc == 0 else f"{out}\n[exit status {rc}]"


def test_manifests_target_runs_through_slurm_with_the_profile(tmp_path):
    _need_root_and_slurm()
    start = time.monotonic()
    left = lambda: BUDGET_S - (time.monotonic() - start)  # noqa: E731
    data, work, logs = tmp_path / "data", tmp_path / "work", tmp_path / "logs"
    _dataset(data)
    work.mkdir()
    logs.mkdir()
    (work / "config.yaml").write_text(json.dumps(
        {"datasets": {"tiny": {"source": str(data), "format": "lfw", "pairs": str(data / "pairs.txt")}},
         "slurm": {"partition": PARTITION}}))

    with _local_cluster(logs, left):
        out = _snakemake(work, logs, left(), "manifests", "--groups", *(f"{r}=tiny" for r in RULES))
        assert "[exit status" not in out, f"snakemake through SLURM failed:\n{out[-4000:]}"

        # outputs, as in the local run of tests/test_workflow.py
        raw = pd.read_parquet(work / "results/manifests/tiny/raw.parquet")
        assert len(raw) == 4 and set(raw["status"]) == {"ok"}
        pairs = pd.read_parquet(work / "results/manifests/tiny/pairs.parquet")
        assert list(pairs["same"]) == [True, False]

        # it went through sbatch: one group job, with the rules' resources combined (threads and mem_mb: the
        # largest; runtime: the sum, the rules running one after the other) and the config's partition
        submitted = SUBMITTED.findall(out)
        assert len(submitted) == 1, out[-4000:]
        jid, log = submitted[0]
        job = _job(jid)
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["Partition"] == PARTITION and job["BatchFlag"] == "1", job
        assert int(job["NumCPUs"]) == 2 and _mib(job["MinMemoryNode"]) == 4096, job
        assert job["TimeLimit"] == "02:10:00" and Path(job["WorkDir"]) == work, job   # 120 + 10 min
        # the job's own output (kept by --slurm-keep-successful-logs): each rule ran inside it
        assert Path(job["StdOut"]) == Path(log) and Path(log).parent.parent == work / ".snakemake/slurm_logs"
        job_log = Path(log).read_text()
        for rule in RULES:
            assert re.search(rf"Finished jobid: \d+ \(Rule: {rule}\)", job_log), job_log[-3000:]
        # download ran on the submit host (compute nodes often have no internet), not in the job
        assert "(Rule: download)" not in job_log and (work / "results/datasets/tiny/dataset.json").is_file()


def test_a_multi_gpu_train_job_is_one_task_on_one_node_and_its_step_is_given_every_gpu(tmp_path):
    """train.gpus 2 through the profile on a cluster with 2 stand-in GPUs: one sbatch job of one node and one
    task asking for 2 GPUs, and the job step (the one srun that runs the rule's script, which would start
    torchrun) is given both (CUDA_VISIBLE_DEVICES=0,1), not one GPU per task as with --ntasks-per-gpu. CUDA
    finds none of the stand-ins, so the script then stops before torchrun, once, with the error that tells a
    GPU that CUDA cannot use from one that was never given; with train.device auto it does not fall back to
    the CPU. Only the training stage runs (its inputs are empty stand-ins: the job stops before reading them)."""
    _need_root_and_slurm()
    from maskface.devices import gpu_device_count

    if gpu_device_count() > 0:
        pytest.skip("this machine has real NVIDIA GPUs: CUDA could use them, so the stand-ins' failure is not what "
                    "the job would show")
    start = time.monotonic()
    left = lambda: BUDGET_S - (time.monotonic() - start)  # noqa: E731
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    write_training_workdir(work, {"folds": [1], "name": "t", "gpus": 2, "threads": 1, "device": "auto"})

    with _local_cluster(logs, left, gpus=2):
        # the rule asks 16 + 8 GB for 2 GPUs, more than this machine has: this test's node would never run it
        out = _snakemake(work, logs, left(), "train_all", "--set-resources", "train:mem_mb=4096")
        assert out.endswith("[exit status 1]"), out[-4000:]
        submitted = SUBMITTED.findall(out)
        assert len(submitted) == 1, out[-4000:]       # the train job; nothing after it ran
        jid, log = submitted[0]
        job = _job(jid)
        assert job["JobState"] == "FAILED", job
        assert job["NumNodes"] == "1" and job["NumTasks"] == "1" and int(job["NumCPUs"]) == 2, job
        assert re.fullmatch(r"gres[:/]gpu:2", job.get("TresPerJob", "")), job     # the spelling varies by version
        rule_log = (work / "results/logs/train/t-fold1-seed1.log").read_text()
        given = ("train.gpus is 2 and this job was given 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1), but CUDA finds 0")
        assert rule_log.count(given) == 1, rule_log[-3000:]      # the script ran once, with both GPUs
        assert "launching" not in rule_log, rule_log[-3000:]
        assert not (work / "results/models/t-fold1-seed1/model.pt").exists()


@pytest.mark.parametrize("proctrack", ["linuxproc", "cgroup"])
def test_scancel_stops_a_training_job_that_then_removes_its_staged_copies(tmp_path, proctrack):
    """scancel of a running train job on the one-node cluster: SLURM sends SIGTERM to the job step's
    processes (KillWait 5 s before SIGKILL on this cluster). With proctrack/linuxproc SLURM signals the step's
    whole process tree, the script included. With proctrack/cgroup, as on most production clusters, SIGTERM
    reaches only the step's task (Snakemake's job process, which waits for its job), and the script learns of
    the stop from its look at the job's state (maskface.slurmjob). Either way the training script finishes its
    iteration, writes the checkpoint and exits (143, "stopped by signal 15"), and its caches' copies in
    train.stage's folder are gone; Snakemake reports the job failed. The job trains for real (a small network on synthetic caches) until it is cancelled."""
    _need_root_and_slurm()
    start = time.monotonic()
    left = lambda: BUDGET_S - (time.monotonic() - start)  # noqa: E731
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    local = tmp_path / "local"
    write_training_workdir(work, {"folds": [1], "name": "t", "preset": "none", "device": "cpu", "threads": 1,
                                  "arch": {"depth": 4, "width": 0.125}, "batch_size": 8, "iterations": 10 ** 6,
                                  "checkpoint_every": 10 ** 6, "log_every": 20, "max_cpu_hours": 10 ** 4,
                                  "mask_fractions": [0.5], "stage": str(local)}, caches=True)
    rule_log = work / "results/logs/train/t-m50-fold1-seed1.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MASKFACE_SLURM_PARTITION", "MASKFACE_SLURM_POLL")}
    if proctrack == "cgroup":       # twice a second: well inside KillWait (5 s) on a busy machine
        env["MASKFACE_SLURM_POLL"] = "0.5"
    cmd = [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", work, "--profile", PROFILE,
           "train_all", "--set-resources", "train:mem_mb=2048"]

    with _local_cluster(logs, left, proctrack=proctrack), open(logs / "snakemake.log", "w") as out:
        sm = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
        try:
            # the job is training, on its staged copies (clean and masked)
            while left() > 0 and not (len(list(local.glob("maskface-staged-*/?-*.npy"))) == 2
                                      and rule_log.exists() and "it 40/" in rule_log.read_text()):
                assert sm.poll() is None, (logs / "snakemake.log").read_text()[-4000:]
                time.sleep(0.5)
            text = (logs / "snakemake.log").read_text()
            submitted = SUBMITTED.findall(text)
            assert len(submitted) == 1 and rule_log.exists() and "it 40/" in rule_log.read_text(), text[-4000:]
            jid = submitted[0][0]
            assert _job(jid)["JobState"] == "RUNNING"
            subprocess.run(["scancel", jid], check=True, timeout=20)
            rc = sm.wait(timeout=max(left(), 10))
        finally:
            if sm.poll() is None:
                os.killpg(sm.pid, signal.SIGKILL)
                sm.wait(timeout=30)
        text = (logs / "snakemake.log").read_text()
        assert rc != 0, text[-4000:]
        assert _job(jid)["JobState"] == "CANCELLED", _job(jid)
        log_text = rule_log.read_text()
        assert "stopped by signal 15" in log_text, log_text[-3000:]
        # the iteration under way finished and was checkpointed (none was due): a resubmitted job resumes there
        assert "checkpoint written, the next run of t-m50-fold1-seed1 resumes there" in log_text, log_text[-3000:]
        assert (work / "results/models/t-m50-fold1-seed1/checkpoint.pt").exists()
        if proctrack == "cgroup":   # the job's state stopped it: SLURM's SIGTERM never reached the script
            assert f"SLURM job {jid} is COMPLETING: stopping as on SIGTERM" in log_text, log_text[-3000:]
        else:                       # the interval came from the cluster's KillWait (5 s / 3)
            assert f"watching SLURM job {jid}'s state every 1.7 s" in log_text, log_text[-3000:]
        assert list(local.iterdir()) == [], list(local.rglob("*"))
        assert not (work / "results/models/t-m50-fold1-seed1/model.pt").exists()
