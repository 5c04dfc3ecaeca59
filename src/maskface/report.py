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

from .fileio import write_text

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
    """A markdown table row's cells; ``\\|`` is a '|' inside a cell."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


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
            if not rows:      # a table with no rows is left out
                continue
            keep = [k for k in range(len(head)) if any(k < len(r) and r[k] for r in rows)]   # no empty columns
            head, align = [head[k] for k in keep], [align[k] if k < len(align) else "" for k in keep]
            rows = [[r[k] if k < len(r) else "" for k in keep] for r in rows]
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
    return "\n".join(_drop_empty_sections(out))


def _drop_empty_sections(blocks: list[str]) -> list[str]:
    """Headings with nothing under them (before the next heading of the same or a higher level) are left out."""
    def level(b: str) -> int:
        m = re.match(r"<h(\d)>", b)
        return int(m.group(1)) if m else 0

    keep = []
    for i, b in enumerate(blocks):
        lv = level(b)
        if lv:
            body = False
            for x in blocks[i + 1:]:
                if level(x) and level(x) <= lv:
                    break
                if not level(x):
                    body = True
                    break
            if not body:
                continue
        keep.append(b)
    return keep


def _n(v: Any) -> str:
    return f"{int(v):,}"


def _pct(v: Any, digits: int = 0) -> str:
    return f"{100 * float(v):.{digits}f}%"


def _counts(d: Mapping[str, Any]) -> str:
    """``{"a": 3, "b": 10}`` as "b 10, a 3" (largest first)."""
    return ", ".join(f"{k.replace('_', ' ')} {_n(v)}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def _spread(d: Mapping[str, Any]) -> str:
    """A distribution of shares as "36% (p05 32%, p95 40%; n 9,095)"."""
    parts = [f"p05 {_pct(d['p05'])}", f"p95 {_pct(d['p95'])}"] if "p05" in d and "p95" in d else []
    if "n" in d:
        parts.append(f"n {_n(d['n'])}")
    return _pct(d["mean"]) + (f" ({', '.join(parts)})" if parts else "")


def _align_rows(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if "rows" in s:
        rows.append(("images", _n(s["rows"])))
    if "faces_found" in s and "rows" in s:
        rows.append(("faces found", f"{_n(s['faces_found'])} of {_n(s['rows'])}"
                     + (f" ({_pct(s['detection_rate'], 1)})" if s.get("detection_rate") is not None else "")))
    for key, label in (("fallbacks", "no face found: centre crop used"), ("no_face_skipped", "no face found: skipped"),
                       ("multi_face_images", "images with several faces")):
        if key in s:
            rows.append((label, _n(s[key])))
    if s.get("fit_error_mean_px") is not None:
        rows.append(("5-point fit to the template, mean / median / p98",
                     " / ".join(f"{s.get(k) if s.get(k) is not None else float('nan'):.2f}" for k in
                                ("fit_error_mean_px", "fit_error_median_px", "fit_error_p98_px")) + " px"))
    if s.get("fit_within_3px_rate") is not None:
        rows.append(("faces fitted within 3 px (mean of the 5 points)", _pct(s["fit_within_3px_rate"])))
    if s.get("status_counts"):
        rows.append(("rows by status", _counts(s["status_counts"])))
    return rows


def _mask_rows(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    crops = s.get("crops", s.get("rows"))
    if "masked" in s and crops is not None:
        rows.append(("faces masked", f"{_n(s['masked'])} of {_n(crops)}"
                     + (f" ({_pct(s['masked_rate'], 1)})" if s.get("masked_rate") is not None else "")))
    if s.get("skips"):
        rows.append(("not masked, by reason", _counts(s["skips"])))
    for wear, d in (s.get("coverage_by_wear") or {}).items():
        if not d or d.get("mean") is None:      # no face wore it this way
            continue
        rows.append((f"share of the crop covered, {wear.replace('_', ' ')} wear", _spread(d)))
    by_type = {t: d for t, d in (s.get("coverage_by_type_proper") or {}).items() if d and d.get("mean") is not None}
    if by_type:
        rows.append(("share covered, proper wear, by mask type",
                     ", ".join(f"{t} {_pct(d['mean'])}" for t, d in sorted(by_type.items()))))
    for key, label in (("mask_type_counts", "mask types"), ("wear_counts", "ways of wearing"),
                       ("mask_color_counts", "colours"), ("mask_texture_counts", "textures")):
        if s.get(key):
            rows.append((label, _counts(s[key])))
    yaw = s.get("abs_yaw_deg") or {}  # None values: no face
    if yaw.get("median") is not None:
        rows.append(("head yaw (absolute), median / p99 / max",
                     " / ".join(f"{yaw.get(k) if yaw.get(k) is not None else float('nan'):.1f}°" for k in ("median", "p99", "max"))))
    return rows


def stage_summary_markdown(title: str, summary: Mapping[str, Any], private: bool = False) -> str:
    """A stage's summary.json as a results table: named quantities with units and few digits ("faces found
    13,233 of 13,233 (100.0%)", "share of the crop covered, proper wear: 36% (p05 32%, p95 40%)").
    Alignment and mask summaries are recognised by their keys; a summary of neither kind lists its plain
    numbers. The labels and category names come from this code and the config, never from the dataset, so a
    private dataset's table holds aggregates only. A summary with nothing to show gives no table."""
    rows = _mask_rows(summary) if "masked" in summary else _align_rows(summary)
    if not rows:
        rows = [(k.replace("_", " "), _n(v) if isinstance(v, int) else f"{v:.3g}") for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return ""
    lines = [f"### {title}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def tables_page(sections: Sequence[tuple[str, str]], title: str = "maskface: tables") -> str:
    """A self-contained HTML page from (section title, markdown) pairs."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, md in sections:
        part = markdown_to_html(md)
        if "<table>" not in part and "<p>" not in part:   # nothing but headings: the section is left out
            continue
        body.append(f"<h2>{html.escape(name)}</h2>")
        body.append(part)
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
    stages = [md for md in stages if md]
    if stages:
        sections.append(("Stages", "\n".join(stages)))
    write_text(tables_page(sections), out)
