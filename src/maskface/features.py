"""Feature extraction behind one interface: :class:`Embedder`, a registry, and two implementations.

``dlib-resnet`` (:class:`DlibResnetEmbedder`)
    dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``, 128-d) as the reference
    model that anchors the protocol. It is fed from its own 5-point alignment: dlib's 5-point shape predictor
    runs inside the face rectangle, ``dlib.get_face_chip`` (150x150, padding 0.25) cuts the chip, the ResNet
    computes the descriptor. The rectangle comes from our MTCNN detection (stage 1), converted to the box
    convention dlib's predictor was trained on (its HOG detector's boxes: see :data:`MTCNN_TO_DLIB`); an image
    without a detection gets a centred fallback box (:func:`center_box`), never a dropped pair.
    Evaluation defaults: Euclidean distance, no mean subtraction (the descriptor is metric-learned for
    Euclidean distance, threshold 0.6). ``flip=True`` averages the descriptors of the chip and of its mirror
    image (SphereFace's flip trick, "sum" fusion; twice the cost); ``num_jitters`` is dlib's own averaging
    over randomly jittered copies (0 or 1: none).

``sphereface`` (:class:`SphereFaceEmbedder`)
    A checkpoint of the training stage on the 112x96 aligned crops (never re-aligned: a reproduction trap).
    Feature = concatenation (``flip="concat"``, default, as evaluation.m) or sum (``"sum"``) of the features
    of the image and of its horizontal flip, or the image's alone (``"none"``). Batched, on CUDA when present.
    Evaluation defaults: cosine with mean subtraction (evaluation.m).

Checkpoint format (``maskface-embedder/1``), either of:

1. ``torch.save`` of a dict (loaded with ``torch.load(weights_only=True)``: plain types and tensors only)::

       {"format": "maskface-embedder/1",
        "arch": "sphere20a",                 # a name registered with register_arch(), or "module:callable"
        "arch_kwargs": {...},                # keyword arguments of the builder
        "state_dict": model.state_dict(),    # loaded with strict=True
        "input": {"height": 112, "width": 96,
                  "channel_order": "RGB",    # order of the channels the network was trained on: RGB | BGR
                  "mean": [127.5, 127.5, 127.5], "std": [128.0, 128.0, 128.0]},  # (pixel 0..255 - mean) / std,
                                                                                   # per channel, in channel_order
        "feature_dim": 512,                  # size of the network's output vector
        "template": "sphereface_112x96",     # the alignment template the crops must come from
        "eval": {"mean_subtraction": true, "metric": "cosine"},  # optional protocol settings
        "meta": {...}}                       # optional: anything (training run, iteration, ...)

2. a TorchScript archive (``torch.jit.save(scripted, path, _extra_files={"maskface.json": json.dumps(meta)})``)
   whose ``maskface.json`` holds the same keys less ``arch``, ``arch_kwargs`` and ``state_dict``.

:func:`save_checkpoint` writes form 1 and :func:`load_checkpoint` reads both. The network maps a float tensor
(N, 3, height, width) to (N, feature_dim).

Features Parquet (:func:`write_features` / :func:`features_frame`): one row per (``image_id``, ``variant``),
``variant`` = ``clean`` | ``masked``; ``feature`` is a fixed-size list of float32 (128 for dlib, 1024 for
SphereFace's concatenated 512 + 512, 512 with ``flip="sum"``); ``face`` says where the face came from
(``mtcnn``, ``fallback_center``, ``aligned``). The embedder's name, settings and evaluation defaults are in
the provenance record (``extra.embedder``).
"""
from __future__ import annotations

import importlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .evaluate import ProtocolSettings
from .devices import resolve_device
from .fileio import atomic_path

CHECKPOINT_FORMAT = "maskface-embedder/1"
VARIANTS = ("clean", "masked")


@dataclass
class FaceInput:
    """One face to embed: an RGB uint8 image and, for embedders working on source images, where the face is.

    ``bbox``: (x1, y1, x2, y2) in MTCNN's convention, source coordinates, or None (no detection);
    ``landmarks5``: 10 floats (left eye, right eye, nose, left mouth, right mouth as x, y) or None.
    """
    image: np.ndarray
    bbox: Optional[Sequence[float]] = None
    landmarks5: Optional[Sequence[float]] = None


class Embedder(ABC):
    """Maps faces to feature vectors.

    ``input_kind`` is ``"source"`` (whole source image + MTCNN box / landmarks) or ``"aligned"`` (the aligned
    crops of stage 1). ``eval_settings`` are the protocol settings this feature is meant to be scored with.
    """
    name: ClassVar[str] = ""
    input_kind: ClassVar[str] = "source"
    uses_device: ClassVar[bool] = False         # takes a ``device`` (runs a torch network)
    needs_checkpoint: ClassVar[bool] = False
    dim: int
    eval_settings: ProtocolSettings

    @abstractmethod
    def embed(self, faces: Sequence[FaceInput]) -> np.ndarray:
        """(len(faces), dim) float32."""

    def face_source(self, face: FaceInput) -> str:
        """How the face was located, for the ``face`` column."""
        if self.input_kind == "aligned":
            return "aligned"
        return "mtcnn" if face.bbox is not None else "fallback_center"

    def describe(self) -> dict:
        """Name, settings and evaluation defaults (goes into the features' provenance)."""
        return {"name": self.name, "input_kind": self.input_kind, "dim": self.dim,
                "eval": self.eval_settings.to_dict()}


EMBEDDERS: dict[str, type] = {}


def embedder_from_model(mcfg: Mapping[str, Any], device: str = "auto", **extra):
    """An embedder from an ``evaluate.models`` entry ({embedder, checkpoint, options}); ``device`` goes to the
    embedders that run a torch network (``uses_device``); ``extra``: further keyword arguments."""
    cls = EMBEDDERS.get(mcfg["embedder"])
    kwargs = dict(mcfg.get("options") or {})
    if cls is not None and cls.needs_checkpoint and not mcfg.get("checkpoint"):
        raise ValueError(f"a {mcfg['embedder']} model needs a checkpoint")
    if mcfg.get("checkpoint"):
        kwargs["checkpoint"] = mcfg["checkpoint"]
    if cls is not None and cls.uses_device:
        kwargs["device"] = device
    return make_embedder(mcfg["embedder"], **kwargs, **extra)


def register_embedder(cls):
    EMBEDDERS[cls.name] = cls
    return cls


def make_embedder(name: str, **kwargs) -> Embedder:
    if name not in EMBEDDERS:
        raise KeyError(f"unknown embedder {name!r}; known: {sorted(EMBEDDERS)}")
    emb = EMBEDDERS[name](**kwargs)
    emb.spec = (name, dict(kwargs))   # how to build it again, e.g. in a worker process (embed_all workers)
    return emb


# ------------------------------------------------------------------------------------------------ dlib

# dlib's 5-point predictor was trained on the boxes of dlib's HOG detector, which are squarer and lower than
# MTCNN's (MTCNN's include the forehead). Measured on 400 deep-funneled LFW images found by both, the HOG box
# in units of the MTCNN box (x from its left edge / width, y from its top / height) is on average
# x1 -0.096, y1 0.116, x2 1.042, y2 0.969. On 301 further images, the predictor's 5 points from the converted
# box differ from those it gives on dlib's own box by 0.8% of the outer eye-corner distance on average (median 0.3%);
# from the raw MTCNN box by 1.5% (median 0.9%).
MTCNN_TO_DLIB = (-0.096, 0.116, 1.042, 0.969)


def mtcnn_to_dlib_box(bbox: Sequence[float], mapping: Sequence[float] = MTCNN_TO_DLIB) -> tuple:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    w, h = x2 - x1, y2 - y1
    return (x1 + mapping[0] * w, y1 + mapping[1] * h, x1 + mapping[2] * w, y1 + mapping[3] * h)


def center_box(height: int, width: int, frac_w: float = 0.37, frac_h: float = 0.49) -> tuple:
    """An MTCNN-convention box centred in the image, for images without a detection. Default fractions: the
    mean MTCNN face box of deep-funneled LFW (about 93 x 123 px in 250 x 250, centred)."""
    cx, cy = width / 2.0, height / 2.0
    w, h = frac_w * width, frac_h * height
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


class DlibChipEmbedder(Embedder):
    """Embedders of dlib's face chips: dlib's 5-point landmarks inside the (converted) MTCNN box, then
    ``get_face_chip(img, shape, 150, 0.25)``, as dlib's face recognition example does. Chips are cut for a
    batch of faces, the network sees the batch; with ``flip`` the mirrored chips are a second batch and the
    descriptor is the mean of the two. Subclasses give the network (:meth:`describe_chips_raw`)."""
    input_kind = "source"

    def __init__(self, chip_size: int = 150, padding: float = 0.25,
                 box_mapping: Optional[Sequence[float]] = MTCNN_TO_DLIB, batch_size: int = 64,
                 flip: bool = False, eval_settings: Optional[Mapping[str, Any]] = None):
        import dlib

        from .resources import dlib_model_path

        self._dlib = dlib
        self.predictor = dlib.shape_predictor(str(dlib_model_path("shape_predictor_5")))
        self.chip_size = int(chip_size)
        self.padding = float(padding)
        self.box_mapping = tuple(box_mapping) if box_mapping is not None else None
        self.batch_size = int(batch_size)
        self.flip = bool(flip)
        self.dim = 128
        self.eval_settings = ProtocolSettings.from_dict(
            eval_settings or {"mean_subtraction": False, "metric": "euclidean"})

    def rectangle(self, face: FaceInput):
        h, w = face.image.shape[:2]
        box = face.bbox if face.bbox is not None else center_box(h, w)
        if self.box_mapping is not None:
            box = mtcnn_to_dlib_box(box, self.box_mapping)
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        return self._dlib.rectangle(x1, y1, x2, y2)

    def chip(self, face: FaceInput) -> np.ndarray:
        """dlib's aligned chip of the face (its own 5-point alignment inside the rectangle), 150x150 RGB."""
        img = np.ascontiguousarray(face.image, dtype=np.uint8)
        shape = self.predictor(img, self.rectangle(face))
        chip = self._dlib.get_face_chip(img, shape, size=self.chip_size, padding=self.padding)
        if self.chip_size != 150:  # the network wants 150x150 chips
            import cv2

            chip = cv2.resize(chip, (150, 150), interpolation=cv2.INTER_LINEAR)
        return chip

    def chips(self, faces: Sequence[FaceInput]) -> np.ndarray:
        """(N, 150, 150, 3) uint8 chips of a batch of faces."""
        return np.stack([self.chip(f) for f in faces]) if len(faces) else np.zeros((0, 150, 150, 3), np.uint8)

    def embed(self, faces: Sequence[FaceInput]) -> np.ndarray:
        return self.describe_chip_batches(self.chips(faces))

    def describe_chip_batches(self, chips: np.ndarray) -> np.ndarray:
        """:meth:`describe_chips` of many chips, ``batch_size`` at a time."""
        chips = np.asarray(chips)
        out = np.zeros((len(chips), self.dim), dtype=np.float32)
        for s in range(0, len(chips), self.batch_size):
            out[s:s + self.batch_size] = self.describe_chips(chips[s:s + self.batch_size])
        return out

    def cutter_settings(self) -> dict:
        """What a :class:`ChipCutter` needs to cut the same chips."""
        return {"chip_size": self.chip_size, "padding": self.padding, "box_mapping": self.box_mapping}

    def describe_chips(self, chips: np.ndarray) -> np.ndarray:
        """Descriptors of 150x150 chips; with ``flip`` the mean of the chip's and its mirror image's."""
        desc = self.describe_chips_raw(chips)
        if self.flip:
            desc = (desc + self.describe_chips_raw(np.ascontiguousarray(np.asarray(chips)[:, :, ::-1]))) / 2.0
        return desc

    @abstractmethod
    def describe_chips_raw(self, chips: np.ndarray) -> np.ndarray:
        """(N, 128) float32 descriptors of (N, 150, 150, 3) uint8 chips."""

    def describe(self) -> dict:
        d = super().describe()
        d.update(flip=self.flip, chip_size=self.chip_size, padding=self.padding,
                 box_mapping=list(self.box_mapping) if self.box_mapping else None,
                 predictor="shape_predictor_5_face_landmarks.dat")
        return d


class ChipCutter(DlibChipEmbedder):
    """The chip-cutting half of a dlib chip embedder (landmarks and ``get_face_chip``, no network): run in
    worker processes that feed a GPU, whose network is far faster than one core cuts chips."""

    def describe_chips_raw(self, chips: np.ndarray) -> np.ndarray:  # pragma: no cover - never called
        raise NotImplementedError("a ChipCutter cuts chips only")


@register_embedder
class DlibLibraryEmbedder(DlibChipEmbedder):
    """dlib's face recognition network run by dlib itself (``face_recognition_model_v1``): one chip at a time
    on the CPU, with dlib's optional jitter. The reference the torch module (``dlib-resnet``) is checked
    against; selectable as ``embedder: dlib``."""
    name = "dlib"

    def __init__(self, num_jitters: int = 0, **kwargs):
        super().__init__(**kwargs)
        from .resources import dlib_model_path

        self.model = self._dlib.face_recognition_model_v1(str(dlib_model_path("face_recognition_resnet")))
        self.num_jitters = int(num_jitters)

    def describe_chips_raw(self, chips: np.ndarray) -> np.ndarray:
        if not len(chips):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray([np.asarray(d) for d in self.model.compute_face_descriptor(list(chips), self.num_jitters)],
                          dtype=np.float32)

    def describe(self) -> dict:
        d = super().describe()
        d.update(num_jitters=self.num_jitters, backend="dlib", model="dlib_face_recognition_resnet_model_v1.dat")
        return d


@register_embedder
class DlibResnetEmbedder(DlibChipEmbedder):
    """dlib's face recognition ResNet as a torch module (:mod:`maskface.dlibnet`), its weights read from
    dlib's own model file, or from a ``maskface-embedder/1`` checkpoint of it (``checkpoint``; see
    :func:`save_dlib_resnet_checkpoint`). Batched, on the CPU or a GPU; the same chips as ``dlib``."""
    name = "dlib-resnet"
    uses_device = True

    def __init__(self, device: str = "auto", checkpoint: Optional[str | os.PathLike] = None,
                 model_file: Optional[str | os.PathLike] = None, num_jitters: int = 0, **kwargs):
        if num_jitters:
            raise ValueError("num_jitters is dlib's own random jitter: use embedder: dlib for it")
        super().__init__(**kwargs)
        import torch

        from .devices import precision_policy
        from .dlibnet import DlibResnet

        self.device = resolve_device(device, "evaluate.device")
        self.precision = precision_policy(self.device)      # features in true fp32 on a GPU
        self.checkpoint = str(checkpoint) if checkpoint else None
        if self.checkpoint:
            self.net, meta = load_checkpoint(self.checkpoint, self.device)
            inp = meta["input"]
            if (int(inp["height"]), int(inp["width"]), inp["channel_order"]) != (150, 150, "RGB"):
                raise ValueError(f"{self.checkpoint}: not a 150x150 RGB chip network (input {inp})")
            self.mean = torch.tensor(inp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
            self.std = torch.tensor(inp["std"], dtype=torch.float32).view(1, 3, 1, 1)
            self.source = self.checkpoint
        else:
            self.net = DlibResnet.from_dlib_file(model_file).to(self.device).eval()
            self.mean = self.net.input_mean.detach().cpu().view(1, 3, 1, 1)
            self.std = torch.full((1, 3, 1, 1), 256.0)
            self.source = str(model_file) if model_file else "dlib_face_recognition_resnet_model_v1.dat"

    def describe_chips_raw(self, chips: np.ndarray) -> np.ndarray:
        import torch

        if not len(chips):
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            x = torch.as_tensor(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).to(torch.float32)
            x = ((x - self.mean) / self.std).to(self.device)     # dlib/dnn/input.h: (pixel - avg) / 256, RGB
            return self.net(x).float().cpu().numpy()

    def describe(self) -> dict:
        d = super().describe()
        d.update(backend="torch", device=self.device, precision=self.precision, model=self.source)
        return d


def save_dlib_resnet_checkpoint(path: str | os.PathLike, model_file: Optional[str | os.PathLike] = None) -> None:
    """dlib's network as a ``maskface-embedder/1`` checkpoint, like the SphereFace models' (a starting point
    for training): the input is dlib's 150x150 RGB chip, normalised as dlib's input layer does."""
    from .chipcache import save_chip_model
    from .dlibnet import DlibResnet

    net = DlibResnet.from_dlib_file(model_file)
    save_chip_model(path, net, {"mean": net.input_mean.tolist(), "std": [256.0] * 3},
                    {"source": str(model_file or "dlib_face_recognition_resnet_model_v1.dat")},
                    eval={"mean_subtraction": False, "metric": "euclidean"})


# --------------------------------------------------------------------------- masked faces in the source frame

def redraw_mask(image: np.ndarray, landmarks68: np.ndarray, image_id: str, mask_config: Any, *, mask_type: str,
                wear: str, color: str, texture: str) -> tuple[np.ndarray, np.ndarray]:
    """The mask the mask stage drew on an aligned crop, drawn again on another frame of the same face (the
    source photo): the same type, wear, colour, texture and random parameters (the image's own generator,
    :func:`maskface.mask.style.image_rng`), from the stage's 68 landmarks mapped into that frame. Only the
    pixel noise and the light fit follow the new frame. Returns (RGB uint8 image, bool occlusion map).

    Embedders that read source images (dlib-resnet cuts its own chip, wider than the 112x96 crop) see the
    stage's mask whole instead of a paste of the crop, whose borders would cut the mask in straight lines."""
    from .mask import render as rd
    from .mask.config import MaskConfig
    from .mask.face import face_region
    from .mask.style import draw_style, image_rng

    cfg = mask_config if isinstance(mask_config, MaskConfig) else MaskConfig.from_mapping(mask_config)
    lm = np.asarray(landmarks68, np.float64).reshape(68, 2)
    rng = image_rng(cfg, image_id)
    sty = draw_style(rng, cfg, mask_type=mask_type, wear=wear, color=color, texture=texture)
    img = np.ascontiguousarray(image, dtype=np.uint8)
    out = rd.render(img, lm, sty.mask_type, sty.wear, sty.color, sty.texture, sty.params, rng,
                    rd.image_stats(face_region(img, lm)))
    return out.image, out.occlusion


def crop_to_source(points: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """Map (n, 2) points of an aligned crop back to the source image (inverse of stage 1's 2x3 transform)."""
    m = np.asarray(transform, np.float64).reshape(2, 3)
    a, t = m[:, :2], m[:, 2]
    return (np.asarray(points, np.float64).reshape(-1, 2) - t) @ np.linalg.inv(a).T


class SourceLoader:
    """``load(image_id)`` for source-image embedders: the photo and its stage-1 MTCNN box (None: no detection,
    the embedder's centred fallback box). Picklable, so worker processes can use it (:func:`embed_all`)."""

    def __init__(self, images_root: str | os.PathLike, bboxes: Mapping[str, Optional[Sequence[float]]]):
        self.images_root = str(images_root)
        self.bboxes = {k: (None if v is None else [float(x) for x in v]) for k, v in bboxes.items()}

    def __call__(self, image_id: str) -> FaceInput:
        from .imageio import load_rgb

        box = self.bboxes[image_id]
        return FaceInput(load_rgb(f"{self.images_root}/{image_id}"), None if box is None else np.asarray(box, float))


class MaskedSourceLoader(SourceLoader):
    """``load(image_id)``: the source photo with the mask stage's mask redrawn in it (:func:`redraw_mask`) from
    the stage's 68 landmarks mapped back through stage 1's transform, and the stage-1 MTCNN box. Picklable."""

    def __init__(self, images_root: str | os.PathLike, bboxes: Mapping[str, Optional[Sequence[float]]],
                 masks: Mapping[str, Mapping[str, Any]], mask_config: Any):
        from .mask.config import MaskConfig

        super().__init__(images_root, bboxes)
        self.masks = dict(masks)
        self.cfg = mask_config if isinstance(mask_config, MaskConfig) else MaskConfig.from_mapping(mask_config)

    def __call__(self, image_id: str) -> FaceInput:
        face = super().__call__(image_id)
        m = self.masks[image_id]
        lm = crop_to_source(m["landmarks68"], m["transform"])
        face.image, _ = redraw_mask(face.image, lm, image_id, self.cfg, mask_type=m["mask_type"], wear=m["wear"],
                                    color=m["mask_color"], texture=m["mask_texture"])
        return face


def masked_source_loader(images_root: str | os.PathLike, aligned: pd.DataFrame, masked: pd.DataFrame,
                         mask_config: Any) -> tuple[list[str], MaskedSourceLoader]:
    """For source-image embedders: (ids of the images the mask stage masked, a :class:`MaskedSourceLoader`):
    the source photo with the stage's mask redrawn in it and the stage-1 MTCNN box (the face has not moved;
    the embedder still finds its landmarks on the masked face itself).

    ``aligned``: image_id, status, bbox, transform (stage 1 manifest); ``masked``: image_id, status,
    mask_type, mask_color, mask_texture, wear, landmarks68 (mask stage manifest). Images the mask stage
    skipped get no masked face, exactly as for aligned-crop embedders."""
    al = aligned.set_index("image_id")
    ok = masked[(masked["status"] == "ok") & masked["image_id"].isin(al.index)].set_index("image_id")
    ids = sorted(ok.index)
    bboxes, masks = {}, {}
    for i in ids:
        arow, row = al.loc[i], ok.loc[i]
        if arow["transform"] is None:
            raise ValueError(f"{i}: stage 1 recorded no transform, the mask cannot be placed")
        box = arow["bbox"]
        bboxes[i] = None if arow["status"] != "ok" or box is None else [float(v) for v in box]
        masks[i] = {"landmarks68": np.asarray(row["landmarks68"], np.float64), "transform": list(arow["transform"]),
                    "mask_type": row["mask_type"], "wear": row["wear"], "mask_color": row["mask_color"],
                    "mask_texture": row["mask_texture"]}
    return ids, MaskedSourceLoader(images_root, bboxes, masks, mask_config)


# ------------------------------------------------------------------------------------------ SphereFace

ARCHITECTURES: dict[str, Callable[..., Any]] = {}


def register_arch(name: str, builder: Optional[Callable[..., Any]] = None):
    """Register a network builder under ``name`` (usable as a decorator). A checkpoint may also name
    ``"module:callable"`` (the training stage writes ``"maskface.models:sphereface_net"``)."""
    def deco(fn):
        ARCHITECTURES[name] = fn
        return fn
    return deco(builder) if builder is not None else deco


def resolve_arch(name: str) -> Callable[..., Any]:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if ":" in name:
        mod, attr = name.split(":", 1)
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    raise KeyError(f"unknown architecture {name!r}: register it with maskface.features.register_arch or name "
                   f"it as 'module:callable'; registered: {sorted(ARCHITECTURES)}")


_INPUT_DEFAULTS = {"height": 112, "width": 96, "channel_order": "RGB",
                   "mean": [127.5, 127.5, 127.5], "std": [128.0, 128.0, 128.0]}


def _check_meta(meta: Mapping[str, Any], where: str) -> dict:
    meta = dict(meta)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: not a {CHECKPOINT_FORMAT} checkpoint (format={meta.get('format')!r})")
    inp = dict(_INPUT_DEFAULTS)
    inp.update(meta.get("input") or {})
    if inp["channel_order"] not in ("RGB", "BGR"):
        raise ValueError(f"{where}: input.channel_order must be RGB or BGR, got {inp['channel_order']!r}")
    for key in ("mean", "std"):
        v = inp[key]
        inp[key] = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(inp[key]) != 3:
            raise ValueError(f"{where}: input.{key} needs 3 values")
    meta["input"] = inp
    if "feature_dim" not in meta:
        raise ValueError(f"{where}: feature_dim is missing")
    return meta


def save_checkpoint(path: str | os.PathLike, model, *, arch: str, arch_kwargs: Optional[Mapping] = None,
                    feature_dim: int, input: Optional[Mapping[str, Any]] = None,
                    template: str = "sphereface_112x96", eval: Optional[Mapping[str, Any]] = None,
                    meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write a ``maskface-embedder/1`` state-dict checkpoint (form 1 of the module docstring)."""
    import torch

    inp = dict(_INPUT_DEFAULTS)
    inp.update(input or {})
    ckpt = {"format": CHECKPOINT_FORMAT, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "input": inp, "feature_dim": int(feature_dim), "template": template,
            "eval": dict(eval or {"mean_subtraction": True, "metric": "cosine"}), "meta": dict(meta or {})}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """(network in eval mode on ``device``, metadata dict) from either checkpoint form."""
    import torch

    import warnings

    path = str(path)
    extra = {"maskface.json": ""}
    try:
        with warnings.catch_warnings():  # torch 2.9+ flags TorchScript as deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(path, map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError):
        net = None
    if net is not None:
        if not extra["maskface.json"]:
            raise ValueError(f"{path}: TorchScript archive without maskface.json metadata")
        meta = _check_meta(json.loads(extra["maskface.json"]), path)
        return net.eval(), meta
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    meta = _check_meta({k: v for k, v in ckpt.items() if k != "state_dict"}, path)
    for key in ("arch", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"{path}: {key} is missing")
    net = resolve_arch(ckpt["arch"])(**dict(ckpt.get("arch_kwargs") or {}))
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net.to(device).eval(), meta


@register_embedder
class SphereFaceEmbedder(Embedder):
    name = "sphereface"
    input_kind = "aligned"
    uses_device = True
    needs_checkpoint = True

    def __init__(self, checkpoint: str | os.PathLike, flip: str = "concat", device: str = "auto",
                 batch_size: int = 256, eval_settings: Optional[Mapping[str, Any]] = None):
        if flip not in ("concat", "sum", "none"):
            raise ValueError(f"flip must be concat, sum or none, got {flip!r}")
        from .devices import precision_policy

        self.device = resolve_device(device, "evaluate.device")
        self.precision = precision_policy(self.device)      # features in true fp32 on a GPU
        self.net, self.meta = load_checkpoint(checkpoint, self.device)
        self.checkpoint = str(checkpoint)
        self.flip = flip
        self.batch_size = int(batch_size)
        self.feature_dim = int(self.meta["feature_dim"])
        self.dim = self.feature_dim * (2 if flip == "concat" else 1)
        inp = self.meta["input"]
        self.height, self.width = int(inp["height"]), int(inp["width"])
        self.bgr = inp["channel_order"] == "BGR"
        self.mean = np.asarray(inp["mean"], dtype=np.float32)
        self.std = np.asarray(inp["std"], dtype=np.float32)
        self.eval_settings = ProtocolSettings.from_dict(
            eval_settings or self.meta.get("eval") or {"mean_subtraction": True, "metric": "cosine"})

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 crops -> float32 (N, 3, H, W) in the checkpoint's channel order and normalisation."""
        batch = np.stack([np.asarray(im) for im in images]).astype(np.float32)
        if batch.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected aligned {self.height}x{self.width} RGB crops, got {batch.shape[1:]}; feed the stage-1 "
                f"crops as they are (re-aligning an aligned crop is a known accuracy trap)")
        if self.bgr:
            batch = batch[..., ::-1]
        batch = (batch - self.mean) / self.std
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def embed(self, faces: Sequence[FaceInput]) -> np.ndarray:
        import torch

        out = np.zeros((len(faces), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(faces), self.batch_size):
                x = torch.from_numpy(self.preprocess([f.image for f in faces[s:s + self.batch_size]])).to(self.device)
                f = self.net(x).float()
                if self.flip != "none":
                    g = self.net(torch.flip(x, dims=[3])).float()
                    f = torch.cat([f, g], dim=1) if self.flip == "concat" else f + g
                if f.shape[1] != self.dim:
                    raise ValueError(f"network returned {f.shape[1]} values per face, checkpoint says "
                                     f"feature_dim {self.feature_dim} (flip={self.flip})")
                out[s:s + len(x)] = f.cpu().numpy()
        return out

    def describe(self) -> dict:
        d = super().describe()
        d.update(checkpoint=self.checkpoint, flip=self.flip, device=self.device, precision=self.precision,
                 input=self.meta["input"],
                 feature_dim=self.feature_dim, template=self.meta.get("template"), meta=self.meta.get("meta"))
        return d


# -------------------------------------------------------------------------------------- feature tables

def features_frame(image_ids: Sequence[str], variant: str, matrix: np.ndarray,
                   face: Optional[Sequence[str]] = None) -> pd.DataFrame:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    matrix = np.asarray(matrix, dtype=np.float32)
    if len(matrix) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image_ids but {len(matrix)} features")
    return pd.DataFrame({"image_id": list(image_ids), "variant": variant,
                         "feature": list(matrix), "face": list(face) if face is not None else "unknown"})


def write_features(df: pd.DataFrame, path: str | os.PathLike, prov: Optional[Mapping[str, Any]] = None) -> None:
    """Write a features table (image_id, variant, feature as fixed-size float32 list, face)."""
    import pyarrow as pa

    from .manifest import write_parquet

    dim = len(df["feature"].iloc[0]) if len(df) else 0
    schema = pa.schema([("image_id", pa.string()), ("variant", pa.string()),
                        ("feature", pa.list_(pa.float32(), dim)), ("face", pa.string())])
    df = df[["image_id", "variant", "feature", "face"]].copy()
    df["feature"] = [np.asarray(f, dtype=np.float32) for f in df["feature"]]
    write_parquet(df, path, prov, schema=schema)


_WORKER: dict[str, Any] = {}


def _worker_init(spec: tuple, load: Callable[[str], FaceInput]) -> None:
    _WORKER["emb"] = make_embedder(spec[0], **spec[1])
    _WORKER["load"] = load


def _worker_chunk(ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    emb, load = _WORKER["emb"], _WORKER["load"]
    items = [load(i) for i in ids]
    return emb.embed(items), [emb.face_source(f) for f in items]


def chip_batches(cutter_settings: Mapping[str, Any], chunks: Sequence[Sequence[str]], load: Callable[[str], FaceInput],
                 workers: int = 1, what: str = "chips") -> Iterator[tuple[np.ndarray, list[str]]]:
    """(uint8 chips, face source of each) per chunk of image ids, in order: cut by a
    ``ChipCutter(**cutter_settings)``, in ``workers`` processes when there are several chunks (``load`` must
    then be picklable, e.g. a :class:`SourceLoader`)."""
    from .workers import imap

    if workers > 1 and len(chunks) > 1:
        yield from imap(_chip_worker_chunk, chunks, workers, initializer=_chip_worker_init,
                        initargs=(dict(cutter_settings), load), what=what)
        return
    cut = ChipCutter(**cutter_settings)
    for ids in chunks:
        items = [load(i) for i in ids]
        yield cut.chips(items), [cut.face_source(f) for f in items]


def _chip_worker_init(settings: dict, load: Callable[[str], FaceInput]) -> None:
    _WORKER["cut"] = ChipCutter(**settings)
    _WORKER["load"] = load


def _chip_worker_chunk(ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    cut, load = _WORKER["cut"], _WORKER["load"]
    items = [load(i) for i in ids]
    return cut.chips(items), [cut.face_source(f) for f in items]


def embed_all(embedder: Embedder, image_ids: Sequence[str], load: Callable[[str], FaceInput], variant: str,
              chunk: int = 256, progress: Optional[Callable[[int, int], None]] = None,
              workers: int = 1, chips_in_workers: Optional[bool] = None) -> pd.DataFrame:
    """Embed images by id (``load(image_id) -> FaceInput``) in chunks; return a features frame.

    ``workers`` > 1: chunks go to that many worker processes (:mod:`maskface.workers`; each builds the embedder
    again from its ``spec``, so ``embedder`` must come from :func:`make_embedder` and ``load`` must be
    picklable, e.g. a :class:`SourceLoader`). For CPU-bound embedders that use one core each (dlib-resnet); the
    features are the same as in one process, in the same order. SphereFace batches on its device and ignores it.

    ``chips_in_workers`` (default: when a dlib chip embedder runs on a GPU): the workers only cut the chips and
    this process runs the network on them, so that several cores feed one GPU."""
    from .workers import chunked, imap

    feats, faces = [], []
    chunks = chunked(image_ids, chunk)
    spec = getattr(embedder, "spec", None)
    done = 0
    if chips_in_workers is None:
        chips_in_workers = isinstance(embedder, DlibChipEmbedder) and getattr(embedder, "device", "cpu") != "cpu"
    if workers > 1 and len(chunks) > 1 and chips_in_workers and isinstance(embedder, DlibChipEmbedder):
        results = ((embedder.describe_chip_batches(chips), src) for chips, src in
                   chip_batches(embedder.cutter_settings(), chunks, load, workers, f"chips ({embedder.name})"))
    elif workers > 1 and len(chunks) > 1 and spec is not None and embedder.input_kind == "source":
        results = imap(_worker_chunk, chunks, workers, initializer=_worker_init, initargs=(spec, load),
                       what=f"features ({embedder.name})")
    else:
        results = ((embedder.embed(items), [embedder.face_source(f) for f in items])
                   for items in ([load(i) for i in ids] for ids in chunks))
    for f, src in results:
        feats.append(f)
        faces.extend(src)
        done += len(src)
        if progress:
            progress(done, len(image_ids))
    matrix = np.concatenate(feats) if feats else np.zeros((0, embedder.dim), np.float32)
    return features_frame(image_ids, variant, matrix, faces)


# ------------------------------------------------------------------------------------ the feature job

def usable_faces(aligned: pd.DataFrame, pairs: Optional[pd.DataFrame], log) -> pd.DataFrame:
    """The rows of the aligned manifest that have a crop or a box (sorted by image_id); with ``pairs``, only
    the images the pairs name (the ones lacking one are logged: the protocol counts their pairs as errors)."""
    from .align import ALIGNED_STATUSES

    usable = aligned[aligned["status"].isin(ALIGNED_STATUSES)]
    if pairs is not None:
        wanted = set(pairs["a"]) | set(pairs["b"])
        usable = usable[usable["image_id"].isin(wanted)]
        lacking = wanted - set(usable["image_id"])
        if lacking:  # never silently
            log.warning("%d pair images have no stage-1 crop or box (status not in %s), e.g. %s", len(lacking),
                        ALIGNED_STATUSES, sorted(lacking)[:3])
    return usable.sort_values("image_id")


def read_crops(shard_paths: Iterable[str | os.PathLike], ids: Iterable[str]) -> dict[str, bytes]:
    """{image_id: PNG bytes} of the wanted ids from shard files (rows whose png is null are left out: e.g.
    faces the mask stage did not mask)."""
    from . import shards

    wanted, crops = set(ids), {}
    for path in shard_paths:
        crops.update(shards.read_crops(path, wanted))
    return crops


class CropLoader:
    """``load(image_id) -> FaceInput`` of an aligned (or masked) crop held as PNG bytes."""

    def __init__(self, crops: Mapping[str, bytes]):
        self.crops = crops

    def __call__(self, image_id: str) -> FaceInput:
        from .imageio import decode_png

        return FaceInput(decode_png(self.crops[image_id]))


def face_loader(emb: Embedder, variant: str, usable: pd.DataFrame, log, *, images_root: str | os.PathLike,
                masked: Optional[pd.DataFrame] = None, mask_settings: Optional[Mapping[str, Any]] = None,
                shard_paths: Sequence[str | os.PathLike] = ()) -> tuple[list[str], Callable[[str], FaceInput]]:
    """(image ids to embed, their loader) for an embedder and a variant:
    - source-image embedders: the source photo with the stage-1 box; masked: with the mask stage's mask
      redrawn in it (images the mask stage skipped get no feature);
    - aligned-crop embedders: the stage-1 crops (clean) or the mask stage's crops (masked), from the shards.
    Ids without an input are logged, never dropped silently (their pairs count as errors)."""
    ids = usable["image_id"].tolist()
    if emb.input_kind == "source" and variant == "masked":
        mids, load = masked_source_loader(images_root, usable, masked, mask_settings)
        have = set(mids)
        what = "were not masked by the mask stage"
    elif emb.input_kind == "source":
        return ids, SourceLoader(images_root, {
            i: (None if s != "ok" or b is None else list(b))
            for i, s, b in zip(usable["image_id"], usable["status"], usable["bbox"])})
    else:
        load = CropLoader(read_crops(shard_paths, ids))
        have = set(load.crops)
        what = f"have no {variant} crop"
    lacking = [i for i in ids if i not in have]
    if lacking:
        log.warning("%d of %d images %s; they get no feature", len(lacking), len(ids), what)
    return [i for i in ids if i in have], load


def extract_features(out: str | os.PathLike, *, model: Mapping[str, Any], variant: str,
                     images_root: str | os.PathLike, aligned: str | os.PathLike,
                     pairs: Optional[str | os.PathLike] = None, masked: Optional[str | os.PathLike] = None,
                     shard_paths: Sequence[str | os.PathLike] = (), mask_settings: Optional[Mapping] = None,
                     device: str = "auto", chunk: int = 256, workers: int = 1, log=None) -> pd.DataFrame:
    """The feature job: one model's features of one dataset's images (one variant) -> ``out`` (features
    Parquet with provenance). ``aligned``/``pairs``/``masked``: the stage manifests; ``shard_paths``: the
    crops of an aligned-crop embedder. Source-image embedders run ``workers`` worker processes (one core
    each on the CPU; on a GPU they cut the chips and this process runs the network)."""
    import logging
    import time

    from .devices import describe
    from .manifest import provenance

    log = log or logging.getLogger("maskface.features")
    table = pd.read_parquet(aligned, columns=["image_id", "status", "bbox", "transform", "shard"])
    usable = usable_faces(table, pd.read_parquet(pairs, columns=["a", "b"]) if pairs else None, log)
    emb = embedder_from_model(model, device, **({"eval_settings": model["eval"]} if model.get("eval") else {}))
    log.info("%s: %s", emb.name, describe(getattr(emb, "device", "cpu")))
    masked_rows = None
    if emb.input_kind == "source" and variant == "masked":
        masked_rows = pd.read_parquet(masked, columns=[
            "image_id", "status", "mask_type", "mask_color", "mask_texture", "wear", "landmarks68"])
    ids, load = face_loader(emb, variant, usable, log, images_root=images_root, masked=masked_rows,
                            mask_settings=mask_settings, shard_paths=shard_paths)
    t0 = time.time()

    def progress(done, total):
        log.info("%d/%d faces, %.1f/s", done, total, done / max(time.time() - t0, 1e-9))

    df = embed_all(emb, ids, load, variant, chunk=chunk, progress=progress,
                   workers=workers if emb.input_kind == "source" else 1)
    log.info("%d features (%s): %s", len(df), emb.name, df["face"].value_counts().to_dict())
    used = [aligned] + ([masked] if masked else [])
    prov = provenance("features", {"model": dict(model), "variant": variant, "mask": mask_settings}, used,
                      embedder=emb.describe())
    write_features(df, out, prov)
    return df
