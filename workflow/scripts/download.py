"""Rule download: make a dataset available on disk and write its record (dataset.json)."""
from maskface.datasets import acquire
from maskface.fileio import write_json
from maskface.smk import logged

with logged(snakemake) as log:
    record = acquire(snakemake.wildcards.dataset, snakemake.params.cfg, retries=snakemake.params.retries,
                     timeout=snakemake.params.timeout, log=log.info)
    log.info("dataset %s: %s source, images under %s", record["name"], record["source_kind"], record["images_root"])
    write_json(record, snakemake.output.json)
