"""One way to write a result file: atomically (a temporary file in the same folder, then a rename), so that a
killed job never leaves a half-written file under its final name, and one way to read a JSON record.

    with atomic_path("results/x.png") as tmp:   # any writer: PNG, .npy, torch.save, a video encoder ...
        fig.savefig(tmp)
    write_json(obj, path); write_text(text, path); read_json(path)

The temporary file keeps the target's suffix (``.x.png.1a2b.tmp.png``) because some writers (matplotlib,
OpenCV's video writer, numpy) choose the format from it."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    exception, removed otherwise. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomic, deterministic JSON (sorted keys, two-space indent, a final newline)."""
    write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)
