"""Rule demo_run: the open-set demo on a video (maskface.demo.run_demo); metrics when a ground truth exists."""
from pathlib import Path

from maskface.datasets import parse_pairs
from maskface.demo import DemoConfig, check_never_trained_on, run_demo, score_run
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
    spec = read_json(Path(snakemake.input.gt).parent / "spec.json") if "gt" in snakemake.input.keys() else None
    if spec is not None:    # the test video: a model fine-tuned on LFW must not know its people
        check_never_trained_on(dict(snakemake.params.model), snakemake.params.dataset,
                               parse_pairs(read_json(snakemake.input.lfw)["pairs"]),
                               spec["known"] + spec["unknown"], "test video's people", "demo.video_folds")
    cfg = DemoConfig.from_mapping(dict(snakemake.params.cfg), threshold=thr, device=snakemake.params.device)
    out = Path(snakemake.params.out)
    summary = run_demo(snakemake.input.video, snakemake.input.gallery, out, cfg, model=dict(snakemake.params.model),
                       threshold_source=source)
    if spec is not None:
        note = "" if spec["masks_available"] else f"\nMasked probes: none ({spec['masks_reason']}).\n"
        md = score_run(out, snakemake.input.gt, thr, summary["frames"], note=note,
                       extra={"masks_available": spec["masks_available"], "masks_reason": spec["masks_reason"],
                              "fps": summary["fps"], "threshold_source": source})
        log.info("\n%s", md)
