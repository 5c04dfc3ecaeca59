"""Rule eval_summary: one markdown table over every model/run and protocol, plus mean +- std over runs."""
from pathlib import Path

from maskface.evaluate import summarize
from maskface.smk import logged

with logged(snakemake) as log:
    text = summarize(snakemake.input.json)
    Path(snakemake.output.md).write_text(text)
    log.info("%d result files summarised", len(snakemake.input.json))
