"""Rule train_summary: mean +- std of the fold accuracies over the runs (folds x seeds)."""
import json
from pathlib import Path

from maskface.manifest import write_json
from maskface.smk import logged
from maskface.train import summarize_evals, summary_markdown

with logged(snakemake) as log:
    evals = [json.loads(Path(p).read_text()) for p in snakemake.input.json]
    summary = summarize_evals(evals)
    write_json(summary, snakemake.output.json)
    Path(snakemake.output.md).write_text(summary_markdown(summary, Path(snakemake.output.md).stem))
    log.info("%s", summary_markdown(summary))
