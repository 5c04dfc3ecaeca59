# The report: `snakemake --report report.html` (or report.zip) after a run. Figures are flagged with report() in
# their rules (mask gallery, ROC curves, training curves); this rule adds one HTML page of tables (evaluation
# summary, per-fold tables, training summary, alignment and masking counts) so the numbers read as tables.
#   results/report/tables.html
# Private datasets (private: true) appear through aggregate numbers only (maskface.report).


rule report_tables:
    input:
        unpack(report_inputs),
    output:
        html=report(REPORT_TABLES, category="Summary", labels={"page": "tables"}),
    params:
        private=PRIVATE_DATASETS,
        code=code_digest("report", "fileio"),
    conda:
        "../../envs/maskface.yaml"
    log:
        log_path("report", "tables"),
    script:
        "../scripts/report_tables.py"


rule report_page:
    """Named target: the tables page (then `snakemake --report report.html`)."""
    input:
        REPORT_TABLES,
