# Open-set video recognition demo (maskface.demo, maskface.testvideo). A named target, not part of `all`:
#   snakemake --cores 2 demo
#   results/demo/testvideo/video.mp4, gallery/, ground_truth.parquet, spec.json   the LFW test video (video: null)
#   results/demo/threshold.json                                                    threshold at `far` (threshold: null)
#   {output}/annotated.mp4, detections.parquet/.csv, summary.json, snapshot.png    the demo run
#   {output}/metrics.json / metrics.md                                             DIR / FAR (test video only)
DEMO = config["demo"]
DEMO_DIR = f"{RESULTS}/demo"
DEMO_OUT = DEMO["output"].rstrip("/")
DEMO_BUILD = DEMO["video"] is None
DEMO_TV = f"{DEMO_DIR}/testvideo"

if DEMO["gallery"] is None and not DEMO_BUILD:
    raise ValueError("demo.gallery: null (the test video's gallery) needs demo.video: null as well")


def _demo_lfw():
    name = DEMO["lfw_dataset"] or (LFW_DATASETS[0] if LFW_DATASETS else None)
    if name is None or name not in config["datasets"] or config["datasets"][name]["format"] != "lfw":
        raise ValueError(f"demo.lfw_dataset: {name!r} is not an LFW-format dataset of `datasets` "
                         f"(needed for the test video and the threshold)")
    return name


def _demo_model():
    models = config.get("evaluate", {}).get("models", {})
    if DEMO["model"] not in models:
        raise ValueError(f"demo.model: {DEMO['model']!r} is not a model of evaluate.models ({sorted(models)})")
    return models[DEMO["model"]]


def _demo_code():
    mods = ["demo", "testvideo", "align", "features", "dlibnet", "imageio"]
    if os.path.exists(os.path.join(workflow.basedir, "src", "maskface", "mask")):
        mods.append("mask")
    return code(*mods)


def _demo_cfg():
    keys = ["min_face_size", "factor", "det_thresholds", "batch_size", "masked_gallery", "gallery_no_face",
            "max_frames"]
    return plain({k: DEMO[k] for k in keys})


rule demo_test_video:
    input:
        json=lambda wc: dataset_json(_demo_lfw()),
    output:
        video=f"{DEMO_TV}/video.mp4",
        gt=f"{DEMO_TV}/ground_truth.parquet",
        spec=f"{DEMO_TV}/spec.json",
        gallery=directory(f"{DEMO_TV}/gallery"),
    params:
        spec=lambda wc: plain({**DEMO["test_video"], "masked_fraction": DEMO["masked_probes"]}),
        code=_demo_code(),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/demo/test_video.log",
    benchmark:
        f"{BENCH}/demo/test_video.tsv"
    threads: 1
    resources:
        **part(),
        mem_mb=2048,
        runtime=30,
    script:
        "../scripts/demo_testvideo.py"


def _threshold_inputs(wc):
    lfw = _demo_lfw()
    if DEMO["threshold_from"] == "evaluation":
        mcfg = _demo_model()
        src = mcfg.get("features_from") or DEMO["model"]
        return {"features": f"{RESULTS}/features/{src}/{lfw}/clean.parquet", "pairs": pairs_manifest(lfw)}
    return {"json": dataset_json(lfw)}


rule demo_threshold:
    input:
        unpack(_threshold_inputs),
    output:
        json=f"{DEMO_DIR}/threshold.json",
    params:
        far=DEMO["far"],
        source=DEMO["threshold_from"],
        people=DEMO["calibration_people"],
        model=lambda wc: plain({"name": DEMO["model"], **_demo_model()}),
        cfg=_demo_cfg(),
        code=_demo_code(),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/demo/threshold.log",
    benchmark:
        f"{BENCH}/demo/threshold.tsv"
    threads: DEMO["threads"]
    resources:
        **gpu_resources(DEMO["device"]),
        mem_mb=4096,
        runtime=60,
    script:
        "../scripts/demo_threshold.py"


def _demo_inputs(wc):
    inp = {}
    if DEMO_BUILD:
        inp.update(video=f"{DEMO_TV}/video.mp4", gallery=f"{DEMO_TV}/gallery", gt=f"{DEMO_TV}/ground_truth.parquet")
    else:
        inp["video"] = DEMO["video"]
        inp["gallery"] = DEMO["gallery"] or f"{DEMO_TV}/gallery"
    if DEMO["threshold"] is None:
        inp["threshold"] = f"{DEMO_DIR}/threshold.json"
    mcfg = _demo_model()
    if mcfg.get("checkpoint"):
        inp["checkpoint"] = mcfg["checkpoint"]
    return inp


DEMO_OUTPUTS = [f"{DEMO_OUT}/{f}" for f in ("annotated.mp4", "detections.parquet", "detections.csv",
                                             "summary.json", "snapshot.png")]
if DEMO_BUILD:
    DEMO_OUTPUTS += [f"{DEMO_OUT}/metrics.json", f"{DEMO_OUT}/metrics.md"]


rule demo_run:
    input:
        unpack(_demo_inputs),
    output:
        DEMO_OUTPUTS,
    params:
        out=lambda wc, output: os.path.dirname(output[0]),   # the demo's output folder
        threshold=DEMO["threshold"],
        model=lambda wc: plain({"name": DEMO["model"], **_demo_model()}),
        cfg=_demo_cfg(),
        device=DEMO["device"],
        code=_demo_code(),
    conda:
        "../../envs/maskface.yaml"
    log:
        f"{LOGS}/demo/run.log",
    benchmark:
        f"{BENCH}/demo/run.tsv"
    threads: DEMO["threads"]
    resources:
        **gpu_resources(DEMO["device"]),
        mem_mb=4096,
        runtime=120,
    script:
        "../scripts/demo.py"


rule demo:
    """Named target: the annotated video, its detections and (test video) the open-set metrics."""
    input:
        DEMO_OUTPUTS,
