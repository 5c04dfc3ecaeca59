"""Rule train_summary: mean +- std of the fold accuracies over the runs (folds x seeds), per group of runs
(train.mask_fractions: the same runs with and without masks, side by side)."""
import json
from pathlib import Path

from maskface.manifest import write_json
from maskface.smk import logged
from maskface.train import summarize_groups, summary_markdown

with logged(snakemake) as log:
    by_run = {Path(p).parent.name: json.loads(Path(p).read_text()) for p in snakemake.input.json}
    groups = {g: [by_run[r] for r in runs] for g, runs in snakemake.params.groups.items()}
    summary = summarize_groups(groups)
    write_json(summary, snakemake.output.json)
    Path(snakemake.output.md).write_text(summary_markdown(summary, Path(snakemake.output.md).stem))
    log.info("%s", summary_markdown(summary))
