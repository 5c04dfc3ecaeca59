"""Raw manifests (every file accounted for), LFW pairs parsing, dataset acquisition."""
from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskface.datasets import (DatasetError, acquire, check_pairs, find_images_root, fingerprint, lfw_people,
                               parse_pairs, scan)
from maskface.testing import BAD_INPUTS, write_bad_inputs


def _jpg(path: Path, seed: int = 0, size: int = 48):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="JPEG")


def _tiny_lfw(root: Path) -> Path:
    """LFW-shaped tree: images/<Name>/<Name>_000k.jpg for 4 people, and a 2-fold pairs.txt."""
    people = {"Alice_A": 3, "Bob_B": 2, "Carol_C": 2, "Dan_D": 1}
    for k, (name, n) in enumerate(people.items()):
        for i in range(1, n + 1):
            _jpg(root / "images" / name / f"{name}_{i:04d}.jpg", seed=10 * k + i)
    (root / "pairs.txt").write_text(
        "2\t1\n"
        "Alice_A\t1\t2\n"
        "Alice_A\t1\tBob_B\t1\n"
        "Carol_C\t1\t2\n"
        "Bob_B\t2\tDan_D\t1\n"
    )
    return root


def test_scan_accounts_for_every_bad_input(tmp_path):
    root = tmp_path / "ds"
    _jpg(root / "Alice" / "a1.jpg")
    write_bad_inputs(root / "Bob")
    df = scan(root, root, threads=1, progress=False)
    assert len(df) == 1 + len(BAD_INPUTS)
    got = dict(zip(df["image_id"], df["status"]))
    assert got["Alice/a1.jpg"] == "ok"
    for name, (status, _) in BAD_INPUTS.items():
        assert got[f"Bob/{name}"] == status, name
    assert (df.loc[df.status != "ok", "reason"].str.len() > 0).all()
    ok = df[df.status == "ok"]
    assert ok["width"].notna().all() and ok["sha256"].str.len().eq(64).all()
    modes = dict(zip(df["image_id"], df["mode"]))
    assert modes["Bob/cmyk.jpg"] == "CMYK" and modes["Bob/gray.png"] == "L" and modes["Bob/gray16.png"].startswith("I")
    zero = df[df.image_id == "Bob/zero.jpg"].iloc[0]
    assert zero["bytes"] == 0 and zero["sha256"] == hashlib.sha256(b"").hexdigest()


def test_scan_parallel_equals_serial(tmp_path):
    root = tmp_path / "ds"
    for i in range(40):
        _jpg(root / f"P{i % 5}" / f"{i}.jpg", seed=i)
    write_bad_inputs(root / "P9")
    a = scan(root, root, threads=1, progress=False, chunk=7)
    b = scan(root, root, threads=2, progress=False, chunk=7)
    pd.testing.assert_frame_equal(a, b)
    assert fingerprint(a) == fingerprint(b)


def test_symlinks_loops_and_odd_files_are_recorded_not_fatal(tmp_path):
    root = tmp_path / "ds"
    _jpg(root / "Alice" / "a1.jpg")
    os.symlink(root / "Alice", root / "Alice" / "loop")           # folder link to its own parent
    os.symlink(root / "Alice", root / "AliceAgain")                 # second path to a scanned folder
    os.symlink(root / "nowhere.jpg", root / "Alice" / "broken.jpg")
    os.symlink("self.jpg", root / "Alice" / "self.jpg")             # link to itself: ELOOP
    os.mkfifo(root / "Alice" / "pipe.jpg")
    _jpg(root / "stray.jpg")                                        # beside the identity folders
    df = scan(root, root, threads=1, progress=False)
    got = dict(zip(df["image_id"], df["status"]))
    assert got == {
        "Alice/a1.jpg": "ok",
        "Alice/broken.jpg": "broken_link",
        "Alice/loop": "symlink_loop",
        "Alice/pipe.jpg": "not_a_regular_file",
        "Alice/self.jpg": "symlink_loop",
        "AliceAgain": "duplicate_link",
        "stray.jpg": "no_identity",
    }


def test_find_images_root_descends_single_folders(tmp_path):
    _jpg(tmp_path / "lfw" / "top" / "Alice" / "a.jpg")
    (tmp_path / "lfw" / "pairs.txt").write_text("1 1\n")
    assert find_images_root(tmp_path / "lfw") == (tmp_path / "lfw" / "top").resolve()
    assert find_images_root(tmp_path / "lfw", "top") == (tmp_path / "lfw" / "top").resolve()
    with pytest.raises(DatasetError, match="images_subdir"):
        find_images_root(tmp_path / "lfw", "missing")


# ------------------------------------------------------------------------------------------------ pairs

def test_lfw_people_lists_each_persons_images(tmp_path):
    images = _tiny_lfw(tmp_path) / "images"
    (images / "Empty_E").mkdir()
    (images / "Dan_D" / "notes.txt").write_text("not an image")
    people = lfw_people(images)
    assert list(people) == ["Alice_A", "Bob_B", "Carol_C", "Dan_D"]      # a folder without images is left out
    assert people["Alice_A"] == [f"Alice_A/Alice_A_{i:04d}.jpg" for i in (1, 2, 3)] and people["Dan_D"] == [
        "Dan_D/Dan_D_0001.jpg"]
    with pytest.raises(FileNotFoundError, match="not found"):
        lfw_people(tmp_path / "missing")
    with pytest.raises(ValueError, match="no person folders"):
        lfw_people(images / "Empty_E")


def test_parse_pairs_real_shape(tmp_path):
    root = _tiny_lfw(tmp_path)
    p = parse_pairs(root / "pairs.txt")
    assert list(p["fold"]) == [1, 1, 2, 2]
    assert list(p["same"]) == [True, False, True, False]
    assert p.iloc[1]["a"] == "Alice_A/Alice_A_0001.jpg" and p.iloc[1]["b"] == "Bob_B/Bob_B_0001.jpg"
    assert list(p["line"]) == [2, 3, 4, 5]


@pytest.mark.parametrize("text,where", [
    ("2\t1\nAlice_A\t1\t2\nAlice_A\t1\tBob_B\nCarol_C\t1\t2\nBob_B\t2\tDan_D\t1\n", ":3:"),
    ("2\t1\nAlice_A\t1\tx\nAlice_A\t1\tBob_B\t1\nCarol_C\t1\t2\nBob_B\t2\tDan_D\t1\n", ":2:"),
    ("2\t1\nAlice_A\t1\t2\nAlice_A\t1\tBob_B\t1\nCarol_C\t1\t2\nBob_B\t2\tBob_B\t1\n", ":5:"),
    ("two folds\nAlice_A\t1\t2\n", ":1:"),
    ("2\t1\nAlice_A\t1\t2\nAlice_A\t1\tBob_B\t1\nCarol_C\t1\t2\n", "announces 4 pair lines, the file has 3"),
])
def test_bad_pairs_line_is_named(tmp_path, text, where):
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(DatasetError) as err:
        parse_pairs(tmp_path / "pairs.txt")
    assert where in str(err.value)


def test_pair_naming_a_missing_or_broken_image_fails_loudly(tmp_path):
    root = _tiny_lfw(tmp_path)
    (root / "images" / "Dan_D" / "Dan_D_0001.jpg").unlink()
    (root / "images" / "Carol_C" / "Carol_C_0002.jpg").write_bytes(b"")
    raw = scan(root, root / "images", progress=False)
    with pytest.raises(DatasetError) as err:
        check_pairs(parse_pairs(root / "pairs.txt"), raw, "pairs.txt")
    msg = str(err.value)
    assert "pairs.txt:5: image Dan_D/Dan_D_0001.jpg is missing" in msg
    assert "pairs.txt:4: image Carol_C/Carol_C_0002.jpg is unusable (empty)" in msg


# ------------------------------------------------------------------------------------------ acquisition

@pytest.fixture()
def file_server(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_acquire_from_url_archive(tmp_path, file_server):
    served, base = file_server
    src = _tiny_lfw(tmp_path / "src")
    with tarfile.open(served / "tiny-lfw.tgz", "w:gz") as tf:
        tf.add(src / "images", arcname="tiny-lfw")
    (served / "pairs.txt").write_bytes((src / "pairs.txt").read_bytes())
    cfg = {"source": f"{base}/tiny-lfw.tgz", "md5": _md5(served / "tiny-lfw.tgz"), "format": "lfw",
           "pairs": {"source": f"{base}/pairs.txt", "md5": _md5(served / "pairs.txt")}}
    rec = acquire("tiny", cfg, resources=tmp_path / "res", log=lambda m: None)
    assert rec["source_kind"] == "url"
    assert rec["images_root"] == str((tmp_path / "res" / "datasets" / "tiny" / "tiny-lfw").resolve())
    raw = scan(rec["root"], rec["images_root"], progress=False)
    assert (raw.status == "ok").sum() == 8
    check_pairs(parse_pairs(rec["pairs"]), raw)
    # again: nothing is downloaded or extracted twice
    rec2 = acquire("tiny", cfg, resources=tmp_path / "res", log=lambda m: None)
    assert rec2 == rec


def test_acquire_url_with_wrong_checksum_fails_and_leaves_nothing(tmp_path, file_server):
    served, base = file_server
    (served / "x.tgz").write_bytes(b"whatever")
    from maskface.download import ChecksumError
    with pytest.raises(ChecksumError):
        acquire("x", {"source": f"{base}/x.tgz", "md5": "f" * 32, "format": "imagefolder"},
                resources=tmp_path / "res", log=lambda m: None)
    assert not list((tmp_path / "res" / "downloads" / "x").iterdir())


def test_acquire_local_folder_is_used_in_place(tmp_path):
    src = _tiny_lfw(tmp_path / "src")
    rec = acquire("tiny", {"source": str(src), "format": "lfw", "pairs": str(src / "pairs.txt")},
                  resources=tmp_path / "res", log=lambda m: None)
    assert rec["root"] == str(src.resolve()) and rec["source_kind"] == "folder"
    assert rec["images_root"] == str((src / "images").resolve())
    assert not (tmp_path / "res").exists()


def test_acquire_local_archive_and_missing_source(tmp_path):
    src = _tiny_lfw(tmp_path / "src")
    with tarfile.open(tmp_path / "ds.tar", "w") as tf:
        tf.add(src / "images", arcname="ds")
    rec = acquire("t", {"source": str(tmp_path / "ds.tar"), "format": "imagefolder"},
                  resources=tmp_path / "res", log=lambda m: None)
    assert rec["source_kind"] == "archive" and Path(rec["images_root"]).name == "ds"
    with pytest.raises(DatasetError, match="does not exist"):
        acquire("m", {"source": str(tmp_path / "nope"), "format": "imagefolder"}, resources=tmp_path / "res")
    (tmp_path / "plain.bin").write_bytes(b"x")
    with pytest.raises(DatasetError, match="neither a folder nor an archive"):
        acquire("m", {"source": str(tmp_path / "plain.bin"), "format": "imagefolder"}, resources=tmp_path / "res")


# ------------------------------------------------------------------------------------------- real LFW

@pytest.mark.lfw
def test_real_lfw_pairs_reproduce_the_protocol(lfw):
    assert hashlib.md5((lfw / "pairs.txt").read_bytes()).hexdigest() == "9f1ba174e4e1c508ff7cdf10ac338a7d"
    p = parse_pairs(lfw / "pairs.txt")
    assert len(p) == 6000
    assert p.groupby(["fold", "same"]).size().eq(300).all() and p["fold"].nunique() == 10
    # the folds are identity-disjoint (what the unrestricted setting relies on)
    people = [set(p[p.fold == f]["a"].str.split("/").str[0]) | set(p[p.fold == f]["b"].str.split("/").str[0])
              for f in range(1, 11)]
    assert all(not (people[i] & people[j]) for i in range(10) for j in range(i + 1, 10))
