"""MTCNN face detection for stage 1: the P-, R- and O-net of facenet-pytorch (weights ship inside its wheel) in
:class:`Detector`, and the cascade they run as stateless functions: :func:`pyramid` (P-net over the scale
pyramid), :func:`refine` (R-net) and :func:`landmarks` (O-net: final boxes and the five points).
Face selection, the similarity warp and the stage's sharded run live in :mod:`maskface.align`.

The cascade is ``facenet_pytorch.models.utils.detect_face.detect_face`` step for step: the same scale pyramid,
the same thresholds, NMS, box regression and landmark decoding (its helper functions are imported, not copied).
One thing is done differently, for speed, without changing the result beyond float rounding: every resampling
(the pyramid levels and the 24x24 / 48x48 crops of the R- and O-net stages) is facenet-pytorch's
``interpolate(mode="area")``, i.e. adaptive average pooling, computed exactly from an integral image by
gathering, for all boxes of a batch at once (:func:`resample`). facenet-pytorch calls ``interpolate`` once per
candidate box (a hundred or more per LFW image with SphereFace's factor 0.85), which was a third of its CPU time.

Defaults follow SphereFace's preprocess/code/face_detect_demo.m: min size 20, factor 0.85, thresholds
0.6/0.7/0.9 (facenet-pytorch's own defaults are 20 / 0.709 / 0.6,0.7,0.7).

torch and facenet-pytorch are imported inside the functions: importing this module (and maskface.align, which
the workflow's rule files import while Snakemake parses them) stays torch-free.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def resample(integral, inds, y0, y1, x0, x1, out_h: int, out_w: int):
    """Exact adaptive average pooling (== ``interpolate(mode="area")``) of the boxes ``[y0, y1) x [x0, x1)`` of
    images ``inds`` to ``out_h x out_w``, from ``integral`` (B, H+1, W+1, 3); normalised as facenet-pytorch does.
    Returns (K, out_h, out_w, 3) float32."""
    import torch

    a_h = torch.arange(out_h, device=integral.device)
    a_w = torch.arange(out_w, device=integral.device)
    lh = (y1 - y0)[:, None]
    lw = (x1 - x0)[:, None]
    hs = y0[:, None] + torch.div(a_h[None] * lh, out_h, rounding_mode="floor")
    he = y0[:, None] + torch.div((a_h[None] + 1) * lh + out_h - 1, out_h, rounding_mode="floor")
    ws = x0[:, None] + torch.div(a_w[None] * lw, out_w, rounding_mode="floor")
    we = x0[:, None] + torch.div((a_w[None] + 1) * lw + out_w - 1, out_w, rounding_mode="floor")
    # flat row index into the (B*(H+1)*(W+1), 3) integral: index_select of 3-int rows is ~3x faster
    # than 3-D advanced indexing
    _, hp1, wp1, _ = integral.shape
    flat = integral.view(-1, 3)
    base = (inds * (hp1 * wp1))[:, None, None]
    rs, re_ = hs[:, :, None] * wp1, he[:, :, None] * wp1
    cs, ce = ws[:, None, :], we[:, None, :]
    g = lambda r, c: flat.index_select(0, (base + r + c).reshape(-1))  # noqa: E731
    # integer sums are exact; one rounding in the division (torch's own pooling rounds every addition)
    s = (g(re_, ce) - g(rs, ce) - g(re_, cs) + g(rs, cs)).view(len(inds), out_h, out_w, 3)
    cnt = ((he - hs)[:, :, None] * (we - ws)[:, None, :]).to(torch.float32)
    out = s.to(torch.float32) / cnt[..., None]              # (K, out_h, out_w, 3)
    return (out - 127.5) * 0.0078125                       # facenet-pytorch's normalisation


def crops(integral, boxes, image_inds, w: int, h: int, size: int):
    """The ``size x size`` network inputs of ``boxes`` (padded and clamped as facenet-pytorch's ``pad``), and
    the indices of the boxes kept (those with a non-empty area inside the image)."""
    import torch
    from facenet_pytorch.models.utils.detect_face import pad

    y, ey, x, ex = pad(boxes, w, h)                        # 1-based, clamped (facenet-pytorch)
    keep = np.flatnonzero((ey > y - 1) & (ex > x - 1))
    dev = integral.device
    t = lambda v: torch.as_tensor(np.asarray(v)[keep].astype(np.int64), device=dev)  # noqa: E731
    data = resample(integral, image_inds[torch.as_tensor(keep, device=dev)], t(y) - 1, t(ey), t(x) - 1, t(ex),
                    size, size)
    data = data.permute(0, 3, 1, 2)                        # channels-last strides
    if dev.type != "cpu":
        data = data.contiguous()
    return data, torch.as_tensor(keep, device=dev)


def integral_image(imgs: np.ndarray, device):
    """The exact integer integral image (B, H+1, W+1, 3) of (B, H, W, 3) uint8 images (int32 while
    255 * H * W fits)."""
    import torch

    bsz, h, w = imgs.shape[:3]
    timg = torch.as_tensor(imgs, device=device)
    itype = torch.int32 if 255 * h * w < 2 ** 31 else torch.int64
    integral = torch.zeros((bsz, h + 1, w + 1, 3), dtype=itype, device=device)
    integral[:, 1:, 1:] = timg.to(itype).cumsum(1).cumsum(2)
    return integral


def scales(h: int, w: int, min_face_size: float, factor: float) -> list[float]:
    """The pyramid's scales: from 12 / min_face_size down by ``factor`` while the short side stays >= 12."""
    m = 12.0 / min_face_size
    minl = min(h, w) * m
    out = []
    scale_i = m
    while minl >= 12:
        out.append(scale_i)
        scale_i = scale_i * factor
        minl = minl * factor
    return out


def pyramid(pnet, integral, min_face_size: float, factor: float, threshold: float):
    """Stage 1: P-net over the scale pyramid, NMS per scale and over all scales, box regression, squared
    boxes. Returns (boxes (n, 5), image_inds (n,)), or None when no candidate is left."""
    import torch
    from facenet_pytorch.models.utils.detect_face import generateBoundingBox, rerec
    from torchvision.ops.boxes import batched_nms

    bsz, hp1, wp1, _ = integral.shape
    h, w = hp1 - 1, wp1 - 1
    dev = integral.device
    all_inds = torch.arange(bsz, device=dev)
    zeros = torch.zeros(bsz, dtype=torch.int64, device=dev)
    hh = torch.full((bsz,), h, dtype=torch.int64, device=dev)
    ww = torch.full((bsz,), w, dtype=torch.int64, device=dev)
    boxes_l, inds_l = [], []
    for scale in scales(h, w, min_face_size, factor):
        sh, sw = int(h * scale + 1), int(w * scale + 1)
        im_data = resample(integral, all_inds, zeros, hh, zeros, ww, sh, sw).permute(0, 3, 1, 2)
        if dev.type != "cpu":
            im_data = im_data.contiguous()
        reg, probs = pnet(im_data)
        boxes_scale, inds_scale = generateBoundingBox(reg.contiguous(), probs[:, 1].contiguous(), scale, threshold)
        pick = batched_nms(boxes_scale[:, :4], boxes_scale[:, 4], inds_scale, 0.5)
        boxes_l.append(boxes_scale[pick])
        inds_l.append(inds_scale[pick])
    if not boxes_l:
        return None
    boxes = torch.cat(boxes_l, 0)
    image_inds = torch.cat(inds_l, 0)
    if len(boxes) == 0:
        return None
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    regw = boxes[:, 2] - boxes[:, 0]
    regh = boxes[:, 3] - boxes[:, 1]
    qq1 = boxes[:, 0] + boxes[:, 5] * regw
    qq2 = boxes[:, 1] + boxes[:, 6] * regh
    qq3 = boxes[:, 2] + boxes[:, 7] * regw
    qq4 = boxes[:, 3] + boxes[:, 8] * regh
    boxes = torch.stack([qq1, qq2, qq3, qq4, boxes[:, 4]]).permute(1, 0)
    return rerec(boxes), image_inds


def refine(rnet, integral, boxes, image_inds, threshold: float):
    """Stage 2: R-net on 24x24 crops of the candidates; threshold, NMS, box regression, squared boxes.
    Returns (boxes, image_inds), or None when no candidate is left."""
    import torch
    from facenet_pytorch.models.utils.detect_face import bbreg, rerec
    from torchvision.ops.boxes import batched_nms

    h, w = integral.shape[1] - 1, integral.shape[2] - 1
    im_data, keep = crops(integral, boxes, image_inds, w, h, 24)
    boxes, image_inds = boxes[keep], image_inds[keep]
    if len(boxes) == 0:
        return None
    reg, prob = rnet(im_data)
    score = prob[:, 1]
    ipass = score > threshold
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    image_inds = image_inds[ipass]
    mv = reg[ipass]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
    boxes = bbreg(boxes, mv)
    boxes = rerec(boxes)
    if len(boxes) == 0:
        return None
    return boxes, image_inds


def landmarks(onet, integral, boxes, image_inds, threshold: float):
    """Stage 3: O-net on 48x48 crops; threshold, the five points decoded in source pixels, box regression and
    a final "Min" NMS. Returns (boxes (n, 5), points (n, 5, 2), image_inds), or None when no crop is left."""
    import torch
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg

    h, w = integral.shape[1] - 1, integral.shape[2] - 1
    im_data, keep = crops(integral, boxes, image_inds, w, h, 48)
    boxes, image_inds = boxes[keep], image_inds[keep]
    if len(boxes) == 0:
        return None
    reg, pts, prob = onet(im_data)
    score = prob[:, 1]
    ipass = score > threshold
    pts = pts[ipass].permute(1, 0)
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    image_inds = image_inds[ipass]
    mv = reg[ipass]
    w_i = boxes[:, 2] - boxes[:, 0] + 1
    h_i = boxes[:, 3] - boxes[:, 1] + 1
    points_x = w_i.repeat(5, 1) * pts[:5, :] + boxes[:, 0].repeat(5, 1) - 1
    points_y = h_i.repeat(5, 1) * pts[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
    points = torch.stack((points_x, points_y)).permute(2, 1, 0)
    boxes = bbreg(boxes, mv)
    pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
    return boxes[pick], points[pick], image_inds[pick]


class Detector:
    """facenet-pytorch's MTCNN networks on one device, and the cascade on a batch of same-size RGB uint8
    images (see the module docstring)."""

    def __init__(self, min_face_size: int = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.9),
                 factor: float = 0.85, device: str = "cpu"):
        import torch
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        from .devices import precision_policy

        self.device = torch.device(device)
        self.precision = precision_policy(self.device)      # true fp32 on a GPU: boxes as on the CPU
        self.min_face_size = float(min_face_size)
        self.thresholds = [float(t) for t in thresholds]
        self.factor = float(factor)
        self.pnet = PNet().to(self.device).eval()   # pretrained=True by default: weights from the wheel
        self.rnet = RNet().to(self.device).eval()
        self.onet = ONet().to(self.device).eval()
        if self.device.type == "cpu":
            # channels-last: the inputs arrive in that layout from the resampler, and torch's CPU max-pooling
            # and small convolutions are 2-3x faster in it (same numbers to 1e-6)
            self.pnet = self.pnet.to(memory_format=torch.channels_last)
            self.rnet = self.rnet.to(memory_format=torch.channels_last)
            self.onet = self.onet.to(memory_format=torch.channels_last)

    def detect(self, imgs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``imgs``: (B, H, W, 3) uint8 RGB. Returns per image ``(boxes (n, 5): x1 y1 x2 y2 score,
        points (n, 5, 2))`` exactly as ``facenet_pytorch.models.utils.detect_face.detect_face``."""
        import torch

        imgs = np.asarray(imgs)
        if not imgs.flags.writeable:
            imgs = imgs.copy()
        if imgs.ndim == 3:
            imgs = imgs[None]
        bsz = imgs.shape[0]
        thr = self.thresholds
        found: Optional[tuple] = None
        with torch.inference_mode():
            integral = integral_image(imgs, self.device)
            found = pyramid(self.pnet, integral, self.min_face_size, self.factor, thr[0])
            if found is not None:
                found = refine(self.rnet, integral, *found, thr[1])
            if found is not None:
                found = landmarks(self.onet, integral, *found, thr[2])
            if found is None:
                return [(np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)) for _ in range(bsz)]
            boxes, points, image_inds = found
            boxes_np = boxes.cpu().numpy()
            points_np = points.cpu().numpy().reshape(-1, 5, 2)
            inds_np = image_inds.cpu().numpy()
        return [(boxes_np[inds_np == b].copy(), points_np[inds_np == b].copy()) for b in range(bsz)]
