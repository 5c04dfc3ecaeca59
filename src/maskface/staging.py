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
- a folder: always that folder.

A folder without room for the caches (their size plus 1 GiB) is not used; the run then reads the originals.
Each choice, and the reason when nothing is staged, is one line of the job's log.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

log = logging.getLogger("maskface.staging")

STAGED_ENV = "MASKFACE_STAGED"     # JSON {original path: local copy}, for this process and its children
MARGIN = 1 << 30                    # free space left on the local disk after the copies


def scratch_folder(setting: str) -> tuple[Optional[Path], str, bool]:
    """(folder, where it came from, explicit) for a ``train.stage`` setting; folder None when nothing applies."""
    if setting == "none":
        return None, "train.stage is none", False
    if setting != "auto":
        return Path(setting), "train.stage", True
    if os.environ.get("MASKFACE_SCRATCH"):
        return Path(os.environ["MASKFACE_SCRATCH"]), "$MASKFACE_SCRATCH", False
    if os.environ.get("SLURM_JOB_ID"):
        for name in ("SLURM_TMPDIR", "TMPDIR"):
            if os.environ.get(name):
                return Path(os.environ[name]), f"${name}", False
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


def stage(paths: Iterable[str | os.PathLike], setting: str = "auto") -> dict[str, str]:
    """Copy ``paths`` to the local folder that ``setting`` names (see the module's text), record the mapping in
    ``$MASKFACE_STAGED`` for this process and its children, and return it ({} when nothing is staged; the
    reason is logged). Remove the copies with :func:`unstage`."""
    files = [Path(p) for p in dict.fromkeys(str(p) for p in paths if p)]
    if not files:
        return {}
    folder, source, explicit = scratch_folder(setting)
    if folder is None:
        log.info("caches read in place: %s", source)
        return {}
    size = sum(f.stat().st_size for f in files)
    if not explicit and _device_of(folder) == _device_of(files[0]):
        log.info("caches read in place: %s (%s) is on the caches' own filesystem", folder, source)
        return {}
    if not explicit and _fs_type(folder) == "tmpfs":
        log.info("caches read in place: %s (%s) is in memory (tmpfs), where the copies would count against the "
                 "job's memory", folder, source)
        return {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        log.warning("caches read in place: cannot use %s (%s): %s", folder, source, exc)
        return {}
    if free < size + MARGIN:
        log.warning("caches read in place: %s (%s) has %.1f GiB free, the caches need %.1f GiB + 1 GiB",
                    folder, source, free / 2**30, size / 2**30)
        return {}
    dest = Path(tempfile.mkdtemp(prefix="maskface-staged-", dir=folder))
    mapping: dict[str, str] = {}
    t0 = time.time()
    try:
        for i, f in enumerate(files):
            copy = dest / f"{i}-{f.name}"
            shutil.copyfile(f, copy)
            if copy.stat().st_size != f.stat().st_size:
                raise OSError(f"{copy}: {copy.stat().st_size} bytes copied of {f.stat().st_size}")
            mapping[os.path.abspath(f)] = str(copy)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
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
    for folder in {str(Path(c).parent) for c in mapping.values()}:
        shutil.rmtree(folder, ignore_errors=True)
