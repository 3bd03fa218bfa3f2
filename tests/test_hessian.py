"""Full Hessians, blocks, diagonals (both routes), per-sample diagonals, against the oracle."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOL, assert_close, assert_nested_close, oracle_loss
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import vmap

import hessfunc as hf
from hessfunc.graph.chain import graph_chain
from hessfunc.graph.curvature import plan_diagonal
from hessfunc.testing.losses import custom_loss
from hessfunc.testing.models import ACTIVATIONS, ResidualMLP, build_mlp
from hessfunc.testing.strategies import problems


def _oracle(f, params, batch):
    loss, leaves = oracle_loss(f, params, *batch)
    return (hf.reference.hessian(loss, list(leaves.values())),
            hf.reference.hessian_blocks(loss, leaves),
            hf.reference.hessian_diag(loss, leaves))


def _close_to_rounding(actual, expected, H_ref):
    """Equal to rounding: every entry of a block or the diagonal is a sum of terms as
    large as the largest Hessian entry, so it carries their rounding, however much they
    cancel (a drawn net with inputs at 1e3: diagonal entries of 1e-5 next to 1e3
    elsewhere agree to 4e-11, 3e-14 of max|H|). The float64 table's atol is taken
    relative to max|H| (as hessfunc.testing's comparisons take it), rtol as it is."""
    rtol, atol = TOL[torch.float64]
    torch.testing.assert_close(actual, expected, rtol=rtol,
                               atol=atol * max(1.0, float(H_ref.abs().max())))


@given(problems(max_batch=4))
def test_full_blocks_diag_equal_oracle_and_each_other(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    H_ref, blocks_ref, diag_ref = _oracle(f, params, prob.batch)
    H = hf.hessian(f, flat=True)(params, *prob.batch)
    _close_to_rounding(H, H_ref, H_ref)
    _close_to_rounding(H, H.T, H_ref)
    nested = hf.hessian(f)(params, *prob.batch)
    blocks = hf.hessian_blocks(f)(params, *prob.batch)
    diag = hf.hessian_diag(f)(params, *prob.batch)
    generic = hf.hessian_diag(f, method="generic")(params, *prob.batch)
    _close_to_rounding(blocks, blocks_ref, H_ref)
    _close_to_rounding(diag, diag_ref, H_ref)
    _close_to_rounding(generic, diag_ref, H_ref)
    lo = 0
    for a, pa in params.items():
        n = pa.numel()
        sl = slice(lo, lo + n)
        _close_to_rounding(blocks[a], H_ref[sl, sl], H_ref)
        _close_to_rounding(diag[a].reshape(-1), H_ref.diagonal()[sl], H_ref)
        assert diag[a].shape == pa.shape
        col = 0
        for b, pb in params.items():
            assert nested[a][b].shape == pa.shape + pb.shape
            _close_to_rounding(nested[a][b].reshape(n, pb.numel()),
                               H_ref[sl, col:col + pb.numel()], H_ref)
            col += pb.numel()
        lo += n


@pytest.mark.parametrize("dim", [1, 2])
def test_convolution_chains_take_structured_products_and_are_exact(dim, monkeypatch):
    """Convolutions have product rules but no per-sample Hessian rules in the chain
    route: the full Hessian of a conv chain comes from batched structured products on
    one-hot tangents (NOTE [structured products]); the blocks and the diagonal from the
    captured graph (no products); all equal to the oracle."""
    methods = []
    real = importlib.import_module("hessfunc.products").HVPFunction
    for module in ("hessfunc.dense", "hessfunc.diagonal"):
        monkeypatch.setattr(importlib.import_module(module), "HVPFunction",
                            lambda *a, **kw: methods.append(real(*a, **kw)) or methods[-1])
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    torch.manual_seed(dim)
    body = nn.Sequential(conv(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                         conv(3, 2, 2, padding=1, dilation=2), nn.Sigmoid(), nn.Flatten())
    x = torch.randn(3, 2, *[7] * dim, dtype=torch.float64)
    model = nn.Sequential(*body, nn.Linear(body.double()(x).shape[1], 3)).double()
    f, params = hf.functionalize(model, F.cross_entropy)
    batch = (x, torch.tensor([0, 2, 1]))
    H_ref, blocks_ref, diag_ref = _oracle(f, params, batch)
    assert_close(hf.hessian(f, flat=True, chunk_size=5)(params, *batch), H_ref)
    assert_close(hf.hessian_blocks(f)(params, *batch), blocks_ref)
    assert_close(hf.hessian_diag(f)(params, *batch), diag_ref)
    assert [H.method for H in methods] == ["structured"]


class SimpleNet(nn.Module):
    """The seed's network: a custom module whose forward calls a Sequential."""

    def __init__(self, act: type[nn.Module] = nn.Tanh):
        super().__init__()
        self.linear = nn.Sequential(nn.Linear(1, 10), act(), nn.Linear(10, 10), act(),
                                    nn.Linear(10, 1))

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss", ["mse", "sum-mse", "cross-entropy", "custom"])
def test_structured_route_taken_and_exact(act, loss):
    torch.manual_seed(0)
    out = 3 if loss == "cross-entropy" else 2
    model = build_mlp([3, 5, 4, out], act, seed=1)
    x = torch.randn(7, 3, dtype=torch.float64)
    if loss == "cross-entropy":
        y, loss_fn = torch.randint(0, 3, (7,)), F.cross_entropy
    else:
        y = torch.randn(7, out, dtype=torch.float64)
        loss_fn = {"mse": nn.MSELoss(), "sum-mse": nn.MSELoss(reduction="sum"),
                   "custom": custom_loss}[loss]
    f, params = hf.functionalize(model, loss_fn)
    plan, reason = graph_chain(f, (params, x, y), 0)
    _, blocks_ref, diag_ref = _oracle(f, params, (x, y))
    # a user-defined module (sin) is an elementwise map in the graph like any other
    assert plan is not None and plan.per_sample_blocks(), reason
    assert_close(hf.hessian_diag(f, method="structured")(params, x, y), diag_ref)
    assert_close(hf.hessian_blocks(f)(params, x, y), blocks_ref)
    loss_value, leaves = oracle_loss(f, params, x, y)
    assert_close(plan.full(), hf.reference.hessian(loss_value, list(leaves.values())))


def test_structured_route_on_the_seed_network_with_frozen_layer():
    torch.manual_seed(0)
    model = SimpleNet().double()
    model.linear[2].bias.requires_grad_(False)
    x = torch.linspace(-3, 3, 40, dtype=torch.float64).view(-1, 1)
    y = torch.sin(x)
    f, params = hf.functionalize(model, nn.MSELoss())
    assert "linear.2.bias" not in params
    H_ref, blocks_ref, diag_ref = _oracle(f, params, (x, y))
    assert_close(hf.hessian_diag(f, method="structured")(params, x, y), diag_ref)
    assert_close(hf.hessian_blocks(f)(params, x, y), blocks_ref)
    assert graph_chain(f, (params, x, y), 0)[0].per_sample_blocks()
    assert_close(hf.hessian(f, flat=True)(params, x, y), H_ref)  # structured full Hessian


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x):
        return self.body(x)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 2)

    def forward(self, x):
        h = self.act(self.a(x))
        h.mul_(2.0)  # edits the recorded output in place: the chain must be refused
        return self.b(h)


@pytest.mark.parametrize(
    ("make", "loss_fn", "chain", "graph"),
    [
        (lambda: ResidualMLP(3, 3, 1, 2), nn.MSELoss(), "products", True),
        (WithLayerNorm, nn.MSELoss(), "per-sample", True),
        (InPlace, nn.MSELoss(), "per-sample", True),
        (lambda: build_mlp([3, 4, 2], "tanh", 0), lambda o, t: ((o - t).sum()) ** 2,
         "products", False),
    ],
)
def test_fallback_is_detected_and_still_exact(make, loss_fn, chain, graph):
    """The chain in the graph: LayerNorm's normalisation is a map with a closed form,
    whose full Hessian propagates per sample; skips make a DAG of layers, whose full
    Hessian takes the products' rows; an
    in-place edit after an activation is one more elementwise op of the functional trace;
    a loss that couples samples keeps its gradient graph for products, and the full
    Hessian takes rows.
    The captured graph's diagonal takes skips, LayerNorm and in-place edits
    (method='structured' holds); a loss that couples samples takes one-hot products.
    Every route equals the oracle."""
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    f, params = hf.functionalize(model, loss_fn)
    plan, reason = graph_chain(f, (params, x, y), 0)
    if chain is None:
        assert plan is None and "used outside the chain of layers" in reason
    else:
        assert plan is not None and plan.per_sample_blocks() == (chain == "per-sample")
    H_ref, _, diag_ref = _oracle(f, params, (x, y))
    assert_close(hf.hessian(f, flat=True)(params, x, y), H_ref)
    assert_close(hf.hessian_diag(f)(params, x, y), diag_ref)
    if graph:
        assert_close(hf.hessian_diag(f, method="structured")(params, x, y), diag_ref)
    else:
        with pytest.raises(hf.ArgumentError, match="method='structured' does not apply"):
            hf.hessian_diag(f, method="structured")(params, x, y)


@given(prob=problems(kinds=("mlp",), max_batch=5), chunk=st.sampled_from([1, 2, 3, None]))
def test_every_chunk_size_gives_the_oracle(prob, chunk):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    H_ref, blocks_ref, diag_ref = _oracle(f, params, prob.batch)
    for method in ("structured", "generic"):
        if method == "structured" and plan_diagonal(f, (params, *prob.batch), 0)[0] is None:
            continue
        _close_to_rounding(
            hf.hessian_diag(f, chunk_size=chunk, method=method)(params, *prob.batch),
            diag_ref, H_ref)
    P = sum(t.numel() for t in params.values())
    for c in {1, max(1, P // 2), P, P + 3} | ({chunk} if chunk else set()):
        _close_to_rounding(hf.hessian(f, flat=True, chunk_size=c)(params, *prob.batch), H_ref,
                           H_ref)
        _close_to_rounding(hf.hessian_blocks(f, chunk_size=c)(params, *prob.batch), blocks_ref,
                           H_ref)


@given(problems(kinds=("mlp", "tied"), max_batch=4))
def test_per_sample_diagonals_under_vmap_equal_a_loop_with_the_oracle(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    x, y = prob.batch
    per_sample = vmap(hf.hessian_diag(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for n in range(x.shape[0]):
        H_ref, _, diag_ref = _oracle(f, params, (x[n:n + 1], y[n:n + 1]))
        _close_to_rounding({k: t[n] for k, t in per_sample.items()}, diag_ref, H_ref)


@given(problems(kinds=("mlp",), max_batch=4))
def test_per_sample_input_hessian_diagonals(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    x, y = prob.batch
    per_point = vmap(hf.hessian_diag(f, argnums=1), in_dims=(None, 0, 0))(params, x, y)
    for n in range(x.shape[0]):
        expected = hf.reference.input_hessian_diag(lambda xi: f(params, xi, y[n]), x[n])
        assert_close(per_point[n], expected)


@given(problems(kinds=("mlp",), max_batch=3))
def test_hessian_under_vmap_equals_per_sample_oracle(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    x, y = prob.batch
    H = vmap(hf.hessian(f, flat=True), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for n in range(x.shape[0]):
        H_ref, _, _ = _oracle(f, params, (x[n:n + 1], y[n:n + 1]))
        assert_close(H[n], H_ref)


def _third_derivative_contraction(f, params, batch, C):
    """``d/dp sum_ij C_ij H_ij(p)`` by plain nested autograd (three backward passes deep):
    the truth for a gradient taken through a Hessian."""
    loss, leaves = oracle_loss(f, params, *batch)
    ps = list(leaves.values())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, ps, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], ps, create_graph=True)])
            for i in range(g.numel())]
    s = (torch.stack(rows) * C).sum()
    return dict(zip(leaves, [t.detach() for t in torch.autograd.grad(s, ps)], strict=True))


def _small_problem(act="softplus", loss="mse"):
    model = build_mlp([2, 3, 2], act, seed=4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    if loss == "cross-entropy":
        y, loss_fn = torch.tensor([0, 1, 1, 0]), F.cross_entropy
    else:
        y, loss_fn = torch.randn(4, 2, generator=g, dtype=torch.float64), nn.MSELoss()
    f, params = hf.functionalize(model, loss_fn)
    return f, params, x, y


@pytest.mark.parametrize(("act", "loss"), [("softplus", "mse"), ("tanh", "cross-entropy")])
def test_hessian_and_diagonal_composed_with_grad_equal_third_derivatives(act, loss):
    """``torch.func.grad`` through ``hf.hessian`` and ``hf.hessian_diag``: the gradient of
    a weighted sum of Hessian entries is a contraction of the third-derivative tensor,
    checked against nested plain autograd."""
    f, params, x, y = _small_problem(act, loss)
    P = sum(t.numel() for t in params.values())
    C = torch.randn(P, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def weighted_hessian(p):
        return (hf.hessian(f, flat=True)(p, x, y) * C).sum()

    expected = _third_derivative_contraction(f, params, (x, y), C)
    assert max(float(t.abs().max()) for t in expected.values()) > 1e-3
    assert_close(torch.func.grad(weighted_hessian)(params), expected)

    c = C.diagonal()
    weights = dict(zip(params, torch.split(c, [t.numel() for t in params.values()]),
                       strict=True))

    def weighted_diagonal(p):
        d = hf.hessian_diag(f)(p, x, y)
        return sum((d[k].reshape(-1) * weights[k]).sum() for k in d)

    assert_close(torch.func.grad(weighted_diagonal)(params),
                 _third_derivative_contraction(f, params, (x, y), torch.diag(c)))


def test_jacobian_of_grad_and_jvp_of_grad_equal_the_oracle_hessian():
    """``jacrev(hf.grad(f))`` is the Hessian (nested like ``hf.hessian``), and ``jvp`` of
    ``hf.grad(f)`` is a Hessian-vector product: both against the loop oracle. (Cross-entropy:
    forward mode over the gradient of F.mse_loss raises in torch 2.13, for torch.func.grad
    and hf.grad alike; ``hf.hvp`` works around it, test_grad_hvp.py.)"""
    f, params, x, y = _small_problem("sigmoid", "cross-entropy")
    H_ref, _, _ = _oracle(f, params, (x, y))
    nested = torch.func.jacrev(lambda p: hf.grad(f)(p, x, y))(params)
    assert_nested_close(nested, H_ref, params)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    _, hv = torch.func.jvp(lambda p: hf.grad(f)(p, x, y), (params,), (v,))
    flat_v = torch.cat([v[k].reshape(-1) for k in params])
    assert_close(torch.cat([hv[k].reshape(-1) for k in params]), H_ref @ flat_v)


def test_float32_agrees_with_float64_oracle_within_stated_tolerance():
    model = build_mlp([3, 6, 6, 2], "tanh", seed=3)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    f64, p64 = hf.functionalize(model, nn.MSELoss())
    f32, p32 = hf.functionalize(model.float(), nn.MSELoss())
    _, _, d64 = _oracle(f64, p64, (x, y))  # the float64 truth
    for method in ("structured", "generic"):
        d32 = hf.hessian_diag(f32, method=method)(p32, x.float(), y.float())
        for k in d64:
            assert d32[k].dtype == torch.float32
            scale = float(d64[k].abs().max())
            torch.testing.assert_close(d32[k].double(), d64[k], rtol=2e-4, atol=2e-5 * scale)


# ----------------------------------------------------------------- derivative, laplacian
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("fn", [torch.sin, torch.exp, torch.tanh, lambda t: t ** 4 - 2 * t ** 3])
def test_derivative_equals_nested_autograd(order, fn):
    x = torch.linspace(-2, 2, 11, dtype=torch.float64).reshape(11, 1)
    assert_close(hf.derivative(fn, order)(x), hf.reference.derivatives(fn, x, order)[-1])


def test_derivative_closed_forms_and_scalar_input():
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)
    assert_close(hf.derivative(torch.sin, 3)(x), -torch.cos(x))
    assert_close(hf.derivative(torch.exp, 5)(x), torch.exp(x))
    assert_close(hf.derivative(lambda t: t ** 3, 2)(x), 6 * x)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert [float(hf.derivative(lambda t: t ** 4, n)(one)) for n in (1, 2, 3)] == [4, 12, 24]
    assert_close(vmap(hf.derivative(torch.sin, 2))(x), -torch.sin(x))


@given(st.integers(1, 5), st.integers(0, 1000))
def test_laplacian_equals_trace_of_the_oracle_hessian(d, seed):
    model = build_mlp([d, 5, 1], "softplus", seed)
    u = lambda x: model(x).squeeze(-1)  # noqa: E731
    X = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for method in ("auto", "forward", "hessian"):
        lap = vmap(hf.laplacian(u, method=method))(X)
        for n in range(4):
            assert_close(lap[n], hf.reference.laplacian(u, X[n]))


def test_laplacian_closed_forms():
    x = torch.randn(6, dtype=torch.float64)
    assert_close(hf.laplacian(lambda z: torch.sin(z).sum())(x), -torch.sin(x).sum())
    r2 = (x ** 2).sum()
    assert_close(hf.laplacian(lambda z: torch.exp(-(z ** 2).sum() / 2))(x),
                 (r2 - 6) * torch.exp(-r2 / 2))
    assert_close(hf.laplacian(lambda w, z: (w * z ** 3).sum(), argnums=1)(x, x), (6 * x * x).sum())


# ----------------------------------------------------------------- memory guard, bad input
def test_dense_hessian_refused_before_allocating():
    big = {"w": torch.zeros(200_000)}
    f = lambda p: (p["w"] ** 3).sum()  # noqa: E731
    with pytest.raises(hf.DenseMemoryError,
                       match=r"298\.0 GiB .*2 copies.*over the limit.*hessian_diag"):
        hf.hessian(f)(big)
    with pytest.raises(hf.DenseMemoryError, match="over the limit of 1.0 KiB"):
        hf.hessian(f, max_memory=1024)({"w": torch.zeros(100)})
    with pytest.raises(hf.DenseMemoryError, match="diagonal blocks"):
        hf.hessian_blocks(f, max_memory=1024)({"w": torch.zeros(100)})
    w = torch.linspace(-2, 3, 100, dtype=torch.float64)
    assert_close(hf.hessian_diag(f)({"w": w})["w"], 6 * w)   # d2/dw_i2 sum(w^3) = 6 w_i


def test_bad_input():
    f = lambda x: (x ** 3).sum()  # noqa: E731
    x = torch.ones(3)
    with pytest.raises(hf.ArgumentError, match="scalar"):
        hf.hessian(lambda x: x ** 2)(x)
    with pytest.raises(hf.ArgumentError, match="scalar"):
        hf.hessian_diag(lambda x: x ** 2)(x)
    for bad in (0, -1, 1.5):
        with pytest.raises(hf.ArgumentError, match="`chunk_size` must be an int >= 1"):
            hf.hessian_diag(f, chunk_size=bad)(x)
        with pytest.raises(hf.ArgumentError, match="`chunk_size`"):
            hf.hessian(f, chunk_size=bad)(x)
    with pytest.raises(hf.ArgumentError, match="`order` must be an int >= 1"):
        hf.derivative(torch.sin, 0)
    with pytest.raises(hf.ArgumentError, match="must be elementwise"):
        hf.derivative(lambda t: t.sum(), 2)(x)
    with pytest.raises(hf.ArgumentError, match="dtype torch.int64"):
        hf.hessian(f)(torch.arange(3))
    with pytest.raises(hf.ArgumentError, match="dtype torch.int64"):
        hf.derivative(torch.sin, 1)(torch.arange(3))
    with pytest.raises(hf.ArgumentError, match="`method` must be one of"):
        hf.hessian_diag(f, method="fast")
    with pytest.raises(hf.ArgumentError, match="`method` must be one of"):
        hf.laplacian(f, method="taylor")
    with pytest.raises(hf.ArgumentError, match="`argnums`=2 is out of range"):
        hf.hessian_blocks(f, argnums=2)(x)
    with pytest.raises(hf.ArgumentError, match="method='structured' does not apply here: f "
                                               "takes no batch after the parameters"):
        hf.hessian_diag(f, method="structured")(x)


@given(problems(kinds=("mlp", "tied", "two-input"), max_batch=4))
def test_per_sample_option_equals_the_vmap_recipe_and_the_oracle(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    x, y = prob.batch
    got = hf.hessian_diag(f, per_sample=True)(params, x, y)
    generic = hf.hessian_diag(f, per_sample=True, method="generic")(params, x, y)
    n_samples = y.shape[0]
    for n in range(n_samples):
        xn = tuple(t[n:n + 1] for t in x) if isinstance(x, tuple) else x[n:n + 1]
        H_ref, _, diag_ref = _oracle(f, params, (xn, y[n:n + 1]))
        _close_to_rounding({k: t[n] for k, t in got.items()}, diag_ref, H_ref)
        _close_to_rounding({k: t[n] for k, t in generic.items()}, diag_ref, H_ref)


def test_per_sample_structured_route_is_taken_for_chains():
    model = build_mlp([3, 5, 4, 3], "tanh", seed=2)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    f, params = hf.functionalize(model, F.cross_entropy)
    plan, reason = plan_diagonal(f, (params, x, y), 0, per_sample=True)
    assert plan is not None and not plan.products, reason
    structured = hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y)
    recipe = vmap(hf.hessian_diag(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    assert structured["0.weight"].shape == (6, 5, 3)
    for n in range(6):
        _, _, diag_ref = _oracle(f, params, (x[n:n + 1], y[n:n + 1]))
        assert_close({k: t[n] for k, t in structured.items()}, diag_ref)
        assert_close({k: t[n] for k, t in recipe.items()}, diag_ref)
    # the per-sample diagonals of a mean loss average to the batch diagonal
    _, _, batch_ref = _oracle(f, params, (x, y))
    assert_close({k: t.mean(0) for k, t in structured.items()}, batch_ref)
    with pytest.raises(hf.ArgumentError, match="per_sample=True needs f"):
        hf.hessian_diag(lambda w: (w ** 3).sum(), per_sample=True)(torch.ones(2))
