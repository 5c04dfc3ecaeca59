"""SphereFace networks, margin heads and the model file (``model.pt``).

Networks (:class:`SphereNet`, builder :func:`sphereface_net`)
    The residual nets of the SphereFace paper (Liu et al., CVPR 2017, table 2; wy1iu/sphereface
    ``train/code/make_spherenet.py``): no BatchNorm, PReLU after every convolution, four stages of 64 / 128 /
    256 / 512 channels, each opened by a 3x3 stride-2 convolution (pad 1, with bias) followed by ``units[i]``
    residual units (3x3 conv - PReLU - 3x3 conv - PReLU, plus the identity; no bias). 112x96 RGB in, a 7x6 map
    out of stage 4, flattened into ``fc5`` (Linear, with bias) = the 512-d feature. No activation after fc5.

    ===========  =====================  =====================================
    depth        residual units/stage   note
    ===========  =====================  =====================================
    4            0, 0, 0, 0             the paper's SphereFace-4
    10           0, 1, 2, 0
    20           1, 2, 4, 1             ``sphere20a`` (the released model)
    36           2, 4, 8, 2
    64           3, 8, 16, 3
    ===========  =====================  =====================================

    Initialisation, as make_spherenet.py: the stride-2 convolutions and fc5 use Caffe's ``xavier`` filler
    (uniform on +-sqrt(3 / fan_in), Caffe's default ``variance_norm: FAN_IN``; not PyTorch's xavier, which
    averages fan in and out), bias 0; the residual-unit convolutions are Gaussian std 0.01 without bias;
    PReLU slopes start at 0.25 (Caffe's default), one per channel. ``width`` multiplies every stage's channel
    count (rounded, at least 8) for CPU-sized runs; ``width=1`` is the paper's net.

Input convention (stored in every model file's ``input`` metadata and used unchanged by training and by
feature extraction): RGB channel order, ``(pixel - 127.5) / 128`` per channel (make_spherenet.py:
``mean_value 127.5, scale 0.0078125``). The Caffe original fed OpenCV's BGR; this project trains on RGB, so
RGB is correct *for models trained here* and the file says so.

Heads (``make_head``; each maps (features, labels, iteration) to logits for cross-entropy)
    ``softmax``  plain linear classifier with bias, ``W x + b``.

    ``asoftmax`` (SphereFace's A-Softmax, Caffe ``MarginInnerProduct``). Class weights are L2-normalised,
    ``cos t_j = w_j . x / |x|``. Non-target logits ``|x| cos t_j``; the target logit is
    ``|x| (psi(t_y) + lambda cos t_y) / (1 + lambda)`` with
    ``psi(t) = (-1)^k cos(m t) - 2k`` for ``t`` in ``[k pi / m, (k+1) pi / m]``, ``k = 0..m-1`` and
    ``cos(m t)`` the Chebyshev polynomial ``T_m(cos t)``. ``lambda`` anneals with the iteration as Caffe's
    layer: ``lambda = max(base * (1 + gamma * iter)^-power, lambda_min)`` (defaults base 1000, gamma 0.12,
    power 1, lambda_min 5; make_spherenet.py) where ``iter`` counts forward passes from 1 (Caffe increments
    its counter before computing lambda), so training iteration ``t`` (0-based) uses ``iter = t + 1``.
    ``feature_norm: true`` replaces ``|x|`` by a constant scale ``s`` (the SphereFace README's note on
    feature normalisation; as in NormFace / SphereFace-FNorm).

    ``grad: exact`` (default) back-propagates the true gradient of that formula (autograd; weights
    normalised differentiably). ``grad: caffe`` reproduces wy1iu/sphereface's layer
    (``tools/caffe-sphereface/src/caffe/layers/margin_inner_product_layer.cpp``), the README's note 1
    "Backward gradient: ... we normalize the scale of gradient":

    * the weight is re-projected onto unit rows in place before every training forward, and its gradient is
      that of a plain inner product, ``dW = G^T x`` (``G`` = dL/dlogits), ignoring both the margin and the
      normalisation (a projected-gradient step);
    * for the feature, the target term ``f = |x| psi(t_y)`` has the true gradient
      ``df/dx = c_w w_y + c_x x`` with ``c_w = psi'(cos t_y)`` and ``c_x = (psi(cos t_y) - cos t_y psi'(cos t_y))
      / |x|``; Caffe replaces it by ``(c_w w_y + c_x x) / sqrt(c_w^2 + c_x^2)`` (scaled by ``G_iy / (1 +
      lambda)``), while the ``lambda`` part and the non-target logits keep their ordinary gradient.
      For m = 1 the two modes agree (``c_x = 0``, ``c_w = 1``).

    ``grad: caffe`` is incompatible with ``feature_norm`` (Caffe had no such option).

    ``cosface`` (CosFace / AM-Softmax): ``s (cos t_j - m [j = y])`` with normalised x and w.

    ``arcface``: ``s cos(t_y + m)`` for the target, ``s cos t_j`` otherwise; where ``t_y + m > pi``
    (``cos t_y < cos(pi - m)``) the target is ``s (cos t_y - m sin(pi - m))``, insightface's
    monotonic fall-back (``easy_margin`` False).

Margin and scale defaults per head (``margin``/``scale`` null): asoftmax m=4 (s=30 when feature_norm),
cosface m=0.35 s=30, arcface m=0.5 s=64.

Model file (``model.pt``; :func:`save_model`, :func:`load_model`)
    The ``maskface-embedder/1`` format that :mod:`maskface.features` reads (``torch.save`` of plain types
    and tensors, ``torch.load(weights_only=True)``)::

        {"format": "maskface-embedder/1", "arch": "maskface.models:sphereface_net",
         "arch_kwargs": {"depth": 20, "width": 1.0, "feature_dim": 512},
         "state_dict": ..., "feature_dim": 512, "template": "sphereface_112x96",
         "input": {"height": 112, "width": 96, "channel_order": "RGB",
                   "mean": [127.5]*3, "std": [128.0]*3},
         "eval": {"mean_subtraction": True, "metric": "cosine"},
         "meta": {... training run: protocol, fold, seed, head, iterations, data, code version ...}}

    ``load_model(path) -> (network in eval mode, metadata)`` reads it without importing the features module.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_FORMAT = "maskface-embedder/1"
ARCH = "maskface.models:sphereface_net"
INPUT = {"height": 112, "width": 96, "channel_order": "RGB",
         "mean": [127.5, 127.5, 127.5], "std": [128.0, 128.0, 128.0]}
PIXEL_MEAN = 127.5
PIXEL_STD = 128.0

from .fileio import atomic_path  # noqa: E402
from .train_config import BASE_CHANNELS, DEPTH_UNITS  # noqa: E402 - torch-free, shared with the estimates
HEADS = ("softmax", "asoftmax", "cosface", "arcface")
HEAD_DEFAULTS = {"asoftmax": {"margin": 4, "scale": 30.0}, "cosface": {"margin": 0.35, "scale": 30.0},
                 "arcface": {"margin": 0.5, "scale": 64.0}, "softmax": {"margin": None, "scale": None}}


# --------------------------------------------------------------------------------------------- networks

def caffe_xavier_(weight: torch.Tensor) -> torch.Tensor:
    """Caffe's XavierFiller with its default FAN_IN: uniform on +-sqrt(3 / fan_in)."""
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def stage_channels(width: float) -> tuple[int, ...]:
    return tuple(max(8, int(round(c * width))) for c in BASE_CHANNELS)


class ResidualUnit(nn.Module):
    """3x3 conv - PReLU - 3x3 conv - PReLU, plus the input (Caffe Eltwise SUM). No bias, Gaussian 0.01."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.prelu1 = nn.PReLU(channels, init=0.25)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.prelu2 = nn.PReLU(channels, init=0.25)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


class Stage(nn.Module):
    """Stride-2 3x3 conv (Caffe xavier, bias 0) + PReLU, then ``n_units`` residual units."""

    def __init__(self, in_ch: int, out_ch: int, n_units: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 2, 1, bias=True)
        self.prelu = nn.PReLU(out_ch, init=0.25)
        caffe_xavier_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.units = nn.Sequential(*[ResidualUnit(out_ch) for _ in range(n_units)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.prelu(self.conv(x)))


class SphereNet(nn.Module):
    """SphereFace-``depth`` (4, 10, 20, 36, 64) or custom ``units``; ``width`` scales the channels."""

    def __init__(self, depth: int = 20, width: float = 1.0, feature_dim: int = 512,
                 units: Optional[Sequence[int]] = None, input_size: Sequence[int] = (112, 96)):
        super().__init__()
        if units is None:
            if depth not in DEPTH_UNITS:
                raise ValueError(f"depth must be one of {sorted(DEPTH_UNITS)} (or give units), got {depth}")
            units = DEPTH_UNITS[depth]
        units = tuple(int(u) for u in units)
        if len(units) != 4 or min(units) < 0:
            raise ValueError(f"units must be 4 non-negative counts, got {units}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.depth, self.width, self.units, self.feature_dim = depth, float(width), units, int(feature_dim)
        chans = stage_channels(width)
        stages, prev = [], 3
        for c, n in zip(chans, units):
            stages.append(Stage(prev, c, n))
            prev = c
        self.stages = nn.Sequential(*stages)
        h, w = (int(v) for v in input_size)
        for _ in range(4):
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, pad 1
        self.map_size = (h, w)  # 7x6 for 112x96
        self.fc5 = nn.Linear(prev * h * w, self.feature_dim, bias=True)
        caffe_xavier_(self.fc5.weight)
        nn.init.zeros_(self.fc5.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(x)
        return self.fc5(torch.flatten(x, 1))


def sphereface_net(depth: int = 20, width: float = 1.0, feature_dim: int = 512,
                   units: Optional[Sequence[int]] = None) -> SphereNet:
    """Builder named by model files (``arch = "maskface.models:sphereface_net"``)."""
    return SphereNet(depth=depth, width=width, feature_dim=feature_dim, units=units)


def preprocess(batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (N, H, W, 3) -> float (N, 3, H, W) in channels_last memory, ``(p - 127.5) / 128``.

    The permuted view of an NHWC tensor *is* the channels_last layout, so no copy is made before the cast.
    """
    x = batch_uint8_nhwc.permute(0, 3, 1, 2).float()
    return (x - PIXEL_MEAN) / PIXEL_STD


# ------------------------------------------------------------------------------------------------ heads

def lambda_at(iteration: int, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
              lambda_min: float = 5.0) -> float:
    """Caffe MarginInnerProduct: ``max(base * (1 + gamma * iteration)^-power, lambda_min)``; ``iteration``
    is the layer's forward count, 1 for the first training step."""
    return max(base * (1.0 + gamma * iteration) ** (-power), lambda_min)


def chebyshev(m: int, c: torch.Tensor) -> torch.Tensor:
    """cos(m t) as the polynomial T_m(cos t) (exact gradients; no acos in the differentiable path)."""
    if m == 0:
        return torch.ones_like(c)
    t_prev, t = torch.ones_like(c), c
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
    return t


def chebyshev_derivative(m: int, c: torch.Tensor) -> torch.Tensor:
    """d T_m / dc = m U_{m-1}(c)."""
    if m == 0:
        return torch.zeros_like(c)
    u_prev, u = torch.ones_like(c), 2 * c  # U_0, U_1
    if m == 1:
        return torch.ones_like(c)
    for _ in range(m - 2):
        u_prev, u = u, 2 * c * u - u_prev
    return m * u


def psi_parts(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(psi(t), psi'(cos t) w.r.t. cos t, k) for cos t = c: psi = (-1)^k T_m(c) - 2k, k = floor(m t / pi)."""
    with torch.no_grad():
        theta = torch.acos(c.detach().clamp(-1.0, 1.0))
        k = torch.floor(m * theta / math.pi).clamp(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (-1)^k
    psi = sign * chebyshev(m, c) - 2.0 * k
    dpsi = sign * chebyshev_derivative(m, c)
    return psi, dpsi, k


class _CaffeASoftmax(torch.autograd.Function):
    """A-Softmax with the Caffe layer's backward (see the module docstring, ``grad: caffe``)."""

    @staticmethod
    def forward(ctx, x, weight, labels, lam: float, m: int):
        xn = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        wx = x @ weight.t()
        cos = (wx / xn).clamp(-1.0, 1.0)
        idx = labels.view(-1, 1)
        c_y = cos.gather(1, idx)
        psi, dpsi, _ = psi_parts(m, c_y)
        target = xn * (psi + lam * c_y) / (1.0 + lam)
        out = wx.scatter(1, idx, target)
        ctx.save_for_backward(x, weight, labels, xn, c_y, psi, dpsi)
        ctx.lam = lam
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, labels, xn, c_y, psi, dpsi = ctx.saved_tensors
        lam = ctx.lam
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_y = grad_out.gather(1, labels.view(-1, 1)) / (1.0 + lam)
            w_y = weight[labels]
            coeff_w = dpsi
            coeff_x = (psi - c_y * dpsi) / xn
            norm = torch.sqrt(coeff_w ** 2 + coeff_x ** 2).clamp_min(1e-12)
            grad_x = grad_out @ weight + g_y * ((coeff_w / norm - 1.0) * w_y + (coeff_x / norm) * x)
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.t() @ x
        return grad_x, grad_w, None, None, None


class MarginHead(nn.Module):
    """Classifier head producing logits; see the module docstring for each ``kind``."""

    def __init__(self, kind: str, feature_dim: int, num_classes: int, *, margin: Optional[float] = None,
                 scale: Optional[float] = None, feature_norm: bool = False, grad: str = "exact",
                 lambda_base: float = 1000.0, lambda_gamma: float = 0.12, lambda_power: float = 1.0,
                 lambda_min: float = 5.0):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head type must be one of {HEADS}, got {kind!r}")
        if grad not in ("exact", "caffe"):
            raise ValueError(f"head grad must be exact or caffe, got {grad!r}")
        if grad == "caffe" and (kind != "asoftmax" or feature_norm):
            raise ValueError("grad: caffe is the Caffe A-Softmax backward: only with type asoftmax and "
                             "feature_norm false")
        d = HEAD_DEFAULTS[kind]
        self.kind = kind
        self.margin = d["margin"] if margin is None else margin
        self.scale = d["scale"] if scale is None else float(scale)
        self.feature_norm = bool(feature_norm)
        self.grad = grad
        self.lambda_cfg = dict(base=float(lambda_base), gamma=float(lambda_gamma), power=float(lambda_power),
                               lambda_min=float(lambda_min))
        if kind == "asoftmax":
            m = int(self.margin)
            if m != self.margin or not 1 <= m <= 4:
                raise ValueError(f"A-Softmax margin m must be an integer 1..4, got {self.margin}")
            self.margin = m
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.feature_dim))
        caffe_xavier_(self.weight)  # make_spherenet.py: MarginInnerProduct weight_filler xavier
        if kind == "softmax":
            self.bias = nn.Parameter(torch.zeros(self.num_classes))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, classes={self.num_classes}, margin={self.margin}, scale={self.scale}, "
                f"feature_norm={self.feature_norm}, grad={self.grad}")

    def lambda_at(self, iteration: int) -> float:
        return lambda_at(iteration, **self.lambda_cfg) if self.kind == "asoftmax" else 0.0

    def forward(self, x: torch.Tensor, labels: torch.Tensor, iteration: int = 1) -> torch.Tensor:
        """Logits (N, classes). ``iteration``: the A-Softmax lambda counter (1 = first training step);
        ``float('inf')``-like large values give lambda_min. Run in fp32 (callers disable autocast)."""
        x = x.to(self.weight.dtype)  # bf16 features from autocast -> the head's fp32 (fp64 in tests)
        if self.kind == "softmax":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "asoftmax":
            lam = self.lambda_at(iteration)
            if self.grad == "caffe":
                if self.training:
                    with torch.no_grad():  # Caffe normalises the blob in place at every forward
                        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
                    return _CaffeASoftmax.apply(x, self.weight, labels, lam, self.margin)
                return _CaffeASoftmax.apply(x, F.normalize(self.weight, dim=1), labels, lam, self.margin)
            return self._asoftmax(x, labels, lam)
        w = F.normalize(self.weight, dim=1)
        cos = (F.normalize(x, dim=1) @ w.t()).clamp(-1.0, 1.0)
        idx = labels.view(-1, 1)
        if self.kind == "cosface":
            return self.scale * cos.scatter(1, idx, cos.gather(1, idx) - self.margin)
        # arcface
        m = float(self.margin)
        c = cos.gather(1, idx)
        s_ = torch.sqrt((1.0 - c * c).clamp_min(1e-12))
        phi = c * math.cos(m) - s_ * math.sin(m)
        phi = torch.where(c > math.cos(math.pi - m), phi, c - math.sin(math.pi - m) * m)
        return self.scale * cos.scatter(1, idx, phi)

    def _asoftmax(self, x: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        xn = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = ((x @ w.t()) / xn).clamp(-1.0, 1.0)
        r = torch.full_like(xn, self.scale) if self.feature_norm else xn
        idx = labels.view(-1, 1)
        c_y = cos.gather(1, idx)
        psi, _, _ = psi_parts(self.margin, c_y)
        target = (psi + lam * c_y) / (1.0 + lam)
        return r * cos.scatter(1, idx, target)


def make_head(cfg: Mapping[str, Any], feature_dim: int, num_classes: int) -> MarginHead:
    """A head from the ``train.head`` config mapping."""
    lam = dict(cfg.get("lambda") or {})
    return MarginHead(cfg.get("type", "asoftmax"), feature_dim, num_classes, margin=cfg.get("margin"),
                      scale=cfg.get("scale"), feature_norm=bool(cfg.get("feature_norm", False)),
                      grad=cfg.get("grad", "exact"), lambda_base=lam.get("base", 1000.0),
                      lambda_gamma=lam.get("gamma", 0.12), lambda_power=lam.get("power", 1.0),
                      lambda_min=lam.get("min", 5.0))


# ------------------------------------------------------------------------------------------- model file

def arch_kwargs_of(net: SphereNet) -> dict:
    kw = {"depth": int(net.depth), "width": float(net.width), "feature_dim": int(net.feature_dim)}
    if net.depth not in DEPTH_UNITS or tuple(DEPTH_UNITS[net.depth]) != tuple(net.units):
        kw["units"] = list(net.units)
    return kw


def save_model(path: str | os.PathLike, net: SphereNet, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write the ``maskface-embedder/1`` model file (atomically) for a trained :class:`SphereNet`."""
    ckpt = {"format": MODEL_FORMAT, "arch": ARCH, "arch_kwargs": arch_kwargs_of(net),
            "state_dict": {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()},
            "input": {k: (list(v) if isinstance(v, list) else v) for k, v in INPUT.items()},
            "feature_dim": int(net.feature_dim), "template": "sphereface_112x96",
            "eval": {"mean_subtraction": True, "metric": "cosine"}, "meta": dict(meta or {})}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[SphereNet, dict]:
    """(network in eval mode on ``device``, metadata = the file less its state_dict)."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a {MODEL_FORMAT} model file")
    if ckpt.get("arch") != ARCH:
        raise ValueError(f"{path}: arch {ckpt.get('arch')!r} is not {ARCH}; use maskface.features.load_checkpoint")
    inp = ckpt.get("input") or {}
    if inp.get("channel_order", "RGB") != "RGB" or list(inp.get("mean", INPUT["mean"])) != INPUT["mean"] \
            or list(inp.get("std", INPUT["std"])) != INPUT["std"]:
        raise ValueError(f"{path}: input convention {inp} differs from this module's {INPUT}")
    net = sphereface_net(**dict(ckpt.get("arch_kwargs") or {}))
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net.to(device).eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}
