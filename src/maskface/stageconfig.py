"""One mechanism for a stage's settings: a frozen dataclass whose fields are the keys of the stage's section of
the workflow config (``align:``, ``mask:``, ``demo:``, ``demo.test_video:``), built from the validated config.

    @dataclass(frozen=True)
    class AlignConfig(StageConfig):
        section = "align"
        factor: float = setting(0.85)                 # changes the result: a Snakemake param (reruns)
        batch_size: int = setting(0, rerun=False)     # speed only: read by the job, never reruns anything

- ``from_mapping(cfg, **overrides)``: keys the stage does not know are ignored (the config section may hold
  keys for the rules, e.g. ``threads``) unless ``strict``; ``None`` overrides are ignored (CLI flags left
  out); a field's ``convert`` normalises its value (lists to tuples); ``validate()`` runs last.
- ``result_params()``: the result-changing settings as builtin types, the rule's ``params`` value.
- The defaults mirror workflow/schemas/config.schema.yaml (the schema is authoritative inside Snakemake, and
  tests/test_stageconfig.py checks that every default equals the schema's).

Torch-free and quick to import: the rule files build these while Snakemake parses the workflow."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional


def setting(default: Any, *, rerun: bool = True, convert: Optional[Callable[[Any], Any]] = None) -> Any:
    """A field of a stage config: ``rerun`` (the default) marks settings that change the stage's results;
    ``convert`` normalises the value given in a mapping (e.g. ``tuple``)."""
    meta = {"rerun": rerun, "convert": convert}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def floats(values: Any) -> tuple:
    return tuple(float(v) for v in values)


def builtin(value: Any) -> Any:
    """Tuples to lists, recursively (the form of the YAML config and of Snakemake params)."""
    if isinstance(value, (tuple, list)):
        return [builtin(v) for v in value]
    if isinstance(value, Mapping):
        return {k: builtin(v) for k, v in value.items()}
    return value


class StageConfig:
    section: ClassVar[str] = ""
    # old key -> field (a key kept for configs written before a rename)
    aliases: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]] = None, *, strict: bool = False, **overrides: Any):
        d = dict(cfg or {})
        d.update({k: v for k, v in overrides.items() if v is not None})
        for old, new in cls.aliases.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if strict and unknown:
            raise ValueError(f"{cls.section}: unknown settings {unknown}; known: {sorted(fields)}")
        kw = {}
        for name, value in d.items():
            if name in fields:
                convert = fields[name].metadata.get("convert")
                kw[name] = convert(value) if convert is not None and value is not None else value
        out = cls(**kw)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ValueError naming ``<section>.<key>`` for a bad value (stages override)."""

    @classmethod
    def result_keys(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("rerun", True))

    def result_params(self) -> dict:
        """The settings that change the stage's results, as builtin types (a rule's params value)."""
        return {k: builtin(getattr(self, k)) for k in self.result_keys()}

    @classmethod
    def defaults(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = builtin(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = builtin(f.default_factory())
        return out
