"""Config mistakes stop the run before any job with one short line each: the key path, the bad value and what is
allowed, never the schema. One test per kind of mistake, then the message as a user sees it from `snakemake`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO, snakemake_run

from maskface.configcheck import config_errors

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


@pytest.fixture()
def good(tmp_path, monkeypatch) -> dict:
    """A valid config: a local LFW-format set (an empty folder and a pairs file) in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    (tmp_path / "pairs.txt").write_text("1\t0\n")
    return {"datasets": {"mine": {"source": "faces", "format": "lfw", "pairs": "pairs.txt"}}}


def test_a_valid_config_has_no_error(good):
    assert config_errors(good, SCHEMA) == []


def test_unknown_key(good):
    good["mask"] = {"shards": 1}
    assert config_errors(good, SCHEMA) == [
        "mask.shards: unknown key; allowed under mask: " + ", ".join(SCHEMA["properties"]["mask"]["properties"])]


def test_wrong_type(good):
    good["align"] = {"threads": "two"}
    assert config_errors(good, SCHEMA) == ["align.threads: 'two' is a string, expected integer"]


def test_value_not_in_the_enum(good):
    good["align"] = {"device": "gpu"}
    assert config_errors(good, SCHEMA) == ["align.device: 'gpu' is not allowed; one of: auto, cpu, cuda"]


def test_value_out_of_range(good):
    good["align"] = {"shards": 0}
    (line,) = config_errors(good, SCHEMA)
    assert line.startswith("align.shards: 0 is less than the minimum of 1")


def test_lfw_set_without_pairs(good):
    del good["datasets"]["mine"]["pairs"]
    (line,) = config_errors(good, SCHEMA)
    assert line.startswith("datasets.mine.pairs: a dataset of format lfw needs its pairs file")
    good["datasets"]["mine"]["pairs"] = None
    assert config_errors(good, SCHEMA) == [line]


def test_missing_local_path(good):
    good["datasets"]["mine"]["source"] = "no/such/folder"
    good["datasets"]["mine"]["pairs"] = {"source": "nowhere/pairs.txt"}
    assert config_errors(good, SCHEMA) == [
        f"datasets.mine.source: no/such/folder does not exist (relative paths are relative to the working "
        f"directory, {os.getcwd()})",
        f"datasets.mine.pairs.source: nowhere/pairs.txt does not exist (relative paths are relative to the working "
        f"directory, {os.getcwd()})"]
    good["datasets"]["mine"]["source"] = "https://example.org/faces.tgz"     # a URL is not a local path
    assert len(config_errors(good, SCHEMA)) == 1
    assert config_errors(good, SCHEMA, paths=False) == []        # a job parsing the workflow again on a node


def test_a_url_that_cannot_be_fetched(good):
    good["datasets"]["mine"]["source"] = "ftp://example.org/faces.tgz"
    assert config_errors(good, SCHEMA) == [
        "datasets.mine.source: ftp://example.org/faces.tgz: only http:// and https:// URLs are fetched; or a local path"]


def test_an_archive_removed_after_its_extraction(good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good["datasets"]["mine"]["source"] = "gone/faces.tgz"
    assert len(config_errors(good, SCHEMA)) == 1
    (tmp_path / "resources/datasets/mine").mkdir(parents=True)       # what the download rule extracted
    assert config_errors(good, SCHEMA) == []


def test_several_mistakes_one_line_each(good):
    good["mask"] = {"shards": 1, "seed": "x"}
    good["evaluate"] = {"device": "tpu"}
    lines = config_errors(good, SCHEMA)
    assert len(lines) == 3 and all("\n" not in x for x in lines)
    assert any(x.startswith("mask.seed: 'x' is a string") for x in lines)


def test_snakemake_prints_the_short_message_and_runs_nothing(good, tmp_path: Path):
    good["mask"] = {"shards": 1}
    (tmp_path / "config.yaml").write_text(json.dumps(good))
    res = snakemake_run(tmp_path, "-n", check=False, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "mask.shards: unknown key; allowed under mask:" in out
    assert "Failed validating" not in out and "description" not in out     # no schema dump
    assert len(out.strip().splitlines()) <= 8, out
    assert not (tmp_path / "results").exists()


def test_source_alternatives_the_first_local_copy_else_the_download(good, tmp_path, monkeypatch):
    from maskface.download import chosen_sources, choose_source

    monkeypatch.chdir(tmp_path)
    url = "https://example.org/lfw.tgz"
    (tmp_path / "copy").mkdir()
    assert choose_source(["nowhere", "copy", url]) == "copy"
    assert choose_source(["nowhere", url]) == url
    assert choose_source("x") == "x"
    cfg = chosen_sources({"source": ["copy", url], "pairs": {"source": ["copy/pairs.txt", url + ".txt"], "md5": None}})
    assert cfg["source"] == "copy" and cfg["pairs"]["source"] == url + ".txt"
    good["datasets"]["mine"]["source"] = ["nowhere", url]
    assert config_errors(good, SCHEMA) == []
    good["datasets"]["mine"]["source"] = ["nowhere", "neither"]
    assert config_errors(good, SCHEMA) == [f"datasets.mine.source: none of nowhere, neither exists (relative paths "
                                           f"are relative to the working directory, {tmp_path})"]
    good["datasets"]["mine"]["source"] = ["nowhere", "ftp://example.org/lfw.tgz"]
    assert config_errors(good, SCHEMA)[0].endswith("only http:// and https:// URLs are fetched; or a local path")
    good["datasets"]["mine"]["source"] = []
    assert config_errors(good, SCHEMA)      # an empty list is no source
