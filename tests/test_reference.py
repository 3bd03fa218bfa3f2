"""The oracle itself, against central finite differences and closed forms (test the tests)."""

from __future__ import annotations

import math

import torch
from _helpers import oracle_loss
from hypothesis import given
from hypothesis import strategies as st
from strategies import problems, random_like

import hessfunc as hf


def _flat_grad_at(f, params, batch, flat_p):
    """Gradient of f at a flat parameter vector, by plain autograd (float64)."""
    names = list(params)
    pieces = torch.split(flat_p, [params[k].numel() for k in names])
    leaves = {k: p.reshape(params[k].shape).clone().requires_grad_(True)
              for k, p in zip(names, pieces, strict=True)}
    loss = f(leaves, *batch)
    gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return torch.cat([(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1)
                      for k, g in zip(names, gs, strict=True)])


@given(prob=problems(), seed=st.integers(0, 1000))
def test_oracle_hvp_matches_central_differences(prob, seed):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    v = random_like(params, seed)
    flat_p = torch.cat([t.reshape(-1) for t in params.values()])
    flat_v = torch.cat([t.reshape(-1) for t in v.values()])
    h = 1e-5
    fd = (_flat_grad_at(f, params, prob.batch, flat_p + h * flat_v)
          - _flat_grad_at(f, params, prob.batch, flat_p - h * flat_v)) / (2 * h)
    loss, leaves = oracle_loss(f, params, *prob.batch)
    hv = torch.cat([t.reshape(-1) for t in
                    hf.reference.hvp(loss, list(leaves.values()), list(v.values()))])
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-7 * (1 + float(fd.abs().max())))


@given(prob=problems(max_batch=3))
def test_oracle_hessian_matches_central_differences_and_is_symmetric(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    flat_p = torch.cat([t.reshape(-1) for t in params.values()])
    P = flat_p.numel()
    h = 1e-5
    cols = []
    for j in range(P):
        e = torch.zeros_like(flat_p)
        e[j] = h
        cols.append((_flat_grad_at(f, params, prob.batch, flat_p + e)
                     - _flat_grad_at(f, params, prob.batch, flat_p - e)) / (2 * h))
    fd = torch.stack(cols, dim=1)
    loss, leaves = oracle_loss(f, params, *prob.batch)
    H = hf.reference.hessian(loss, list(leaves.values()))
    assert H.shape == (P, P)
    torch.testing.assert_close(H, H.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H, fd, rtol=1e-6, atol=1e-7 * (1 + float(fd.abs().max())))
    # blocks and diagonal are slices of the full Hessian
    blocks = hf.reference.hessian_blocks(loss, leaves)
    diags = hf.reference.hessian_diag(loss, leaves)
    lo = 0
    for k, p in params.items():
        n = p.numel()
        torch.testing.assert_close(blocks[k], H[lo:lo + n, lo:lo + n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(diags[k].reshape(-1), H.diagonal()[lo:lo + n],
                                   rtol=1e-12, atol=1e-14)
        assert diags[k].shape == p.shape
        lo += n


def test_oracle_derivatives_of_x4_as_in_the_seed():
    d = hf.reference.derivatives(lambda x: x ** 4, torch.tensor(1.0, dtype=torch.float64), 4)
    assert [float(t) for t in d] == [4.0, 12.0, 24.0, 24.0]


def test_oracle_derivatives_closed_forms():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    sin_d = hf.reference.derivatives(torch.sin, x, 5)
    expected = [torch.cos(x), -torch.sin(x), -torch.cos(x), torch.sin(x), torch.cos(x)]
    for got, want in zip(sin_d, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    exp_d = hf.reference.derivatives(torch.exp, x, 3)
    for got in exp_d:
        torch.testing.assert_close(got, torch.exp(x), rtol=1e-14, atol=0)


def test_oracle_laplacian_closed_forms():
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(hf.reference.laplacian(lambda z: torch.sin(z).sum(), x),
                               -torch.sin(x).sum(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(hf.reference.laplacian(lambda z: (z ** 2).sum(), x),
                               torch.tensor(10.0, dtype=torch.float64))
    gauss = lambda z: torch.exp(-(z ** 2).sum() / 2)  # noqa: E731
    r2 = float((x ** 2).sum())
    assert math.isclose(float(hf.reference.laplacian(gauss, x)), (r2 - 5) * math.exp(-r2 / 2),
                        rel_tol=1e-12)
