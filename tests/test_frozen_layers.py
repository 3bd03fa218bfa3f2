"""Whole frozen layers in Linear chains, against the loop oracle (float64, rtol 1e-10).

A layer whose parameters are all frozen has no blocks of its own, but every
structured route must still carry curvature and Jacobians *through* it: the full
Hessian pushes the Jacobian of a lower trainable layer forward across it (NOTE [full
Hessian] in ``hessfunc/graph/chain_plan.py``), the products run their R-operator through it
(NOTE [structured products]) and the per-sample Hessians are propagated back through
it. Each case freezes the weight, the bias or both of whole layers (first, middle,
last, several, consecutive) of chains of depth >= 3 with curved activations, and
compares every quantity with ``hf.reference`` on a graph built by plain autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, assert_nested_close, oracle_loss
from torch import nn

import hessfunc as hf
from hessfunc.graph.chain import graph_chain
from hessfunc.testing.losses import custom_loss
from hessfunc.testing.models import build_mlp
from hessfunc.testing.strategies import random_like

# (sizes, {layer index: "weight" | "bias" | "both"}): layer indices count Linear layers.
# Square frozen layers (4 -> 4) matter: a Jacobian that is not pushed through them
# keeps a valid shape, so only the values can tell.
CASES = {
    "first-both": ([3, 4, 4, 2], {0: "both"}),
    "middle-both": ([3, 4, 4, 2], {1: "both"}),
    "last-both": ([3, 4, 4, 2], {2: "both"}),
    "middle-weight": ([3, 4, 4, 2], {1: "weight"}),
    "middle-bias": ([3, 4, 4, 2], {1: "bias"}),
    "last-weight": ([3, 5, 4, 3], {2: "weight"}),
    "first-bias": ([3, 5, 4, 3], {0: "bias"}),
    "first-and-last": ([3, 4, 4, 4, 2], {0: "both", 3: "both"}),
    "two-consecutive-middle": ([3, 4, 4, 4, 2], {1: "both", 2: "both"}),
    "alternate-mixed": ([2, 4, 4, 4, 3], {0: "weight", 1: "both", 3: "bias"}),
    "all-but-one-bias": ([3, 4, 4, 2], {0: "both", 1: "both", 2: "weight"}),
}
ACTS = ["tanh", "sigmoid", "softplus"]
LOSSES = ["mse", "cross-entropy", "custom"]


def _problem(case, act, loss, n=5, seed=0):
    sizes, frozen = CASES[case]
    model = build_mlp(sizes, act, seed=seed + 11)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for index, what in frozen.items():
        if what in ("weight", "both"):
            linears[index].weight.requires_grad_(False)
        if what in ("bias", "both"):
            linears[index].bias.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    c = sizes[-1]
    if loss == "cross-entropy":
        y, loss_fn = torch.randint(0, c, (n,), generator=g), F.cross_entropy
    else:
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
        loss_fn = nn.MSELoss() if loss == "mse" else custom_loss
    f, params = hf.functionalize(model, loss_fn)
    expected_names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert list(params) == expected_names  # frozen parameters are not differentiated
    return model, loss_fn, f, params, x, y


def _oracle(f, params, *batch):
    loss, leaves = oracle_loss(f, params, *batch)
    return (hf.reference.hessian(loss, list(leaves.values())),
            hf.reference.hessian_blocks(loss, leaves),
            hf.reference.hessian_diag(loss, leaves))


def _oracle_hvp(f, params, batch, v):
    loss, leaves = oracle_loss(f, params, *batch)
    return dict(zip(params, hf.reference.hvp(loss, list(leaves.values()),
                                             [v[k] for k in params]), strict=True))


def _cases():
    for i, case in enumerate(CASES):
        for j, act in enumerate(ACTS):
            yield pytest.param(case, act, LOSSES[(i + j) % 3], id=f"{case}-{act}")


@pytest.mark.parametrize(("case", "act", "loss"), list(_cases()))
def test_dense_quantities_with_frozen_layers_equal_the_oracle(case, act, loss):
    _, _, f, params, x, y = _problem(case, act, loss)
    plan, reason = graph_chain(f, (params, x, y), 0)
    assert plan is not None and plan.per_sample_blocks(), reason  # the route under test
    H_ref, blocks_ref, diag_ref = _oracle(f, params, x, y)
    assert float(H_ref.abs().max()) > 1e-3  # curved: a zero Hessian would prove nothing

    H = hf.hessian(f, flat=True)(params, x, y)
    assert_close(H, H_ref)
    assert_close(hf.hessian(f, flat=True, chunk_size=2)(params, x, y), H_ref)
    nested = hf.hessian(f)(params, x, y)
    assert_nested_close(nested, H_ref, params)

    assert_close(hf.hessian_blocks(f)(params, x, y), blocks_ref)
    assert_close(hf.hessian_blocks(f, chunk_size=2)(params, x, y), blocks_ref)
    assert_close(hf.hessian_diag(f)(params, x, y), diag_ref)
    assert_close(hf.hessian_diag(f, method="structured", chunk_size=2)(params, x, y), diag_ref)
    assert_close(hf.hessian_diag(f, method="generic")(params, x, y), diag_ref)


@pytest.mark.parametrize(("case", "act", "loss"), list(_cases()))
def test_per_sample_diagonals_with_frozen_layers_equal_the_oracle(case, act, loss):
    _, _, f, params, x, y = _problem(case, act, loss, n=3)
    got = hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y)
    auto = hf.hessian_diag(f, per_sample=True)(params, x, y)
    for n in range(x.shape[0]):
        _, _, diag_ref = _oracle(f, params, x[n:n + 1], y[n:n + 1])
        assert_close({k: t[n] for k, t in got.items()}, diag_ref)
        assert_close({k: t[n] for k, t in auto.items()}, diag_ref)


@pytest.mark.parametrize(("case", "act", "loss"), list(_cases()))
def test_products_with_frozen_layers_equal_the_oracle(case, act, loss):
    _, _, f, params, x, y = _problem(case, act, loss)
    vs = [random_like(params, seed) for seed in range(3)]
    expected = [_oracle_hvp(f, params, (x, y), v) for v in vs]
    H = hf.hvp_fn(f, (params, x, y), method="structured")
    assert H.method == "structured"
    graph = hf.hvp_fn(f, (params, x, y), method="graph")
    batched = H.batched({k: torch.stack([v[k] for v in vs]) for k in params})
    for i, (v, hv) in enumerate(zip(vs, expected, strict=True)):
        assert_close(hf.hvp(f, (params, x, y), v, method="structured"), hv)
        assert_close(hf.hvp(f, (params, x, y), v), hv)
        assert_close(H(v), hv)
        assert_close(graph(v), hv)
        assert_close({k: t[i] for k, t in batched.items()}, hv)
    for index, key in enumerate(params):  # each parameter's own block rows
        rows = H.block_rows(index, torch.stack([v[key] for v in vs]))
        for i, v in enumerate(vs):
            only = {q: t if q == key else torch.zeros_like(t) for q, t in v.items()}
            assert_close(rows[i], _oracle_hvp(f, params, (x, y), only)[key])


@pytest.mark.parametrize(("case", "act", "loss"), list(_cases()))
def test_operator_with_frozen_layers_equals_the_oracle(case, act, loss):
    model, loss_fn, f, params, x, y = _problem(case, act, loss, n=7)
    H_ref, _, _ = _oracle(f, params, x, y)
    for data in ((x, y), [(x[:3], y[:3]), (x[3:], y[3:])]):
        op = hf.HessianOperator.from_model(model, loss_fn, data)
        assert op.shape == H_ref.shape
        assert_close(op.to_dense(), H_ref)
        assert_close(op.diagonal(), H_ref.diagonal())
        v = torch.randn(op.shape[0], dtype=torch.float64)
        V = torch.randn(op.shape[0], 3, dtype=torch.float64)
        assert_close(op @ v, H_ref @ v)
        assert_close(op @ V, H_ref @ V)
        assert_close(op.trace(), H_ref.trace())


def test_frozen_middle_layer_changes_the_cross_blocks_it_carries():
    """The case of the audit: on a [3, 4, 4, 2] tanh chain with its middle layer frozen,
    the cross blocks between the first and last layers pass through the frozen weight.
    The full Hessian equals the oracle, and those cross blocks are far from zero (a
    route that dropped the frozen layer's Jacobian would be visibly wrong)."""
    model, _, f, params, x, y = _problem("middle-both", "tanh", "mse", n=6)
    assert list(params) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    H_ref, _, _ = _oracle(f, params, x, y)
    H = hf.hessian(f, flat=True)(params, x, y)
    assert_close(H, H_ref)
    cross = H_ref[:16, 16:]   # first layer (12 + 4) against the last (8 + 2)
    assert float(cross.abs().max()) > 1e-2 * float(H_ref.abs().max())
    assert_close(H[:16, 16:], cross)
