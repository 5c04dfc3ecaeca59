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
    holding the reason (Snakemake prints the log path).
    """
    path = snakemake.log[0] if len(snakemake.log) else None
    # Progress bars go to the log file: one line every 15 s instead of a redraw per step.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    if path is None:
        yield logging.getLogger("maskface")
        return
    with open(path, "w", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
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
