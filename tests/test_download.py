"""Download and extraction, end to end against an HTTP server on 127.0.0.1 (Range, cut-offs, checksums)."""
from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from maskface.download import (ChecksumError, DownloadError, HTTPClientError, UnsafeArchiveError, download,
                               extract_archive)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file with Range support. The server's `plan` scripts misbehaviour per request:
    'cut' sends half of what it promised and drops the connection; 'norange' ignores Range; 'ok' is normal."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if self.path != "/file":
            self.send_error(404)
            return
        mode = srv.plan.pop(0) if srv.plan else "ok"
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.plan, srv.requests = [], []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/file"
    yield srv
    srv.shutdown()
    srv.server_close()


MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_verifies_and_renames_atomically(server, tmp_path):
    dest = tmp_path / "d" / "file.bin"
    download(server.url, dest, md5=MD5, sha256=SHA, progress=False, log=lambda m: None)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "d" / "file.bin.part").exists()
    # second call: verified on disk, no request made
    n = len(server.requests)
    download(server.url, dest, md5=MD5, progress=False, log=lambda m: None)
    assert len(server.requests) == n


def test_cut_off_download_resumes_with_range(server, tmp_path):
    server.plan = ["cut"]
    dest = tmp_path / "file.bin"
    download(server.url, dest, md5=MD5, retries=3, backoff=0, progress=False, log=lambda m: None)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] is None
    # the second request resumes where the first stopped (up to one unflushed 64 KiB read lost)
    resumed_at = int(server.requests[1]["range"].split("=")[1].rstrip("-"))
    assert len(PAYLOAD) // 2 - (1 << 16) <= resumed_at <= len(PAYLOAD) // 2


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:1000])
    download(server.url, dest, sha256=SHA, progress=False, log=lambda m: None)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] == "bytes=1000-"


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.plan = ["cut", "norange"]
    dest = tmp_path / "file.bin"
    download(server.url, dest, md5=MD5, retries=3, backoff=0, progress=False, log=lambda m: None)
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_file_and_names_digests(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(ChecksumError) as err:
        download(server.url, dest, md5="0" * 32, progress=False, log=lambda m: None)
    assert "0" * 32 in str(err.value) and MD5 in str(err.value)
    assert not dest.exists() and not (tmp_path / "file.bin.part").exists()


def test_persistent_cut_offs_give_up_with_a_clear_error_and_keep_partial(server, tmp_path):
    server.plan = ["cut"] * 10
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="failed after 2 retries"):
        download(server.url, dest, md5=MD5, retries=2, backoff=0, progress=False, log=lambda m: None)
    assert not dest.exists()
    assert (tmp_path / "file.bin.part").stat().st_size > 0  # kept for the next run to resume


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(HTTPClientError, match="404"):
        download(server.url.replace("/file", "/missing"), tmp_path / "x", retries=5, backoff=0,
                 progress=False, log=lambda m: None)
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------------------- archives

def _tar(path, members: dict[str, bytes], links: dict[str, str] | None = None):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)


def test_extract_tar_and_zip(tmp_path):
    _tar(tmp_path / "a.tgz", {"top/Alice/Alice_0001.jpg": b"x", "top/Bob/Bob_0001.jpg": b"y"})
    out = extract_archive(tmp_path / "a.tgz", tmp_path / "ds", progress=False)
    assert (out / "top" / "Bob" / "Bob_0001.jpg").read_bytes() == b"y"
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.writestr("Carol/Carol_0001.jpg", b"z")
    out = extract_archive(tmp_path / "b.zip", tmp_path / "dz", progress=False)
    assert (out / "Carol" / "Carol_0001.jpg").read_bytes() == b"z"


@pytest.mark.parametrize("member", ["../evil.txt", "top/../../evil.txt", "/etc/evil.txt"])
def test_tar_members_escaping_the_target_are_refused(tmp_path, member):
    _tar(tmp_path / "bad.tgz", {"top/ok.jpg": b"x", member: b"evil"})
    with pytest.raises(UnsafeArchiveError, match="evil"):
        extract_archive(tmp_path / "bad.tgz", tmp_path / "out" / "ds", progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "out" / "ds").exists()


def test_tar_symlink_escaping_the_target_is_refused(tmp_path):
    _tar(tmp_path / "bad.tgz", {"top/ok.jpg": b"x"}, links={"top/link": "../../etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        extract_archive(tmp_path / "bad.tgz", tmp_path / "ds", progress=False)


def test_zip_member_escaping_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("ok.jpg", b"x")
        zf.writestr("../evil.txt", b"evil")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tmp_path / "bad.zip", tmp_path / "ds", progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "junk.tgz").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        extract_archive(tmp_path / "junk.tgz", tmp_path / "ds", progress=False)
