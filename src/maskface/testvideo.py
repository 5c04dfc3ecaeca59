"""A test video for the open-set demo, composed at run time from real LFW photographs, with its ground truth.

Holds its settings (:class:`VideoSpec`, the ``demo.test_video`` config section) and the builder's steps: the
plan of appearances, the probe photographs (masked by the mask stage where asked), the rendered frames, and
the gallery, video, ground truth and ``spec.json`` written by :func:`build_test_video`.

What is built (:func:`build_test_video`), all under one output folder (outside the repository, e.g. in
``results/`` or a test's temporary folder: LFW pixels are never committed):

``gallery/{Person}/{image}.jpg``
    One (``gallery_images``) photograph of each of ``n_known`` *gallery people*: LFW people with at least
    ``min_images`` photographs, drawn with ``seed``. The file bytes are the LFW JPEG as it is.
``video.mp4``
    ``width`` x ``height`` frames at ``fps`` (OpenCV ``mp4v``). The frame is split into ``lanes`` vertical
    lanes; each lane shows a sequence of *appearances* of ``appearance_s`` seconds (lanes are staggered, so
    the faces do not all change at once). An appearance is one LFW photograph of one person -- a gallery
    person (always a photograph *other* than their gallery image) or an *unknown* person (someone not in the
    gallery, ``n_unknown`` of them) -- cut as a centred square (``crop`` px of the 250 px LFW image), scaled
    to a tile of ``tile`` px (scaling by a random factor along the way, ``zoom``), blended in with a
    feathered elliptical edge and moved along a straight line across its lane, over a synthetic background
    that pans slowly (smooth colour field and soft blobs: no faces in it). Known and unknown appearances
    alternate in each lane (``known_share`` of them known).
``ground_truth.parquet``
    One row per face per frame: ``frame``, ``appearance``, ``lane``, ``identity``, ``known`` (a gallery
    person), ``masked``, ``image_id`` (LFW ``Person/Person_0003.jpg``), ``bbox`` (x1, y1, x2, y2 in frame
    pixels: MTCNN's box on the clean source photograph, mapped through the tile's scale and position), and
    ``tile`` (the tile's square in frame pixels).
``spec.json``
    The settings, the people, each appearance (person, photograph, masked, path), and whether masks were
    available.

Masked probes
    ``masked_fraction`` of the appearances (of known and unknown people alike, alternating so that each
    gallery person is seen both ways when it appears often enough) wear a synthetic mask drawn by the mask
    stage (:func:`maskface.mask.mask_image`: its own draw of type, colour and texture, deterministic in the
    seed and the photograph; worn ``mask_wear``, default ``proper``, i.e. over nose and mouth) on the 250 px
    source photograph before it is cut and pasted. A photograph the mask stage cannot mask is replaced by
    the person's next one. When the mask stage is not importable, no appearance is masked, ``spec.json``
    says so (``masks_available: false`` and ``masks_reason``) and a warning is logged: masks are never
    faked here.

Ground truth boxes come from MTCNN on the clean source photograph (a photograph where MTCNN finds no face is
not used), so they share MTCNN's box convention with the demo's detections; they are matched by IoU.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional

import cv2
import numpy as np
import pandas as pd

from .datasets import lfw_people
from .fileio import atomic_path, read_json, write_json
from .imageio import load_rgb
from .manifest import provenance, write_parquet
from .mask.api import MaskFailed, wearing_masker
from .stageconfig import StageConfig, setting

log = logging.getLogger("maskface.testvideo")

GT_COLUMNS = ["frame", "appearance", "lane", "identity", "known", "masked", "image_id", "bbox", "tile"]


@dataclass(frozen=True)
class VideoSpec(StageConfig):
    """The ``demo.test_video`` section of the workflow config, plus ``masked_fraction`` (``demo.masked_probes``);
    unknown keys are an error (``from_mapping(..., strict=True)``)."""
    section: ClassVar[str] = "demo.test_video"

    n_known: int = setting(4)              # gallery people
    n_unknown: int = setting(4)            # people who appear but are not in the gallery
    gallery_images: int = setting(1)       # gallery photographs per gallery person
    min_images: int = setting(6)           # a gallery person needs this many LFW photographs (gallery + probes)
    width: int = setting(320)
    height: int = setting(240)
    fps: float = setting(8.0)
    seconds: float = setting(30.0)
    lanes: int = setting(2)                # faces on screen at once (side by side)
    appearance_s: float = setting(2.0)     # how long one appearance lasts
    known_share: float = setting(0.5)      # share of appearances that show a gallery person
    masked_fraction: float = setting(0.5)  # share of appearances (known and unknown) wearing a mask
    mask_wear: Optional[str] = setting("proper")  # how masks are worn (mask stage's wears); None: its own draw
    tile: int = setting(112)               # tile side in px (the face is about 0.55 of it)
    zoom: float = setting(0.15)            # the tile scales by up to +-zoom over an appearance
    crop: int = setting(170)               # centred square cut from the 250 px LFW photograph
    seed: int = setting(0)

    def validate(self) -> None:
        if self.n_known < 1:
            raise ValueError("n_known must be >= 1")
        if self.n_unknown < 0 or self.gallery_images < 1 or self.lanes < 1:
            raise ValueError("n_unknown >= 0, gallery_images >= 1 and lanes >= 1 are required")
        if self.min_images < self.gallery_images + 1:
            raise ValueError("min_images must leave at least one probe photograph beyond the gallery images")
        if not (0 <= self.known_share <= 1 and 0 <= self.masked_fraction <= 1):
            raise ValueError("known_share and masked_fraction must be in [0, 1]")
        if self.n_unknown == 0 and self.known_share < 1:
            raise ValueError("known_share < 1 needs n_unknown >= 1")
        if self.fps <= 0 or self.seconds <= 0 or self.appearance_s <= 0:
            raise ValueError("fps, seconds and appearance_s must be positive")
        big = int(math.ceil(self.tile * (1 + self.zoom)))
        if big > self.height or big > self.width // self.lanes:
            raise ValueError(f"a tile of {self.tile} px (+{self.zoom:.0%} zoom) does not fit a "
                             f"{self.width // self.lanes}x{self.height} lane")

    @property
    def n_frames(self) -> int:
        return max(1, int(round(self.fps * self.seconds)))

    @property
    def appearance_frames(self) -> int:
        return max(2, int(round(self.fps * self.appearance_s)))


# -------------------------------------------------------------------------------------------- masks

def _masker(spec: VideoSpec) -> tuple[Optional[Callable[..., np.ndarray]], str]:
    """(the mask stage's masker for the spec's wear, "") or (None, why no appearance is masked)."""
    if spec.masked_fraction <= 0:
        return None, "masked_fraction is 0"
    return wearing_masker(spec.mask_wear), ""


# -------------------------------------------------------------------------------------------- plan

def plan_appearances(spec: VideoSpec, people: Mapping[str, list[str]], rng: np.random.Generator,
                     masks_on: bool) -> tuple[list[str], list[str], dict[str, list[str]], list[dict]]:
    """Choose gallery people (and their gallery photographs), unknown people, and the appearances."""
    eligible = sorted(p for p, f in people.items() if len(f) >= spec.min_images)
    if len(eligible) < spec.n_known:
        raise ValueError(f"only {len(eligible)} people have >= {spec.min_images} photographs; "
                         f"{spec.n_known} gallery people asked for")
    known = sorted(rng.choice(eligible, spec.n_known, replace=False).tolist())
    others = sorted(p for p in people if p not in set(known))
    if len(others) < spec.n_unknown:
        raise ValueError(f"only {len(others)} people outside the gallery; {spec.n_unknown} unknowns asked for")
    unknown = sorted(rng.choice(others, spec.n_unknown, replace=False).tolist()) if spec.n_unknown else []
    gallery = {p: [str(f) for f in rng.choice(people[p], spec.gallery_images, replace=False)] for p in known}
    apps = _schedule(spec)
    _assign_people(apps, known, unknown, spec.masked_fraction if masks_on else 0.0)
    return known, unknown, gallery, apps


def _schedule(spec: VideoSpec) -> list[dict]:
    """The appearances' lanes and frame spans, known or not, in order of their first frame."""
    n_frames, length = spec.n_frames, spec.appearance_frames
    apps: list[dict] = []
    k_count = u_count = 0
    for lane in range(spec.lanes):
        offset = -((lane * length) // spec.lanes)   # stagger the lanes
        start = offset
        while start < n_frames:
            f0, f1 = max(start, 0), min(start + length, n_frames)
            if f1 - f0 >= 2:
                # known share by a running quota (deterministic, evenly spread)
                is_known = spec.n_unknown == 0 or (k_count + 1) <= spec.known_share * (k_count + u_count + 1)
                if is_known:
                    k_count += 1
                else:
                    u_count += 1
                apps.append({"lane": lane, "f0": f0, "f1": f1, "known": bool(is_known)})
            start += length
    apps.sort(key=lambda a: (a["f0"], a["lane"]))
    return apps


def _assign_people(apps: list[dict], known: list[str], unknown: list[str], f: float) -> None:
    """Persons: cycle through the gallery people / unknowns in order of appearance; masks at the rate ``f``."""
    counts = {True: 0, False: 0}
    seen: dict[str, int] = {}
    for i, a in enumerate(apps):
        pool = known if a["known"] else unknown
        n = counts[a["known"]]
        j = n % len(pool)
        a["identity"] = pool[j]
        a["round"] = n // len(pool)
        counts[a["known"]] += 1
        # masks per person, spread evenly over their appearances (a Bresenham sequence at the rate f, shifted
        # by the person's index so that people do not all start the same way): with f = 0.5 every person
        # alternates, so each is seen both masked and clean
        k = seen.get(a["identity"], 0) + 1
        seen[a["identity"]] = k
        a["masked"] = bool(math.floor(f * (k + j) + 1e-9) > math.floor(f * (k - 1 + j) + 1e-9))
        a["appearance"] = i


# ------------------------------------------------------------------------------------------ probes

@dataclass
class _Source:
    image_id: str
    rgb: np.ndarray          # clean or masked, 250x250
    box: np.ndarray          # MTCNN box on the clean photograph (x1, y1, x2, y2)


def _detect_box(detector, rgb: np.ndarray) -> Optional[np.ndarray]:
    from .align import select_face
    boxes, _ = detector.detect(np.array(rgb[None]))[0]   # a writable copy for torch
    if not len(boxes):
        return None
    return np.asarray(boxes[select_face(boxes, rgb.shape[:2], "center"), :4], dtype=np.float64)


class _ProbePhotos:
    """Per person, the photographs not in the gallery, in a seeded order; each appearance takes the next one
    with a detectable (and, if masked, maskable) face."""

    def __init__(self, root: Path, people: Mapping[str, list[str]], gallery: Mapping[str, list[str]],
                 persons: list[str], rng: np.random.Generator, detector, masker):
        self.root, self.detector, self.masker = root, detector, masker
        self.queues: dict[str, list[str]] = {}
        for p in persons:
            cand = [f for f in people[p] if f not in set(gallery.get(p, []))]
            self.queues[p] = list(rng.permutation(cand)) if cand else []
        self.used: dict[str, int] = {p: 0 for p in self.queues}
        self.boxes: dict[str, Optional[np.ndarray]] = {}
        self.unmaskable: set[str] = set()

    def next(self, person: str, masked: bool, seed: int) -> Optional[_Source]:
        """The person's next photograph with a detectable (and, if masked, maskable) face, or None."""
        q = self.queues[person]
        for _ in range(len(q)):
            image_id = q[self.used[person] % len(q)]
            self.used[person] += 1
            if image_id not in self.boxes:
                self.boxes[image_id] = _detect_box(self.detector, load_rgb(self.root / image_id))
            box = self.boxes[image_id]
            if box is None or (masked and image_id in self.unmaskable):
                continue
            rgb = load_rgb(self.root / image_id)
            if masked:
                try:
                    rgb = self.masker(rgb, seed, image_id)
                except MaskFailed as exc:   # the mask stage cannot mask this one: take another photo
                    log.info("test video: %s", exc)
                    self.unmaskable.add(image_id)
                    continue
            return _Source(image_id, rgb, box)
        return None


def _cast(a: dict, pool: list[str], probes: _ProbePhotos, seed: int) -> None:
    """The appearance's person and photograph: the planned person; if none of their photographs can be masked,
    the next person of the same pool who can; if nobody can, the planned person unmasked (recorded as such)."""
    i = pool.index(a["identity"])
    order = pool[i:] + pool[:i]
    src = None
    for person in order if a["masked"] else order[:1]:
        src = probes.next(person, a["masked"], seed)
        if src is not None:
            a["identity"] = person
            break
    if src is None and a["masked"]:
        log.warning("test video: appearance %d: nobody in the %s pool has a maskable photograph left; shown "
                    "unmasked", a["appearance"], "gallery" if a["known"] else "unknown")
        a["masked"] = False
        src = probes.next(a["identity"], False, seed)
    if src is None:
        raise ValueError(f"no photograph of {a['identity']} with a detectable face (besides the gallery's)")
    a["image_id"] = src.image_id
    a["_src"] = src


def _draw_path(spec: VideoSpec, lane: int, rng: np.random.Generator) -> dict:
    """The tile's size and top-left position inside its lane at the start and at the end of an appearance."""
    lane_w = spec.width // spec.lanes
    s0 = spec.tile * (1 + rng.uniform(-spec.zoom, spec.zoom))
    s1 = spec.tile * (1 + rng.uniform(-spec.zoom, spec.zoom))
    smax = max(s0, s1)
    pos = []
    for _ in range(2):
        x = lane * lane_w + rng.uniform(0, max(lane_w - smax, 0))
        y = rng.uniform(0, max(spec.height - smax, 0))
        pos.append((x, y))
    return {"size": [float(s0), float(s1)], "start": list(map(float, pos[0])), "end": list(map(float, pos[1]))}


# ------------------------------------------------------------------------------------------ render

def _blob_background(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """A smooth, face-free background larger than the frame (it pans): colour field + soft blobs + grain."""
    h, w = spec.height + 64, spec.width + 128
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    t = (xx / w * 0.7 + yy / h * 0.3)[..., None]
    bg = c0 * (1 - t) + c1 * t
    for _ in range(10):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 60)
        col = rng.uniform(0, 255, 3)
        a = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * 0.6
        bg = bg * (1 - a) + col * a
    bg += rng.normal(0, 4, bg.shape)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _feather(size: int) -> np.ndarray:
    """Alpha (size, size, 1) float32: an ellipse filling the tile, edge blurred over ~10% of the side."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r = ((xx - c) / (0.50 * size)) ** 2 + ((yy - c) / (0.52 * size)) ** 2
    a = np.clip((1.0 - r) / 0.18, 0.0, 1.0)
    return (a * a * (3 - 2 * a))[..., None]   # smoothstep


def _paste(frame: np.ndarray, a: dict, fi: int, spec: VideoSpec, feathers: dict[int, np.ndarray]) -> dict:
    """Blend appearance ``a``'s tile into ``frame`` (float32 RGB) at frame ``fi``; its ground truth row."""
    t = (fi - a["f0"]) / max(a["f1"] - a["f0"] - 1, 1)
    path = a["path"]
    size = int(round(path["size"][0] * (1 - t) + path["size"][1] * t))
    x = int(round(path["start"][0] * (1 - t) + path["end"][0] * t))
    y = int(round(path["start"][1] * (1 - t) + path["end"][1] * t))
    x = min(max(x, 0), spec.width - size)
    y = min(max(y, 0), spec.height - size)
    src: _Source = a["_src"]
    c = spec.crop
    h0, w0 = src.rgb.shape[:2]
    cx0, cy0 = (w0 - c) // 2, (h0 - c) // 2
    patch = src.rgb[cy0:cy0 + c, cx0:cx0 + c]
    tile = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    if size not in feathers:
        feathers[size] = _feather(size)
    al = feathers[size]
    region = frame[y:y + size, x:x + size]
    frame[y:y + size, x:x + size] = region * (1 - al) + tile * al
    sc = size / c
    b = (src.box - np.array([cx0, cy0, cx0, cy0])) * sc + np.array([x, y, x, y])
    return {"frame": fi, "appearance": a["appearance"], "lane": a["lane"], "identity": a["identity"],
            "known": a["known"], "masked": a["masked"], "image_id": a["image_id"], "bbox": [float(v) for v in b],
            "tile": [float(x), float(y), float(x + size), float(y + size)]}


def render_video(spec: VideoSpec, apps: list[dict], bg: np.ndarray, path: str | os.PathLike) -> list[dict]:
    """Write the video (mp4v) of the appearances over the panning background; the ground truth rows."""
    rows: list[dict] = []
    feathers: dict[int, np.ndarray] = {}
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(spec.fps),
                                 (spec.width, spec.height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write an mp4v video at {tmp}")
        try:
            for fi in range(spec.n_frames):
                # background pans along a slow ellipse
                ox = int(round(64 + 60 * math.sin(2 * math.pi * fi / max(spec.n_frames, 1))))
                oy = int(round(32 + 28 * math.cos(2 * math.pi * fi / max(spec.n_frames, 1))))
                frame = bg[oy:oy + spec.height, ox:ox + spec.width].astype(np.float32)
                rows.extend(_paste(frame, a, fi, spec, feathers) for a in apps if a["f0"] <= fi < a["f1"])
                rgb = np.clip(frame, 0, 255).astype(np.uint8)
                writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
    return rows


# ----------------------------------------------------------------------------------------- builder

def build_test_video(images_root: str | os.PathLike, out_dir: str | os.PathLike,
                     spec: VideoSpec | Mapping[str, Any] | None = None, *, detector=None,
                     only_people: Optional[Iterable[str]] = None, people_note: str = "") -> dict:
    """Build the test video, gallery and ground truth under ``out_dir`` (see module docstring).
    ``only_people``: draw the gallery and unknown people among these LFW people only (e.g. the folds a
    fine-tuned model never trained on; ``people_note`` says which, in spec.json). Returns the spec.json
    document."""
    spec = spec if isinstance(spec, VideoSpec) else VideoSpec.from_mapping(spec, strict=True)
    spec.validate()
    out = Path(out_dir)
    root = Path(images_root)
    people = lfw_people(root)
    if only_people is not None:
        keep = set(only_people)
        people = {p: f for p, f in people.items() if p in keep}
    rng = np.random.default_rng(spec.seed)
    masker, why = _masker(spec)
    known, unknown, gallery, apps = plan_appearances(spec, people, rng, masker is not None)
    if detector is None:
        from .mtcnn import Detector
        detector = Detector(20, (0.6, 0.7, 0.9), 0.85, "cpu")
    probes = _ProbePhotos(root, people, gallery, known + unknown, rng, detector, masker)
    for a in apps:
        _cast(a, known if a["known"] else unknown, probes, spec.seed * 100003 + a["appearance"])
        a["path"] = _draw_path(spec, a["lane"], rng)
    bg = _blob_background(spec, rng)
    out.mkdir(parents=True, exist_ok=True)
    copy_gallery(root, gallery, out / "gallery")
    gt = pd.DataFrame(render_video(spec, apps, bg, out / "video.mp4"), columns=GT_COLUMNS)
    doc = {
        "spec": asdict(spec), "images_root": str(root), "n_frames": spec.n_frames,
        "gallery": {p: gallery[p] for p in known}, "known": known, "unknown": unknown,
        "masks_available": masker is not None, "masks_reason": why,
        "people_from": people_note or ("every LFW person" if only_people is None else "a subset of LFW's people"),
        "appearances": [{k: v for k, v in a.items() if not k.startswith("_")} for a in apps],
        "counts": _counts(gt, apps),
        "video": "video.mp4", "ground_truth": "ground_truth.parquet", "gallery_dir": "gallery",
    }
    write_parquet(gt, out / "ground_truth.parquet", provenance("testvideo", asdict(spec), {}))
    write_json(doc, out / "spec.json")
    log.info("test video: %d frames %dx%d @ %g fps, %d appearances (%d masked), %d gallery people, "
             "%d unknown people -> %s", spec.n_frames, spec.width, spec.height, spec.fps, len(apps),
             doc["counts"]["masked_appearances"], len(known), len(unknown), out)
    return doc


def copy_gallery(root: Path, gallery: Mapping[str, list[str]], gdir: Path) -> None:
    """The gallery folder afresh: ``gdir/{Person}/{image}.jpg``, the LFW files as they are."""
    if gdir.exists():
        shutil.rmtree(gdir)
    for p, files in gallery.items():
        (gdir / p).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(root / f, gdir / p / Path(f).name)


def _counts(gt: pd.DataFrame, apps: list[dict]) -> dict:
    return {
        "faces": int(len(gt)), "known_faces": int(gt["known"].sum()) if len(gt) else 0,
        "unknown_faces": int((~gt["known"]).sum()) if len(gt) else 0,
        "masked_faces": int(gt["masked"].sum()) if len(gt) else 0,
        "appearances": len(apps), "masked_appearances": int(sum(a["masked"] for a in apps)),
    }


def read_ground_truth(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_parquet(path)


def read_spec(folder: str | os.PathLike) -> dict:
    return read_json(Path(folder) / "spec.json")
