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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

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


def _script(action: str, log: Path, timeout: float) -> tuple[int | None, str]:
    env = {**os.environ, "LOCAL_SLURM_LOCK_HELD": "1"}   # this test holds the lock for its whole run
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


def test_manifests_target_runs_through_slurm_with_the_profile(tmp_path):
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux: installs Debian's slurm packages, writes /etc/slurm, starts daemons")
    if not shutil.which("apt-get") and not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("SLURM (slurmctld, slurmd, sbatch, munged) not installed and no apt-get to install it")
    start = time.monotonic()
    left = lambda: BUDGET_S - (time.monotonic() - start)  # noqa: E731
    data, work, logs = tmp_path / "data", tmp_path / "work", tmp_path / "logs"
    _dataset(data)
    work.mkdir()
    logs.mkdir()
    (work / "config.yaml").write_text(json.dumps(
        {"datasets": {"tiny": {"source": str(data), "format": "lfw", "pairs": str(data / "pairs.txt")}},
         "slurm": {"partition": PARTITION}}))

    with _cluster_lock(timeout=60):
        try:
            rc, out = _script("up", logs / "up.log", timeout=min(240, left()))
            if rc == 77:
                pytest.skip(f"no local SLURM possible here: {out.strip().splitlines()[-1]}")
            assert rc == 0, f"local_slurm.sh up {'timed out' if rc is None else f'failed ({rc})'}:\n{out[-3000:]}"

            env = {k: v for k, v in os.environ.items() if k != "MASKFACE_SLURM_PARTITION"}
            cmd = [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", work, "--profile", PROFILE,
                   "--slurm-keep-successful-logs", "manifests", "--groups", *(f"{r}=tiny" for r in RULES)]
            budget = left()
            rc, out = _run(cmd, logs / "snakemake.log", timeout=budget, env=env)
            assert rc is not None, f"snakemake through SLURM not done in {budget:.0f} s:\n{out[-4000:]}"
            assert rc == 0, f"snakemake through SLURM failed ({rc}):\n{out[-4000:]}"

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
        finally:
            daemons = _pids("/run/slurmctld.pid", "/run/slurmd.pid", "/run/munge/munged.pid")
            rc, down = _script("down", logs / "down.log", timeout=DOWN_S)
        assert rc == 0, f"local_slurm.sh down {'timed out' if rc is None else f'failed ({rc})'}:\n{down[-3000:]}"
        # the machine is left clean: daemons gone, no pid file (a stale /run/slurmctld.pid breaks purging the
        # packages), no generated config
        assert not [p for p in daemons if Path(f"/proc/{p}").exists()], down
        for f in ("/run/slurmctld.pid", "/run/slurmd.pid", "/run/munge/munged.pid", "/etc/slurm/slurm.conf"):
            assert not Path(f).exists(), f
