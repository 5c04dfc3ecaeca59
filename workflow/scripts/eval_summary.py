"""Rule eval_summary: one markdown table over every model/run and protocol, plus mean +- std over runs."""
from maskface.evaluate import summarize
from maskface.fileio import write_text
from maskface.smk import logged

with logged(snakemake) as log:
    write_text(summarize(snakemake.input.json), snakemake.output.md)
    log.info("%d result files summarised", len(snakemake.input.json))
