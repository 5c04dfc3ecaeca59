"""The workflow config checked before any job: one short line per mistake, naming the key path, the bad value
and what is allowed. Never the schema itself (a jsonschema error's ``str()`` prints the whole sub-schema).

Kinds of mistakes: an unknown key, a value of the wrong type, a value outside an enum or a range, a missing
required key, an LFW-format dataset without its pairs file, and a local dataset or pairs path that does not
exist. :func:`check_config` raises :class:`ConfigError` with every line; the Snakefile calls it before
Snakemake's own validation, which then only fills in the schema's defaults.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


class ConfigError(ValueError):
    """The config does not match the schema: ``str()`` is one line per mistake."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("invalid config (workflow/schemas/config.schema.yaml documents every key):\n"
                         + "\n".join(f"  {line}" for line in lines))


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _forms(schema: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    """A short description of what a (sub)schema accepts."""
    if "$ref" in schema:
        schema = _resolve(schema["$ref"], root)
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if "const" in schema:
        return repr(schema["const"])
    t = schema.get("type")
    if t == "object" and "properties" in schema:
        return "an object with keys " + ", ".join(schema["properties"])
    if isinstance(t, list):
        return " or ".join(t)
    return str(t or "a value")


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _explain(err, root: Mapping[str, Any]) -> Iterator[str]:
    path = list(err.absolute_path)
    key, value, v = _key(path), err.instance, err.validator
    if path and path[-1] == "pairs" and v in ("not", "required") or (v == "required" and "'pairs'" in err.message):
        where = key if path and path[-1] == "pairs" else _key(path + ["pairs"])
        yield (f"{where}: a dataset of format lfw needs its pairs file (pairs.txt: a local path, a URL, or "
               f"{{source, md5}})")
    elif v == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        for extra in sorted(set(value) - set(allowed)):
            yield f"{_key(path + [extra])}: unknown key; allowed under {key}: {', '.join(allowed) or '(none)'}"
    elif v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        yield f"{_key(path + [missing])}: missing (required)"
    elif v == "type":
        expected = err.validator_value if isinstance(err.validator_value, str) else " or ".join(err.validator_value)
        yield f"{key}: {_show(value)} is {_kind(value)}, expected {expected}"
    elif v == "enum":
        yield f"{key}: {_show(value)} is not allowed; one of: {', '.join(map(str, err.validator_value))}"
    elif v in ("oneOf", "anyOf"):
        forms = "; ".join(_forms(s, root) for s in err.validator_value)
        yield f"{key}: {_show(value)} is none of the allowed forms ({forms})"
    elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "minLength",
               "minProperties", "pattern", "const", "uniqueItems"):
        yield f"{key}: {err.message}"
    else:
        msg = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        yield f"{key}: {msg}"


def _local_paths(config: Mapping[str, Any]) -> Iterator[str]:
    from .download import choose_source, is_archive, is_url

    cwd = Path(os.getcwd())
    for name, ds in (config.get("datasets") or {}).items():
        if not isinstance(ds, Mapping):
            continue
        pairs = ds.get("pairs")
        for key, src in (("source", ds.get("source")),
                         ("pairs", pairs if isinstance(pairs, (str, list)) else None),
                         ("pairs.source", pairs.get("source") if isinstance(pairs, Mapping) else None)):
            if isinstance(src, list):          # alternatives: one usable is enough
                chosen = choose_source(src)
                if is_url(chosen) or Path(chosen).expanduser().exists():
                    continue
                urls = [s for s in src if "://" in s]
                if not urls:
                    yield (f"datasets.{name}.{key}: none of {', '.join(src)} exists (relative paths are relative "
                           f"to the working directory, {cwd})")
                    continue
                src = urls[0]                  # a URL that cannot be fetched: reported below
            if not isinstance(src, str) or not src or is_url(src):
                continue
            if "://" in src:
                yield f"datasets.{name}.{key}: {src}: only http:// and https:// URLs are fetched; or a local path"
            elif not Path(src).expanduser().exists():
                if key == "source" and is_archive(src) and (cwd / "resources" / "datasets" / name).is_dir():
                    continue      # an archive removed after its extraction: the extracted copy is used
                yield (f"datasets.{name}.{key}: {src} does not exist (relative paths are relative to the "
                       f"working directory, {cwd})")


def config_errors(config: Mapping[str, Any], schema: Mapping[str, Any], paths: bool = True) -> list[str]:
    """Every mistake of ``config`` against ``schema``, one line each (empty: valid); with ``paths``, also local
    dataset paths that do not exist."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    lines = [line for err in errors for line in _explain(err, schema)]
    if not lines and paths:
        lines = list(_local_paths(config))
    return list(dict.fromkeys(lines))


def check_config(config: Mapping[str, Any], schema_path: str | os.PathLike, paths: bool = True) -> None:
    """Raise :class:`ConfigError` listing every mistake of ``config``; return quietly when it is valid.
    ``paths``: check that local dataset paths exist (in the main Snakemake process; a job that parses the
    workflow again on a cluster node has no say on them)."""
    import yaml

    with open(schema_path) as fh:
        schema = yaml.safe_load(fh)
    lines = config_errors(config, schema, paths)
    if lines:
        raise ConfigError(lines)
