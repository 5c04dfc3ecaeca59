"""A test video for the open-set demo, composed at run time from real LFW photographs, with its ground truth.

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

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import cv2
import numpy as np
import pandas as pd

from .imageio import IMAGE_EXTENSIONS, load_rgb

log = logging.getLogger("maskface.testvideo")

GT_COLUMNS = ["frame", "appearance", "lane", "identity", "known", "masked", "image_id", "bbox", "tile"]


@dataclass(frozen=True)
class VideoSpec:
    n_known: int = 3             # gallery people
    n_unknown: int = 3           # people who appear but are not in the gallery
    gallery_images: int = 1      # gallery photographs per gallery person
    min_images: int = 6          # a gallery person needs this many LFW photographs (gallery + probes)
    width: int = 320
    height: int = 240
    fps: float = 8.0
    seconds: float = 4.0
    lanes: int = 2               # faces on screen at once (side by side)
    appearance_s: float = 1.5    # how long one appearance lasts
    known_share: float = 0.5     # share of appearances that show a gallery person
    masked_fraction: float = 0.5  # share of appearances (known and unknown) wearing a mask
    mask_wear: Optional[str] = "proper"  # how masks are worn (mask stage's wears); None: the stage's own draw
    tile: int = 112              # tile side in px (the face is about 0.55 of it)
    zoom: float = 0.15           # the tile scales by up to +-zoom over an appearance
    crop: int = 170              # centred square cut from the 250 px LFW photograph
    seed: int = 0

    @classmethod
    def from_mapping(cls, d: Optional[Mapping[str, Any]] = None) -> "VideoSpec":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown test video settings {unknown}; known: {sorted(known)}")
        out = cls(**d)
        out.validate()
        return out

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

class MaskFailed(ValueError):
    """The mask stage could not mask this photograph (no face for its detector, profile, ...)."""


def mask_api(wear: Optional[str] = "proper") -> tuple[Optional[Callable[..., np.ndarray]], str]:
    """(masker, "") from the mask stage's public :func:`maskface.mask.mask_image`, or (None, why not).

    ``masker(rgb, seed, image_id)`` returns the photograph with a mask drawn on its faces (type, colour and
    texture drawn by the mask stage, deterministically from seed and image_id; ``wear`` forced unless None)
    or raises :class:`MaskFailed` when the stage masked no face."""
    try:
        from .mask import mask_image
    except Exception as exc:  # noqa: BLE001 - any import failure means: no masks
        return None, (f"the mask stage (maskface.mask.mask_image) is unavailable ({type(exc).__name__}: {exc}): "
                      f"masked probes are skipped")

    def masker(rgb: np.ndarray, seed: int, image_id: str = "") -> np.ndarray:
        res = mask_image(rgb, seed=seed, image_id=image_id, **({"wear": wear} if wear else {}))
        if res.status != "ok":
            raise MaskFailed(f"{image_id or 'image'}: not masked ({res.status}: {res.reason})")
        if res.image.shape != rgb.shape or res.image.dtype != np.uint8:
            raise ValueError(f"mask_image returned {res.image.shape} {res.image.dtype} for a {rgb.shape} image")
        return res.image

    return masker, ""


# ------------------------------------------------------------------------------------------- people

def lfw_people(images_root: str | os.PathLike) -> dict[str, list[str]]:
    """{person: sorted image files (relative 'Person/Person_0001.jpg')} of an LFW-layout folder."""
    root = Path(images_root)
    if not root.is_dir():
        raise FileNotFoundError(f"LFW images folder not found: {root}")
    out: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f"{d.name}/{f.name}" for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = files
    if not out:
        raise ValueError(f"no person folders with images under {root}")
    return out


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


# ------------------------------------------------------------------------------------------- builder

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
    # persons: cycle through the gallery people / unknowns in order of appearance, masks alternate
    counts = {True: 0, False: 0}
    seen: dict[str, int] = {}
    f = spec.masked_fraction if masks_on else 0.0
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
    return known, unknown, gallery, apps


def build_test_video(images_root: str | os.PathLike, out_dir: str | os.PathLike,
                     spec: VideoSpec | Mapping[str, Any] | None = None, *, detector=None,
                     require_masks: bool = False) -> dict:
    """Build the test video, gallery and ground truth under ``out_dir`` (see module docstring).
    Returns the spec.json document. ``require_masks``: raise instead of skipping masked probes when the mask
    stage is not available (and ``masked_fraction`` > 0)."""
    spec = spec if isinstance(spec, VideoSpec) else VideoSpec.from_mapping(spec)
    spec.validate()
    out = Path(out_dir)
    root = Path(images_root)
    people = lfw_people(root)
    rng = np.random.default_rng(spec.seed)

    masker, why = (None, "masked_fraction is 0")
    if spec.masked_fraction > 0:
        masker, why = mask_api(spec.mask_wear)
        if masker is None:
            if require_masks:
                raise RuntimeError(f"masked probes asked for but unavailable: {why}")
            log.warning("test video: %s", why)
    known, unknown, gallery, apps = plan_appearances(spec, people, rng, masker is not None)

    if detector is None:
        from .align import Detector
        detector = Detector(20, (0.6, 0.7, 0.9), 0.85, "cpu")

    # probe photographs: per person, the photographs not in the gallery, in a seeded order; each appearance
    # takes the next one with a detectable face
    queues: dict[str, list[str]] = {}
    for p in known + unknown:
        cand = [f for f in people[p] if f not in set(gallery.get(p, []))]
        queues[p] = list(rng.permutation(cand)) if cand else []
    used: dict[str, int] = {p: 0 for p in queues}
    box_cache: dict[str, Optional[np.ndarray]] = {}

    unmaskable: set[str] = set()

    def next_source(person: str, masked: bool, seed: int) -> Optional[_Source]:
        """The person's next photograph with a detectable (and, if masked, maskable) face, or None."""
        q = queues[person]
        for _ in range(len(q)):
            image_id = q[used[person] % len(q)]
            used[person] += 1
            if image_id not in box_cache:
                rgb = load_rgb(root / image_id)
                box_cache[image_id] = _detect_box(detector, rgb)
            box = box_cache[image_id]
            if box is None or (masked and image_id in unmaskable):
                continue
            rgb = load_rgb(root / image_id)
            if masked:
                try:
                    rgb = masker(rgb, seed, image_id)
                except MaskFailed as exc:   # the mask stage cannot mask this one: take another photo
                    log.info("test video: %s", exc)
                    unmaskable.add(image_id)
                    continue
            return _Source(image_id, rgb, box)
        return None

    lane_w = spec.width // spec.lanes
    for a in apps:
        seed = spec.seed * 100003 + a["appearance"]
        pool = known if a["known"] else unknown
        # the planned person; if none of their photographs can be masked, the next person of the same
        # pool who can; if nobody can, the planned person unmasked (recorded as such)
        i = pool.index(a["identity"])
        order = pool[i:] + pool[:i]
        src = None
        for person in order if a["masked"] else order[:1]:
            src = next_source(person, a["masked"], seed)
            if src is not None:
                a["identity"] = person
                break
        if src is None and a["masked"]:
            log.warning("test video: appearance %d: nobody in the %s pool has a maskable photograph left; shown "
                        "unmasked", a["appearance"], "gallery" if a["known"] else "unknown")
            a["masked"] = False
            src = next_source(a["identity"], False, seed)
        if src is None:
            raise ValueError(f"no photograph of {a['identity']} with a detectable face (besides the gallery's)")
        a["image_id"] = src.image_id
        a["_src"] = src
        s0 = spec.tile * (1 + rng.uniform(-spec.zoom, spec.zoom))
        s1 = spec.tile * (1 + rng.uniform(-spec.zoom, spec.zoom))
        smax = max(s0, s1)
        # top-left positions inside the lane, start and end
        pos = []
        for _ in range(2):
            x = a["lane"] * lane_w + rng.uniform(0, max(lane_w - smax, 0))
            y = rng.uniform(0, max(spec.height - smax, 0))
            pos.append((x, y))
        a["path"] = {"size": [float(s0), float(s1)], "start": list(map(float, pos[0])),
                     "end": list(map(float, pos[1]))}

    bg = _blob_background(spec, rng)
    out.mkdir(parents=True, exist_ok=True)
    gdir = out / "gallery"
    if gdir.exists():
        shutil.rmtree(gdir)
    for p, files in gallery.items():
        (gdir / p).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(root / f, gdir / p / Path(f).name)

    video_path = out / "video.mp4"
    tmp_video = out / ".video.tmp.mp4"
    writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), float(spec.fps),
                             (spec.width, spec.height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an mp4v video at {tmp_video}")
    rows = []
    feather_cache: dict[int, np.ndarray] = {}
    c = spec.crop
    try:
        for fi in range(spec.n_frames):
            # background pans along a slow ellipse
            ox = int(round(64 + 60 * math.sin(2 * math.pi * fi / max(spec.n_frames, 1))))
            oy = int(round(32 + 28 * math.cos(2 * math.pi * fi / max(spec.n_frames, 1))))
            frame = bg[oy:oy + spec.height, ox:ox + spec.width].astype(np.float32)
            for a in apps:
                if not a["f0"] <= fi < a["f1"]:
                    continue
                t = (fi - a["f0"]) / max(a["f1"] - a["f0"] - 1, 1)
                path = a["path"]
                size = int(round(path["size"][0] * (1 - t) + path["size"][1] * t))
                x = int(round(path["start"][0] * (1 - t) + path["end"][0] * t))
                y = int(round(path["start"][1] * (1 - t) + path["end"][1] * t))
                x = min(max(x, 0), spec.width - size)
                y = min(max(y, 0), spec.height - size)
                src: _Source = a["_src"]
                h0, w0 = src.rgb.shape[:2]
                cx0, cy0 = (w0 - c) // 2, (h0 - c) // 2
                patch = src.rgb[cy0:cy0 + c, cx0:cx0 + c]
                tile = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
                if size not in feather_cache:
                    feather_cache[size] = _feather(size)
                al = feather_cache[size]
                region = frame[y:y + size, x:x + size]
                frame[y:y + size, x:x + size] = region * (1 - al) + tile * al
                sc = size / c
                b = (src.box - np.array([cx0, cy0, cx0, cy0])) * sc + np.array([x, y, x, y])
                rows.append({"frame": fi, "appearance": a["appearance"], "lane": a["lane"],
                             "identity": a["identity"], "known": a["known"], "masked": a["masked"],
                             "image_id": a["image_id"], "bbox": [float(v) for v in b],
                             "tile": [float(x), float(y), float(x + size), float(y + size)]})
            rgb = np.clip(frame, 0, 255).astype(np.uint8)
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    os.replace(tmp_video, video_path)

    from .manifest import provenance, write_json, write_parquet
    gt = pd.DataFrame(rows, columns=GT_COLUMNS)
    doc = {
        "spec": asdict(spec), "images_root": str(root), "n_frames": spec.n_frames,
        "gallery": {p: gallery[p] for p in known}, "known": known, "unknown": unknown,
        "masks_available": masker is not None, "masks_reason": why,
        "appearances": [{k: v for k, v in a.items() if not k.startswith("_")} for a in apps],
        "counts": {
            "faces": int(len(gt)), "known_faces": int(gt["known"].sum()) if len(gt) else 0,
            "unknown_faces": int((~gt["known"]).sum()) if len(gt) else 0,
            "masked_faces": int(gt["masked"].sum()) if len(gt) else 0,
            "appearances": len(apps), "masked_appearances": int(sum(a["masked"] for a in apps)),
        },
        "video": "video.mp4", "ground_truth": "ground_truth.parquet", "gallery_dir": "gallery",
    }
    write_parquet(gt, out / "ground_truth.parquet", provenance("testvideo", asdict(spec), {}))
    write_json(doc, out / "spec.json")
    log.info("test video: %d frames %dx%d @ %g fps, %d appearances (%d masked), %d gallery people, "
             "%d unknown people -> %s", spec.n_frames, spec.width, spec.height, spec.fps, len(apps),
             doc["counts"]["masked_appearances"], len(known), len(unknown), out)
    return doc


def read_ground_truth(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_parquet(path)


def read_spec(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / "spec.json").read_text())
