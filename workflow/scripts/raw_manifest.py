"""Rule raw_manifest: hash and decode every file of the dataset into results/manifests/{dataset}/raw.parquet."""
from maskface.datasets import fingerprint, scan
from maskface.fileio import read_json
from maskface.manifest import provenance, write_parquet
from maskface.smk import logged

with logged(snakemake) as log:
    record = read_json(snakemake.input.json)
    df = scan(record["root"], record["images_root"], threads=snakemake.threads,
              chunk=int(snakemake.params.chunk))
    counts = df["status"].value_counts().to_dict()
    log.info("%d files, %d identities: %s", len(df), df["identity"].nunique(), counts)
    prov = provenance("raw_manifest", {"dataset": record}, [snakemake.input.json],
                      dataset_fingerprint=fingerprint(df))
    write_parquet(df, snakemake.output.raw, prov)
