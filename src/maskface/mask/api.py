"""The single-image entry: :func:`mask_image` (one photo or aligned crop, in memory), the test video's
:func:`wearing_masker`, and the ``maskface mask`` command (:func:`cli_main`). Flow: api -> face -> render ->
kernels, as for the batch entry (:mod:`~maskface.mask.stage`), whose per-face steps these share.

Photos (the default) keep their original frame, as MaskTheFace does: faces are found with dlib's HOG
frontal-face detector (upsampling once for images up to 1000 px a side, as MaskTheFace calls it, not at all
above), each face gets its 68 landmarks from the detector's box and its own mask, drawn in place; the rest
of the photo is untouched. Exposure, colour cast, blur and noise are measured on each face's region.
``--aligned`` inputs are aligned crops instead (SphereFace 112x96 by default, ArcFace 112x112 when the crop
is square, any other size scaled from the template): no detector runs, the face box comes from the template
exactly as in the pipeline's mask stage.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from ..fileio import atomic_path
from . import landmarks as lmk
from . import textures as tx
from .config import MASK_TYPES, WEARS, MaskConfig
from .face import (MIN_SIDE, TEMPLATES, empty_record, hog_detector, landmark_crops, landmarker,
                   limit_threads, mark_skipped, mask_face, template_points, too_small)

log = logging.getLogger("maskface.mask")

@dataclass
class MaskResult:
    image: np.ndarray                      # (H, W, 3) uint8 RGB, masks drawn
    occlusion: np.ndarray                  # (H, W) bool, union over the masked faces
    faces: list = field(default_factory=list)   # one record per face (stage.MANIFEST_COLUMNS + box)
    status: str = "ok"                     # ok (>= 1 face masked) | no_face | skipped | error
    reason: str = ""

    @property
    def masked(self) -> bool:
        return self.status == "ok"


def _config(config: Any, seed: Optional[int]) -> MaskConfig:
    cfg = config if isinstance(config, MaskConfig) else MaskConfig.from_mapping(config or {})
    if seed is not None and seed != cfg.seed:
        cfg = replace(cfg, seed=int(seed))
    return cfg


def mask_image(rgb: np.ndarray, seed: Optional[int] = None, *, image_id: str = "", config: Any = None,
               aligned: bool = False, template: Optional[str] = None, mask_type: Optional[str] = None,
               wear: Optional[str] = None, color: Optional[str] = None, texture: Optional[str] = None,
               upsample: Optional[int] = None) -> MaskResult:
    """Draw a mask on every face of ``rgb`` (RGB uint8). Deterministic in (image_id, config, seed): the
    same call returns the same pixels. A photo without a detectable face comes back unchanged with
    ``status == "no_face"``; faces that cannot be masked correctly (profile, landmarks off the image) are
    left unchanged and recorded with ``status == "skipped"`` and a reason."""
    cfg = _config(config, seed)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got {rgb.shape}")
    force = dict(mask_type=mask_type, wear=wear, color=color, texture=texture)
    if aligned:
        return _mask_aligned(rgb, image_id, cfg, template, force)
    return _mask_photo(rgb, image_id, cfg, force, upsample)


def _mask_aligned(rgb, image_id, cfg, template, force) -> MaskResult:
    h, w = rgb.shape[:2]
    if template is None:
        template = "arcface_112x112" if h == w else "sphereface_112x96"
    rec = empty_record(image_id, "", 0, cfg.seed)
    rec["aligned_status"] = "ok"
    unchanged = np.zeros((h, w), bool)
    small = too_small((h, w))
    if small is not None:
        mark_skipped(rec, small)
        return MaskResult(rgb.copy(), unchanged, [rec], "skipped", rec["reason"])
    t5 = template_points(template, (h, w))
    lm = landmark_crops(rgb[None], lmk.face_box_from_points5(t5), cfg)[0]
    out = mask_face(rgb, lm, image_id, cfg, rec, template5=t5, force=force)
    if out is None:
        return MaskResult(rgb.copy(), unchanged, [_public(rec)], rec["status"], rec["reason"])
    return MaskResult(out.image, out.occlusion, [_public(rec)], "ok", "")


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("png", "occlusion")}


def _mask_photo(rgb, image_id, cfg, force, upsample) -> MaskResult:
    h, w = rgb.shape[:2]
    occ = np.zeros((h, w), bool)
    if min(h, w) < MIN_SIDE:
        return MaskResult(rgb.copy(), occ, [], "skipped", f"image {w}x{h} px is under {MIN_SIDE} px a side")
    up = upsample if upsample is not None else (1 if max(h, w) <= 1000 else 0)
    rects = hog_detector()(rgb, up)
    if not len(rects):
        return MaskResult(rgb.copy(), occ, [], "no_face", f"no face found by dlib's HOG detector (upsample {up})")
    boxes = sorted(([r.left(), r.top(), r.right(), r.bottom()] for r in rects),
                   key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    boxes = np.asarray(boxes, np.float64)
    lms = landmarker(cfg.landmarks)(lmk.intensity(rgb)[None].repeat(len(boxes), 0), boxes)
    out = rgb.copy()
    faces = []
    for k, (box, lm) in enumerate(zip(boxes, lms)):
        rec = empty_record(image_id, "", 0, cfg.seed)
        rec["aligned_status"] = None
        rec["face"] = k
        rec["box"] = [float(v) for v in box]
        faces.append(rec)
        res = mask_face(out, lm, f"{image_id}#face{k}", cfg, rec, region_stats=True, force=force)
        if res is not None:
            out = res.image
            occ |= res.occlusion
    n_ok = sum(1 for f in faces if f["status"] == "ok")
    if n_ok:
        return MaskResult(out, occ, faces, "ok", "")
    return MaskResult(out, occ, faces, "skipped", "; ".join(f["reason"] for f in faces))


# ------------------------------------------------------------------------------------ the test video

class MaskFailed(ValueError):
    """The mask stage could not mask this photograph (no face for its detector, profile, ...)."""


def wearing_masker(wear: Optional[str] = "proper") -> Callable[..., np.ndarray]:
    """``masker(rgb, seed, image_id="")``: the photograph with a mask drawn on its faces by :func:`mask_image`
    (type, colour and texture drawn deterministically from seed and image_id; ``wear`` forced unless None).
    The masker raises :class:`MaskFailed` when no face was masked."""
    def masker(rgb: np.ndarray, seed: int, image_id: str = "") -> np.ndarray:
        res = mask_image(rgb, seed=seed, image_id=image_id, **({"wear": wear} if wear else {}))
        if res.status != "ok":
            raise MaskFailed(f"{image_id or 'image'}: not masked ({res.status}: {res.reason})")
        if res.image.shape != rgb.shape or res.image.dtype != np.uint8:
            raise ValueError(f"mask_image returned {res.image.shape} {res.image.dtype} for a {rgb.shape} image")
        return res.image

    return masker


# ----------------------------------------------------------------------------------------------- CLI

_CLI_COLUMNS = ["image_id", "face", "status", "reason", "skip", "mask_type", "mask_color", "mask_texture",
                "wear", "coverage", "yaw_deg", "box", "landmarks68", "seed", "output"]


def _scan(inp: Path) -> list[tuple[str, Path]]:
    from ..imageio import IMAGE_EXTENSIONS
    if inp.is_dir():
        return [(f.relative_to(inp).as_posix(), f) for f in sorted(inp.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    return [(inp.name, inp)]


def _work_many(tasks: list[tuple]) -> list[list[dict]]:
    return [_work(t) for t in tasks]


def _work(args: tuple) -> list[dict]:
    image_id, src, dst, opts = args
    from ..imageio import ImageDecodeError, load_rgb
    base = {"image_id": image_id, "face": -1, "seed": opts["cfg"].seed, "output": None}
    try:
        rgb = load_rgb(src)
    except ImageDecodeError as exc:
        return [{**base, "status": exc.status, "reason": exc.reason}]
    except OSError as exc:
        return [{**base, "status": "unreadable", "reason": f"cannot read: {exc}"}]
    try:
        res = mask_image(rgb, image_id=image_id, config=opts["cfg"], aligned=opts["aligned"],
                         template=opts["template"], **opts["force"])
    except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
        log.warning("masking %s failed", image_id, exc_info=True)
        return [{**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}]
    dst = Path(dst)
    _write_image(dst, res.image)
    if opts["occlusion"]:
        ok, buf = cv2.imencode(".png", res.occlusion.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_BILEVEL, 1])
        _write_bytes(dst.with_name(dst.stem + "_occlusion.png"), buf)
    rows = []
    for f in res.faces or [{}]:
        row = {**base, "status": res.status, "reason": res.reason, "output": str(dst)}
        row.update({k: f.get(k) for k in _CLI_COLUMNS if k in f})
        row["face"] = f.get("face", 0 if opts["aligned"] else -1)
        rows.append(row)
    return rows


def _write_image(dst: Path, rgb: np.ndarray) -> None:
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    else:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"cannot encode {dst}")
    _write_bytes(dst, buf)


def _write_bytes(dst: Path, buf: np.ndarray) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_bytes(buf.tobytes())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="maskface mask",
        description="Draw synthetic face masks (from dlib's 68 landmarks) on an image or on every image of a "
                    "folder. Photos keep their frame: faces are found with dlib's HOG detector and every "
                    "face gets its own mask. With --aligned, inputs are aligned crops (SphereFace 112x96; "
                    "112x112 is taken as ArcFace) and no detector runs. Output: the masked image(s) as PNG "
                    "(or JPEG when OUTPUT ends in .jpg), and for a folder OUTPUT/masked.parquet with one row per "
                    "face (or per image without one). The same command and seed give identical pixels.")
    ap.add_argument("input", help="an image file or a folder (searched recursively)")
    ap.add_argument("output", help="output image file (for a file input) or folder")
    ap.add_argument("--type", dest="mask_type", choices=MASK_TYPES, help="mask type (default: drawn)")
    ap.add_argument("--wear", choices=WEARS, help="how the mask is worn (default: drawn)")
    ap.add_argument("--color", choices=sorted(tx.PALETTE), help="colour (default: drawn)")
    ap.add_argument("--texture", choices=tx.TEXTURES, help="texture (default: drawn)")
    ap.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    ap.add_argument("--aligned", action="store_true", help="inputs are aligned face crops")
    ap.add_argument("--template", choices=sorted(TEMPLATES), help="template of --aligned crops")
    ap.add_argument("--max-yaw", type=float, default=MaskConfig.defaults()["max_yaw_deg"],
                    help="skip faces turned further than this (degrees)")
    ap.add_argument("--occlusion", action="store_true", help="also write NAME_occlusion.png (1-bit) per image")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _run(tasks: list[tuple], jobs: int, progress: bool) -> list[dict]:
    """The rows of every task (:func:`_work`), in order, in ``jobs`` processes."""
    from tqdm import tqdm
    rows: list[dict] = []
    bar = tqdm(total=len(tasks), desc="mask", unit="img", disable=not progress, file=sys.stderr)
    try:
        if jobs <= 1 or len(tasks) < 2:
            limit_threads()
            for t in tasks:
                rows.extend(_work(t))
                bar.update(1)
        else:
            from ..workers import chunked, imap

            for rs in imap(_work_many, chunked(tasks, 8), jobs, initializer=limit_threads, what="mask"):
                for r in rs:
                    rows.extend(r)
                    bar.update(1)
    finally:
        bar.close()
    return rows


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        print(f"maskface mask: no such file or folder: {inp}", file=sys.stderr)
        return 2
    items = _scan(inp)
    if not items:
        print(f"maskface mask: no images under {inp}", file=sys.stderr)
        return 2
    single = inp.is_file()
    if single and out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        dests = [out]
        out_dir = out.parent
    else:
        out_dir = out
        dests = [out / Path(rel).with_suffix(".png") for rel, _ in items]
    cfg = MaskConfig.from_mapping({"seed": args.seed, "max_yaw_deg": args.max_yaw})
    force = {"mask_type": args.mask_type, "wear": args.wear, "color": args.color, "texture": args.texture}
    opts = {"cfg": cfg, "aligned": args.aligned, "template": args.template, "force": force,
            "occlusion": args.occlusion}
    tasks = [(rel, str(src), str(dst), opts) for (rel, src), dst in zip(items, dests)]
    t0 = time.perf_counter()
    rows = _run(tasks, args.jobs, not args.no_progress)
    dt = time.perf_counter() - t0
    images_ok = len({r["image_id"] for r in rows if r["status"] == "ok"})
    if not single:
        import pandas as pd
        from ..manifest import provenance, write_parquet
        df = pd.DataFrame([{c: r.get(c) for c in _CLI_COLUMNS} for r in rows], columns=_CLI_COLUMNS)
        write_parquet(df, out_dir / "masked.parquet",
                      provenance("mask_cli", cfg.result_params(), {}, input=str(inp), forced=force))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{len(tasks)} image(s) in {dt:.1f} s: {images_ok} masked; face/image statuses {counts}; "
          f"output in {out if single else out_dir}")
    if single and rows and rows[0]["status"] != "ok":
        print(f"maskface mask: {rows[0]['status']}: {rows[0]['reason']}", file=sys.stderr)
        return 1
    return 0
