"""The report's tables page reads like a results page: named quantities with units, empty tables left out."""
from __future__ import annotations

import json

from maskface.report import build_tables_page, markdown_to_html, stage_summary_markdown

ALIGN = {"rows": 13233, "faces_found": 13230, "detection_rate": 13230 / 13233, "fallbacks": 3, "no_face_skipped": 0,
         "multi_face_images": 1765, "fit_error_mean_px": 2.5657, "fit_error_median_px": 2.3927,
         "fit_error_p98_px": 5.2949, "fit_within_3px_rate": 0.6735, "status_counts": {"ok": 13233},
         "config": {"template": "sphereface_112x96"}}
MASK = {"crops": 13233, "masked": 13133, "masked_rate": 0.99244, "skips": {"yaw": 54, "pitch": 45},
        "coverage_by_wear": {"proper": {"mean": 0.3612, "p05": 0.3218, "p95": 0.4023, "n": 9095, "max": 0.457}},
        "coverage_by_type_proper": {"cloth": {"mean": 0.368, "n": 2549}},
        "mask_type_counts": {"cloth": 3722, "surgical": 3925}, "abs_yaw_deg": {"median": 10.89, "p99": 40.53, "max": 52.96}}


def test_stage_tables_name_quantities_with_units():
    md = stage_summary_markdown("Alignment: lfw", ALIGN)
    assert "| faces found | 13,230 of 13,233 (100.0%) |" in md
    assert "| no face found: centre crop used | 3 |" in md
    assert "| 5-point fit to the template, mean / median / p98 | 2.57 / 2.39 / 5.29 px |" in md
    assert "| faces fitted within 3 px (mean of the 5 points) | 67% |" in md
    md = stage_summary_markdown("Masks: lfw", MASK)
    assert "| faces masked | 13,133 of 13,233 (99.2%) |" in md
    assert "| not masked, by reason | yaw 54, pitch 45 |" in md
    assert "| share of the crop covered, proper wear | 36% (p05 32%, p95 40%, n 9,095) |" in md
    assert "| mask types | surgical 3,925, cloth 3,722 |" in md
    assert "10.9° / 40.5° / 53.0°" in md
    for text in (stage_summary_markdown("a", ALIGN), md):
        assert "_" not in text.replace("Alignment: lfw", "") and "config" not in text   # no raw keys


def test_a_tiny_set_without_some_wears_or_types():
    md = stage_summary_markdown("Masks: tiny", {"crops": 3, "masked": 2, "skips": {"yaw": 1},
                                                 "coverage_by_wear": {"chin": None, "proper": {"mean": 0.35, "n": 2}},
                                                 "coverage_by_type_proper": {"gas": None}, "abs_yaw_deg": None})
    assert "| share of the crop covered, proper wear | 35% (n 2) |" in md and "chin" not in md and "gas" not in md


def test_empty_tables_and_their_headings_are_left_out(tmp_path):
    html = markdown_to_html("# Summary\n\n## LFW\n\n| model | acc |\n|---|---:|\n\n## Private sets\n\nnone\n")
    assert "<table>" not in html and "LFW" not in html and "Private sets" in html and "Summary" in html
    assert stage_summary_markdown("x", {"config": {"a": 1}}) == ""
    (tmp_path / "a.json").write_text(json.dumps({"config": {}}))
    (tmp_path / "eval.md").write_text("# Evaluation summary\n\n| model | acc |\n|---|---:|\n")
    build_tables_page(tmp_path / "t.html", eval_summary=str(tmp_path / "eval.md"),
                      stage_summaries=[("Masks: x", str(tmp_path / "a.json"), False)])
    page = (tmp_path / "t.html").read_text()
    assert "<table>" not in page and "Masks: x" not in page and "Stages" not in page and "Evaluation" not in page


def test_a_column_empty_in_every_row_is_left_out():
    html = markdown_to_html("| model | run | acc |\n|---|---|---:|\n| a |  | 99.1 |\n| b |  | 98.4 |\n")
    assert "<th>run</th>" not in html and "<th>acc</th>" in html
    assert '<td class="num">99.1</td>' in html                 # the alignment stays with its column
    assert "<th>run</th>" in markdown_to_html("| model | run |\n|---|---|\n| a | r1 |\n| b |  |\n")
