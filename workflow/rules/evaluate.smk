# Stage 4: features of every configured model on every test dataset, then evaluation.
#   results/features/{model}/{dataset}/{variant}.parquet   (image_id, variant, feature, face)
#   results/eval/{model}/{dataset}.json / .md / _roc.png   (LFW: 10-fold protocols; imagefolder: identification)
#   results/eval/summary.md                                (every model/run and protocol; mean +- std over runs)
# It needs stage 1's outputs (results/manifests/{dataset}/aligned.parquet, results/aligned/{dataset}/shard-*):
# its targets join `all` only once a rule of the workflow produces them.
import re

EVAL = config.get("evaluate", {})
EVAL_MODELS = sorted(EVAL.get("models", {}))


def _makes(prefix, suffix):
    """Whether some rule's output pattern starts and ends so (patterns carry wildcard constraints: {dataset,lfw})."""
    return any(str(o).startswith(prefix) and str(o).endswith(suffix) for r in workflow.rules for o in r.output)


def _variants(model):
    """clean always; masked too once the mask stage (results/masked/...) exists: the mixed and masked protocols
    follow. Aligned-crop embedders (sphereface) read the mask stage's crops; source-image embedders (dlib-resnet)
    the source photo with the stage's mask redrawn in it from the stage's landmarks and random choices."""
    if _makes(f"{RESULTS}/masked/", ".parquet"):
        return ["clean", "masked"]
    return ["clean"]


wildcard_constraints:
    model="|".join(re.escape(m) for m in EVAL_MODELS) or "no-model-configured",
    variant="clean|masked",


def _model_cfg(model):
    return EVAL["models"][model]


def _aligned_manifest(dataset):
    return f"{RESULTS}/manifests/{dataset}/aligned.parquet"


def _aligned_shards(dataset):
    return [f"{RESULTS}/aligned/{dataset}/shard-{s}.parquet" for s in range(config["align"]["shards"])]


def _extract_inputs(wc):
    mcfg = _model_cfg(wc.model)
    inp = {"json": dataset_json(wc.dataset), "aligned": _aligned_manifest(wc.dataset)}
    if dataset_cfg(wc.dataset)["format"] == "lfw" and EVAL.get("lfw_images", "pairs") == "pairs":
        inp["pairs"] = pairs_manifest(wc.dataset)
    # sphereface needs its model file; dlib-resnet may come from a checkpoint of the network (e.g. fine-tuned)
    if mcfg["embedder"] == "sphereface" or mcfg.get("checkpoint"):
        inp["checkpoint"] = mcfg["checkpoint"]
    if mcfg["embedder"] == "sphereface":
        inp["shards"] = (_aligned_shards(wc.dataset) if wc.variant == "clean" else
                         [f"{RESULTS}/masked/{wc.dataset}/shard-{s}.parquet" for s in range(config["align"]["shards"])])
    elif wc.variant == "masked":
        inp["masked"] = f"{RESULTS}/manifests/{wc.dataset}/masked.parquet"
    return inp


def _redraws_mask(wc):
    """Masked features of a source-image embedder: the mask is redrawn in the source photo by the mask stage's
    renderer, so the job depends on the mask settings and code."""
    return wc.variant == "masked" and _model_cfg(wc.model)["embedder"] != "sphereface"


def _features_code(wc):
    return code("features", "dlibnet", "evaluate", "imageio", *(["mask"] if _redraws_mask(wc) else []))


def _features_mask_cfg(wc):
    """The mask settings a source-frame redraw needs (those of the mask stage; None when not redrawing)."""
    return mask_cfg() if _redraws_mask(wc) else None


rule extract_features:
    input:
        unpack(_extract_inputs),
    output:
        features=f"{RESULTS}/features/{{model}}/{{dataset}}/{{variant}}.parquet",
    params:
        model=lambda wc: plain(_model_cfg(wc.model)),
        device=EVAL.get("device", "auto"),
        chunk=EVAL["chunk"],
        mask=_features_mask_cfg,
        code=_features_code,
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/extract_features/{{model}}/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{BENCH}/extract_features/{{model}}/{{dataset}}/{{variant}}.tsv"
    threads: EVAL.get("threads", 2)
    resources:
        # dlib's own run of the reference network never uses a GPU
        **{**gpu_resources(EVAL.get("device", "auto")),
           "gpu": lambda wc: 0 if _model_cfg(wc.model)["embedder"] == "dlib" else uses_gpu(EVAL.get("device", "auto"))},
        mem_mb=8192,
        runtime=240,
    script:
        "../scripts/extract_features.py"


def _features_model(model):
    """A model may score another model's features differently (features_from): they are extracted once."""
    src = _model_cfg(model).get("features_from") or model
    if src not in EVAL["models"] or _model_cfg(src).get("features_from"):
        raise ValueError(f"evaluate.models.{model}.features_from: {src!r} must name a model with its own features")
    return src


def _evaluate_inputs(wc):
    src = _features_model(wc.model)
    inp = {"features": [f"{RESULTS}/features/{src}/{wc.dataset}/{v}.parquet" for v in _variants(wc.model)]}
    if dataset_cfg(wc.dataset)["format"] == "lfw":
        inp["pairs"] = pairs_manifest(wc.dataset)
    return inp


rule evaluate_model:
    input:
        unpack(_evaluate_inputs),
    output:
        json=f"{RESULTS}/eval/{{model}}/{{dataset}}.json",
        md=f"{RESULTS}/eval/{{model}}/{{dataset}}.md",
        png=report(f"{RESULTS}/eval/{{model}}/{{dataset}}_roc.png", category="Evaluation", subcategory="{dataset}",
                   labels={"model": "{model}", "dataset": "{dataset}", "figure": "ROC"}),
    params:
        model=lambda wc: plain(_model_cfg(wc.model)),
        n_impostors=EVAL.get("n_impostors", 200000),
        code=code("evaluate"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/evaluate/{{model}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{dataset}}.tsv"
    resources:
        **part(),
        mem_mb=4096,
        runtime=30,
    script:
        "../scripts/evaluate.py"


EVAL_JSONS = expand(f"{RESULTS}/eval/{{model}}/{{dataset}}.json", model=EVAL_MODELS, dataset=TEST_DATASETS)


rule eval_summary:
    input:
        json=EVAL_JSONS,
    output:
        md=f"{RESULTS}/eval/summary.md",
    params:
        code=code("evaluate"),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/evaluate/summary.log",
    script:
        "../scripts/eval_summary.py"


rule evaluate:
    """Named target: every model on every test dataset, and the summary."""
    input:
        EVAL_JSONS,
        f"{RESULTS}/eval/summary.md",


def _evaluate_targets():
    if not EVAL_MODELS or not _makes(f"{RESULTS}/manifests/", "/aligned.parquet"):
        return []
    return list(rules.evaluate.input)


STAGE_TARGETS["evaluate"] = _evaluate_targets
