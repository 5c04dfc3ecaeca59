"""Rule demo_test_video: the LFW test video, its gallery and ground truth (maskface.testvideo); with
demo.video_folds, its people come from those folds of pairs.txt only."""
from maskface.datasets import parse_pairs
from maskface.demo import fold_people
from maskface.fileio import read_json
from maskface.smk import logged
from maskface.testvideo import VideoSpec, build_test_video

with logged(snakemake) as log:
    record = read_json(snakemake.input.json)
    spec = VideoSpec.from_mapping(dict(snakemake.params.spec), strict=True)
    out = snakemake.output.spec.rsplit("/", 1)[0]
    folds = snakemake.params.folds
    only = fold_people(parse_pairs(record["pairs"]), folds) if folds else None
    doc = build_test_video(record["images_root"], out, spec, only_people=only,
                           people_note=f"the people of pairs.txt folds {list(folds)}" if folds else "")
    log.info("counts: %s; masks: %s %s; people: %s", doc["counts"], doc["masks_available"], doc["masks_reason"],
             doc["people_from"])
