"""train.stage (maskface.staging): where a run's caches are copied before training, and when they are not."""
from __future__ import annotations

import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from maskface import staging as S

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_TMPDIR", "TMPDIR", "MASKFACE_SCRATCH", S.STAGED_ENV)


@pytest.fixture()
def clean_env(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_where_each_setting_stages(clean_env, tmp_path):
    assert S.scratch_folder("none")[0] is None
    assert S.scratch_folder(str(tmp_path)) == (tmp_path, "train.stage", True)
    folder, why, _ = S.scratch_folder("auto")
    assert folder is None and why == "not a SLURM job and no $MASKFACE_SCRATCH"
    clean_env.setenv("SLURM_JOB_ID", "7")
    assert S.scratch_folder("auto")[0] is None                    # SLURM, but no local folder named
    clean_env.setenv("TMPDIR", "/local/tmp")
    assert S.scratch_folder("auto")[:2] == (Path("/local/tmp"), "$TMPDIR")
    clean_env.setenv("SLURM_TMPDIR", "/local/job7")
    assert S.scratch_folder("auto")[:2] == (Path("/local/job7"), "$SLURM_TMPDIR")
    clean_env.setenv("MASKFACE_SCRATCH", "/nvme")
    assert S.scratch_folder("auto")[:2] == (Path("/nvme"), "$MASKFACE_SCRATCH")
    assert S.scratch_folder("none")[0] is None


def _caches(tmp_path: Path) -> list[Path]:
    files = []
    for name, size in (("clean.npy", 3000), ("masked.npy", 5000)):
        f = tmp_path / "shared" / name
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(os.urandom(size))
        files.append(f)
    return files


def test_a_named_folder_gets_copies_that_the_run_opens_and_that_go_at_the_end(clean_env, tmp_path):
    files = _caches(tmp_path)
    local = tmp_path / "local"
    copies = S.stage([str(f) for f in files] + [str(files[0])], str(local))      # a file named twice: one copy
    assert sorted(copies) == sorted(os.path.abspath(f) for f in files)
    for f in files:
        copy = Path(S.staged(f))
        assert copy.parent.parent == local and copy.read_bytes() == f.read_bytes()
        # a relative name of the same file finds the copy too (Snakemake's jobs name results/... relatively)
        assert S.staged(os.path.relpath(f)) == str(copy)
    assert S.staged(tmp_path / "other.npy") == str(tmp_path / "other.npy")
    S.unstage(copies)
    assert list(local.iterdir()) == [] and S.STAGED_ENV not in os.environ
    assert S.staged(files[0]) == str(files[0])


def test_auto_reads_in_place_where_staging_gains_nothing_or_does_not_fit(clean_env, tmp_path, caplog):
    files = [str(f) for f in _caches(tmp_path)]
    caplog.set_level(logging.INFO, logger=S.log.name)
    assert S.stage(files, "none") == {}
    assert S.stage(files, "auto") == {} and "not a SLURM job" in caplog.text
    clean_env.setenv("SLURM_JOB_ID", "7")
    clean_env.setenv("SLURM_TMPDIR", str(tmp_path / "job"))     # the caches' own filesystem
    assert S.stage(files, "auto") == {} and "on the caches' own filesystem" in caplog.text
    # another filesystem (as a node's local disk is): staged, unless it is in memory or too small
    real = S._device_of
    clean_env.setattr(S, "_device_of", lambda p: -1 if str(p).startswith(str(tmp_path / "job")) else real(p))
    clean_env.setattr(S, "_fs_type", lambda p: "tmpfs")
    assert S.stage(files, "auto") == {} and "in memory (tmpfs)" in caplog.text
    clean_env.setattr(S, "_fs_type", lambda p: "xfs")
    usage = namedtuple("usage", "total used free")
    clean_env.setattr(shutil, "disk_usage", lambda p: usage(2**31, 2**31 - 2**29, 2**29))
    assert S.stage(files, "auto") == {} and "0.5 GiB free" in caplog.text
    clean_env.setattr(shutil, "disk_usage", lambda p: usage(2**35, 0, 2**35))
    copies = S.stage(files, "auto")
    assert len(copies) == 2 and "staged 2 cache file(s)" in caplog.text and "($SLURM_TMPDIR)" in caplog.text
    S.unstage(copies)
    assert list((tmp_path / "job").iterdir()) == []


def test_a_copy_that_fails_half_way_is_removed_and_the_run_reads_in_place(clean_env, tmp_path, caplog):
    files = [str(f) for f in _caches(tmp_path)]
    caplog.set_level(logging.INFO, logger=S.log.name)
    real = shutil.copyfile
    calls = []

    def full_disk(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    clean_env.setattr(shutil, "copyfile", full_disk)
    local = tmp_path / "local"
    assert S.stage(files, str(local)) == {}
    assert list(local.iterdir()) == [] and S.STAGED_ENV not in os.environ
    assert "staging to" in caplog.text and "No space left on device" in caplog.text
    clean_env.setattr(shutil, "copyfile", real)
    (tmp_path / "file").write_text("")
    assert S.stage(files, str(tmp_path / "file" / "below")) == {} and "cannot use" in caplog.text


def test_folders_of_killed_runs_of_this_host_are_removed_by_the_next_run(clean_env, tmp_path, caplog):
    import json
    import subprocess
    import sys

    caplog.set_level(logging.INFO, logger=S.log.name)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                        # a process id that no longer runs
    local = tmp_path / "local"
    me = S._owner()
    owners = {"killed": dict(me, pid=gone.pid), "other-host": dict(me, host="not-" + me["host"], pid=gone.pid),
              "other-pid-namespace": dict(me, pid_ns="pid:[1]", pid=gone.pid),     # a container on this host
              "before-a-reboot": dict(me, boot="another-boot", pid=gone.pid),
              "running": dict(me)}
    for name, owner in owners.items():
        d = local / (S.PREFIX + name)
        d.mkdir(parents=True)
        (d / S.OWNER).write_text(json.dumps(owner))
        (d / "0-clean.npy").write_bytes(b"x" * 10)
    (local / (S.PREFIX + "no-owner")).mkdir()
    copies = S.stage([str(f) for f in _caches(tmp_path)], str(local))
    assert "removed" in caplog.text and (S.PREFIX + "killed") in caplog.text
    left = sorted(p.name for p in local.iterdir())
    assert left == sorted([S.PREFIX + n for n in ("other-host", "other-pid-namespace", "before-a-reboot",
                                                  "running", "no-owner")]
                          + [Path(next(iter(copies.values()))).parent.name])
    owner = json.loads((Path(next(iter(copies.values()))).parent / S.OWNER).read_text())
    assert owner == S._owner() and owner["boot"] and owner["pid_ns"]
    S.unstage(copies)
    assert S.PREFIX + "running" in {p.name for p in local.iterdir()}


def test_a_sigterm_while_the_folder_is_made_leaves_no_folder(clean_env, tmp_path, monkeypatch):
    """The signal lands inside mkdtemp (the folder exists, stage does not know it yet, its owner is not written):
    the folder goes all the same. Without the hold it stayed, and with no owner no later run removes it."""
    import signal
    import time

    from maskface.train import _stop_signals
    real = S.tempfile.mkdtemp

    def mkdtemp_then_signal(*args, **kwargs):
        folder = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)                                  # the handler runs here
        return folder

    monkeypatch.setattr(S.tempfile, "mkdtemp", mkdtemp_then_signal)
    local, copies = tmp_path / "local", {}
    with pytest.raises(SystemExit) as e:
        with _stop_signals() as hold:
            S.stage([str(f) for f in _caches(tmp_path)], str(local), into=copies, hold=hold)
    assert e.value.code == 143 and copies == {} and list(local.iterdir()) == []
    assert S.STAGED_ENV not in os.environ
