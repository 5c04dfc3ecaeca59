"""Rule train_lfw_eval: a group's per-fold models as one LFW evaluation (maskface.foldeval.write_lfw_evaluation)."""
import pandas as pd

from maskface.fileio import read_json
from maskface.foldeval import write_lfw_evaluation
from maskface.smk import logged

with logged(snakemake) as log:
    all_folds = sorted(int(k) for k in pd.read_parquet(snakemake.input.pairs, columns=["fold"])["fold"].unique())
    doc = write_lfw_evaluation([read_json(p) for p in snakemake.input.json], model=snakemake.wildcards.tgroup,
                               dataset=snakemake.wildcards.dataset, all_folds=all_folds,
                               out_json=snakemake.output.json, out_md=snakemake.output.md,
                               out_png=snakemake.output.png)
    for name, p in doc["protocols"].items():
        log.info("%s, folds %s: %.2f%% (AUC %.4f, TAR@FAR 1e-3 %.1f%%)", name, doc["folds_run"], 100 * p["mean"],
                 p["auc"], 100 * p["tar_at_far"]["1e-3"])
    if doc["folds_not_run"]:
        log.info("folds not run: %s", doc["folds_not_run"])
