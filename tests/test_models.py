"""SphereFace networks, margin heads (closed forms, gradients, Caffe backward), lambda schedule, model file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskface.models import (DEPTH_UNITS, INPUT, MarginHead, SphereNet, _CaffeASoftmax, lambda_at, load_model,
                             make_head, preprocess, psi_parts, save_model, sphereface_net)

torch.set_num_threads(2)


# ----------------------------------------------------------------------------------------------- lambda

def test_lambda_schedule_values():
    # Caffe: lambda = max(1000 * (1 + 0.12 * iter)^-1, 5), iter counted from 1 at the first forward
    assert lambda_at(0) == 1000.0
    assert lambda_at(1) == pytest.approx(1000 / 1.12)
    assert lambda_at(100) == pytest.approx(1000 / 13.0)
    assert lambda_at(1000) == pytest.approx(1000 / 121.0)
    assert lambda_at(1658) == pytest.approx(1000 / (1 + 0.12 * 1658))  # 5.001, still above the floor
    assert lambda_at(1658) > 5.0
    assert lambda_at(1659) == 5.0 and lambda_at(28000) == 5.0
    assert lambda_at(10, base=100, gamma=1.0, power=2.0, lambda_min=0.0) == pytest.approx(100 / 121)
    seq = [lambda_at(i) for i in range(0, 3000, 7)]
    assert all(a >= b for a, b in zip(seq, seq[1:]))


def test_head_lambda_follows_config():
    h = make_head({"type": "asoftmax", "lambda": {"base": 10, "gamma": 1, "power": 1, "min": 2}}, 8, 3)
    assert h.lambda_at(1) == 5.0 and h.lambda_at(100) == 2.0
    assert make_head({"type": "cosface"}, 8, 3).lambda_at(1) == 0.0


# ------------------------------------------------------------------------------------------- A-Softmax

def psi_closed(theta: np.ndarray, m: int) -> np.ndarray:
    """psi(theta) = (-1)^k cos(m theta) - 2k, theta in [k pi/m, (k+1) pi/m] (the paper's eq. 6/7)."""
    k = np.clip(np.floor(theta * m / np.pi), 0, m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2 * k


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_matches_closed_form_and_is_monotonic(m):
    theta = np.linspace(0, np.pi, 2001)
    c = torch.tensor(np.cos(theta), dtype=torch.float64)
    psi, dpsi, _ = psi_parts(m, c)
    np.testing.assert_allclose(psi.numpy(), psi_closed(theta, m), atol=1e-9)
    assert np.all(np.diff(psi.numpy()) <= 1e-12)  # psi decreases monotonically in theta
    assert psi[-1].item() == pytest.approx(-(2 * m - 1))  # psi(pi) = -(2m - 1)
    # dpsi/dcos by finite differences away from the piece boundaries
    h = 1e-6
    inner = [i for i in range(5, 1995) if abs(theta[i] * m / np.pi - round(theta[i] * m / np.pi)) > 1e-3]
    num = (psi_closed(np.arccos(np.cos(theta[inner]) + h), m) - psi_closed(np.arccos(np.cos(theta[inner]) - h), m)) / (2 * h)
    np.testing.assert_allclose(dpsi.numpy()[inner], num, rtol=1e-4, atol=1e-4)


def _rand_inputs(n=6, d=5, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * 3
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return x, w, y


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("lam_iter", [1, 100000])
def test_asoftmax_forward_closed_form(m, lam_iter):
    x, w, y = _rand_inputs(seed=m)
    head = MarginHead("asoftmax", 5, 4, margin=m).double()
    with torch.no_grad():
        head.weight.copy_(w)
    out = head(x, y, lam_iter).detach().numpy()
    lam = lambda_at(lam_iter)
    xn, wn = x.numpy(), w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
    r = np.linalg.norm(xn, axis=1)
    cos = (xn @ wn.T) / r[:, None]
    expected = r[:, None] * cos
    for i, t in enumerate(y.numpy()):
        th = np.arccos(cos[i, t])
        expected[i, t] = r[i] * (psi_closed(np.array([th]), m)[0] + lam * cos[i, t]) / (1 + lam)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_asoftmax_feature_norm_uses_scale():
    x, w, y = _rand_inputs(seed=3)
    a = MarginHead("asoftmax", 5, 4, margin=4).double()
    b = MarginHead("asoftmax", 5, 4, margin=4, feature_norm=True, scale=7.0).double()
    b.load_state_dict(a.state_dict())
    xa = a(x, y, 50)
    xb = b(x, y, 50)
    torch.testing.assert_close(xb, xa / x.norm(dim=1, keepdim=True) * 7.0)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("feature_norm", [False, True])
def test_asoftmax_gradcheck(m, feature_norm):
    x, w, y = _rand_inputs(seed=10 + m)
    head = MarginHead("asoftmax", 5, 4, margin=m, feature_norm=feature_norm, scale=5.0).double()
    x.requires_grad_(True)

    def f(xx, ww):  # the head with its weight swapped for the differentiable input
        return torch.func.functional_call(head, {"weight": ww}, (xx, y, 7))

    assert torch.autograd.gradcheck(f, (x, w.clone().requires_grad_(True)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["cosface", "arcface", "softmax"])
def test_other_heads_gradcheck(kind):
    x, w, y = _rand_inputs(seed=21)
    head = MarginHead(kind, 5, 4).double()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda xx: head(xx, y, 1), (x,), eps=1e-6, atol=1e-5)


def test_cosface_arcface_closed_form():
    x, w, y = _rand_inputs(seed=5)
    xn = x / x.norm(dim=1, keepdim=True)
    wn = w / w.norm(dim=1, keepdim=True)
    cos = xn @ wn.T
    for kind, s, m in [("cosface", 30.0, 0.35), ("arcface", 64.0, 0.5)]:
        head = MarginHead(kind, 5, 4).double()
        with torch.no_grad():
            head.weight.copy_(w)
        out = head(x, y).detach()
        exp = s * cos.clone()
        for i, t in enumerate(y.tolist()):
            th = math.acos(cos[i, t].item())
            if kind == "cosface":
                exp[i, t] = s * (cos[i, t] - m)
            elif th + m <= math.pi:
                exp[i, t] = s * math.cos(th + m)
            else:
                exp[i, t] = s * (cos[i, t] - math.sin(math.pi - m) * m)
        torch.testing.assert_close(out, exp)


def _caffe_quadruple_grad(x, w_unit, y, G, lam):
    """bottom_diff of margin_inner_product_layer.cpp, MarginType QUADRUPLE, written out with its sign_3/sign_4
    and its literal coefficients (an independent transcription of the Caffe loop)."""
    x, w, G = x.numpy(), w_unit.numpy(), G.numpy()
    M, K = x.shape
    out = np.zeros_like(x)
    for i in range(M):
        xn = np.linalg.norm(x[i])
        for j in range(w.shape[0]):
            if j != y[i]:
                out[i] += G[i, j] / (1 + lam) * w[j]
            else:
                c = x[i] @ w[j] / xn
                s0 = np.sign(c)
                s3 = s0 * np.sign(2 * c * c - 1)
                s4 = 2 * s0 + s3 - 3
                cw = s3 * (32 * c ** 3 - 16 * c)
                cx = 1.0 / (-xn) * (s3 * (24 * c ** 4 - 8 * c ** 2 - 1) - s4)
                nrm = np.sqrt(cw * cw + cx * cx)
                out[i] += G[i, j] / (1 + lam) * (cw / nrm * w[j] + cx / nrm * x[i])
        out[i] += lam / (1 + lam) * (G[i] @ w)
    return out


def test_caffe_backward_matches_the_caffe_layer():
    x, w, y = _rand_inputs(n=8, d=6, c=5, seed=7)
    w = w / w.norm(dim=1, keepdim=True)
    lam = lambda_at(30)
    G = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = _CaffeASoftmax.apply(xx, ww, y, lam, 4)
    out.backward(G)
    np.testing.assert_allclose(xx.grad.numpy(), _caffe_quadruple_grad(x, w, y.numpy(), G, lam), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ww.grad.numpy(), (G.T @ x).numpy(), rtol=1e-10)  # plain inner-product dW
    # same forward as the exact head
    head = MarginHead("asoftmax", 6, 5, margin=4).double()
    with torch.no_grad():
        head.weight.copy_(w)
    torch.testing.assert_close(out.detach(), head(x, y, 30).detach())
    # the exact gradient differs (it is not normalised)
    xe = x.clone().requires_grad_(True)
    head(xe, y, 30).backward(G)
    assert not torch.allclose(xe.grad, xx.grad)


def test_caffe_backward_m1_is_the_exact_gradient():
    x, w, y = _rand_inputs(seed=8)
    w = w / w.norm(dim=1, keepdim=True)
    G = torch.randn(6, 4, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    _CaffeASoftmax.apply(xa, w, y, 3.0, 1).backward(G)
    head = MarginHead("asoftmax", 5, 4, margin=1).double()
    with torch.no_grad():
        head.weight.copy_(w)
    xb = x.clone().requires_grad_(True)
    head(xb, y, 1).backward(G)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_caffe_head_projects_weights_in_training():
    head = MarginHead("asoftmax", 5, 4, grad="caffe")
    with torch.no_grad():
        head.weight.mul_(3.0)
    x, _, y = _rand_inputs(dtype=torch.float32)
    head.train()
    head(x, y, 1).sum().backward()
    torch.testing.assert_close(head.weight.detach().norm(dim=1), torch.ones(4))
    assert head.weight.grad is not None
    with pytest.raises(ValueError):
        MarginHead("asoftmax", 5, 4, grad="caffe", feature_norm=True)
    with pytest.raises(ValueError):
        MarginHead("cosface", 5, 4, grad="caffe")
    with pytest.raises(ValueError):
        MarginHead("asoftmax", 5, 4, margin=5)


# --------------------------------------------------------------------------------------------- networks

@pytest.mark.parametrize("depth", sorted(DEPTH_UNITS))
def test_sphere_nets_shapes_and_structure(depth):
    net = sphereface_net(depth, width=0.125 if depth >= 36 else 0.25)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 + 2 * sum(DEPTH_UNITS[depth]) == depth  # the paper counts conv layers
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, torch.nn.PReLU) for m in net.modules()) == len(convs)
    assert [c.stride for c in convs if c.stride == (2, 2)] == [(2, 2)] * 4
    assert net.map_size == (7, 6)
    out = net(torch.zeros(2, 3, 112, 96))
    assert out.shape == (2, 512)


def test_sphere20_full_width_matches_the_paper():
    net = sphereface_net(20)
    assert net.fc5.in_features == 512 * 7 * 6
    chans = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert chans == [64, 128, 256, 512]
    # initialisation: stride-2 convs Caffe-xavier with zero bias, residual convs N(0, 0.01) without bias
    s1 = net.stages[1]
    assert s1.conv.bias is not None and float(s1.conv.bias.detach().abs().max()) == 0.0
    bound = math.sqrt(3.0 / (64 * 9))
    assert float(s1.conv.weight.detach().abs().max()) <= bound and float(s1.conv.weight.detach().abs().max()) > 0.9 * bound
    u = s1.units[0].conv1
    assert u.bias is None and abs(float(u.weight.detach().std()) - 0.01) < 1e-3
    n_params = sum(p.numel() for p in net.parameters())
    assert 22e6 < n_params < 23.5e6  # sphere20a: ~22.7M parameters without the classifier


def test_channels_last_preprocess_and_bf16_forward():
    img = torch.randint(0, 256, (2, 112, 96, 3), dtype=torch.uint8)
    x = preprocess(img)
    assert x.shape == (2, 3, 112, 96) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0, 1, 3, 4], (img[0, 3, 4, 1].float() - 127.5) / 128)
    net = sphereface_net(4, width=0.25).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.shape == (2, 512) and torch.isfinite(y.float()).all()


def test_model_file_round_trip_and_features_loader(tmp_path):
    net = sphereface_net(10, width=0.25)
    path = tmp_path / "model.pt"
    save_model(path, net, meta={"run": "t"})
    net2, meta = load_model(path)
    assert meta["input"] == INPUT and meta["feature_dim"] == 512 and meta["meta"]["run"] == "t"
    x = torch.randn(2, 3, 112, 96)
    torch.testing.assert_close(net.eval()(x), net2(x))
    features = pytest.importorskip("maskface.features")
    net3, meta3 = features.load_checkpoint(path)
    torch.testing.assert_close(net3(x), net2(x))
    assert meta3["input"]["channel_order"] == "RGB"
