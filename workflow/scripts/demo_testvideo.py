"""Rule demo_test_video: the LFW test video, its gallery and ground truth (maskface.testvideo)."""
from maskface.fileio import read_json
from maskface.smk import logged
from maskface.testvideo import VideoSpec, build_test_video

with logged(snakemake) as log:
    record = read_json(snakemake.input.json)
    spec = VideoSpec.from_mapping(dict(snakemake.params.spec), strict=True)
    out = snakemake.output.spec.rsplit("/", 1)[0]
    doc = build_test_video(record["images_root"], out, spec)
    log.info("counts: %s; masks: %s %s", doc["counts"], doc["masks_available"], doc["masks_reason"])
