"""Rule train_fold_eval: accuracy of a lfw_unrestricted run on its held-out fold (clean / mixed / masked)
(maskface.foldeval.evaluate_fold)."""
import pandas as pd

from maskface.fileio import write_json
from maskface.foldeval import evaluate_fold
from maskface.smk import logged
from maskface.train_data import validation_fold

with logged(snakemake) as log:
    pairs = pd.read_parquet(snakemake.input.pairs)
    masked = tuple(snakemake.input.masked) if "masked" in snakemake.input.keys() else None
    fold = int(snakemake.params.fold)
    validation = validation_fold(pairs, fold) if snakemake.params.validation == "next_fold" else None
    res = evaluate_fold(snakemake.input.model, pairs, fold, tuple(snakemake.input.clean), masked,
                        device=snakemake.params.device, batch_size=snakemake.params.batch_size,
                        threads=snakemake.threads, validation=validation)
    for name, p in res["protocols"].items():
        log.info("fold %d %s: %.2f%% (threshold %.4f, %d missing)", res["fold"], name, 100 * p["accuracy"],
                 p["threshold"], p["n_missing"])
    write_json(res, snakemake.output.json)
