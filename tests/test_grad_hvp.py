"""grad, hvp (both modes) and hvp_fn against the loop oracle, in float64."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOL, assert_close, flat, oracle_loss
from _helpers import check_products as _check_products
from _helpers import oracle_grad as _oracle_grad
from _helpers import oracle_hvp as _oracle_hvp
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.func import vmap

import hessfunc as hf
from hessfunc._tree import tree_dot
from hessfunc.testing.losses import custom_loss
from hessfunc.testing.models import ResidualMLP, TiedNet, build_mlp
from hessfunc.testing.strategies import mlps, problems, random_like

MODES = ["reverse-over-reverse", "forward-over-reverse"]


@given(problems())
def test_grad_equals_oracle(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    assert_close(hf.grad(f)(params, *prob.batch), _oracle_grad(f, params, prob.batch))


@given(problems(kinds=("mlp", "tied")))
def test_grad_under_vmap_is_per_sample_oracle(prob):
    """The torch.func path: per-sample gradients equal a loop with the oracle."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    x, y = prob.batch
    per_sample = vmap(hf.grad(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for n in range(x.shape[0]):
        expected = _oracle_grad(f, params, (x[n:n + 1], y[n:n + 1]))
        assert_close({k: t[n] for k, t in per_sample.items()}, expected)


@pytest.mark.parametrize("mode", MODES)
@given(prob=problems(), seed=st.integers(0, 1000))
def test_hvp_equals_oracle(mode, prob, seed):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    v = random_like(params, seed)
    assert_close(hf.hvp(f, (params, *prob.batch), v, mode=mode),
                 _oracle_hvp(f, params, prob.batch, v))


@pytest.mark.parametrize("mode", MODES)
@given(prob=problems(kinds=("mlp",)), seed=st.integers(0, 1000))
def test_hvp_under_vmap_of_tangents_equals_oracle(mode, prob, seed):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    vs = [random_like(params, seed + i) for i in range(3)]
    stacked = {k: torch.stack([v[k] for v in vs]) for k in params}
    out = vmap(lambda v: hf.hvp(f, (params, *prob.batch), v, mode=mode))(stacked)
    for i, v in enumerate(vs):
        assert_close({k: t[i] for k, t in out.items()}, _oracle_hvp(f, params, prob.batch, v))


@given(prob=problems(), seed=st.integers(0, 1000))
def test_hvp_fn_equals_oracle_repeatedly_and_batched(prob, seed):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    H = hf.hvp_fn(f, (params, *prob.batch))
    vs = [random_like(params, seed + i) for i in range(3)]
    expected = [_oracle_hvp(f, params, prob.batch, v) for v in vs]
    for v, hv in zip(vs, expected, strict=True):
        assert_close(H(v), hv)
    batched = H.batched({k: torch.stack([v[k] for v in vs]) for k in params})
    for i, hv in enumerate(expected):
        assert_close({k: t[i] for k, t in batched.items()}, hv)
    assert_close(H.gradient, _oracle_grad(f, params, prob.batch))


@given(model=mlps(min_out=2), n=st.integers(1, 6), seed=st.integers(0, 1000),
       loss=st.sampled_from(["mse", "sum-mse", "cross-entropy", "custom"]),
       frozen=st.sets(st.integers(0, 5), max_size=3), k=st.integers(1, 4))
def test_hvp_fn_structured_route_equals_oracle(model, n, seed, loss, frozen, k):
    """NOTE [structured products]: chains take the cached R-operator route, and it is exact
    for single and batched tangents, with frozen parameters, for every loss; a user's own
    activation module too (NOTE [chains from the graph]: its ops are elementwise)."""
    for i, p in enumerate(model.parameters()):
        if i in frozen:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model[0].in_features, generator=g, dtype=torch.float64)
    c = model[-1].out_features
    if loss == "cross-entropy":
        y, loss_fn = torch.randint(0, c, (n,), generator=g), F.cross_entropy
    else:
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
        loss_fn = {"mse": nn.MSELoss(), "sum-mse": nn.MSELoss(reduction="sum"),
                   "custom": custom_loss}[loss]
    f, params = hf.functionalize(model, loss_fn)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    vs = [random_like(params, seed + i) for i in range(k)]
    _check_products(H, f, params, (x, y), vs)
    assert_close(H.gradient, _oracle_grad(f, params, (x, y)))
    assert torch.allclose(H.value, f(params, x, y), rtol=1e-12, atol=0)
    for index, key in enumerate(params):  # rows of each parameter's own block
        rows = H.block_rows(index, torch.stack([v[key] for v in vs]))
        for i, v in enumerate(vs):
            only = {q: (t if q == key else torch.zeros_like(t)) for q, t in v.items()}
            assert_close(rows[i], _oracle_hvp(f, params, (x, y), only)[key])


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Identity])
def test_structured_products_closed_form_and_autograd_activation_derivatives(act):
    """Activation derivatives in closed form (tanh, sigmoid, ReLU) or by autograd (ELU...):
    both give the graph route's products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 2))
    model = model.double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    f, params = hf.functionalize(model, nn.MSELoss())
    structured = hf.hvp_fn(f, (params, x, y), method="structured")
    v = random_like(params, 1)
    assert_close(structured(v), _oracle_hvp(f, params, (x, y), v))


@pytest.mark.parametrize("loss", ["mse", "cross-entropy", "coupled", "linear"])
def test_single_hvp_structured_route_equals_oracle(loss):
    """NOTE [single structured product]: the output Hessian is applied through the loss's
    own graph, so it is exact when the loss couples samples, or is linear in the output."""
    torch.manual_seed(0)
    model = build_mlp([3, 5, 4, 3], "softplus", 2)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    loss_fn = {"mse": nn.MSELoss(), "cross-entropy": F.cross_entropy,
               "coupled": lambda o, t: ((o - t).sum()) ** 2 + (o * t).mean(),
               "linear": lambda o, t: (o * t).sum()}[loss]
    if loss == "cross-entropy":
        y = torch.randint(0, 3, (6,))
    f, params = hf.functionalize(model, loss_fn)
    for seed in range(3):
        v = random_like(params, seed)
        expected = _oracle_hvp(f, params, (x, y), v)
        assert_close(hf.hvp(f, (params, x, y), v, method="structured"), expected)
        assert_close(hf.hvp(f, (params, x, y), v, method="graph"), expected)
        assert_close(hf.hvp(f, (params, x, y), v), expected)


@st.composite
def conv_nets(draw):
    """Conv1d/Conv2d - activation - Conv - activation - Flatten - Linear, drawn with
    strides, zero padding and dilation, and an input batch that fits them."""
    dim = draw(st.sampled_from([1, 2]))
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    act = draw(st.sampled_from([nn.Tanh, nn.Sigmoid, nn.Softplus]))
    c0, c1, c2 = (draw(st.integers(1, 3)) for _ in range(3))
    layers, size, channels = [], 10, c0
    for c in (c1, c2):
        kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        padding, dilation = draw(st.integers(0, 1)), draw(st.integers(1, 2))
        layers += [conv(channels, c, kernel, stride=stride, padding=padding,
                        dilation=dilation), act()]
        size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        assume(size >= 1)
        channels = c
    torch.manual_seed(draw(st.integers(0, 2**16)))
    out = draw(st.integers(2, 3))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size**dim, out)).double()
    n = draw(st.integers(1, 4))
    x = torch.randn(n, c0, *[10] * dim, dtype=torch.float64)
    return model, x, out


@given(net=conv_nets(), seed=st.integers(0, 1000), k=st.integers(1, 3),
       frozen=st.sets(st.integers(0, 5), max_size=2),
       loss=st.sampled_from(["mse", "cross-entropy", "coupled"]), patches=st.booleans())
def test_structured_products_through_convolutions_equal_oracle(net, seed, k, frozen, loss,
                                                               patches):
    """Convolutions and Flatten have product rules (no per-sample Hessian rules): hvp and
    hvp_fn take the structured route and agree with the oracle, one tangent or k, with
    the conv terms on patches or on aten (NOTE [convolutions as matrix products])."""
    module = importlib.import_module("hessfunc._thresholds")
    width = module.PATCH_WIDTH
    module.PATCH_WIDTH = width if patches else 0
    try:
        _check_conv_products(net, seed, k, frozen, loss)
    finally:
        module.PATCH_WIDTH = width


def _check_conv_products(net, seed, k, frozen, loss):
    model, x, out = net
    for i, p in enumerate(model.parameters()):
        if i in frozen:
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if loss == "cross-entropy":
        y, loss_fn = torch.randint(0, out, (n,), generator=g), F.cross_entropy
    else:
        y = torch.randn(n, out, generator=g, dtype=torch.float64)
        loss_fn = nn.MSELoss() if loss == "mse" else (lambda o, t: ((o - t).sum()) ** 2)
    f, params = hf.functionalize(model, loss_fn)
    vs = [random_like(params, seed + i) for i in range(k)]
    H = hf.hvp_fn(f, (params, x, y))
    if loss != "coupled":  # (a coupling loss takes the graph route unless N = 1)
        assert H.method == "structured"
    _check_products(H, f, params, (x, y), vs, single=True)
    assert_close(H.gradient, _oracle_grad(f, params, (x, y)))


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("stride,padding,dilation,kernel", [
    (1, 0, 1, 3), (1, 1, 1, 3), (1, 2, 2, 3), (1, 1, 1, 1), (2, 1, 1, 3), (1, 0, 2, 2)])
@pytest.mark.parametrize("groups", [1, 3])
def test_conv_input_gradient_equals_the_transposed_convolution(dim, stride, padding, dilation,
                                                                kernel, groups):
    """NOTE [input gradient as a convolution]: the flipped-kernel convolution (stride 1 and
    padding <= dilation (kernel - 1)) and the fallback both give the input gradient that
    torch computes, per group too (the k-tangent products use groups)."""
    from hessfunc.graph.chain_plan import _Conv
    from hessfunc.graph.chain_products import _conv_input_grad

    g = torch.Generator().manual_seed(stride + 3 * padding + 7 * dilation + 11 * kernel)
    c_in, c_out, size = 2 * groups, 3 * groups, 9
    a = torch.randn(4, c_in, *[size] * dim, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, 2, *[kernel] * dim, generator=g, dtype=torch.float64)
    conv = F.conv1d if dim == 1 else F.conv2d
    kw = dict(stride=(stride,) * dim, padding=(padding,) * dim, dilation=(dilation,) * dim)
    out = conv(a, weight, groups=groups, **kw)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    step = _Conv(weight, a, "w", None, **kw)
    expected = torch.autograd.grad(conv(a.requires_grad_(), weight, groups=groups, **kw), a,
                                   grad_out)[0]
    assert_close(_conv_input_grad(step, grad_out, weight, a.shape, groups=groups), expected)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("patches", [True, False], ids=["patches", "aten"])
def test_conv_products_on_patches_and_on_aten_agree_with_the_oracle(dim, patches, monkeypatch):
    """NOTE [convolutions as matrix products]: both ways of the conv terms (matrix products
    on patches for narrow layers, aten convolutions otherwise) give the exact products,
    one tangent or three, through strides, padding and dilation."""
    if not patches:
        monkeypatch.setattr(importlib.import_module("hessfunc._thresholds"), "PATCH_WIDTH", 0)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    torch.manual_seed(dim)
    model = nn.Sequential(conv(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                          conv(3, 2, 2, padding=1, dilation=2), nn.Sigmoid(), nn.Flatten())
    x = torch.randn(3, 2, *[9] * dim, dtype=torch.float64)
    width = model.double()(x).shape[1]
    model = nn.Sequential(*model, nn.Linear(width, 2)).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    y = torch.randn(3, 2, dtype=torch.float64)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    _check_products(H, f, params, (x, y), [random_like(params, i) for i in range(3)])
    terms = H.chain_products._conv_cache
    assert terms and all((t.patches is not None) == patches for t in terms.values())


def test_structured_products_keep_key_order_and_take_partial_tangents():
    """ChainProducts returns products in the tangents' order (flat vectors are built from
    it), treats missing tangents as zero and computes only the ``wanted`` products."""
    model = build_mlp([3, 4, 4, 2], "tanh", seed=0)
    f, params = hf.functionalize(model, nn.MSELoss())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    chain = hf.hvp_fn(f, (params, x, y)).chain_products
    v = random_like(params, 1)
    full = chain(v)
    assert list(full) == list(params)
    backwards = dict(reversed(list(v.items())))
    assert list(chain(backwards)) == list(backwards)
    assert_close(full, _oracle_hvp(f, params, (x, y), v))
    name = list(params)[2]
    zero_elsewhere = {n: t if n == name else torch.zeros_like(t) for n, t in v.items()}
    expected = _oracle_hvp(f, params, (x, y), zero_elsewhere)
    partial = chain({name: v[name]}, wanted=[list(params)[0], name])
    assert list(partial) == [list(params)[0], name]
    for key in partial:
        assert_close(partial[key], expected[key])
    # zero products keep each parameter's shape, the first weight's restricted one too
    first = list(params)[0]
    restricted = chain.restricted(x[:, :2])
    assert restricted._zeros(first, None).shape == (params[first].shape[0], 2)
    assert restricted._zeros(first, 3).shape == (3, params[first].shape[0], 2)
    assert chain._zeros(name, None).shape == params[name].shape


def test_convolutions_without_product_rules_fall_back():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    for conv in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")):
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 2)) \
            if conv.padding != (0, 0) else \
            nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 2))
        f, params = hf.functionalize(model.double(), nn.MSELoss())
        v = random_like(params, 0)
        # in the captured graph "same" zero padding is the convolution's own padding: a
        # chain (NOTE [chains from the graph]); groups and circular padding (a pad op) not
        chain = conv.padding == "same"
        truth = _oracle_hvp(f, params, (x, y), v)
        if chain:
            assert_close(hf.hvp(f, (params, x, y), v, method="structured"), truth)
        else:
            with pytest.raises(hf.ArgumentError, match="chain of layers|writes into a tensor "
                                                       "that is read later"):
                hf.hvp(f, (params, x, y), v, method="structured")
        H = hf.hvp_fn(f, (params, x, y))
        assert H.method == ("structured" if chain else "graph")
        assert_close(H(v), truth)
        assert_close(hf.hvp(f, (params, x, y), v), truth)
    # the chain route has no per-sample rule for Unflatten; the captured graph has
    model = nn.Sequential(nn.Unflatten(1, (1, 10)), nn.Conv1d(1, 2, 3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(16, 2)).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    x = torch.randn(3, 10, dtype=torch.float64)
    loss, leaves = oracle_loss(f, params, x, y)
    assert_close(hf.hessian_diag(f, method="structured")(params, x, y),
                 hf.reference.hessian_diag(loss, leaves))
    # an Unflatten between a Linear layer and a convolution is a view that keeps the batch
    # axis first: a linear map of the chain (NOTE [chains from the graph])
    model = nn.Sequential(nn.Linear(10, 10), nn.Unflatten(1, (1, 10)), nn.Conv1d(1, 2, 3))
    f, params = hf.functionalize(nn.Sequential(model, nn.Flatten(), nn.Linear(16, 2)).double(),
                                 nn.MSELoss())
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    assert_close(H(v := random_like(params, 1)), _oracle_hvp(f, params, (x, y), v))


def test_linear_layer_on_more_than_two_dimensions_takes_the_r_operator():
    """``nn.Linear`` on ``(N, 3, 5)`` inputs is a view that folds the positions into rows,
    a Linear layer and a view back: the views are maps without a rule (NOTE [maps without
    a rule]), the layer keeps its own; the products equal the oracle's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 2))
    f, params = hf.functionalize(model.double(), nn.MSELoss())
    x, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    v = random_like(params, 0)
    expected = _oracle_hvp(f, params, (x, y), v)
    assert_close(hf.hvp(f, (params, x, y), v, method="structured"), expected)
    assert_close(hf.hvp(f, (params, x, y), v), expected)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    assert_close(H(v), expected)


def test_large_output_hessians_are_not_cached(monkeypatch):
    """Per-sample (C, C) output Hessians over the memory budget are never built: the
    structured products apply the loss Hessian through the loss's graph instead."""
    chain = importlib.import_module("hessfunc.graph.chain")
    monkeypatch.setattr(chain, "CHUNK_BUDGET_BYTES", 100)
    monkeypatch.setattr(chain, "output_blocks", None)  # would fail if called
    torch.manual_seed(0)
    model = build_mlp([3, 5, 4], "tanh", 0)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    f, params = hf.functionalize(model, F.cross_entropy)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured" and H.chain_products._loss_graph is not None
    _check_products(H, f, params, (x, y), [random_like(params, i) for i in range(2)])


def test_one_structured_hvp_builds_no_per_sample_blocks(monkeypatch):
    """One product applies the loss's Hessian through its gradient graph; only cached
    products (``hvp_fn``) keep its per-sample blocks."""
    torch.manual_seed(0)
    model = build_mlp([3, 5, 4], "tanh", 0)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    f, params = hf.functionalize(model, F.cross_entropy)
    v = random_like(params, 0)
    assert hf.hvp_fn(f, (params, x, y)).chain_products._loss_graph is None
    chain = importlib.import_module("hessfunc.graph.chain")
    monkeypatch.setattr(chain, "output_blocks", None)  # would fail if called
    assert_close(hf.hvp(f, (params, x, y), v, method="structured"),
                 _oracle_hvp(f, params, (x, y), v))


@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
def test_one_hvp_through_an_op_torch_differentiates_once(mode, monkeypatch):
    """Hardsigmoid: torch has no derivative of its backward, so the double backward
    fails; the captured graph decomposes it into clamps, and one ``hvp`` takes the chain
    read off it (one product: no per-sample blocks) and equals the oracle's product for
    ``hardtanh(z / 6 + 1/2)``, the same function. ``method="graph"`` names the op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # pre-activations on all three pieces
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    v = random_like(params, 4)

    def f(p, x, y):
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    def twin(p, x, y):
        h = F.hardtanh(F.linear(x, p["0.weight"], p["0.bias"]) / 6 + 0.5, 0.0, 1.0)
        return F.mse_loss(F.linear(h, p["2.weight"], p["2.bias"]), y)

    chain = importlib.import_module("hessfunc.graph.chain")
    monkeypatch.setattr(chain, "output_blocks", None)  # would fail if called
    assert_close(hf.hvp(f, (params, x, y), v, mode=mode), _oracle_hvp(twin, params, (x, y), v))
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hvp: torch has no derivative "
                                               "for aten::hardsigmoid_backward"):
        hf.hvp(f, (params, x, y), v, method="graph", mode=mode)


def test_hvp_fn_value_is_none_only_on_the_torch_func_path():
    """An input that carries a graph sends ``hvp_fn`` to the torch.func path, where
    ``value`` is None (the class docstring); the plain path holds the loss. Both
    products equal the oracle."""
    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    v = torch.randn(3, dtype=torch.float64)
    plain = hf.hvp_fn(f, (w, x))
    assert_close(plain.value, f(w, x))
    carried = hf.hvp_fn(f, (w, x.clone().requires_grad_(True)))
    assert carried.value is None
    leaf = w.clone().requires_grad_(True)
    (expected,) = hf.reference.hvp(f(leaf, x), [leaf], [v])  # the loop oracle
    assert_close(plain(v), expected)
    assert_close(carried(v).detach(), expected)


def test_hvp_fn_method_choice():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    chain = build_mlp([3, 4, 2], "tanh", 0)
    f, params = hf.functionalize(chain, nn.MSELoss())
    v = random_like(params, 0)
    structured, graph = (hf.hvp_fn(f, (params, x, y), method=m) for m in ("auto", "graph"))
    assert (structured.method, graph.method) == ("structured", "graph")
    expected = _oracle_hvp(f, params, (x, y), v)
    assert_close(structured(v), expected)
    assert_close(graph(v), expected)

    f, params = hf.functionalize(TiedNet(3, 3).double(), nn.MSELoss())
    y = torch.randn(5, 3, dtype=torch.float64)
    assert hf.hvp_fn(f, (params, x, y)).method == "graph"
    with pytest.raises(hf.ArgumentError, match="method='structured' does not apply.*used "
                                               "outside the chain of layers"):
        hf.hvp_fn(f, (params, x, y), method="structured")
    with pytest.raises(hf.ArgumentError, match="method='structured' does not apply.*used "
                                               "outside the chain of layers"):
        hf.hvp(f, (params, x, y), random_like(params, 0), method="structured")
    with pytest.raises(hf.ArgumentError, match="`method` must be one of"):
        hf.hvp(f, (params, x, y), random_like(params, 0), method="fast")
    with pytest.raises(hf.ArgumentError, match="`method` must be one of"):
        hf.hvp_fn(f, (params, x, y), method="fast")


@given(prob=problems(kinds=("mlp",)), seed=st.integers(0, 1000))
def test_hvp_fn_under_vmap_of_samples(prob, seed):
    """hvp_fn inside a transform takes the torch.func route."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    v = random_like(params, seed)
    x, y = prob.batch
    out = vmap(lambda xi, yi: hf.hvp_fn(f, (params, xi, yi))(v))(x[:, None], y[:, None])
    rtol, atol = TOL[torch.float64]
    for n in range(x.shape[0]):
        expected = _oracle_hvp(f, params, (x[n:n + 1], y[n:n + 1]), v)
        # each entry of H v sums terms up to (|H| |v|)_i, and carries their rounding however
        # much they cancel (drawn weights at 1e3: 4e-10 of max|Hv|): atol relative to that
        loss, leaves = oracle_loss(f, params, x[n:n + 1], y[n:n + 1])
        H_ref = hf.reference.hessian(loss, list(leaves.values()))
        terms = float((H_ref.abs() @ flat(v).abs()).max())
        torch.testing.assert_close({k: t[n] for k, t in out.items()}, expected, rtol=rtol,
                                   atol=atol * max(1.0, terms))


@given(prob=problems(), seed=st.integers(0, 1000), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_hvp_is_linear_and_symmetric(prob, seed, a, b):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    u, v = random_like(params, seed), random_like(params, seed + 1)
    Hu = hf.hvp(f, (params, *prob.batch), u)
    Hv = hf.hvp(f, (params, *prob.batch), v)
    mix = {k: a * u[k] + b * v[k] for k in params}
    H_mix = hf.hvp(f, (params, *prob.batch), mix)
    assert_close(H_mix, {k: a * Hu[k] + b * Hv[k] for k in params}, scale=10)
    uHv, vHu = tree_dot(u, Hv), tree_dot(v, Hu)
    scale = 1 + float(flat(Hu).norm() * flat(v).norm())
    assert abs(float(uHv - vHu)) <= 1e-10 * scale


def test_mse_loss_forward_over_reverse_zero_tensor_trap():
    """jvp(grad(f)) raises on F.mse_loss in torch 2.13; hvp must still answer exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    for loss in (F.mse_loss, nn.MSELoss()):
        f, params = hf.functionalize(model, loss)
        v = random_like(params, 3)
        got = hf.hvp(f, (params, x, y), v, mode="forward-over-reverse")
        assert_close(got, _oracle_hvp(f, params, (x, y), v))


def test_hvp_of_linear_function_is_zero():
    f = lambda w, x: (w * x).sum()  # noqa: E731
    w, x = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for mode in MODES:
        assert torch.equal(hf.hvp(f, (w, x), torch.ones(3, dtype=torch.float64), mode=mode),
                           torch.zeros(3, dtype=torch.float64))
    assert torch.equal(hf.hvp_fn(f, (w, x))(torch.ones(3, dtype=torch.float64)),
                       torch.zeros(3, dtype=torch.float64))


def test_argnums_selects_the_input():
    f = lambda w, x: (torch.sin(w * x)).sum()  # noqa: E731
    w, x = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64)
    expected = -(w ** 2) * torch.sin(w * x) * v  # d2/dx2 sin(w x) = -w^2 sin(w x), diagonal
    for mode in MODES:
        assert_close(hf.hvp(f, (w, x), v, argnums=1, mode=mode), expected)
    assert_close(hf.grad(f, argnums=1)(w, x), w * torch.cos(w * x))
    gw, gx = hf.grad(f, argnums=(0, 1))(w, x)
    assert_close(gx, w * torch.cos(w * x))
    assert_close(gw, x * torch.cos(w * x))


def test_grad_has_aux():
    f = lambda x: ((x ** 2).sum(), x.detach() * 2)  # noqa: E731
    x = torch.tensor([1.0, 3.0], dtype=torch.float64)
    g, aux = hf.grad(f, has_aux=True)(x)
    assert_close(g, 2 * x)
    assert_close(aux, 2 * x)
    g2, aux2 = vmap(hf.grad(f, has_aux=True))(x[:, None])
    assert_close(g2[:, 0], 2 * x)


# well-scaled draws: at 1e3 a float32 network is ill-conditioned (sin(1e3 w) loses 1e-4
# of its argument), so float32 cannot agree with the float64 truth there
@given(prob=problems(kinds=("mlp",), scales=(1.0, 1e-3, 10.0)), seed=st.integers(0, 1000))
def test_float32_agrees_with_float64_oracle(prob, seed):
    f64, p64 = hf.functionalize(prob.model, prob.loss_fn)
    f32, p32 = hf.functionalize(prob.model.float(), prob.loss_fn)
    x, y = prob.batch
    x32, y32 = x.float(), (y.float() if y.is_floating_point() else y)
    v64 = random_like(p64, seed)
    v32 = {k: t.float() for k, t in v64.items()}
    h64 = _oracle_hvp(f64, p64, (x, y), v64)  # the float64 truth
    h32 = hf.hvp(f32, (p32, x32, y32), v32)
    scale = float(flat(h64).abs().max()) + 1.0
    torch.testing.assert_close(flat(h32).double(), flat(h64), rtol=2e-4, atol=2e-5 * scale)
    assert all(t.dtype == torch.float32 for t in h32.values())


# ----------------------------------------------------------------- bad input
def _setup():
    f, params = hf.functionalize(nn.Linear(2, 1).double(), nn.MSELoss())
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    return f, params, x, y, v


def test_bad_input_non_scalar_loss():
    _, params, x, y, v = _setup()
    f, _ = hf.functionalize(nn.Linear(2, 1).double(), nn.MSELoss(reduction="none"))
    with pytest.raises(hf.ArgumentError, match=r"scalar \(0-d\) tensor, got shape \(3, 1\)"):
        hf.grad(f)(params, x, y)
    for mode in MODES:
        with pytest.raises(hf.ArgumentError, match="scalar"):
            hf.hvp(f, (params, x, y), v, mode=mode)
    with pytest.raises(hf.ArgumentError, match="scalar"):
        hf.hvp_fn(f, (params, x, y))


def test_bad_input_tangent_structure_shape_dtype():
    f, params, x, y, v = _setup()
    with pytest.raises(hf.ArgumentError, match="`tangent` must have the structure"):
        hf.hvp(f, (params, x, y), [v["weight"], v["bias"]])
    with pytest.raises(hf.ArgumentError, match=r"has shape \(2,\), expected \(1, 2\)"):
        hf.hvp(f, (params, x, y), {"weight": torch.ones(2, dtype=torch.float64),
                                   "bias": v["bias"]})
    with pytest.raises(hf.ArgumentError, match="dtype torch.float32, expected torch.float64"):
        hf.hvp(f, (params, x, y), {k: t.float() for k, t in v.items()})


def test_bad_input_integer_and_bool_primals():
    f = lambda x: (x * x).sum()  # noqa: E731
    for bad in (torch.arange(3), torch.tensor([True, False])):
        with pytest.raises(hf.ArgumentError, match=r"`primals\[0\]` has dtype .*floating"):
            hf.hvp(f, (bad,), bad)
        with pytest.raises(hf.ArgumentError, match=r"`args\[0\]` has dtype"):
            hf.grad(f)(bad)


def test_bad_input_argnums_primals_mode():
    f, params, x, y, v = _setup()
    with pytest.raises(hf.ArgumentError, match="`argnums`=3 is out of range"):
        hf.hvp(f, (params, x, y), v, argnums=3)
    with pytest.raises(hf.ArgumentError, match="`argnums`=5 is out of range"):
        hf.grad(f, argnums=5)(params, x, y)
    with pytest.raises(hf.ArgumentError, match="`argnums` must be an int"):
        hf.hvp(f, (params, x, y), v, argnums=(0,))
    with pytest.raises(hf.ArgumentError, match="`primals` must be a tuple"):
        hf.hvp(f, [params, x, y], v)
    with pytest.raises(hf.ArgumentError, match="`mode` must be one of"):
        hf.hvp(f, (params, x, y), v, mode="forward")
    with pytest.raises(hf.ArgumentError, match="`f` must be a callable"):
        hf.grad(3)


# ----------------------------------------------------------------- CUDA
def _check_on_device(device):
    """hvp, hvp_fn, hessian_diag and HessianOperator products of a tanh chain and of a
    conv chain evaluated on ``device``, against the loop oracle on the CPU in float64."""
    torch.manual_seed(0)
    mlp = build_mlp([3, 5, 4, 2], "tanh", seed=5)
    conv = nn.Sequential(nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
                         nn.Softplus(), nn.Flatten(), nn.Linear(3 * 6 * 3, 2)).double()
    g = torch.Generator().manual_seed(6)
    cases = [(mlp, torch.randn(8, 3, generator=g, dtype=torch.float64)),
             (conv, torch.randn(4, 2, 6, 7, generator=g, dtype=torch.float64))]
    for model, x in cases:
        y = torch.randn(x.shape[0], 2, generator=g, dtype=torch.float64)
        f_cpu, p_cpu = hf.functionalize(model, nn.MSELoss())
        loss, leaves = oracle_loss(f_cpu, p_cpu, x, y)
        H_ref = hf.reference.hessian(loss, list(leaves.values()))
        diag_ref = hf.reference.hessian_diag(loss, leaves)
        f, params = hf.functionalize(copy.deepcopy(model).to(device), nn.MSELoss())
        xd, yd = x.to(device), y.to(device)
        vs = [random_like(p_cpu, seed) for seed in range(3)]
        H = hf.hvp_fn(f, (params, xd, yd))
        assert H.method == "structured"
        batched = H.batched({k: torch.stack([v[k] for v in vs]).to(device) for k in params})
        for i, v in enumerate(vs):
            expected = H_ref @ flat(v)
            vd = {k: t.to(device) for k, t in v.items()}
            for got in (hf.hvp(f, (params, xd, yd), vd), H(vd),
                        {k: t[i] for k, t in batched.items()}):
                assert all(t.device.type == torch.device(device).type for t in got.values())
                assert_close(flat(got).cpu(), expected)
        assert_close({k: t.cpu() for k, t in hf.hessian_diag(f)(params, xd, yd).items()},
                     diag_ref)
        op = hf.HessianOperator(f, params, [(xd[:2], yd[:2]), (xd[2:], yd[2:])])
        V = torch.randn(op.shape[0], 3, generator=g, dtype=torch.float64)
        assert_close((op @ V.to(device)).cpu(), H_ref @ V)
        assert_close(op.diagonal().cpu(), H_ref.diagonal())
        assert_close(op.to_dense().cpu(), H_ref)
        # float32 on the device agrees with the float64 truth within the stated tolerance
        f32, p32 = hf.functionalize(copy.deepcopy(model).to(device).float(), nn.MSELoss())
        v = vs[0]
        h32 = hf.hvp(f32, (p32, xd.float(), yd.float()), {k: t.float().to(device)
                                                           for k, t in v.items()})
        expected = H_ref @ flat(v)
        scale = float(expected.abs().max()) + 1.0
        torch.testing.assert_close(flat(h32).cpu().double(), expected, rtol=2e-4,
                                   atol=2e-5 * scale)


@pytest.mark.gpu
def test_products_and_diagonals_on_cuda_equal_the_cpu_oracle():
    """On CUDA (conv terms on aten there: patches are for the CPU). TF32 is switched off
    for the float32 check: its tolerance is stated for true float32 arithmetic."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            _check_on_device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.mark.parametrize("k", [2, 3, 4, 11, 26])
@pytest.mark.parametrize("choice", [None, "batched", "loop"])
@pytest.mark.parametrize("route", ["graph", "structured"])
def test_batched_products_measured_or_forced_equal_the_oracle(route, choice, k):
    """NOTE [batched or looped products]: the products through the cached graph (tied
    weights) or the R-operator (a residual MLP), as batched passes or as a loop of
    single ones, or as the first call mixes them while it times them, equal the oracle
    column by column; the choice is kept."""
    from hessfunc.products import _Choice

    torch.manual_seed(0)
    model = (TiedNet(3, 4) if route == "graph" else ResidualMLP(3, 4, 2, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    f = lambda p, x, y: F.mse_loss(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == route
    if choice is not None:  # batched: all columns in one pass
        forced = _Choice(k, 0.0, 1.0, True) if choice == "batched" else \
            _Choice(None, math.inf, 1.0, True)
        H._choices["products"] = H._choices["rows"] = forced
    tangents = [random_like(params, s) for s in range(k)]
    batch = {k: torch.stack([t[k] for t in tangents]) for k in params}
    out = H.batched(batch)
    for i, t in enumerate(tangents):
        expected = _oracle_hvp(f, params, (x, y), t)
        assert_close({k: v[i] for k, v in out.items()}, expected)
    kept = H._choices.get("products")
    if k <= 3 and choice is None:
        assert kept is None  # up to three columns are single products, nothing timed
    else:
        assert isinstance(kept, _Choice) and (choice is None or kept.loop == (choice == "loop"))
    if choice is None and k >= 5:  # the first probe: 2 columns, or 8 on the R-operator
        # the graph route widens a winning 2-column probe 4x while columns are left (by
        # the clock: either width may be kept; the policy's own test fakes the clock)
        assert kept.width in ((2, 8) if route == "graph" else (8,))
    assert_close(H.batched(batch), out)  # the kept choice, all columns
    first = list(params)[0]
    rows = H.block_rows(0, batch[first])
    if choice is None and k >= 5:  # the rows are timed the same way
        assert H._choices["rows"].width == (2 if route == "graph" else 8)
    for i, t in enumerate(tangents):
        zeroed = {k: t[k] if k == first else torch.zeros_like(t[k]) for k in params}
        assert_close(rows[i], _oracle_hvp(f, params, (x, y), zeroed)[first])


def _on_a_clock(monkeypatch, single_cost, pass_cost):
    """An ``HVPFunction`` whose clock only the fake products advance: ``(H, batched,
    single, widths)``, ``widths`` the batched passes' widths; ``single_cost`` one number
    or the costs of the first single products (1.0 after them)."""
    import types

    import hessfunc.products as products

    clock = {"now": 0.0}
    monkeypatch.setattr(products, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    H = hf.hvp_fn(lambda x: (x ** 3).sum(), (torch.ones(2),))
    widths = []
    costs = iter(single_cost) if isinstance(single_cost, list) else None

    def batched(lo, hi):
        clock["now"] += pass_cost(hi - lo)
        widths.append(hi - lo)
        return list(range(lo, hi))

    def single(i):
        clock["now"] += next(costs, 1.0) if costs is not None else single_cost
        return [i]

    return H, batched, single, widths


@pytest.mark.parametrize(("single_cost", "pass_cost", "calls", "expected"), [
    # batching never cheaper per column (a ResNet): settled at 2 wide, the loop kept
    (1.0, lambda w: 1.0 * w, [20, 20], (2, 1.0, True, True)),
    # 5x cheaper at 2 wide, no cheaper at 8: settled, batched 2 at a time
    (1.0, lambda w: 0.2 * w, [20, 20], (2, 0.2, True, False)),
    # a pass costs the same at any width: wider on every call while the next one fits
    (1.0, lambda w: 1.0, [11, 30], (8, 1 / 8, False, False)),
    # 8 wide only 6% cheaper per column than 2 wide: not worth growing
    (1.0, lambda w: 0.5 * w if w <= 2 else 0.47 * w, [20, 20], (2, 0.5, True, False)),
    # batching 5% cheaper than a single product: the loop, not batching
    (1.0, lambda w: 0.95 * w, [20, 20], (2, 0.95, True, True)),
    # the faster of the two timed single products (0.5) counts: 0.6 per column loses
    ([1.0, 0.5, 1.0], lambda w: 0.6 * w, [20], (2, 0.6, True, True)),
    # 2 wide only ties with the loop: that ends the probing too
    (1.0, lambda w: 1.0 * w if w <= 2 else 0.1 * w, [20, 20], (2, 1.0, True, True)),
    # 2 wide loses to the loop: no wider pass is tried, though 8 wide would win
    (1.0, lambda w: 1.3 * w if w <= 2 else 0.1 * w, [20, 20], (2, 1.3, True, True)),
    # 2 and 8 wide win, 32 wide loses to the loop: settled at 8 on the second call
    (1.0, lambda w: 0.85 * w if w <= 2 else 0.5 * w if w <= 8 else 2.0 * w, [40, 80, 24],
     (8, 0.5, True, False)),
])
def test_batched_or_looped_policy(single_cost, pass_cost, calls, expected, monkeypatch):
    """NOTE [batched or looped products] on a clock that the products advance: every
    column is computed once and in order, the loop is kept where batching does not pay
    10%, and the width grows by four while it does, across calls."""
    H, batched, single, widths = _on_a_clock(monkeypatch, single_cost, pass_cost)
    for k in calls:
        widths.clear()
        assert H._batched_or_looped("kind", k, batched, single,
                                    lambda parts: sum(parts, [])) == list(range(k))
    got = H._choices["kind"]
    assert (got.width, got.per_column, got.settled, got.loop) == pytest.approx(expected)
    if got.settled and len(calls) > 1:  # the last call ran only its route: that width
        assert set(widths) == (set() if got.loop else {got.width})


@pytest.mark.parametrize(("pass_cost", "calls", "expected", "widths"), [
    # 2 wide loses but 7 wide wins (kernel launches, a CNN): 7 columns after the singles,
    # then batches of 7; 28 wide, tried once 28 columns are left, pays no more: settled
    (lambda w: 1.3 * w if w <= 2 else 0.5 * w, [10, 10, 40], (7, 0.5, True, False),
     [28, 7, 5]),
    # the probe loses (activations out of cache, a residual MLP, a ResNet): the loop
    (lambda w: 1.6 * w, [10, 10], (7, 1.6, True, True), []),
    # one column left after the singles: no probe; the next call probes 6 of its 6
    (lambda w: 0.5 * w, [4, 6], (6, 0.5, False, False), [6]),
    # at most 8 wide: 8 of the 17 columns left, then batches of 8
    (lambda w: 0.5 * w, [20], (8, 0.5, False, False), [8, 8, 1]),
])
def test_batched_or_looped_clipped_policy(pass_cost, calls, expected, widths, monkeypatch):
    """NOTE [batched or looped products] for the R-operator (``first_width=8, clip=True``):
    after three timed single products the first pass takes 8 columns or those left (at
    least 2), then the width grows by four while it pays, as for the cached graph."""
    H, batched, single, seen = _on_a_clock(monkeypatch, 1.0, pass_cost)
    for k in calls:
        seen.clear()
        assert H._batched_or_looped("kind", k, batched, single, lambda parts: sum(parts, []),
                                    first_width=8, clip=True) == list(range(k))
    got = H._choices["kind"]
    assert (got.width, got.per_column, got.settled, got.loop) == pytest.approx(expected)
    assert seen == widths  # the last call's passes


class _StampClock:
    """``perf_counter`` returning the given stamps, then one more second per call."""

    def __init__(self, stamps):
        self.stamps, self.now = iter(stamps), 100.0

    def perf_counter(self):
        self.now = next(self.stamps, self.now + 1.0)
        return self.now


@pytest.mark.parametrize("graph_faster", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_route_by_measurement(graph_faster, batched, monkeypatch):
    """NOTE [route by measurement]: on a plan with a map (a softmax between layers),
    ``method='auto'`` starts on the R-operator and its first four products (single, or
    a batch's first columns) time two on each route; the faster serves the rest and is
    kept in the shared choices, so a second function with them builds only it. Every
    product equals the oracle's; a plan of layers alone and ``method='structured'`` never
    measure."""
    import hessfunc.products as products

    g = torch.Generator().manual_seed(4)
    p = {"w1": torch.randn(4, 3, generator=g, dtype=torch.float64),
         "w2": torch.randn(2, 4, generator=g, dtype=torch.float64)}
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), \
        torch.randn(5, 2, generator=g, dtype=torch.float64)

    def f(p, x, y):
        return F.mse_loss(F.linear(torch.softmax(F.linear(x, p["w1"]), -1), p["w2"]), y)

    graph_cost = 1.0 if graph_faster else 3.0
    clock = _StampClock([0, 2, 10, 12, 20, 20 + graph_cost, 30, 30 + graph_cost])
    monkeypatch.setattr(products, "time", clock)
    choices = {}
    H = products.HVPFunction(f, (p, x, y), 0, choices=choices)
    assert H.method == "structured" and H._pending is not None
    vs = [random_like(p, i) for i in range(6)]
    if batched:
        out = H.batched({k: torch.stack([v[k] for v in vs]) for k in p})
        got = [{k: out[k][i] for k in p} for i in range(len(vs))]
    else:
        got = [H(v) for v in vs]
    for v, hv in zip(vs, got, strict=True):
        assert_close(hv, _oracle_hvp(f, p, (x, y), v))
    winner = "graph" if graph_faster else "structured"
    assert H.method == winner and H._pending is None and choices["route"] == winner
    assert (H.chain_products is None) == graph_faster
    again = products.HVPFunction(f, (p, x, y), 0, choices=choices)
    assert again.method == winner and again._pending is None
    assert_close(again(vs[0]), _oracle_hvp(f, p, (x, y), vs[0]))
    assert hf.hvp_fn(f, (p, x, y), method="structured")._pending is None
    layers = lambda p, x, y: F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"])), p["w2"]), y)  # noqa: E731
    assert hf.hvp_fn(layers, (p, x, y))._pending is None


@pytest.mark.parametrize("budget, width", [(1, 2), (3, 3), (5, 5), (100, 8)])
def test_the_r_operators_first_pass_fits_its_byte_budget(budget, width, monkeypatch):
    """The R-operator's first batched pass takes as many columns as the tangents of its
    widest value fit in ``CHAIN_PROBE_BYTES`` (here ``budget`` times one column), from 2
    to 8."""

    g = torch.Generator().manual_seed(2)
    p = {"w1": torch.randn(6, 3, generator=g), "w2": torch.randn(2, 6, generator=g)}
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    f = lambda p, x, y: F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"])), p["w2"]), y)  # noqa: E731
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "structured"
    monkeypatch.setattr(importlib.import_module("hessfunc._thresholds"), "CHAIN_PROBE_BYTES",
                        budget * 5 * 6 * 4)  # (5, 6) floats
    assert H._chain_probe_width() == width


@pytest.mark.parametrize("route", ["autograd", "torch.func"])
def test_block_rows_and_linear_leaves_on_both_routes(route):
    """``HVPFunction.block_rows`` gives rows of one leaf's own block, the other leaves'
    tangents zero, on the autograd graph and on the torch.func path (taken when ``f``
    captures a tensor that requires grad); a leaf ``f`` is linear in has zero rows; an
    ``f`` linear in every leaf has zero products of the leaves' dtype and shape, single
    and batched. All against the dense loop oracle, in float64."""
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=route == "torch.func")
    x = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)

    def f(p):
        inner = torch.tanh(p["a"] * x[:3]).sum() * p["b"]
        return scale * ((inner ** 2).sum() + (p["b"] ** 3).sum() + (p["c"] * x[:2]).sum())

    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, generator=g, dtype=torch.float64),
              "b": torch.randn(2, generator=g, dtype=torch.float64),
              "c": torch.randn(2, generator=g, dtype=torch.float64)}
    H = hf.hvp_fn(f, (params,))
    assert (H._vjp is not None) == (route == "torch.func")
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    dense = hf.reference.hessian(f(leaves), list(leaves.values())).detach()
    offsets = {"a": slice(0, 3), "b": slice(3, 5), "c": slice(5, 7)}
    for index, (name, p) in enumerate(params.items()):
        tangents = torch.randn(4, *p.shape, generator=g, dtype=torch.float64)
        rows = H.block_rows(index, tangents)
        sl = offsets[name]
        assert rows.shape == tangents.shape and rows.dtype == torch.float64
        assert_close(rows, tangents @ dense[sl, sl].T)
    assert torch.equal(H.block_rows(2, torch.ones(3, 2, dtype=torch.float64)),
                       torch.zeros(3, 2, dtype=torch.float64))

    def linear(p):
        return scale * ((p["a"] * x[:3]).sum() + p["c"].sum())

    from hessfunc.products import _Choice

    lin = hf.hvp_fn(linear, ({"a": params["a"], "c": params["c"]},))
    single = lin({"a": torch.ones(3, dtype=torch.float64), "c": torch.ones(2, dtype=torch.float64)})
    lin._choices["products"] = _Choice(4, 0.0, 1.0, True)  # one batched pass
    batch = lin.batched({"a": torch.ones(4, 3, dtype=torch.float64),
                         "c": torch.ones(4, 2, dtype=torch.float64)})
    for out, lead in ((single, ()), (batch, (4,))):
        assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == {
            "a": ((*lead, 3), torch.float64), "c": ((*lead, 2), torch.float64)}
        assert all(not v.any() for v in out.values())


@pytest.mark.parametrize(("method", "mode", "route"), [
    ("auto", "reverse-over-reverse", "autograd"),
    ("structured", "reverse-over-reverse", "structured"),
    ("structured", "forward-over-reverse", "structured"),
    ("auto", "forward-over-reverse", "jvp"),
    ("graph", "reverse-over-reverse", "autograd"),
    ("graph", "forward-over-reverse", "jvp"),
])
def test_hvp_takes_the_route_it_is_asked_for(method, mode, route, monkeypatch):
    """``hvp``'s routes on a functionalize chain, seen by spies: the structured
    R-operator for ``structured`` (one product does not repay finding the chain, so not
    for ``auto``); the forward-over-reverse ``jvp`` when asked; else the autograd double
    backward. Every route equals the loop oracle; a bad ``mode`` or ``method`` is named."""
    import hessfunc.products as products

    seen = []
    chain_call = products.ChainProducts.__call__
    monkeypatch.setattr(products.ChainProducts, "__call__", lambda self, *a, **k:
                        seen.append("structured") or chain_call(self, *a, **k))
    jvp = torch.func.jvp
    monkeypatch.setattr(torch.func, "jvp", lambda *a, **k: seen.append("jvp") or jvp(*a, **k))
    backward = products._second_backward
    monkeypatch.setattr(products, "_second_backward",
                        lambda *a, **k: seen.append("autograd") or backward(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    f, params = hf.functionalize(model, nn.CrossEntropyLoss())  # no ZeroTensor trap
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    v = random_like(params, 1)
    assert_close(hf.hvp(f, (params, x, y), v, method=method, mode=mode),
                 _oracle_hvp(f, params, (x, y), v))
    assert seen == [route]
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hvp: `mode` must be one of"):
        hf.hvp(f, (params, x, y), v, mode="reverse")
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hvp: `method` must be one of"):
        hf.hvp(f, (params, x, y), v, method="fast")


def test_torch_func_chain_one_shot_and_cached_routes(monkeypatch):
    """A chain written the torch.func way: one ``hvp`` does not capture ``f`` (a trace
    costs more than one product saves) and takes the double backward; ``hvp_fn`` reads
    the chain off the captured graph and carries the loss's value. Both equal the
    oracle."""
    import hessfunc.products as products

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def f(p, x, y):
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    v = random_like(params, 2)
    expected = _oracle_hvp(f, params, (x, y), v)
    looked = []
    find = products.graph_chain
    monkeypatch.setattr(products, "graph_chain",
                        lambda *a: looked.append(1) or find(*a))
    assert_close(hf.hvp(f, (params, x, y), v), expected)
    assert not looked
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured" and looked
    assert_close(H(v), expected)
    assert torch.allclose(H.value, f(params, x, y), rtol=1e-12, atol=0)


_X = torch.ones(3, dtype=torch.float64)
_CUBE = lambda t: (t ** 3).sum()  # noqa: E731


@pytest.mark.parametrize(("call", "message"), [
    (lambda: hf.hvp(3, (_X,), _X), r"hessfunc\.hvp: `f` must be a callable, got int\."),
    (lambda: hf.hvp(_CUBE, _X, _X), r"hessfunc\.hvp: `primals` must be a tuple"),
    (lambda: hf.hvp(_CUBE, (_X,), _X, argnums=3), r"hessfunc\.hvp: `argnums`=3 is out of"),
    (lambda: hf.hvp(_CUBE, (torch.ones(3, dtype=torch.long),), _X),
     r"hessfunc\.hvp: `primals\[0\]` has dtype torch\.int64"),
    (lambda: hf.hvp(_CUBE, (_X,), torch.ones(2, dtype=torch.float64)),
     r"hessfunc\.hvp: `tangent` leaf 0 has shape \(2,\), expected \(3,\)"),
    (lambda: hf.hvp(lambda t: t ** 2, (_X,), _X), r"hessfunc\.hvp: f must return a scalar"),
    (lambda: hf.hvp(lambda t: t ** 2, (_X,), _X, method="graph"),
     r"hessfunc\.hvp: f must return a scalar"),
    (lambda: hf.hvp(_CUBE, (_X,), _X, method="structured"),
     r"hessfunc\.hvp: method='structured' does not apply here: argnums is not 0 or f takes "
     r"no batch after the parameters; use method='auto' or 'graph'\.$"),
    (lambda: hf.hvp_fn(3, (_X,)), r"hessfunc\.hvp_fn: `f` must be a callable"),
    (lambda: hf.hvp_fn(_CUBE, _X), r"hessfunc\.hvp_fn: `primals` must be a tuple"),
    (lambda: hf.hvp_fn(_CUBE, (_X,), method="bad"), r"hessfunc\.hvp_fn: `method` must be one"),
    (lambda: hf.hvp_fn(_CUBE, (_X,), method="structured"),
     r"hessfunc\.hvp_fn: method='structured' does not apply here: .*use method='auto' or "
     r"'graph'\.$"),
    (lambda: hf.hvp_fn(lambda t: t ** 2, (_X,)), r"hessfunc\.hvp_fn: f must return a scalar"),
    (lambda: hf.hvp_fn(_CUBE, (_X,))(torch.ones(2, dtype=torch.float64)),
     r"HVPFunction: `tangent` leaf 0 has shape \(2,\), expected \(3,\)"),
])
def test_product_errors_name_the_call_and_the_argument(call, message):
    """Every bad input to hvp, hvp_fn and an HVPFunction is refused by hessfunc's
    ArgumentError whose text starts with the public call and names the argument."""
    with pytest.raises(hf.ArgumentError, match="^" + message):
        call()


def test_structured_single_product_refuses_a_tangent_that_carries_a_graph():
    """``hvp(method="structured")`` on a chain whose tangent requires grad: refused,
    saying why, and the default takes the graph route exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    v = {k: t.clone().requires_grad_() for k, t in random_like(params, 2).items()}
    with pytest.raises(hf.ArgumentError, match=r"^hessfunc\.hvp: method='structured' does not "
                       r"apply here: the tangent carries a graph; use method='auto' or 'graph'\.$"):
        hf.hvp(f, (params, x, y), v, method="structured")
    expected = _oracle_hvp(f, params, (x, y), {k: t.detach() for k, t in v.items()})
    assert_close({k: t.detach() for k, t in hf.hvp(f, (params, x, y), v).items()}, expected)


def test_graph_route_with_an_unused_leaf_and_a_bilinear_term():
    """Through the cached gradient graph: a leaf ``f`` never uses has a zero gradient and
    zero products; in ``f = <a, b>`` the gradient of ``a`` depends on ``b`` only, so the
    rows of ``a``'s own block are zero while the cross products are ``b``'s tangent."""
    g = torch.Generator().manual_seed(3)
    params = {k: torch.randn(3, generator=g, dtype=torch.float64) for k in ("a", "b", "u")}

    def f(p):
        return (p["a"] * p["b"]).sum() + (p["b"] ** 3).sum()

    H = hf.hvp_fn(f, (params,), method="graph")
    assert torch.equal(H.gradient["u"], torch.zeros(3, dtype=torch.float64))
    v = {k: torch.randn(3, generator=g, dtype=torch.float64) for k in params}
    out = H(v)
    assert_close(out["a"], v["b"])
    assert_close(out["b"], v["a"] + 6 * params["b"] * v["b"])
    assert torch.equal(out["u"], torch.zeros(3, dtype=torch.float64))
    T = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.equal(H.block_rows(0, T), torch.zeros(5, 3, dtype=torch.float64))
    assert torch.equal(H.block_rows(2, T), torch.zeros(5, 3, dtype=torch.float64))
    assert_close(H.block_rows(1, T), 6 * params["b"] * T)


def test_batched_products_of_a_one_tensor_function():
    """``HVPFunction.batched`` of ``f(x)`` with one tensor argument, four columns (three
    single products and one timed batched pass), against the dense oracle."""
    x = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)

    def f(t):
        return (t ** 3).sum() + t.prod()

    H = hf.hvp_fn(f, (x,))
    V = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    dense = hf.reference.hessian(f(leaf), [leaf])
    assert_close(H.batched(V), V @ dense)


def test_a_sparse_embedding_gradient_is_laid_out_densely():
    """NOTE [sparse embedding gradients]: with ``nn.Embedding(sparse=True)`` torch's
    gradient of the table is sparse, which torch cannot backpropagate in batches. Every
    route gives results laid out like ``params``, equal to the loop oracle's on the same
    model with the flag off (the same function and derivative)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Tanh(), nn.Flatten(),
                          nn.Linear(6, 2)).double()
    x = torch.randint(0, 5, (4, 2), generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f, p = hf.functionalize(model, nn.MSELoss())
    dense_model = copy.deepcopy(model)
    dense_model[0].sparse = False
    g, _ = hf.functionalize(dense_model, nn.MSELoss())
    leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}
    H = hf.reference.hessian(g(leaves, x, y), list(leaves.values()))
    vs = [random_like(p, i) for i in range(3)]
    want = [H @ flat(v) for v in vs]
    H_fn = hf.hvp_fn(f, (p, x, y))
    stacked = {k: torch.stack([v[k] for v in vs]) for k in p}
    batched = H_fn.batched(stacked)
    results = [hf.hvp(f, (p, x, y), vs[0]), H_fn(vs[1]), {k: t[2] for k, t in batched.items()}]
    for j, result in enumerate(results):
        assert all(t.layout == torch.strided for t in result.values())
        assert_close(flat(result), want[j])
    assert_close(hf.HessianOperator(f, p, (x, y)).to_dense(), H)
    blocks = hf.hessian(f)(p, x, y)
    assert blocks["0.weight"]["0.weight"].layout == torch.strided
    assert_close(blocks["0.weight"]["0.weight"].reshape(15, 15), H[:15, :15])
    assert_close(flat(H_fn.gradient), flat(_oracle_grad(g, p, (x, y))))


def test_batched_products_fall_back_to_the_loop_where_torch_has_no_batched_rule():
    """GroupNorm's double backward has no batched rule in torch 2.13 (a batched backward
    pass through it raises a size mismatch inside torch): batched products, rows of a
    block, the diagonal and the full Hessian loop over single backward passes instead,
    equal to the loop oracle's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    f, p = hf.functionalize(model, nn.CrossEntropyLoss())
    leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}
    H = hf.reference.hessian(f(leaves, x, y), list(leaves.values()))
    vs = [random_like(p, i) for i in range(6)]
    batched = hf.hvp_fn(f, (p, x, y), method="graph").batched(
        {k: torch.stack([v[k] for v in vs]) for k in p})
    for j, v in enumerate(vs):
        assert_close(flat({k: t[j] for k, t in batched.items()}), H @ flat(v))
    assert_close(flat(hf.hessian_diag(f)(p, x, y)), torch.diagonal(H))
    assert_close(hf.HessianOperator(f, p, (x, y)).to_dense(), H)
