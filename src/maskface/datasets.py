"""Datasets: acquisition record, raw manifest (one row per file), LFW's people and pairs protocol.

A dataset is a folder per identity (``format: imagefolder``) or LFW (``format: lfw``: the same layout plus
the ``pairs.txt`` protocol file). :func:`acquire` turns a config ``source`` (URL, local archive or local
folder) into a folder on disk and writes its record, ``dataset.json``. :func:`scan` accounts for every file
under the images root: each becomes one manifest row whose ``status`` is ``ok`` or says why it cannot be
used (``empty``, ``not_an_image``, ``unreadable``, ``symlink_loop``, ``broken_link``, ``duplicate_link``,
``not_a_regular_file``, ``no_identity``), with a human ``reason``. Nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import pandas as pd
from tqdm import tqdm

from .download import download, extract_archive, is_archive, is_url, verify_checksum
from .imageio import IMAGE_EXTENSIONS, ImageDecodeError, image_mode, load_rgb

RAW_COLUMNS = ["image_id", "identity", "path", "bytes", "sha256", "width", "height", "mode", "status", "reason"]
PAIRS_COLUMNS = ["fold", "a", "b", "same", "line"]


class DatasetError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- acquisition

def _source_parts(spec: Any) -> tuple[str, Optional[str], Optional[str]]:
    if spec is None:
        return None, None, None  # type: ignore[return-value]
    if isinstance(spec, str):
        return spec, None, None
    return spec["source"], spec.get("md5"), spec.get("sha256")


def _fetch(source: str, md5: Optional[str], sha256: Optional[str], downloads: Path, *, retries: int,
           timeout: float, log) -> Path:
    """A local path (checked, used in place) or a URL (downloaded into ``downloads``)."""
    if is_url(source):
        name = source.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
        return download(source, downloads / name, md5=md5, sha256=sha256, retries=retries, timeout=timeout,
                        log=log).resolve()
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"source {source!r} does not exist (resolved: {path.resolve()})")
    if path.is_file():
        verify_checksum(path, md5, sha256)
    return path.resolve()


def find_images_root(root: Path, images_subdir: Optional[str] = None) -> Path:
    """The folder holding the identity folders: ``images_subdir`` if given, else descend single folders."""
    if images_subdir:
        sub = root / images_subdir
        if not sub.is_dir():
            raise DatasetError(f"images_subdir {images_subdir!r} is not a folder under {root}")
        return sub.resolve()
    def has_images(folder: str) -> bool:
        return any(e.name.lower().endswith(tuple(IMAGE_EXTENSIONS)) for e in os.scandir(folder))

    cur = root
    for _ in range(8):
        entries = [e for e in os.scandir(cur) if not e.name.startswith(".")]
        dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        # Descend into a lone folder that holds no image itself (an archive's top folder such as
        # lfw-deepfunneled/, or images_deepfunneled/ beside the protocol files); a lone folder holding
        # images is an identity of a one-person dataset, not a wrapper.
        if len(dirs) == 1 and not has_images(str(cur)) and not has_images(dirs[0].path):
            cur = Path(dirs[0].path)
            continue
        break
    return cur.resolve()


def acquire(name: str, cfg: Mapping[str, Any], *, resources: str | os.PathLike = "resources",
            retries: int = 5, timeout: float = 60.0, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Make dataset ``name`` available on disk; return its record (what ``dataset.json`` holds)."""
    resources = Path(resources)
    downloads = resources / "downloads" / name
    source = cfg["source"]
    fetched = _fetch(source, cfg.get("md5"), cfg.get("sha256"), downloads, retries=retries, timeout=timeout, log=log)
    if fetched.is_dir():
        kind = "folder"
        if cfg.get("md5") or cfg.get("sha256"):
            log(f"{name}: source is a folder; its md5/sha256 setting applies to archives only and is not checked")
        root = fetched
    elif is_archive(fetched):
        kind = "url" if is_url(source) else "archive"
        root = extract_archive(fetched, resources / "datasets" / name).resolve()
    else:
        raise DatasetError(f"{name}: source {source!r} is neither a folder nor an archive "
                           f"(.tgz/.tar.gz/.tar/.tar.bz2/.tar.xz/.zip)")
    images_root = find_images_root(root, cfg.get("images_subdir"))
    pairs = None
    if cfg.get("format") == "lfw":
        psrc, pmd5, psha = _source_parts(cfg.get("pairs"))
        if psrc is None:
            raise DatasetError(f"datasets.{name}.pairs is required for format lfw")
        pairs = str(_fetch(psrc, pmd5, psha, downloads, retries=retries, timeout=timeout, log=log))
    return {
        "name": name,
        "format": cfg.get("format"),
        "role": cfg.get("role", "test"),
        "private": bool(cfg.get("private", False)),
        "source": source,
        "source_kind": kind,
        "root": str(root),
        "images_root": str(images_root),
        "pairs": pairs,
    }


# ----------------------------------------------------------------------------------------- raw manifest

@dataclass(frozen=True)
class _Entry:
    rel_root: str      # posix path relative to the dataset root
    rel_images: str    # posix path relative to the images root (image_id)
    abspath: str
    status: Optional[str] = None   # set when the walk itself already knows the file is unusable
    reason: str = ""


def _walk(root: Path, images_root: Path) -> Iterator[_Entry]:
    """Every non-directory entry under ``images_root``, sorted; directory links followed once, loops recorded."""
    ancestors: list[str] = []
    seen: set[str] = set()

    def rel(p: str) -> tuple[str, str]:
        return (Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else Path(p).as_posix(),
                Path(p).relative_to(images_root).as_posix())

    def visit(folder: str) -> Iterator[_Entry]:
        real = os.path.realpath(folder)
        ancestors.append(real)
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            r1, r2 = rel(folder)
            yield _Entry(r1, r2, folder, "unreadable", f"cannot list folder: {exc.strerror}")
            ancestors.pop()
            return
        for e in entries:
            r1, r2 = rel(e.path)
            try:
                is_link = e.is_symlink()
                st = os.stat(e.path)  # follows links
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    yield _Entry(r1, r2, e.path, "symlink_loop", "symbolic link loop")
                elif is_link:
                    yield _Entry(r1, r2, e.path, "broken_link", f"symbolic link to a missing target ({exc.strerror})")
                else:
                    yield _Entry(r1, r2, e.path, "unreadable", f"cannot stat: {exc.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                target = os.path.realpath(e.path)
                if target in ancestors:
                    yield _Entry(r1, r2, e.path, "symlink_loop", "link to a folder that contains it (loop)")
                elif target in seen:
                    yield _Entry(r1, r2, e.path, "duplicate_link", "link to a folder already scanned")
                else:
                    yield from visit(e.path)
            elif stat.S_ISREG(st.st_mode):
                yield _Entry(r1, r2, e.path)
            else:
                yield _Entry(r1, r2, e.path, "not_a_regular_file", "not a regular file (device, fifo or socket)")
        ancestors.pop()

    yield from visit(str(images_root))


def inspect_file(path: str) -> dict:
    """Hash and fully decode one file: bytes, sha256, width, height, mode, status, reason."""
    out = {"bytes": 0, "sha256": None, "width": None, "height": None, "mode": None, "status": "ok", "reason": ""}
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        out.update(status="unreadable", reason=f"cannot read: {exc.strerror}")
        return out
    out["bytes"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        out.update(status="empty", reason="zero-byte file")
        return out
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        out.update(status="not_an_image", reason=f"extension {Path(path).suffix or '(none)'!r} is not an image type")
        return out
    try:
        out["mode"] = image_mode(data)
        arr = load_rgb(data)
    except ImageDecodeError as exc:
        out.update(status=exc.status, reason=exc.reason)
        return out
    out["height"], out["width"] = int(arr.shape[0]), int(arr.shape[1])
    return out


def _inspect_many(paths: list[str]) -> list[dict]:
    return [inspect_file(p) for p in paths]


def scan(root: str | os.PathLike, images_root: str | os.PathLike | None = None, *, threads: int = 1,
         progress: bool = True, chunk: int = 256) -> pd.DataFrame:
    """The raw manifest of a dataset: one row per file under ``images_root`` (see ``RAW_COLUMNS``)."""
    root = Path(root).resolve()
    images_root = Path(images_root).resolve() if images_root else find_images_root(root)
    entries = list(_walk(root, images_root))
    todo = [i for i, e in enumerate(entries) if e.status is None]
    paths = [entries[i].abspath for i in todo]
    results: list[dict] = []
    batches = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc=f"scan {images_root.name}", unit="file", disable=not progress)
    if threads > 1 and len(batches) > 1:
        from .workers import imap

        for res in imap(_inspect_many, batches, threads, what="raw manifest"):
            results.extend(res)
            bar.update(len(res))
    else:
        for b in batches:
            res = _inspect_many(b)
            results.extend(res)
            bar.update(len(res))
    bar.close()
    info = dict(zip(todo, results))
    rows = []
    for i, e in enumerate(entries):
        parts = e.rel_images.split("/")
        identity = parts[0] if len(parts) > 1 else ""
        if i in info:
            r = info[i]
        else:
            r = {"bytes": 0, "sha256": None, "width": None, "height": None, "mode": None,
                 "status": e.status, "reason": e.reason}
        if r["status"] == "ok" and not identity:
            r = dict(r, status="no_identity", reason="file beside the identity folders, not inside one")
        rows.append({"image_id": e.rel_images, "identity": identity, "path": e.rel_root, **r})
    df = pd.DataFrame(rows, columns=RAW_COLUMNS)
    df["bytes"] = df["bytes"].astype("int64")
    for col in ("width", "height"):
        df[col] = df[col].astype("Int32")
    for col in ("image_id", "identity", "path", "sha256", "mode", "status", "reason"):
        df[col] = df[col].astype("string")
    return df


def fingerprint(raw: pd.DataFrame) -> str:
    """One digest of a dataset's content: sha256 over the sorted (image_id, sha256) of its files."""
    h = hashlib.sha256()
    for image_id, digest in sorted(zip(raw["image_id"].astype(str), raw["sha256"].fillna("").astype(str))):
        h.update(f"{image_id}\t{digest}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- LFW people

def lfw_people(images_root: str | os.PathLike) -> dict[str, list[str]]:
    """{person: sorted image files (relative 'Person/Person_0001.jpg')} of an LFW-layout folder."""
    root = Path(images_root)
    if not root.is_dir():
        raise FileNotFoundError(f"LFW images folder not found: {root}")
    out: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f"{d.name}/{f.name}" for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = files
    if not out:
        raise ValueError(f"no person folders with images under {root}")
    return out


# ---------------------------------------------------------------------------------------------- LFW pairs

def lfw_image_id(name: str, number: str) -> str:
    return f"{name}/{name}_{int(number):04d}.jpg"


def parse_pairs(path: str | os.PathLike) -> pd.DataFrame:
    """Parse LFW's pairs.txt (view 2: ``10 300`` then per fold 300 matched + 300 mismatched lines;
    pairsDevTrain/Test.txt: one count, one fold). Any malformed line raises :class:`DatasetError` naming
    the file and line number. Returns ``fold`` (1-based), ``a``, ``b`` (image_ids), ``same``, ``line``.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a text file ({exc})") from None
    if not lines:
        raise DatasetError(f"{path}: empty pairs file")
    head = lines[0].split()
    try:
        nums = [int(x) for x in head]
    except ValueError:
        raise DatasetError(f"{path}:1: header must be 'FOLDS PAIRS' or 'PAIRS', got {lines[0]!r}") from None
    if len(nums) == 2:
        n_folds, n = nums
    elif len(nums) == 1:
        n_folds, n = 1, nums[0]
    else:
        raise DatasetError(f"{path}:1: header must be 'FOLDS PAIRS' or 'PAIRS', got {lines[0]!r}")
    if n_folds < 1 or n < 1:
        raise DatasetError(f"{path}:1: header counts must be positive, got {lines[0]!r}")
    body = lines[1:]
    while body and not body[-1].strip():
        body.pop()
    expected = n_folds * 2 * n
    if len(body) != expected:
        raise DatasetError(f"{path}: header {lines[0].strip()!r} announces {expected} pair lines, "
                           f"the file has {len(body)}")
    rows = []
    for k, text in enumerate(body):
        lineno = k + 2
        fold = k // (2 * n) + 1
        same = (k % (2 * n)) < n
        f = text.split()
        try:
            if same:
                if len(f) != 3:
                    raise ValueError(f"a matched pair line has 3 fields (name n1 n2), got {len(f)}")
                a, b = lfw_image_id(f[0], f[1]), lfw_image_id(f[0], f[2])
            else:
                if len(f) != 4:
                    raise ValueError(f"a mismatched pair line has 4 fields (name1 n1 name2 n2), got {len(f)}")
                if f[0] == f[2]:
                    raise ValueError("a mismatched pair names the same person twice")
                a, b = lfw_image_id(f[0], f[1]), lfw_image_id(f[2], f[3])
        except ValueError as exc:
            raise DatasetError(f"{path}:{lineno}: {exc}: {text!r}") from None
        rows.append((fold, a, b, same, lineno))
    df = pd.DataFrame(rows, columns=PAIRS_COLUMNS)
    df["fold"] = df["fold"].astype("int16")
    df["line"] = df["line"].astype("int32")
    return df


def check_pairs(pairs: pd.DataFrame, raw: pd.DataFrame, pairs_path: str = "pairs.txt") -> None:
    """Fail loudly if a pair names an image that the dataset lacks or cannot read."""
    status = dict(zip(raw["image_id"].astype(str), raw["status"].astype(str)))
    problems = []
    for row in pairs.itertuples(index=False):
        for img in (row.a, row.b):
            st = status.get(img)
            if st != "ok":
                problems.append(f"{pairs_path}:{row.line}: image {img} is "
                                f"{'missing from the dataset' if st is None else 'unusable (' + st + ')'}")
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DatasetError(f"{len(problems)} pair image problem(s):\n" + "\n".join(problems[:10]) + more)


# --------------------------------------------------------------------------------------------------- CLI

def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="maskface manifest",
                                 description="Scan a folder-per-identity dataset into a raw Parquet manifest.")
    ap.add_argument("root", help="dataset root folder")
    ap.add_argument("output", help="output .parquet")
    ap.add_argument("--images-subdir")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    from .manifest import provenance, write_parquet
    try:
        images_root = find_images_root(Path(args.root).resolve(), args.images_subdir)
        df = scan(args.root, images_root, threads=args.threads)
    except (DatasetError, OSError) as exc:
        print(f"maskface manifest: {exc}", file=sys.stderr)
        return 1
    write_parquet(df, args.output, provenance("raw_manifest", {"root": str(Path(args.root).resolve())}))
    counts = df["status"].value_counts().to_dict()
    print(f"{len(df)} files: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0
