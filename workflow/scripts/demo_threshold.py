"""Rule demo_threshold: the demo's cosine threshold at demo.far, from a sample of LFW people (lfw_sample; with
demo.calibration_folds, people of those folds only) or from the evaluation stage's LFW features (evaluation).
A model fine-tuned on LFW is calibrated on people it never trained on, or the job stops saying which folds."""
from maskface.datasets import lfw_people, parse_pairs
from maskface.demo import (DemoConfig, calibrate_on_lfw, check_evaluation_threshold, check_never_trained_on,
                           embedder_from_model, fold_people, make_detector, threshold_at_far)
from maskface.fileio import read_json, write_json
from maskface.smk import logged

with logged(snakemake) as log:
    import torch

    torch.set_num_threads(max(1, snakemake.threads))
    far = float(snakemake.params.far)
    model = dict(snakemake.params.model)
    record = read_json(snakemake.input.json)
    pairs = parse_pairs(record["pairs"])
    folds = snakemake.params.folds
    if snakemake.params.source == "evaluation":
        check_evaluation_threshold(model, snakemake.params.dataset, pairs)
        doc = threshold_at_far(snakemake.input.features, snakemake.input.pairs, far)
    else:
        only = fold_people(pairs, folds) if folds else None
        candidates = sorted(only if only is not None else lfw_people(record["images_root"]))
        check_never_trained_on(model, snakemake.params.dataset, pairs, candidates, "calibration people",
                               "demo.calibration_folds")
        cfg = DemoConfig.from_mapping(dict(snakemake.params.cfg))
        doc = calibrate_on_lfw(record["images_root"], make_detector(cfg), embedder_from_model(model, cfg.device),
                               far, people=int(snakemake.params.people), only=only)
        doc["folds"] = list(folds) if folds else None
    doc.update(kind=snakemake.params.source, model=model)
    log.info("threshold %.4f (cosine) at FAR %g: achieved FAR %.2e over %d impostor pairs, TAR %s",
             doc["threshold"], far, doc["far_achieved"], doc["n_impostor"], doc["tar"])
    write_json(doc, snakemake.output.json)
