"""Glue for the thin ``workflow/scripts/*.py``: logging to the rule's ``log:`` file, plain config access."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator


@contextlib.contextmanager
def logged(snakemake) -> Iterator[logging.Logger]:  # noqa: ANN001 - the Snakemake script object
    """Send stdout, stderr and ``logging`` of a script job to its first ``log:`` file.

    An exception is written to the log with its traceback and re-raised, so the job fails with the log
    holding the reason (Snakemake prints the log path). The process's file descriptors 1 and 2 point at the log
    too while the job runs, so what C libraries and worker processes (:mod:`maskface.workers`) print, a
    worker's traceback among it, lands in the same log.
    """
    path = snakemake.log[0] if len(snakemake.log) else None
    # Progress bars go to the log file: one line every 15 s instead of a redraw per step.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    if path is None:
        yield logging.getLogger("maskface")
        return
    with open(path, "w", buffering=1) as fh, _fds_to(fh), contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh):
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield logging.getLogger("maskface")
        except BaseException:
            traceback.print_exc(file=fh)
            raise
        finally:
            root.removeHandler(handler)


@contextlib.contextmanager
def _fds_to(fh) -> Iterator[None]:  # noqa: ANN001 - an open file
    """Point file descriptors 1 and 2 at ``fh`` (shared offset: lines from several processes never overwrite
    each other) and restore them afterwards."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    saved = []
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(fh.fileno(), fd)
        yield
    finally:
        fh.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
