"""The gallery figure: every mask type in every wearing style on real faces, plus textures, colours and the
occlusion maps, for the report.

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

from . import landmarks as lmk
from . import render as rd
from . import stage as st
from . import textures as tx

SCALE = 2
LABEL_W = 118
HEAD_H = 30
CAP_H = 16
GAP = 4


def pick_faces(shard_paths: Sequence[str], cfg: st.MaskConfig, n: int, max_yaw: float = 20.0) -> list[dict]:
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
    chosen, seen = [], set()
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
        for it in st.read_aligned_shard(path):
            if it["image_id"] in set(want):
                items.append(it)
    items.sort(key=lambda it: hashlib.sha1(it["image_id"].encode()).hexdigest())
    faces = []
    for it in items:
        crop = st.decode_crop(it["png"])
        t5 = st.template_points(it.get("template"), crop.shape[:2])
        lm = st.landmark_crops(crop[None], lmk.face_box_from_points5(t5), cfg)[0]
        skip, yaw = st.face_checks(lm, crop.shape[:2], cfg, t5)
        if skip is None and abs(yaw) <= max_yaw:
            faces.append({"image_id": it["image_id"], "crop": crop, "lm": lm, "template5": t5})
        if len(faces) >= n:
            break
    return faces


def _cell(face: dict, cfg: st.MaskConfig, **force) -> tuple[np.ndarray, np.ndarray, str]:
    rec = st._blank(face["image_id"], "", 0, cfg)
    st.mask_one(face["crop"], face["lm"], face["image_id"], cfg, rec, template5=face["template5"],
                keep_arrays=True, **force)
    if rec["status"] != "ok":
        img = face["crop"].copy()
        return img, np.zeros(img.shape[:2], bool), f"skipped: {rec['skip']}"
    return rec["_image"], rec["_occlusion"], f"{rec['mask_color']}/{rec['mask_texture']}"


def _text(img, s, org, scale=0.42, color=(30, 30, 30), thick=1):
    cv2.putText(img, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def render_gallery(faces: list[dict], cfg: st.MaskConfig, out_path: str | Path,
                   title: Optional[str] = None) -> dict:
    """Write the gallery PNG; returns what is in it (cells: image ids and styles)."""
    if not faces:
        raise ValueError("no faces for the gallery")
    per_wear = 2
    cols = len(rd.WEARS) * per_wear
    h, w = faces[0]["crop"].shape[:2]
    ch, cw = h * SCALE, w * SCALE
    rows_spec = [(t, None) for t in rd.MASK_TYPES] + [("textures", None), ("colours", None), ("occlusion", None)]
    H = HEAD_H + len(rows_spec) * (ch + CAP_H + GAP) + (22 if title else 0)
    W = LABEL_W + cols * (cw + GAP)
    canvas = np.full((H, W, 3), 255, np.uint8)
    top = 22 if title else 0
    if title:
        _text(canvas, title, (6, 16), 0.5)
    for j in range(cols):
        wear = rd.WEARS[j // per_wear]
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
                wear = rd.WEARS[j // per_wear]
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    tmp.replace(out_path)
    info["size"] = [int(W), int(H)]
    info["faces"] = [f["image_id"] for f in faces]
    return info


def gallery(shard_paths: Sequence[str], cfg: st.MaskConfig, out_path: str | Path,
            title: Optional[str] = None) -> dict:
    """Pick faces from aligned shards and write the gallery."""
    n = len(rd.MASK_TYPES) * len(rd.WEARS) * 2 + 12
    faces = pick_faces(shard_paths, cfg, n)
    return render_gallery(faces, cfg, out_path, title)
