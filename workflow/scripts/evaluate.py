"""Rule evaluate: LFW 10-fold protocols (clean / mixed / masked as the variants allow) or identification on a
folder-per-identity set -> results/eval/{model}/{dataset}.json (+ .md table and _roc.png for LFW)."""
import pandas as pd

from maskface.evaluate import (FeatureTable, ProtocolSettings, evaluate_lfw_features, identification, markdown_table,
                               plot_roc)
from maskface.manifest import read_provenance, write_json
from maskface.smk import logged

with logged(snakemake) as log:
    frames = [pd.read_parquet(p) for p in snakemake.input.features]
    table = FeatureTable.from_frame(pd.concat(frames, ignore_index=True))
    embedder = read_provenance(snakemake.input.features[0]).get("embedder", {})
    settings = ProtocolSettings.from_dict(snakemake.params.model.get("eval") or embedder.get("eval"))
    model, dataset = snakemake.wildcards.model, snakemake.wildcards.dataset
    extra = {"embedder": embedder, "run": snakemake.params.model.get("run")}
    if "pairs" in snakemake.input.keys():
        pairs = pd.read_parquet(snakemake.input.pairs, columns=["fold", "a", "b", "same"])
        doc = evaluate_lfw_features(table, pairs, settings, model=model, dataset=dataset,
                                    run=snakemake.params.model.get("run"), out_json=snakemake.output.json,
                                    out_md=snakemake.output.md, out_png=snakemake.output.png,
                                    extra={"embedder": embedder})
        for name, r in doc["protocols"].items():
            log.info("%s: %.2f%% +- %.2f (AUC %.4f)", name, 100 * r["mean"], 100 * r["std"], r["auc"])
    else:
        ids = sorted({i for i, v in zip(table.image_ids, table.variant_of) if v == "clean"})
        curves = {}
        res = identification(table, ids, settings, n_impostors=int(snakemake.params.n_impostors), curves=curves)
        plot_roc(curves, snakemake.output.png, title=f"{model} on {dataset}: verification, all genuine pairs")
        doc = {"model": model, "dataset": dataset, "settings": settings.to_dict(), "identification": res, **extra}
        write_json(doc, snakemake.output.json)
        lines = [f"**{model} on {dataset}: identification ({res['n_identities']} identities, "
                 f"{res['n_probes']} probes)**", "", "| probes | rank-1 | rank-5 | AUC | TAR@1e-2 | TAR@1e-3 |",
                 "|---|---:|---:|---:|---:|---:|"]
        for v, r in res["protocols"].items():
            t = r.get("tar_at_far", {})
            lines.append(f"| {v} | {100 * r['rank1']:.2f} | {100 * r['rank5']:.2f} | {r.get('auc', float('nan')):.4f} | "
                         f"{100 * t.get('1e-2', float('nan')):.2f} | {100 * t.get('1e-3', float('nan')):.2f} |")
        open(snakemake.output.md, "w").write("\n".join(lines) + "\n")
        log.info("\n".join(lines))
