"""Rule report_tables: the report's page of tables -> results/report/tables.html (maskface.report)."""
from pathlib import Path

from maskface.report import build_tables_page
from maskface.smk import logged

with logged(snakemake) as log:
    inp = snakemake.input
    private = set(snakemake.params.private)
    stages = []
    for p in inp.stages:
        stage, dataset = Path(p).parts[-3], Path(p).parts[-2]
        title = {"aligned": "Alignment", "masked": "Masks"}.get(stage, stage) + f": {dataset}"
        stages.append((title, p, dataset in private))
    build_tables_page(snakemake.output.html,
                      eval_summary=inp.get("eval_summary"), eval_tables=inp.get("eval_tables", []),
                      train_summaries=inp.get("train", []), stage_summaries=stages)
    log.info("tables page: %d stage summaries, %d evaluation tables", len(stages), len(inp.get("eval_tables", [])))
