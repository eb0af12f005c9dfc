import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from lossbook.ntk import empirical_ntk, kernel_alignment, kernel_distance, module_ntk, per_sample_jacobian

F64 = torch.float64


def mlp_fn(p, x):
    """A small two-layer tanh network with two outputs, on one sample."""
    return p["b"] @ torch.tanh(p["a"] @ x + p["c"])


def mlp_params(seed=0, d=3, h=4, o=2):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(h, d, generator=g, dtype=F64), "c": torch.randn(h, generator=g, dtype=F64),
            "b": torch.randn(o, h, generator=g, dtype=F64)}


def loop_jacobians(fn, params, x):
    """Reference: one autograd backward pass per sample and output, flattened and concatenated."""
    rows = []
    for mu in range(x.shape[0]):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out = fn(p, x[mu]).reshape(-1)
        per_out = []
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], list(p.values()), retain_graph=True)
            per_out.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)                                      # (P, O, p)


def loop_ntk(fn, params, x1, x2):
    j1, j2 = loop_jacobians(fn, params, x1), loop_jacobians(fn, params, x2)
    P1, O, _ = j1.shape
    K = torch.zeros(P1, x2.shape[0], O, O, dtype=F64)
    for m in range(P1):
        for n in range(x2.shape[0]):
            for a in range(O):
                for b in range(O):
                    K[m, n, a, b] = sum(float(j1[m, a, i]) * float(j2[n, b, i]) for i in range(j1.shape[-1]))
    return K


def test_per_sample_jacobian_matches_loop():
    p = mlp_params()
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    jac = per_sample_jacobian(mlp_fn, p, x)
    assert jac["a"].shape == (5, 2, 4, 3) and jac["b"].shape == (5, 2, 2, 4)
    flat = torch.cat([jac[k].reshape(5, 2, -1) for k in p], -1)
    torch.testing.assert_close(flat, loop_jacobians(mlp_fn, p, x), rtol=1e-12, atol=1e-14)


def test_empirical_ntk_matches_loop_vector_output():
    p = mlp_params(seed=2)
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, 3, dtype=F64, generator=g), torch.randn(3, 3, dtype=F64, generator=g)
    K = empirical_ntk(mlp_fn, p, x1, x2)
    ref = loop_ntk(mlp_fn, p, x1, x2)
    assert K.shape == (4, 3, 2, 2)
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(mlp_fn, p, x1, x2, trace_outputs=True),
                               ref.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-12)


def test_scalar_output_gram_is_symmetric_psd_and_linear_model_case():
    p = mlp_params(seed=4, o=1)
    fn = lambda q, x: mlp_fn(q, x)[0]                                # noqa: E731
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    K = empirical_ntk(fn, p, x)
    assert K.shape == (6, 6)
    torch.testing.assert_close(K, K.T)
    assert float(torch.linalg.eigvalsh(K).min()) > -1e-10
    torch.testing.assert_close(K, loop_ntk(fn, p, x, x)[..., 0, 0], rtol=1e-12, atol=1e-12)
    # linear model f = w.x: the NTK is the linear kernel x x'^T, whatever w is
    lin = lambda q, x: (q["w"] * x).sum()                            # noqa: E731
    torch.testing.assert_close(empirical_ntk(lin, {"w": torch.randn(3, dtype=F64)}, x), x @ x.T)


def test_module_ntk_matches_functional():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(4, 3, dtype=F64)
    p = {"0.weight": model[0].weight, "0.bias": model[0].bias, "2.weight": model[2].weight, "2.bias": model[2].bias}
    fn = lambda q, xi: (q["2.weight"] @ torch.tanh(q["0.weight"] @ xi + q["0.bias"]) + q["2.bias"])[0]   # noqa: E731
    ref = loop_ntk(fn, {k: v.detach() for k, v in p.items()}, x, x)[..., 0, 0]
    torch.testing.assert_close(module_ntk(model, x)[..., 0, 0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module_ntk(model, x, trace_outputs=True), ref, rtol=1e-12, atol=1e-12)


def loop_alignment(K, y, center):
    P = len(y)
    if center:
        rm = [sum(K[i][j] for j in range(P)) / P for i in range(P)]
        cm = [sum(K[i][j] for i in range(P)) / P for j in range(P)]
        m = sum(rm) / P
        K = [[K[i][j] - rm[i] - cm[j] + m for j in range(P)] for i in range(P)]
        ym = sum(y) / P
        y = [v - ym for v in y]
    num = sum(y[i] * K[i][j] * y[j] for i in range(P) for j in range(P))
    fro = math.sqrt(sum(K[i][j] ** 2 for i in range(P) for j in range(P)))
    return num / (fro * sum(v * v for v in y))


@pytest.mark.parametrize("center", [True, False])
def test_kernel_alignment_matches_loop(center):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(7, 4, dtype=F64, generator=g)
    K, y = z @ z.T, torch.randn(7, dtype=F64, generator=g)
    ref = loop_alignment(K.tolist(), y.tolist(), center)
    assert abs(float(kernel_alignment(K, y, center=center)) - ref) < 1e-12


def test_alignment_special_cases_and_gradcheck():
    y = torch.tensor([1.0, -2.0, 0.5, 0.5], dtype=F64)
    yc = y - y.mean()
    assert abs(float(kernel_alignment(torch.outer(yc, yc), y)) - 1.0) < 1e-12       # the ideal kernel
    assert abs(float(kernel_alignment(torch.outer(y, y) + 3.0, y)) - 1.0) < 1e-12   # a constant is centred away
    K = torch.randn(4, 4, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k: kernel_alignment(k @ k.T, y), (K,))
    assert torch.autograd.gradcheck(lambda k: kernel_distance(k @ k.T, torch.eye(4, dtype=F64) + 1), (K,))


def test_kernel_distance_matches_loop_and_special_cases():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(5, 5, dtype=F64, generator=g), torch.randn(5, 5, dtype=F64, generator=g)
    K1, K2 = a @ a.T, b @ b.T
    inner = sum(float(K1[i, j]) * float(K2[i, j]) for i in range(5) for j in range(5))
    ref = 1 - inner / (math.sqrt(sum(float(v) ** 2 for v in K1.reshape(-1))) * math.sqrt(sum(float(v) ** 2 for v in K2.reshape(-1))))
    assert abs(float(kernel_distance(K1, K2)) - ref) < 1e-12
    assert abs(float(kernel_distance(K1, 3.0 * K1))) < 1e-12
    batch = kernel_distance(torch.stack([K1, K2]), K1)
    assert batch.shape == (2,) and abs(float(batch[0])) < 1e-12


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.floats(0.1, 10.0), st.integers(0, 1000))
def test_alignment_and_distance_properties(p, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(p, p + 1, dtype=F64, generator=g)
    K, K2, y = z @ z.T, torch.eye(p, dtype=F64), torch.randn(p, dtype=F64, generator=g)
    A = float(kernel_alignment(K, y))
    assert -1e-12 <= A <= 1 + 1e-12                                   # PSD kernel: alignment in [0, 1]
    assert abs(float(kernel_alignment(scale * K, scale * y)) - A) < 1e-9   # scale-free in K and y
    d = float(kernel_distance(K, K2))
    assert -1e-12 <= d <= 1 + 1e-12
    assert abs(d - float(kernel_distance(K2, scale * K))) < 1e-9          # symmetric, scale-free


def test_bad_input():
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(mlp_fn, {}, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x must"):
        per_sample_jacobian(mlp_fn, mlp_params(), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="square"):
        kernel_alignment(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="y must"):
        kernel_alignment(torch.eye(3), torch.zeros(4))
    with pytest.raises(ValueError, match="same matrix shape"):
        kernel_distance(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="nn.Module"):
        module_ntk("not a model", torch.zeros(2, 3))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    p = mlp_params(seed=8)
    x = torch.randn(5, 3, dtype=F64)
    K = empirical_ntk(mlp_fn, {k: v.cuda() for k, v in p.items()}, x.cuda())
    torch.testing.assert_close(K.cpu(), empirical_ntk(mlp_fn, p, x))
    y = torch.randn(5, dtype=F64)
    torch.testing.assert_close(kernel_alignment(K[..., 0, 0], y.cuda()).cpu(), kernel_alignment(K.cpu()[..., 0, 0], y))
