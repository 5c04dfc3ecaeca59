"""Dataset acquisition: resumable, checksum-verified downloads and safe archive extraction.

* :func:`download` fetches an http(s) URL to ``dest``: the bytes go to ``dest + '.part'``; a cut-off
  transfer is resumed with an HTTP ``Range`` request (falling back to a fresh start when the server ignores
  it), retried with back-off, checked against the md5/sha256 given, and only then renamed onto ``dest``
  (``os.replace``: atomic), so ``dest`` never holds a partial or wrong file. A checksum mismatch deletes the
  partial file and raises :class:`ChecksumError` naming both digests.
* :func:`extract_archive` unpacks .tar/.tgz/.tar.gz/.tar.bz2/.tar.xz/.zip into a folder. Every member is
  checked first: an absolute path, a ``..`` component, or a link pointing out of the target folder stops the
  extraction with :class:`UnsafeArchiveError` before anything is written. Extraction goes to a temporary
  sibling folder that is renamed into place when complete.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Optional

import requests
from tqdm import tqdm

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")


class DownloadError(RuntimeError):
    pass


class ChecksumError(DownloadError):
    pass


class HTTPClientError(DownloadError):
    """A 4xx answer (not found, forbidden): retrying cannot help."""


class UnsafeArchiveError(ValueError):
    pass


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def choose_source(source: Any) -> Any:
    """A dataset's or pairs file's ``source``: a string is itself; a list of alternatives gives the first
    local path that exists, else the first http(s) URL, else its first entry (whose absence is then reported)."""
    if not isinstance(source, (list, tuple)):
        return source
    for s in source:
        if not is_url(s) and Path(s).expanduser().exists():
            return s
    return next((s for s in source if is_url(s)), source[0] if source else None)


def chosen_sources(cfg: Mapping[str, Any]) -> dict:
    """A dataset config with its source and pairs source alternatives resolved by :func:`choose_source`."""
    out = dict(cfg)
    out["source"] = choose_source(cfg.get("source"))
    pairs = cfg.get("pairs")
    if isinstance(pairs, Mapping):
        out["pairs"] = {**pairs, "source": choose_source(pairs.get("source"))}
    elif pairs is not None:
        out["pairs"] = choose_source(pairs)
    return out


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike, md5: Optional[str] = None, sha256: Optional[str] = None) -> None:
    """Raise :class:`ChecksumError` when ``path`` does not match the digests given (None: not checked)."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            actual = file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                raise ChecksumError(f"{path}: {algorithm} mismatch: expected {expected.lower()}, got {actual}")


def download(url: str, dest: str | os.PathLike, *, md5: Optional[str] = None, sha256: Optional[str] = None,
             retries: int = 5, timeout: float = 60.0, chunk_size: int = 1 << 16, progress: bool = True,
             backoff: float = 1.0, session: Optional[requests.Session] = None,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Download ``url`` to ``dest`` (see the module docstring). Returns ``dest``.

    An existing ``dest`` that matches the checksums is kept as is (no request). Without any checksum, an
    existing ``dest`` is trusted: it can only have been written by a completed download (atomic rename).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            verify_checksum(dest, md5, sha256)
            log(f"{dest}: present and verified, not downloaded again")
            return dest
        except ChecksumError as exc:
            log(f"{exc}; downloading again")
            dest.unlink()
    part = dest.with_name(dest.name + ".part")
    sess = session or requests.Session()
    attempt = 0
    while True:
        try:
            _fetch_into(sess, url, part, timeout=timeout, chunk_size=chunk_size, progress=progress, log=log)
            break
        except HTTPClientError:
            raise
        except (requests.RequestException, DownloadError, OSError) as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"{url}: failed after {retries} retries: {exc} (partial data kept in {part}; "
                    f"run again to resume)"
                ) from exc
            wait = backoff * 2 ** (attempt - 1)
            log(f"{url}: {exc}; retry {attempt}/{retries} in {wait:.1f}s (resuming at {_size(part)} bytes)")
            time.sleep(wait)
    try:
        verify_checksum(part, md5, sha256)
    except ChecksumError as exc:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: {exc}; the downloaded file was removed") from None
    os.replace(part, dest)
    return dest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fetch_into(sess: requests.Session, url: str, part: Path, *, timeout: float, chunk_size: int,
                progress: bool, log: Callable[[str], None]) -> None:
    have = _size(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    with sess.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and have:
            # Range past the end: the part file may already be complete; the checksum decides.
            total = _content_range_total(resp.headers.get("Content-Range"))
            if total is not None and total == have:
                return
            log(f"{url}: server refused the resume range; starting over")
            part.unlink()
            raise DownloadError("range not satisfiable")
        if 400 <= resp.status_code < 500:
            raise HTTPClientError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code == 200 and have:
            log(f"{url}: server ignored the Range request; starting over")
            have = 0
        mode = "ab" if resp.status_code == 206 else "wb"
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = (have + expected) if expected is not None else None
        received = 0
        with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                          desc=part.name[:-5], disable=not progress, leave=False) as bar:
            for block in resp.iter_content(chunk_size=chunk_size):
                fh.write(block)
                received += len(block)
                bar.update(len(block))
        if expected is not None and received < expected:
            raise DownloadError(f"connection closed after {received} of {expected} bytes")


def _content_range_total(value: Optional[str]) -> Optional[int]:
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


# ---------------------------------------------------------------------------------------------- archives

def _check_member_path(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; nothing was extracted")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would escape the target folder; nothing was extracted")
    return p


def _check_link_target(member_path: PurePosixPath, target: str, archive: Path, name: str) -> None:
    t = PurePosixPath(target.replace("\\", "/"))
    if t.is_absolute():
        raise UnsafeArchiveError(f"{archive}: link {name!r} points to absolute path {target!r}; nothing was extracted")
    depth = len(member_path.parent.parts)
    for part in t.parts:
        depth = depth - 1 if part == ".." else depth + (part not in (".", ""))
        if depth < 0:
            raise UnsafeArchiveError(f"{archive}: link {name!r} -> {target!r} escapes the target folder; nothing was extracted")


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True) -> Path:
    """Extract ``archive`` into ``dest`` (created; must not exist yet, or be left from a completed run)."""
    archive, dest = Path(archive), Path(dest)
    marker = dest / ".extracted"
    if marker.exists() and marker.read_text().strip() == archive.name:
        return dest
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    tmp = dest.with_name(dest.name + ".extracting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        name = archive.name.lower()
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:
                    p = _check_member_path(info.filename, archive)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refused")
                    del p
                for info in tqdm(infos, desc=f"extract {archive.name}", disable=not progress, leave=False):
                    zf.extract(info, tmp)
        else:
            try:
                tf = tarfile.open(archive)
            except tarfile.TarError as exc:
                raise ValueError(f"{archive}: not a readable tar archive: {exc}") from None
            with tf:
                members = tf.getmembers()
                for m in members:
                    p = _check_member_path(m.name, archive)
                    if m.issym() or m.islnk():
                        _check_link_target(p if m.issym() else PurePosixPath("x"), m.linkname, archive, m.name)
                    if m.isdev() or m.ischr() or m.isblk() or m.isfifo():
                        raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or fifo; refused")
                for m in tqdm(members, desc=f"extract {archive.name}", disable=not progress, leave=False):
                    # filter="data" (PEP 706) is a second line of defence behind the checks above.
                    tf.extract(m, tmp, filter="data")
        (tmp / ".extracted").write_text(archive.name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="maskface download", description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("dest")
    ap.add_argument("--md5")
    ap.add_argument("--sha256")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--extract-to", help="extract the downloaded archive into this folder")
    args = ap.parse_args(argv)
    try:
        path = download(args.url, args.dest, md5=args.md5, sha256=args.sha256, retries=args.retries)
        if args.extract_to:
            extract_archive(path, args.extract_to)
    except (DownloadError, UnsafeArchiveError, ValueError, FileNotFoundError) as exc:
        print(f"maskface download: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
