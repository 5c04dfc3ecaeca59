"""Rule evaluate: LFW 10-fold protocols (clean / mixed / masked as the variants allow) or identification on a
folder-per-identity set -> results/eval/{model}/{dataset}.json (+ .md table and _roc.png)."""
import pandas as pd

from maskface.evaluate import (FeatureTable, ProtocolSettings, evaluate_identification_features,
                               evaluate_lfw_features, identification_markdown)
from maskface.manifest import read_provenance
from maskface.smk import logged

with logged(snakemake) as log:
    frames = [pd.read_parquet(p) for p in snakemake.input.features]
    table = FeatureTable.from_frame(pd.concat(frames, ignore_index=True))
    embedder = read_provenance(snakemake.input.features[0]).get("embedder", {})
    settings = ProtocolSettings.from_dict(snakemake.params.model.get("eval") or embedder.get("eval"))
    model, dataset, run = snakemake.wildcards.model, snakemake.wildcards.dataset, snakemake.params.model.get("run")
    out = dict(out_json=snakemake.output.json, out_md=snakemake.output.md, out_png=snakemake.output.png)
    if "pairs" in snakemake.input.keys():
        pairs = pd.read_parquet(snakemake.input.pairs, columns=["fold", "a", "b", "same"])
        doc = evaluate_lfw_features(table, pairs, settings, model=model, dataset=dataset, run=run,
                                    extra={"embedder": embedder}, **out)
        for name, r in doc["protocols"].items():
            log.info("%s: %.2f%% +- %.2f (AUC %.4f)", name, 100 * r["mean"], 100 * r["std"], r["auc"])
    else:
        doc = evaluate_identification_features(table, settings, model=model, dataset=dataset,
                                               n_impostors=int(snakemake.params.n_impostors),
                                               extra={"embedder": embedder, "run": run}, **out)
        log.info("%s", identification_markdown(doc["identification"], model, dataset))
