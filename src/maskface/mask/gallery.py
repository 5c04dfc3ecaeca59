"""The gallery figure: every mask type in every wearing style on real faces, plus textures, colours and the
occlusion maps, for the report. Reads aligned shards through :mod:`~maskface.mask.stage` and masks each cell
with the per-face steps of :mod:`~maskface.mask.face`, as the stage does.

Faces are picked deterministically from aligned shards: crops with aligned status ``ok`` whose landmarks
pass the stage's checks with |yaw| <= 20 deg, one per identity, in the order of sha1(image_id). Each cell is
the mask stage's own output for that face with the type and wear (and, in the texture / colour rows, the
texture / colour) imposed; the other choices are the image's own draws under the config. Cells are shown
at 2x (bilinear).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import pyarrow.parquet as pq

from ..fileio import atomic_path
from . import landmarks as lmk
from . import textures as tx
from .config import MASK_TYPES, WEARS, MaskConfig
from .face import empty_record, face_checks, landmark_crops, mask_face, template_points
from .stage import decode_crop, read_aligned_shard

SCALE = 2
LABEL_W = 118
HEAD_H = 30
CAP_H = 16
GAP = 4


def pick_faces(shard_paths: Sequence[str], cfg: MaskConfig, n: int, max_yaw: float = 20.0) -> list[dict]:
    """``n`` aligned faces for the gallery (see module doc): dicts with image_id, crop, lm, template5."""
    cands = []
    for path in shard_paths:
        t = pq.read_table(path, columns=[c for c in ("image_id", "identity", "status", "template")
                                          if c in pq.read_schema(path).names])
        ids = t.column("image_id").to_pylist()
        idents = t.column("identity").to_pylist() if "identity" in t.column_names else ids
        stats = t.column("status").to_pylist() if "status" in t.column_names else ["ok"] * len(ids)
        for i, (iid, ident, s) in enumerate(zip(ids, idents, stats)):
            if s == "ok":
                cands.append((hashlib.sha1(iid.encode()).hexdigest(), iid, ident, path))
        if len(cands) >= 20 * n:
            break
    cands.sort()
    seen = set()
    by_path: dict[str, list] = {}
    for _, iid, ident, path in cands:
        if ident in seen:
            continue
        seen.add(ident)
        by_path.setdefault(path, []).append(iid)
        if sum(len(v) for v in by_path.values()) >= 3 * n:
            break
    items = []
    for path, want in by_path.items():
        for it in read_aligned_shard(path):
            if it["image_id"] in set(want):
                items.append(it)
    items.sort(key=lambda it: hashlib.sha1(it["image_id"].encode()).hexdigest())
    faces = []
    for it in items:
        crop = decode_crop(it["png"])
        t5 = template_points(it.get("template"), crop.shape[:2])
        lm = landmark_crops(crop[None], lmk.face_box_from_points5(t5), cfg)[0]
        skip, yaw = face_checks(lm, crop.shape[:2], cfg, t5)
        if skip is None and abs(yaw) <= max_yaw:
            faces.append({"image_id": it["image_id"], "crop": crop, "lm": lm, "template5": t5})
        if len(faces) >= n:
            break
    return faces


def _cell(face: dict, cfg: MaskConfig, **force) -> tuple[np.ndarray, np.ndarray, str]:
    rec = empty_record(face["image_id"], "", 0, cfg.seed)
    out = mask_face(face["crop"], face["lm"], face["image_id"], cfg, rec, template5=face["template5"], force=force)
    if out is None:
        img = face["crop"].copy()
        return img, np.zeros(img.shape[:2], bool), f"skipped: {rec['skip']}"
    return out.image, out.occlusion, f"{rec['mask_color']}/{rec['mask_texture']}"


def _text(img, s, org, scale=0.42, color=(30, 30, 30), thick=1):
    cv2.putText(img, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def render_gallery(faces: list[dict], cfg: MaskConfig, out_path: str | Path,
                   title: Optional[str] = None) -> dict:
    """Write the gallery PNG; returns what is in it (cells: image ids and styles)."""
    if not faces:
        raise ValueError("no faces for the gallery")
    per_wear = 2
    cols = len(WEARS) * per_wear
    h, w = faces[0]["crop"].shape[:2]
    ch, cw = h * SCALE, w * SCALE
    rows_spec = [(t, None) for t in MASK_TYPES] + [("textures", None), ("colours", None), ("occlusion", None)]
    H = HEAD_H + len(rows_spec) * (ch + CAP_H + GAP) + (22 if title else 0)
    W = LABEL_W + cols * (cw + GAP)
    canvas = np.full((H, W, 3), 255, np.uint8)
    top = 22 if title else 0
    if title:
        _text(canvas, title, (6, 16), 0.5)
    for j in range(cols):
        wear = WEARS[j // per_wear]
        _text(canvas, wear, (LABEL_W + j * (cw + GAP) + 6, top + HEAD_H - 9), 0.5)
    info = {"cells": []}
    k = 0
    first_row_occ = []
    for r, (row, _) in enumerate(rows_spec):
        y = top + HEAD_H + r * (ch + CAP_H + GAP)
        label = {"textures": "cloth:", "colours": "kn95:", "occlusion": "occlusion"}.get(row, row)
        _text(canvas, label, (6, y + ch // 2), 0.55)
        if row == "textures":
            _text(canvas, "textures", (6, y + ch // 2 + 20), 0.55)
        if row == "colours":
            _text(canvas, "colours", (6, y + ch // 2 + 20), 0.55)
        if row == "occlusion":
            _text(canvas, "maps of", (6, y + ch // 2 + 20), 0.45)
            _text(canvas, "row 1", (6, y + ch // 2 + 38), 0.45)
        for j in range(cols):
            x = LABEL_W + j * (cw + GAP)
            if row == "occlusion":
                occ = first_row_occ[j]
                img = np.repeat((occ.astype(np.uint8) * 255)[..., None], 3, axis=2)
                cap = f"coverage {occ.mean():.2f}"
            else:
                face = faces[k % len(faces)]
                k += 1
                wear = WEARS[j // per_wear]
                if row == "textures":
                    force = {"mask_type": "cloth", "wear": "proper", "texture": tx.TEXTURES[j % len(tx.TEXTURES)]}
                elif row == "colours":
                    cl = ("white", "black", "pink", "light_blue", "grey", "navy")
                    force = {"mask_type": "kn95", "wear": "proper", "color": cl[j % len(cl)], "texture": "solid"}
                else:
                    force = {"mask_type": row, "wear": wear}
                img, occ, cap = _cell(face, cfg, **force)
                if r == 0:
                    first_row_occ.append(occ)
                info["cells"].append({"row": row, "col": j, "image_id": face["image_id"], **force, "style": cap})
            big = cv2.resize(img, (cw, ch), interpolation=cv2.INTER_LINEAR)
            canvas[y:y + ch, x:x + cw] = big
            _text(canvas, cap[:30], (x + 2, y + ch + 12), 0.38, (70, 70, 70))
    ok, buf = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(buf.tobytes())
    info["size"] = [int(W), int(H)]
    info["faces"] = [f["image_id"] for f in faces]
    return info


def gallery(shard_paths: Sequence[str], cfg: MaskConfig, out_path: str | Path,
            title: Optional[str] = None) -> dict:
    """Pick faces from aligned shards and write the gallery."""
    n = len(MASK_TYPES) * len(WEARS) * 2 + 12
    faces = pick_faces(shard_paths, cfg, n)
    return render_gallery(faces, cfg, out_path, title)
