"""The tables page of the Snakemake report (``snakemake --report report.html``): one self-contained HTML page
with the evaluation summary, the per-fold tables of every model and dataset, the training summaries and the
stage summaries (alignment and masking counts), so the report shows numbers as tables, not as files to
download.

Privacy: the page is built only from aggregate artifacts (evaluation and training tables, stage counts). A
stage summary of a ``private: true`` dataset is reduced to its counts and rates here; nothing in these inputs
names an image or an identity (the evaluation writes none; tests/test_rerun.py checks the whole report).
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;font-size:.9em}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}p{max-width:60em}
"""


def _inline(text: str) -> str:
    """Markdown inline: **bold** and `code`, HTML-escaped."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def markdown_to_html(md: str) -> str:
    """The subset of Markdown our tables files use: # headings, paragraphs, pipe tables (with the ``---:``
    alignment row), **bold**, `code`."""
    lines = md.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            level = min(len(m.group(1)) + 1, 6)   # the page's own title is the only h1
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
            head = _cells(line)
            align = ["num" if c.endswith(":") else "" for c in _cells(lines[i + 1])]
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            t = ["<table>", "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"]
            for r in rows:
                t.append("<tr>" + "".join(
                    f"<td class=\"{align[k] if k < len(align) else ''}\">{_inline(c)}</td>" for k, c in enumerate(r))
                    + "</tr>")
            t.append("</table>")
            out.append("\n".join(t))
            continue
        para = [line.strip()]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("|", "#")):
            para.append(lines[i].strip())
            i += 1
        out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def stage_summary_markdown(title: str, summary: Mapping[str, Any], private: bool = False) -> str:
    """A stage's summary.json as a two-column table (its ``config`` left out: the report has the config).
    For a private dataset only numbers are kept (counts, rates, statistics), never a string value."""
    rows = [(k, v) for k, v in _flatten({k: v for k, v in summary.items() if k != "config"})]
    if private:
        rows = [(k, v) for k, v in rows if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = [f"### {title}", "", "| quantity | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def tables_page(sections: Sequence[tuple[str, str]], title: str = "maskface: tables") -> str:
    """A self-contained HTML page from (section title, markdown) pairs."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, md in sections:
        body.append(f"<h2>{html.escape(name)}</h2>")
        body.append(markdown_to_html(md))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) +
            "</title><style>" + _CSS + "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build_tables_page(out: str | os.PathLike, *, eval_summary: Optional[str] = None,
                      eval_tables: Iterable[str] = (), train_summaries: Iterable[str] = (),
                      stage_summaries: Iterable[tuple[str, str, bool]] = ()) -> None:
    """Write the tables page. ``stage_summaries``: (title, summary.json path, private)."""
    sections: list[tuple[str, str]] = []
    if eval_summary:
        sections.append(("Evaluation", Path(eval_summary).read_text()))
    tables = [Path(p).read_text() for p in sorted(eval_tables)]
    if tables:
        sections.append(("Per-fold tables", "\n\n".join(tables)))
    trains = [Path(p).read_text() for p in sorted(train_summaries)]
    if trains:
        sections.append(("Training", "\n\n".join(trains)))
    stages = [stage_summary_markdown(t, json.loads(Path(p).read_text()), private) for t, p, private in stage_summaries]
    if stages:
        sections.append(("Stages", "\n".join(stages)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    tmp.write_text(tables_page(sections))
    os.replace(tmp, out)
