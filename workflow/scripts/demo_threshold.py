"""Rule demo_threshold: the demo's cosine threshold at demo.far, from a sample of LFW people (lfw_sample) or
from the evaluation stage's LFW features (evaluation)."""
from maskface.demo import DemoConfig, calibrate_on_lfw, embedder_from_model, make_detector, threshold_at_far
from maskface.fileio import read_json, write_json
from maskface.smk import logged

with logged(snakemake) as log:
    import torch

    torch.set_num_threads(max(1, snakemake.threads))
    far = float(snakemake.params.far)
    model = dict(snakemake.params.model)
    if snakemake.params.source == "evaluation":
        doc = threshold_at_far(snakemake.input.features, snakemake.input.pairs, far)
    else:
        record = read_json(snakemake.input.json)
        cfg = DemoConfig.from_mapping(dict(snakemake.params.cfg))
        doc = calibrate_on_lfw(record["images_root"], make_detector(cfg), embedder_from_model(model, cfg.device),
                               far, people=int(snakemake.params.people))
    doc.update(kind=snakemake.params.source, model=model)
    log.info("threshold %.4f (cosine) at FAR %g: achieved FAR %.2e over %d impostor pairs, TAR %s",
             doc["threshold"], far, doc["far_achieved"], doc["n_impostor"], doc["tar"])
    write_json(doc, snakemake.output.json)
