"""Tests aimed at surviving mutants of hessfunc/dense.py and hessfunc/diagonal.py
(docs/mutation.md): the memory guard's itemsize and device, the structured route replaced
by the generic one, per-sample diagonals through Flatten; float64 against the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import oracle_loss
from torch import nn

import hessfunc as hf

ATOL = 1e-10


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    return f, params, x, y


def test_memory_guard_counts_float64_bytes():
    f = lambda w: (w ** 4).sum()  # noqa: E731
    w = torch.zeros(10, dtype=torch.float64)   # 100 entries: 800 bytes in float64, 400 in float32
    with pytest.raises(hf.DenseMemoryError):
        hf.hessian_blocks(f, max_memory=500)(w)
    hf.hessian_blocks(f, max_memory=800)(w)


def test_memory_guard_gets_the_inputs_device(monkeypatch):
    import hessfunc._memory as mem

    seen = []
    original = mem.memory_limit

    def spy(max_memory, device, call):
        seen.append(device)
        return original(max_memory, device, call)

    monkeypatch.setattr(mem, "memory_limit", spy)
    f = lambda w: (w ** 4).sum()  # noqa: E731
    w = torch.ones(4, dtype=torch.float64)
    hf.hessian(f)(w)
    hf.hessian_blocks(f)(w)
    assert seen and all(d is not None and torch.device(d) == w.device for d in seen)


def test_structured_route_does_not_need_generic_products(monkeypatch):
    import hessfunc.dense as dense

    f, params, x, y = _mlp_problem()
    loss, leaves = oracle_loss(f, params, x, y)
    H_ref = hf.reference.hessian(loss, list(leaves.values()))
    blocks_ref = hf.reference.hessian_blocks(loss, leaves)

    class Boom:
        def __init__(self, *a, **k):
            raise AssertionError("generic route taken")

    monkeypatch.setattr(dense, "HVPFunction", Boom)
    _close(hf.hessian(f, flat=True)(params, x, y), H_ref)
    hf.hessian(f)(params, x, y)
    blocks = hf.hessian_blocks(f)(params, x, y)
    for k in blocks_ref:
        _close(blocks[k], blocks_ref[k])


def test_generic_diag_does_not_analyze_the_chain(monkeypatch):
    import hessfunc.diagonal as diagonal

    f, params, x, y = _mlp_problem()
    loss, leaves = oracle_loss(f, params, x, y)
    ref = hf.reference.hessian_diag(loss, leaves)

    def boom(*a, **k):
        raise AssertionError("structured route tried")

    monkeypatch.setattr(diagonal, "plan_diagonal", boom)
    d = hf.hessian_diag(f, method="generic")(params, x, y)
    for k in ref:
        _close(d[k], ref[k])


def test_per_sample_diag_through_conv_flatten_linear():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 2 * 2, 3)).double()
    f, params = hf.functionalize(model, F.cross_entropy)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    got = hf.hessian_diag(f, per_sample=True)(params, x, y)
    for n in range(4):
        loss, leaves = oracle_loss(f, params, x[n:n + 1], y[n:n + 1])
        ref = hf.reference.hessian_diag(loss, leaves)
        for k in ref:
            _close(got[k][n], ref[k])


def test_generic_dense_route_respects_chunk_size(monkeypatch):
    from hessfunc.products import HVPFunction

    seen = []
    original = HVPFunction.batched

    def spy(self, tangents):
        seen.append(torch.utils._pytree.tree_leaves(tangents)[0].shape[0])
        return original(self, tangents)

    monkeypatch.setattr(HVPFunction, "batched", spy)
    f = lambda w: (w.sin() * w.cos()).sum() + (w * w).sum() ** 2  # noqa: E731
    w = torch.randn(100, dtype=torch.float64)
    H = hf.hessian(f, chunk_size=7)(w)
    assert seen and max(seen) <= 7 and sum(seen) == 100
    seen.clear()
    _close(hf.hessian(f)(w), H)
    assert seen and max(seen) <= 32 and sum(seen) == 100  # NOTE [chunk cap]


def test_error_messages_name_the_public_function():
    f = lambda w: (w ** 4).sum()  # noqa: E731
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hessian: .*`f`"):
        hf.hessian(42)(torch.ones(3))
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hessian: .*`chunk_size`"):
        hf.hessian(f, chunk_size=0)(torch.ones(3))
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hessian_blocks: .*`chunk_size`"):
        hf.hessian_blocks(f, chunk_size=0)(torch.ones(3))
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hessian_diag: .*`chunk_size`"):
        hf.hessian_diag(f, chunk_size=0)(torch.ones(3))
    with pytest.raises(hf.DenseMemoryError,
                       match=r"^hessfunc\.hessian: the dense 10 x 10 Hessian needs .*; use "
                             r"`hessian_blocks`, `hessian_diag` or `hessfunc\.HessianOperator`"):
        hf.hessian(f, max_memory=100)(torch.zeros(10, dtype=torch.float64))
    with pytest.raises(hf.DenseMemoryError,
                       match=r"^hessfunc\.hessian_blocks: storing the diagonal blocks needs .*; "
                             r"use `hessian_diag` or `hessfunc\.HessianOperator`"):
        hf.hessian_blocks(f, max_memory=100)(torch.zeros(10, dtype=torch.float64))


def test_hessian_diag_reduction_and_the_per_sample_memory_guard():
    """``reduction`` takes 'mean' and 'sum' only (one process: the same diagonal), named
    in the error; the per-sample diagonals' memory guard counts N x P float64 numbers,
    names the call and says how to fit."""
    f, params, x, y = _mlp_problem()
    P = sum(t.numel() for t in params.values())
    truth = hf.hessian_diag(f)(params, x, y)
    for name, t in hf.hessian_diag(f, reduction="sum")(params, x, y).items():
        _close(t, truth[name])
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hessian_diag: `reduction` must be "
                                               r"'mean' or 'sum', got 'max'\.$"):
        hf.hessian_diag(f, reduction="max")
    need = 5 * P * 8
    with pytest.raises(hf.DenseMemoryError, match=rf"^hessfunc\.hessian_diag: .*5 per-sample "
                                                  rf"diagonals of {P}.*pass fewer samples at "
                                                  "a time"):
        hf.hessian_diag(f, per_sample=True, max_memory=need - 1)(params, x, y)
    hf.hessian_diag(f, per_sample=True, max_memory=need)(params, x, y)


def test_hessian_diag_takes_the_graph_for_the_parameters_it_covers(monkeypatch):
    """method='auto' on a graph that leaves some parameters to one-hot products (a tied
    weight, a norm penalty) still takes the graph for the others: the graph route runs,
    and the diagonal equals the oracle's."""
    import sys

    from hessfunc.testing.models import TiedNet

    torch.manual_seed(0)
    model = TiedNet(3, 4).double()
    with torch.no_grad():
        model.dec_bias.normal_()

    def f(p, x, y):
        out = torch.func.functional_call(model, p, (x,))
        return F.mse_loss(out, y) + p["dec_bias"].norm()

    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    module = sys.modules["hessfunc.diagonal"]
    calls = []
    real = module.graph_route
    monkeypatch.setattr(module, "graph_route", lambda *a: calls.append(1) or real(*a))
    diag = hf.hessian_diag(f)(params, x, y)
    assert calls == [1]
    loss, leaves = oracle_loss(f, params, x, y)
    truth = hf.reference.hessian_diag(loss, leaves)
    for name, t in diag.items():
        _close(t, truth[name])
