"""Rule demo_run: the open-set demo on a video (maskface.demo.run_demo); metrics when a ground truth exists."""
from pathlib import Path

from maskface.demo import DemoConfig, run_demo, score_run
from maskface.fileio import read_json
from maskface.smk import logged

with logged(snakemake) as log:
    import torch

    torch.set_num_threads(max(1, snakemake.threads))
    if snakemake.params.threshold is not None:
        thr, source = float(snakemake.params.threshold), {"kind": "config"}
    else:
        source = read_json(snakemake.input.threshold)
        thr = float(source["threshold"])
    cfg = DemoConfig.from_mapping(dict(snakemake.params.cfg), threshold=thr, device=snakemake.params.device)
    out = Path(snakemake.params.out)
    summary = run_demo(snakemake.input.video, snakemake.input.gallery, out, cfg, model=dict(snakemake.params.model),
                       threshold_source=source)
    if "gt" in snakemake.input.keys():
        spec = read_json(Path(snakemake.input.gt).parent / "spec.json")
        note = "" if spec["masks_available"] else f"\nMasked probes: none ({spec['masks_reason']}).\n"
        md = score_run(out, snakemake.input.gt, thr, summary["frames"], note=note,
                       extra={"masks_available": spec["masks_available"], "masks_reason": spec["masks_reason"],
                              "fps": summary["fps"], "threshold_source": source})
        log.info("\n%s", md)
