"""Rule train_summary: mean +- std of the fold accuracies over the runs (folds x seeds), per group of runs
(train.mask_fractions: the same runs with and without masks, side by side) (maskface.foldeval)."""
from pathlib import Path

from maskface.fileio import read_json, write_json, write_text
from maskface.foldeval import summarize_groups, summary_markdown
from maskface.smk import logged

with logged(snakemake) as log:
    by_run = {Path(p).parent.name: read_json(p) for p in snakemake.input.json}
    groups = {g: [by_run[r] for r in runs] for g, runs in snakemake.params.groups.items()}
    summary = summarize_groups(groups)
    write_json(summary, snakemake.output.json)
    write_text(summary_markdown(summary, Path(snakemake.output.md).stem), snakemake.output.md)
    log.info("%s", summary_markdown(summary))
