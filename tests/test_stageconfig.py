"""The stage settings classes (maskface.stageconfig) against the workflow's schema: the schema is where the
defaults live inside Snakemake; the classes, used outside it (CLI, notebooks), must default the same."""
from pathlib import Path

import pytest
import yaml

from maskface.align import AlignConfig
from maskface.demo import DemoConfig
from maskface.mask.config import MaskConfig
from maskface.stageconfig import StageConfig
from maskface.testvideo import VideoSpec
from maskface.train_config import DEFAULTS as TRAIN_DEFAULTS

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


def schema_defaults(section):
    node = SCHEMA
    for key in section.split("."):
        node = node["properties"][key]
    return {k: v["default"] for k, v in node["properties"].items() if "default" in v}


def same(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


@pytest.mark.parametrize("cls", [AlignConfig, MaskConfig, DemoConfig, VideoSpec], ids=lambda c: c.__name__)
def test_stage_defaults_are_the_schemas(cls):
    assert issubclass(cls, StageConfig)
    schema = schema_defaults(cls.section)
    mine = cls.defaults()
    for alias, field in cls.aliases.items():      # a config key the class reads under another name
        if alias in schema:
            schema[field] = schema.pop(alias)
    shared = sorted(set(schema) & set(mine))
    assert len(shared) >= len(mine) // 2, (cls.__name__, sorted(mine), sorted(schema))
    wrong = {k: (mine[k], schema[k]) for k in shared if not same(mine[k], schema[k])}
    assert not wrong, wrong


def test_train_defaults_are_the_schemas():
    schema = schema_defaults("train")
    wrong = {k: (TRAIN_DEFAULTS[k], schema[k]) for k in schema
             if k in TRAIN_DEFAULTS and not isinstance(schema[k], dict) and not same(TRAIN_DEFAULTS[k], schema[k])}
    assert not wrong, wrong


def test_result_params_are_builtin_and_leave_speed_settings_out():
    cfg = AlignConfig.from_mapping({"factor": 0.8, "threads": 3, "batch_size": 16, "device": "cpu"})
    params = cfg.result_params()
    assert params["factor"] == 0.8 and isinstance(params["thresholds"], list)
    assert not {"device", "batch_size", "workers", "threads"} & set(params)
    assert cfg.workers == 3      # `threads`, the config key, is the number of worker processes


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="align.factor"):
        AlignConfig.from_mapping({"factor": 1.5})
