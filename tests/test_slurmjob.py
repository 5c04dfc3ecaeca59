"""maskface.slurmjob: a run inside a SLURM job stops when the job is ending, also where SLURM's SIGTERM does not
reach it (proctrack/cgroup). Stand-in squeue and scontrol on PATH; the real cluster case is in test_slurm."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from maskface import slurmjob
from maskface.train import _stop_signals

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and shell stand-ins")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """squeue prints the file `state` (its `%A %T` lines; exits 1 when it holds FAIL) and logs its arguments;
    scontrol shows a KillWait of 6 s. Returns the state file."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    state = tmp_path / "state"
    state.write_text("4242 RUNNING\n")
    calls = tmp_path / "calls"
    (bin_ / "squeue").write_text(f"""#!/bin/sh
echo "$@" >> {calls}
s=$(cat {state})
[ "$s" = FAIL ] && exit 1
printf '%s\\n' "$s"
""")
    (bin_ / "scontrol").write_text("#!/bin/sh\nprintf 'JobCompType = none\\nKillWait                = 6 sec\\n'\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv(slurmjob.POLL_ENV, raising=False)
    return state


def _wait_for_stop(seconds: float) -> float:
    """Sleep in the main thread (a blocking call, as torchrun's wait is) until SystemExit; returns when."""
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        while time.monotonic() - t0 < seconds:
            time.sleep(10)
    assert e.value.code == 128 + signal.SIGTERM
    return time.monotonic() - t0


@pytest.mark.parametrize("ending", ["4242 COMPLETING", "4241 RUNNING\n4242 COMPLETING\n4243 RUNNING"])
def test_an_ending_slurm_job_stops_the_run_as_a_sigterm_would(fake_slurm, caplog, ending):
    assert slurmjob.poll_interval() == pytest.approx(2.0)       # a third of KillWait
    os.environ[slurmjob.POLL_ENV] = "0.2"
    try:
        with _stop_signals(), slurmjob.stop_with_job() as watcher:
            assert watcher is not None and watcher.daemon
            time.sleep(1.0)                                      # RUNNING: nothing happens
            threading.Timer(0.3, lambda: fake_slurm.write_text(ending + "\n")).start()
            took = _wait_for_stop(20)
        assert took < 3, took                                    # the main thread's sleep was cut short
        assert "SLURM job 4242 is COMPLETING" in caplog.text and "stopped by signal 15" in caplog.text
        calls = (fake_slurm.parent / "calls").read_text().splitlines()
        assert len(calls) >= 2 and set(calls) == {"-h -j 4242 -o %A %T"}
        watcher.join(5)
        assert not watcher.is_alive()
    finally:
        del os.environ[slurmjob.POLL_ENV]


@pytest.mark.parametrize("answer", [
    "FAIL", "", "4242 RUNNING\n4242 COMPLETING", "slurm_load_jobs error: Invalid job id", "COMPLETING",
    "4242 PENDING", "4242 SUSPENDED",
    "4242 STOPPED", "4242 SIGNALING",                 # scancel -s STOP: the job goes on after SIGCONT
    "4241 COMPLETING\n4242 RUNNING",                  # another task of the array ends, not this one
    "4243 CANCELLED"])
def test_no_clear_answer_that_the_job_is_ending_never_stops_it(fake_slurm, monkeypatch, answer):
    monkeypatch.setenv(slurmjob.POLL_ENV, "0.1")
    fake_slurm.write_text(answer + "\n")
    with _stop_signals(), slurmjob.stop_with_job() as watcher:
        assert watcher is not None
        time.sleep(1.0)
    assert len((fake_slurm.parent / "calls").read_text().splitlines()) >= 2
    # once the block is over, nothing is sent, whatever squeue then says
    fake_slurm.write_text("4242 CANCELLED\n")
    time.sleep(0.5)
    watcher.join(5)
    assert not watcher.is_alive()


def test_no_watch_outside_slurm_or_when_switched_off(fake_slurm, monkeypatch):
    monkeypatch.setenv(slurmjob.POLL_ENV, "0")
    with slurmjob.stop_with_job() as watcher:
        assert watcher is None
    monkeypatch.setenv(slurmjob.POLL_ENV, "soon")
    with pytest.raises(ValueError, match="MASKFACE_SLURM_POLL"):
        slurmjob.poll_interval()
    monkeypatch.delenv(slurmjob.POLL_ENV)
    monkeypatch.delenv("SLURM_JOB_ID")
    with slurmjob.stop_with_job() as watcher:
        assert watcher is None
    assert not (fake_slurm.parent / "calls").exists()


def test_the_interval_follows_killwait_within_bounds(fake_slurm, monkeypatch):
    scontrol = Path(os.environ["PATH"].split(os.pathsep)[0]) / "scontrol"
    for kill_wait, want in (("120", 15.0), ("2", 1.0), (None, 15.0)):
        scontrol.write_text("#!/bin/sh\n" + (f"echo 'KillWait = {kill_wait} sec'\n" if kill_wait else "exit 1\n"))
        assert slurmjob.poll_interval() == want
