"""Rule demo_run: the open-set demo on a video (maskface.demo.run_demo); metrics when a ground truth exists."""
import json
from pathlib import Path

import pandas as pd

from maskface.demo import DemoConfig, metrics_markdown, open_set_metrics, run_demo
from maskface.manifest import write_json
from maskface.smk import logged

with logged(snakemake) as log:
    import torch

    torch.set_num_threads(max(1, snakemake.threads))
    if snakemake.params.threshold is not None:
        thr, source = float(snakemake.params.threshold), {"kind": "config"}
    else:
        source = json.load(open(snakemake.input.threshold))
        thr = float(source["threshold"])
    cfg = DemoConfig.from_mapping(dict(snakemake.params.cfg), threshold=thr, device=snakemake.params.device)
    out = Path(snakemake.params.out)
    summary = run_demo(snakemake.input.video, snakemake.input.gallery, out, cfg, model=dict(snakemake.params.model),
                       threshold_source=source)
    if "gt" in snakemake.input.keys():
        det = pd.read_parquet(out / "detections.parquet")
        res = open_set_metrics(det, pd.read_parquet(snakemake.input.gt), thr, frames=summary["frames"])
        spec = json.load(open(Path(snakemake.input.gt).parent / "spec.json"))
        res.update(masks_available=spec["masks_available"], masks_reason=spec["masks_reason"],
                   fps=summary["fps"], threshold_source=source)
        write_json(res, out / "metrics.json")
        md = metrics_markdown(res)
        if not spec["masks_available"]:
            md += f"\nMasked probes: none ({spec['masks_reason']}).\n"
        (out / "metrics.md").write_text(md)
        log.info("\n%s", md)
