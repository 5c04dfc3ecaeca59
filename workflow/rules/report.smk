# The report: `snakemake --report report.html` (or report.zip) after a run. Figures are flagged with report() in
# their rules (mask gallery, ROC curves, training curves); this rule adds one HTML page of tables (evaluation
# summary, per-fold tables, training summary, alignment and masking counts) so the numbers read as tables.
#   results/report/tables.html
# Private datasets (private: true) appear through aggregate numbers only (maskface.report).


def _report_inputs(wc):
    inp = {"stages": []}
    if STAGE_TARGETS["evaluate"]():
        inp["eval_summary"] = f"{RESULTS}/eval/summary.md"
        inp["eval_tables"] = [f"{RESULTS}/eval/{m}/{d}.md" for m in EVAL_MODELS for d in TEST_DATASETS]
    if "train" in STAGE_TARGETS and STAGE_TARGETS["train"]() and TRAIN_LFW:
        inp["train"] = [TRAIN_SUMMARY[1]]
    for stage in ("aligned", "masked"):
        if _makes(f"{RESULTS}/{stage}/", "/summary.json"):
            inp["stages"] += [f"{RESULTS}/{stage}/{d}/summary.json" for d in DATASETS]
    return inp


rule report_tables:
    input:
        unpack(_report_inputs),
    output:
        html=report(f"{RESULTS}/report/tables.html", category="Summary", labels={"page": "tables"}),
    params:
        private=[d for d in DATASETS if dataset_cfg(d).get("private")],
        code=code("report"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/report/tables.log",
    script:
        "../scripts/report_tables.py"


rule report_page:
    """Named target: the tables page (then `snakemake --report report.html`)."""
    input:
        rules.report_tables.output.html,


STAGE_TARGETS["report"] = [f"{RESULTS}/report/tables.html"]
