"""A training job inside SLURM notices that its job is being stopped, also where SLURM's SIGTERM never reaches it.

``scancel``, a time limit or a preemption stop a job with SIGTERM, then KillWait seconds later SIGKILL. On a
cluster with ``ProctrackType=proctrack/cgroup`` (most production clusters) the SIGTERM goes only to the job
step's *tasks*, the processes whose parent is slurmstepd; every other process of the step gets only the
SIGKILL (Slurm's proctrack_cgroup.c: "only signal slurm tasks unless signal is SIGKILL"). Under the SLURM
profile the step's task is Snakemake's job process, which on SIGTERM waits for its running job, and the
training script is its child: it would be killed outright, its staged caches left on the node's disk and
torchrun's ranks cut mid-step. (With proctrack/linuxproc the whole process tree gets the SIGTERM.)

:func:`stop_with_job` asks SLURM for the job's state while the run lasts (``squeue`` for this one job, every
third of KillWait: at least every 15 s, at most once a second) and, once the job is ending (COMPLETING,
CANCELLED, TIMEOUT, PREEMPTED, ...), sends SIGTERM to this process's main thread, which then stops as on a
SIGTERM of its own.
Outside SLURM, without ``squeue``, or with ``MASKFACE_SLURM_POLL=0`` it does nothing;
``MASKFACE_SLURM_POLL=<seconds>`` sets the interval. A failed or unclear ``squeue`` answer never stops a job.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from typing import Iterator, Optional

log = logging.getLogger("maskface.slurmjob")

POLL_ENV = "MASKFACE_SLURM_POLL"
MAX_POLL_S = 15.0
# squeue's %T of a job on its way out (a cancelled job is COMPLETING while its processes still run). Not
# STOPPED or SIGNALING: a job stopped by `scancel -s STOP` goes on after SIGCONT
ENDING = frozenset({"COMPLETING", "CANCELLED", "TIMEOUT", "PREEMPTED", "FAILED", "NODE_FAIL", "DEADLINE",
                    "OUT_OF_MEMORY", "BOOT_FAIL", "COMPLETED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "STAGE_OUT", "SPECIAL_EXIT"})


def _run(cmd: list[str], timeout: float = 20.0) -> Optional[str]:
    """stdout of ``cmd``, or None when it fails or times out."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def kill_wait() -> Optional[float]:
    """The cluster's KillWait in seconds (``scontrol show config``), or None when unknown."""
    out = _run(["scontrol", "show", "config"]) if shutil.which("scontrol") else None
    m = re.search(r"^\s*KillWait\s*=\s*(\d+)", out or "", re.M)
    return float(m.group(1)) if m else None


def job_state(job_id: str) -> Optional[str]:
    """squeue's state of the job (RUNNING, COMPLETING, ...), or None when squeue gives no clear answer. The
    line of this job id only: ``squeue -j`` of an array's own id, or of a heterogeneous job's leader, lists
    the other tasks or components too."""
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%A %T"])
    states = [m.group(2).upper() for m in (re.fullmatch(r"(\S+)\s+([A-Za-z_]+)", ln.strip())
                                          for ln in (out or "").splitlines()) if m and m.group(1) == str(job_id)]
    return states[0] if len(states) == 1 else None


def poll_interval() -> Optional[float]:
    """Seconds between two looks at the job's state, or None when no watch applies here."""
    setting = os.environ.get(POLL_ENV, "").strip()
    if setting:
        try:
            value = float(setting)
        except ValueError:
            raise ValueError(f"${POLL_ENV}={setting!r}: seconds between looks at the SLURM job, or 0 for none")
        return value if value > 0 else None
    wait = kill_wait()
    return MAX_POLL_S if wait is None else min(MAX_POLL_S, max(1.0, wait / 3.0))


@contextlib.contextmanager
def stop_with_job() -> Iterator[Optional[threading.Thread]]:
    """For the with-block: inside a SLURM job, a daemon thread that sends SIGTERM to the main thread once the
    job is ending (see the module docstring). The caller has a SIGTERM handler that stops it cleanly. Yields
    the thread, or None when nothing watches (not SLURM, no squeue, polling off, not the main thread)."""
    job = os.environ.get("SLURM_JOB_ID")
    if (not job or threading.current_thread() is not threading.main_thread()
            or not shutil.which("squeue")):
        yield None
        return
    interval = poll_interval()
    if interval is None:
        yield None
        return
    done, lock = threading.Event(), threading.Lock()
    main = threading.main_thread().ident

    def watch() -> None:
        while not done.wait(interval):
            try:
                state = job_state(job)
            except Exception as e:  # noqa: BLE001 - a look that fails is no answer; the run goes on
                log.warning("SLURM job %s: no state this time (%s)", job, e)
                continue
            if state in ENDING:
                with lock:              # never once the block has ended: its SIGTERM handler may be gone
                    if done.is_set():
                        return
                    log.warning("SLURM job %s is %s: stopping as on SIGTERM (which SLURM may not send to this "
                                "process)", job, state)
                    signal.pthread_kill(main, signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name=f"slurm-job-{job}", daemon=True)
    log.info("watching SLURM job %s's state every %.1f s, so that a stop reaches this run on any cluster",
             job, interval)
    try:
        thread.start()
        yield thread
    finally:
        with lock:
            done.set()
