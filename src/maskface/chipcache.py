"""Training inputs of a chip network (dlib's face ResNet and its fine-tunes, ``train.init``): the 150x150 chips
of a dataset cut once, exactly as the evaluation cuts them, and the activations of the network's frozen part.
The training that reads them is maskface.train (data: maskface.train_data); the fold evaluation
(maskface.foldeval) reads the chips.

Chips (``build_chip_cache``)
    ``results/train_cache/{dataset}/chips-{variant}.npy``: (N, 150, 150, 3) uint8 RGB, and ``.parquet``
    mapping image_id to row. Every image of the aligned manifest with a crop or a box, cut by the evaluation's
    own code (maskface.features: the stage-1 MTCNN box mapped to dlib's convention, dlib's 5 landmarks in it,
    ``get_face_chip(150, 0.25)``; no detection: the centred fallback box). ``masked``: the same photo with
    the mask stage's mask redrawn in it first (``MaskedSourceLoader``), as the evaluation's masked variant; an
    image the mask stage skipped has no masked chip. With ``train.mask_variants`` V > 1 the masked cache holds
    V chips per image, variant after variant (index column ``variant``): the stage's own mask (0, the only one
    the evaluation uses: :func:`stage_masks`) and V - 1 masks drawn afresh on the same landmarks
    (:func:`restyled`). Chips are cut in worker processes.

Frozen prefix (``build_prefix_cache``)
    ``results/train_cache/{dataset}/prefix-{variant}.npy``: (N, 2, C, H, W) float16, the output of the stem
    and the first ``train.frozen_blocks`` residual blocks for each chip and for its mirror image (index 1), so
    the random flip of training picks a row instead of running the frozen layers again.

``load_init`` reads the network ``train.init`` names (``dlib-resnet`` or a maskface-embedder checkpoint of it).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from .fileio import atomic_path
from .manifest import write_parquet

CHIP_SHAPE = (150, 150, 3)
CHIP_INPUT_KIND = "source_chip"
log = logging.getLogger("maskface.chipcache")


# ------------------------------------------------------------------------------------------ the network

def load_init(init: str, device: str = "cpu"):
    """(DlibResnet in eval mode, its input normalisation {"mean", "std"}) of ``train.init``: ``dlib-resnet``
    (dlib's model file) or a maskface-embedder checkpoint of that network."""
    import torch

    from .dlibnet import DlibResnet
    from .features import load_checkpoint

    if init == "dlib-resnet":
        net = DlibResnet.from_dlib_file().to(device)
        return net, {"mean": [float(v) for v in net.input_mean], "std": [256.0] * 3}
    if not os.path.exists(init):
        raise FileNotFoundError(f"train.init: {init!r} is neither dlib-resnet nor an existing checkpoint file")
    net, meta = load_checkpoint(init, device)
    inp = meta["input"]
    if not isinstance(net, DlibResnet) or (int(inp["height"]), int(inp["width"])) != CHIP_SHAPE[:2]:
        raise ValueError(f"train.init: {init} is not a checkpoint of dlib's 150x150 chip network "
                         f"(arch {type(net).__name__}, input {inp['height']}x{inp['width']}); a SphereFace model "
                         f"cannot start a chip run")
    if inp["channel_order"] != "RGB":
        raise ValueError(f"train.init: {init}: channel order {inp['channel_order']}, expected RGB")
    with torch.no_grad():
        net.input_mean.copy_(torch.tensor(inp["mean"], dtype=torch.float32))
    if any(float(s) != 256.0 for s in inp["std"]):
        raise ValueError(f"train.init: {init}: input std {inp['std']}, dlib's network divides by 256")
    return net, {"mean": [float(v) for v in inp["mean"]], "std": [float(v) for v in inp["std"]]}


def save_chip_model(path: str | os.PathLike, net, normalisation: Mapping[str, Any], meta: Mapping[str, Any],
                    feature_center: Optional[Any] = None,
                    eval: Optional[Mapping[str, Any]] = None) -> None:  # noqa: A002 - the checkpoint's key
    """A chip network (dlib's, or one trained from it) as a maskface-embedder checkpoint (what ``embedder:
    dlib-resnet`` with a ``checkpoint`` loads): the whole network, dlib's chip input, scored as ``eval`` says
    (default: cosine with mean subtraction, as a fine-tuned network is). ``feature_center``: the mean training
    descriptor, subtracted by the network itself (so that plain cosine, as the demo scores, works too)."""
    from .dlibnet import DlibResnet
    from .features import save_checkpoint

    center = None if feature_center is None else [float(v) for v in feature_center]
    full = DlibResnet(feature_center=center)
    full.load_state_dict(net.state_dict())
    save_checkpoint(path, full, arch="maskface.dlibnet:DlibResnet",
                    arch_kwargs={"feature_center": center} if center else {}, feature_dim=128,
                    input={"kind": CHIP_INPUT_KIND, "height": 150, "width": 150, "channel_order": "RGB",
                           "mean": [float(v) for v in normalisation["mean"]],
                           "std": [float(v) for v in normalisation["std"]],
                           "chip": {"landmarks": "dlib shape_predictor_5", "size": 150, "padding": 0.25}},
                    template="dlib_chip_150_padding_0.25",
                    eval=dict(eval or {"mean_subtraction": True, "metric": "cosine"}), meta=dict(meta))


# ---------------------------------------------------------------------------------------------- chips

def open_chips(npy_path: str | os.PathLike, index_path: str | os.PathLike) -> tuple[np.ndarray, pd.DataFrame]:
    arr = np.load(npy_path, mmap_mode="r")
    index = pd.read_parquet(index_path)
    if arr.shape[1:] != CHIP_SHAPE or len(arr) != len(index):
        raise ValueError(f"{npy_path}: shape {arr.shape} does not match its index ({len(index)} rows) or 150x150x3")
    return arr, index


def restyled(load, k: int):
    """A masked-source loader (maskface.features.MaskedSourceLoader) for the same faces and landmarks with masks
    of another draw: type, wear, colour, texture and every shape parameter drawn afresh from mask seed + ``k``
    (``k`` >= 1; ``train.mask_variants``). ``load`` itself draws the mask stage's own masks (``k`` = 0)."""
    from dataclasses import replace

    from .features import MaskedSourceLoader

    masks = {i: {**m, "mask_type": None, "wear": None, "mask_color": None, "mask_texture": None}
             for i, m in load.masks.items()}
    return MaskedSourceLoader(load.images_root, load.bboxes, masks, replace(load.cfg, seed=load.cfg.seed + int(k)))


def stage_masks(index: pd.DataFrame) -> pd.DataFrame:
    """The rows of a chip (or prefix) cache index that hold the mask stage's own masks (variant 0): what the
    evaluation's masked variant is; a cache without variants is returned as it is."""
    return index[index["variant"] == 0] if "variant" in index.columns else index


def build_chip_cache(npy_path: str | os.PathLike, index_path: str | os.PathLike, *, images_root: str,
                     aligned: str | os.PathLike, variant: str, masked: Optional[str | os.PathLike] = None,
                     mask_settings: Optional[Mapping[str, Any]] = None, variants: int = 1, workers: int = 1,
                     chunk: int = 128, prov: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
    """Cut every usable image's chip (see the module docstring) into ``npy_path`` + ``index_path`` (image_id,
    identity, status, face: the box it was cut in, row). ``variants`` (masked only): that many masked chips per
    image, the mask stage's own (variant 0) and ``variants - 1`` redrawn (:func:`restyled`), stored variant
    after variant, with a ``variant`` column in the index."""
    from .features import ChipCutter, chip_batches, face_loader, usable_faces
    from .workers import chunked

    variants = int(variants)
    if variants < 1 or (variants > 1 and variant != "masked"):
        raise ValueError(f"variants {variants}: at least 1, and more than 1 for the masked chips only")
    table = pd.read_parquet(aligned, columns=["image_id", "identity", "status", "bbox", "transform"])
    usable = usable_faces(table, None, log)
    cutter = ChipCutter()
    masked_rows = None
    if variant == "masked":
        masked_rows = pd.read_parquet(masked, columns=[
            "image_id", "status", "mask_type", "mask_color", "mask_texture", "wear", "landmarks68"])
    ids, load = face_loader(cutter, variant, usable, log, images_root=images_root, masked=masked_rows,
                            mask_settings=mask_settings)
    loads = [load] + [restyled(load, k) for k in range(1, variants)]
    n = len(ids)
    faces = []
    with atomic_path(npy_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(variants * n,) + CHIP_SHAPE)
        for k, ld in enumerate(loads):
            what = variant if k == 0 else f"{variant} {k}"
            for chips, src in chip_batches(cutter.cutter_settings(), chunked(ids, chunk), ld, workers,
                                           f"chips ({what})"):
                arr[len(faces):len(faces) + len(src)] = chips
                faces.extend(src)
                done = len(faces) - k * n
                if done % (20 * chunk) < chunk or done == n:
                    log.info("%s chips: %d/%d", what, done, n)
        arr.flush()
        del arr
    ident = dict(zip(usable["image_id"], usable["identity"].astype(str)))
    status = dict(zip(usable["image_id"], usable["status"].astype(str)))
    index = pd.DataFrame({"image_id": ids * variants, "identity": [ident[i] for i in ids] * variants,
                          "status": [status[i] for i in ids] * variants, "face": faces,
                          "row": np.arange(variants * n, dtype=np.int64)})
    if variants > 1:     # one variant: the index (and so a run's spec digest) as it was before variants
        index.insert(4, "variant", np.repeat(np.arange(variants, dtype=np.int16), n))
    write_parquet(index, index_path, {**(prov or {}), "cutter": cutter.cutter_settings()} if prov else None)
    return index


# ------------------------------------------------------------------------------------- frozen prefix

def build_prefix_cache(chips: tuple[str, str], npy_path: str | os.PathLike, index_path: str | os.PathLike, *,
                       init: str, frozen_blocks: int, device: str = "auto", batch_size: int = 64,
                       threads: int = 2, prov: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
    """The frozen part's activations (module docstring) of every chip in ``chips`` (npy, index)."""
    import torch

    from .devices import describe, precision_policy, resolve_device

    torch.set_num_threads(max(1, int(threads)))
    dev = torch.device(resolve_device(device, "train.device"))
    precision_policy(dev)
    log.info("prefix cache of %s (%d frozen blocks): %s", init, int(frozen_blocks), describe(dev))
    net, _ = load_init(init, str(dev))
    arr, index = open_chips(*chips)
    shape = net.prefix_shape(int(frozen_blocks))
    with atomic_path(npy_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(arr), 2) + shape)
        with torch.inference_mode():
            for s in range(0, len(arr), batch_size):
                c = np.asarray(arr[s:s + batch_size])
                for m, batch in enumerate((c, np.ascontiguousarray(c[:, :, ::-1]))):
                    h = net.prefix(net.to_input(batch).to(dev), int(frozen_blocks))
                    out[s:s + len(c), m] = h.half().cpu().numpy()
                if (s // batch_size) % 40 == 0:
                    log.info("prefix (%d blocks): %d/%d", frozen_blocks, s + len(c), len(arr))
        out.flush()
        del out
    write_parquet(index, index_path, prov)
    return index
