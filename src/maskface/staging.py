"""Training caches copied to node-local disk before a run (``train.stage``).

A training run reads its caches (memory-mapped ``.npy``: about 16 GB clean + 16 GB masked for CASIA-WebFace)
in a new random order every epoch. On a cluster they live on a shared filesystem, and the job's memory limit
(SLURM's cgroup counts the page cache) keeps them from staying cached, so every epoch would read them over the
network again. Staging copies them once, at the start of the job, to a folder on the node's own disk; the run
(every rank of a multi-GPU run: torchrun's processes inherit the mapping) opens the copies, and the job removes
them when it ends. Nothing about the run changes: its spec, digest and checkpoints name the original files.

``train.stage``:

- ``auto`` (default): ``$MASKFACE_SCRATCH`` when set; else, inside a SLURM job, ``$SLURM_TMPDIR`` or ``$TMPDIR``
  (where clusters put a job's local disk). A folder on the same filesystem as the caches is no gain, and one in
  memory (tmpfs) would count against the job's memory: neither is used. Outside SLURM with no
  ``$MASKFACE_SCRATCH``, nothing is staged.
- ``none``: never.
- a folder: that folder, even when it shares the caches' filesystem or is a tmpfs (the user's choice).

A folder without room for the caches (their size plus 1 GiB), or one that cannot be created or written (a
copy that fails half way is removed), is not used: the run then reads the originals, with a warning in the
log. Staging never changes a result, so it never fails a job. Each choice, and the reason when nothing is
staged, is one line of the job's log.

The copies go when the job ends, also when it is stopped by SIGTERM (``scancel``, a SLURM time limit),
SIGHUP (:func:`maskface.train.launch` turns both into a normal exit; inside SLURM it also notices a stop whose
SIGTERM reaches only the job step's task, :mod:`maskface.slurmjob`) or SIGINT (Ctrl-C), at whatever moment:
the caller's mapping is filled copy by copy, and the folder is created with signals held. A job killed outright
(SIGKILL, a crash) leaves them, so each staged folder records its owner (host, boot, PID namespace, process,
SLURM job), and the next run that stages into the same folder from the same machine removes the folders
whose process is gone.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Mapping, MutableMapping, Optional

log = logging.getLogger("maskface.staging")

STAGED_ENV = "MASKFACE_STAGED"     # JSON {original path: local copy}, for this process and its children
MARGIN = 1 << 30                    # free space left on the local disk after the copies
PREFIX = "maskface-staged-"         # a staged folder's name starts so
OWNER = "owner.json"                # in each staged folder: _owner() of the run that staged it


def scratch_folder(setting: str) -> tuple[Optional[Path], str, bool]:
    """(folder, where it came from, explicit) for a ``train.stage`` setting; folder None when nothing applies."""
    if setting == "none":
        return None, "train.stage is none", False
    if setting != "auto":
        return Path(os.path.abspath(setting)), "train.stage", True
    if os.environ.get("MASKFACE_SCRATCH"):
        return Path(os.path.abspath(os.environ["MASKFACE_SCRATCH"])), "$MASKFACE_SCRATCH", False
    if os.environ.get("SLURM_JOB_ID"):
        for name in ("SLURM_TMPDIR", "TMPDIR"):
            if os.environ.get(name):
                return Path(os.path.abspath(os.environ[name])), f"${name}", False
        return None, "a SLURM job without $SLURM_TMPDIR or $TMPDIR (set MASKFACE_SCRATCH or train.stage)", False
    return None, "not a SLURM job and no $MASKFACE_SCRATCH", False


def _device_of(path: Path) -> Optional[int]:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return p.stat().st_dev
    except OSError:
        return None


def _fs_type(path: Path) -> Optional[str]:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts), or None where unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # another user's process: alive
        return True
    return True


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _owner() -> dict:
    """This process as the owner of a staged folder: host, boot, PID namespace, pid, SLURM job."""
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_ns(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _pid_ns() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def remove_orphans(folder: Path) -> list[Path]:
    """Remove the staged folders in ``folder`` left by killed runs of this very machine: same host name, same
    boot, same PID namespace (a container sharing the folder cannot see the other's processes), and the
    process gone. Return them. Every other folder, and any whose owner cannot be read, is left alone."""
    me, gone = _owner(), []
    for d in sorted(folder.glob(PREFIX + "*")):
        try:
            owner = json.loads((d / OWNER).read_text())
            same = all(owner.get(k) == me[k] and me[k] is not None for k in ("host", "boot", "pid_ns"))
            mine = same and not _alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if mine:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def stage(paths: Iterable[str | os.PathLike], setting: str = "auto", *,
          into: Optional[MutableMapping[str, str]] = None,
          hold: Callable[[], ContextManager] = contextlib.nullcontext) -> MutableMapping[str, str]:
    """Copy ``paths`` to the local folder that ``setting`` names (see the module's text), record the mapping in
    ``$MASKFACE_STAGED`` for this process and its children, and return it ({} when nothing is staged; the
    reason is logged). Remove the copies with :func:`unstage`.

    ``into``: the caller's mapping, filled copy by copy, so that a signal raised anywhere (even between the
    last copy and the return) leaves the caller holding every copy made. ``hold``: a context manager that
    defers signals (:func:`maskface.train._stop_signals`), kept over the creation of the folder, so that no
    folder exists unrecorded and without its owner."""
    mapping: MutableMapping[str, str] = {} if into is None else into
    files = [Path(p) for p in dict.fromkeys(str(p) for p in paths if p)]
    if not files:
        return mapping
    folder, source, explicit = scratch_folder(setting)
    if folder is None:
        log.info("caches read in place: %s", source)
        return mapping
    size = sum(f.stat().st_size for f in files)
    if not explicit and _device_of(folder) in {_device_of(f) for f in files}:
        log.info("caches read in place: %s (%s) is on the caches' own filesystem", folder, source)
        return mapping
    if not explicit and _fs_type(folder) == "tmpfs":
        log.info("caches read in place: %s (%s) is in memory (tmpfs), where the copies would count against the "
                 "job's memory", folder, source)
        return mapping
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for d in remove_orphans(folder):
            log.info("removed %s, staged by a run of this host that was killed", d)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        log.warning("caches read in place: cannot use %s (%s): %s", folder, source, exc)
        return mapping
    if free < size + MARGIN:
        log.warning("caches read in place: %s (%s) has %.1f GiB free, the caches need %.1f GiB + 1 GiB",
                    folder, source, free / 2**30, size / 2**30)
        return mapping
    dest: Optional[Path] = None
    t0 = time.time()
    try:
        with hold():
            dest = Path(tempfile.mkdtemp(prefix=PREFIX, dir=folder))
            (dest / OWNER).write_text(json.dumps(_owner()))
        for i, f in enumerate(files):
            copy = dest / f"{i}-{f.name}"
            shutil.copyfile(f, copy)
            if copy.stat().st_size != f.stat().st_size:
                raise OSError(f"{copy}: {copy.stat().st_size} bytes copied of {f.stat().st_size}")
            mapping[os.path.abspath(f)] = str(copy)
    except BaseException as exc:
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        mapping.clear()
        if not isinstance(exc, OSError):        # a signal or a bug: not a disk that failed
            raise
        log.warning("caches read in place: staging to %s (%s) failed, the partial copy is removed: %s",
                    folder, source, exc)
        return mapping
    dt = time.time() - t0
    log.info("staged %d cache file(s), %.2f GiB, to %s (%s) in %.1f s (%.0f MB/s)", len(files), size / 2**30,
             dest, source, dt, size / 1e6 / max(dt, 1e-9))
    os.environ[STAGED_ENV] = json.dumps(mapping)
    return mapping


def staged(path: str | os.PathLike) -> str:
    """The local copy of ``path`` when this job staged it, else ``path`` itself."""
    mapping: Mapping[str, str] = json.loads(os.environ.get(STAGED_ENV) or "{}")
    return mapping.get(os.path.abspath(path), str(path))


def unstage(mapping: Mapping[str, str]) -> None:
    """Remove the copies of :func:`stage` (their folder) and forget the mapping."""
    os.environ.pop(STAGED_ENV, None)
    for folder in {Path(c).parent for c in mapping.values()}:
        for f in folder.iterdir() if folder.is_dir() else ():
            if f.name != OWNER:          # the data first, the owner record last: a run cut short here
                f.unlink(missing_ok=True)    # leaves a folder that the next run can still recognise
        shutil.rmtree(folder, ignore_errors=True)
