"""Chains of layers read off the captured graph of any ``f`` (NOTE [chains from the
graph] in ``hessfunc/graph/chain.py``): which functions are chains, and their products,
gradients and values against the loop oracle."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    assert_close,
    assert_nested_close,
    check_products,
    oracle_grad,
    oracle_hessian,
    oracle_hvp,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import hessfunc as hf
from hessfunc.graph.chain import graph_chain
from hessfunc.testing.models import TiedNet
from hessfunc.testing.strategies import problems, random_like

F64 = torch.float64


def _torch_func(model, loss_fn):
    return lambda p, x, y: loss_fn(torch.func.functional_call(model, p, (x,)), y)


@given(prob=problems(kinds=("mlp",), freeze=True), seed=st.integers(0, 1000),
       k=st.integers(1, 3))
def test_torch_func_chains_take_the_structured_products(prob, seed, k):
    """The same chains written the torch.func way (functional_call inside the loss):
    hvp_fn finds the chain in the captured graph, every activation an elementwise run
    of ops (GELU, softplus, a user's Sin), frozen parameters constants; its products,
    gradient and value equal the oracle's."""
    _structured_products_match(prob, seed, k, chain=True)


@given(prob=problems(kinds=("normed",), freeze=True), seed=st.integers(0, 1000),
       k=st.integers(1, 3))
def test_normalised_nets_take_the_structured_products(prob, seed, k):
    """MLPs with BatchNorm in eval mode (a scale), LayerNorm or RMSNorm (a normalisation
    with a closed form, then a scale) or a softmax, frozen subsets included: the
    R-operator's products (``method='auto'`` takes it), gradient and value equal the
    oracle's."""
    _structured_products_match(prob, seed, k, chain=True)


def _structured_products_match(prob, seed, k, chain, method="auto"):
    """``hvp_fn`` of the drawn problem written the torch.func way takes the R-operator
    (with ``method``; on a chain, or a DAG with skips: ``chain=False``); products,
    gradient and value equal the oracle's."""
    f = _torch_func(prob.model, prob.loss_fn)
    params = {n: p.detach() for n, p in prob.model.named_parameters() if p.requires_grad}
    assume(params)
    batch = (prob.inputs, prob.targets)
    H = hf.hvp_fn(f, (params, *batch), method=method)
    assert H.method == "structured"
    sources = H.chain_products._sources
    assert (sources == [(i,) for i in range(len(sources))]) == chain
    vs = [random_like(params, seed + i) for i in range(k)]
    check_products(H, f, params, batch, vs, single=True)
    assert_close(H.gradient, oracle_grad(f, params, batch))
    assert torch.allclose(H.value, f(params, *batch), rtol=1e-12, atol=0)


def test_torch_func_conv_chain_and_hand_written_layers():
    """A convolution chain through functional_call, and a chain written with F.linear,
    F.gelu and a frozen bias held by the closure: structured, equal to the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(),
                          nn.Linear(3 * 9, 4)).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    f = _torch_func(model, F.cross_entropy)
    params = {n: p.detach() for n, p in model.named_parameters()}
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    check_products(H, f, params, (x, y), [random_like(params, i) for i in range(2)])
    bias = torch.randn(4, dtype=torch.float64)

    def g(p, x, y):
        h = F.gelu(F.linear(x, p["w1"], bias))
        return F.mse_loss(h @ p["w2"].T + p["b2"], y, reduction="sum")

    p = {"w1": torch.randn(4, 3, dtype=torch.float64), "w2": torch.randn(2, 4, dtype=torch.float64),
         "b2": torch.randn(2, dtype=torch.float64)}
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    H = hf.hvp_fn(g, (p, x, y))
    assert H.method == "structured"
    check_products(H, g, p, (x, y), [random_like(p, i) for i in range(2)], single=True)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_torch_func_chain_keeps_output_blocks_only_where_samples_are_proved_apart(n):
    """A sum over samples (proved on the graph) keeps the loss's per-sample blocks; a loss
    that couples samples keeps its gradient graph (one sample: its block is all of it);
    both products equal the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    for loss_fn, apart in ((nn.MSELoss(), True), (lambda o, t: ((o - t).sum()) ** 2, n == 1)):
        f = _torch_func(model, loss_fn)
        H = hf.hvp_fn(f, (params, x, y))
        assert H.method == "structured"
        assert (H.chain_products._out_hessian is not None) == apart
        assert hf.explain(f, params, x, y)["hvp, hvp_fn, HessianOperator"].why == ""
        assert_close(H.value, f(params, x, y))  # either way the loss at the point
        check_products(H, f, params, (x, y), [random_like(params, i) for i in range(2)])


def _chain_loss(p, x, y, reduction="mean"):
    return F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"]), y,
                      reduction=reduction)


_TERMS = {
    "weight decay": lambda p, x, y: _chain_loss(p, x, y) + 1e-2 * sum(
        (w ** 2).sum() for k, w in p.items() if k != "s"),
    "separable penalties": lambda p, x, y: _chain_loss(p, x, y) + 0.1 * (p["w1"] ** 4).sum()
        + torch.cosh(p["b1"]).mean() - 0.5 * (p["w2"].t() ** 2).sum(),
    "coupled terms, the sum scaled": lambda p, x, y: (
        _chain_loss(p, x, y) + (p["w1"] ** 2).sum() * (p["b1"] ** 2).sum()
        + p["w2"].pow(4).sum() - 0.5 * p["b1"].sum() + (p["w2"] ** 2).sum() ** 2) / 3,
    "a parameter only the terms read": lambda p, x, y: _chain_loss(p, x, y)
        + torch.cosh(p["s"] * p["w1"][0]).sum(),
    "reordered copies of one parameter": lambda p, x, y: _chain_loss(p, x, y)
        + (p["b1"].view(2, 2) * p["b1"].view(2, 2).t()).sum()
        + ((p["b1"].view(2, 2) - p["b1"].view(2, 2).t()) ** 2).sum(),
    "the sum halved": lambda p, x, y: 0.5 * (_chain_loss(p, x, y) + (p["w2"] ** 2).sum()
                                             * (p["b1"] ** 2).sum()),
    "a linear term and coupled ones": lambda p, x, y: _chain_loss(p, x, y)
        + p["w1"].sum() + (p["b1"] ** 2).sum() * (p["w2"] ** 2).sum(),
    "a term subtracted from a summed loss": lambda p, x, y: _chain_loss(
        p, x, y, "none").sum(1).mean() - torch.log((p["w2"] ** 2).sum()),
    # separable, some second derivatives nowhere curved or absent (relu, a detached copy),
    # a 0-d constant inside an elementwise op, a cube written as w^2 * w
    "terms without curvature": lambda p, x, y: _chain_loss(p, x, y) + torch.relu(p["w1"]).sum()
        + (p["w2"] * torch.tensor(0.5, dtype=F64)).pow(2).sum() + (p["b1"] ** 2 * p["b1"]).sum()
        + (p["b1"] ** 2).sum() / 4,
    "a detached copy": lambda p, x, y: _chain_loss(p, x, y) + (p["b1"].detach() ** 2).sum()
        + (p["w1"] ** 2).sum(),
    # not separable: the same layout of two permutations, an op coupling the entries, a
    # square of a sum after a scaled separable term, an elementwise value entering the
    # loss before its sum
    "two permutations": lambda p, x, y: _chain_loss(p, x, y) + (
        p["b1"].view(2, 2).permute(1, 0) * p["b1"].view(2, 2).permute(0, 1)).sum(),
    "an op coupling one parameter": lambda p, x, y: _chain_loss(p, x, y)
        + (torch.cumsum(p["b1"], 0) ** 2).sum(),
    "scaled, then coupled": lambda p, x, y: _chain_loss(p, x, y)
        + 0.1 * (p["w1"] ** 4).sum() + p["b1"].sum() ** 2,
    "elementwise before the sum": lambda p, x, y: (_chain_loss(p, x, y, "none").sum(0)
                                                   + p["s"] ** 2).sum() + p["s"].sum() ** 2,
    "a constant over a term": lambda p, x, y: _chain_loss(p, x, y)
        + torch.tensor(2.0, dtype=F64) / (p["w1"] ** 2).sum(),
    "the sum scaled by a constant tensor": lambda p, x, y: torch.tensor(0.5, dtype=F64) * (
        _chain_loss(p, x, y) + (p["w1"] ** 2).sum() * (p["b1"] ** 2).sum()),
}
#: the parameters only the terms read, by their shapes
_ONLY_TERMS = {"a parameter only the terms read": (3,), "elementwise before the sum": (2,)}
_SEPARABLE = ("weight decay", "separable penalties", "terms without curvature")


@pytest.mark.parametrize("n", [2, 6])
@pytest.mark.parametrize("name", list(_TERMS))
def test_terms_of_the_parameters_alone_join_the_chains_products(name, n, monkeypatch):
    """NOTE [parameter terms]: a loss ``l(o) + R(p)`` (weight decay, separable penalties,
    penalties coupling several parameters, a parameter only ``R`` reads) keeps the chain:
    products, batched products, the gradient, the value, the full Hessian and the
    operator's dense matrix and eigenvalues equal the oracle's.
    With two samples of three features the first layer's inputs span less than its
    weight, and a term on that weight must keep the operator off the data span."""
    f = _TERMS[name]
    gen = torch.Generator().manual_seed(3)
    p = {"w1": torch.randn(4, 3, generator=gen, dtype=F64),
         "b1": torch.randn(4, generator=gen, dtype=F64),
         "w2": torch.randn(2, 4, generator=gen, dtype=F64)}
    if name in _ONLY_TERMS:
        p["s"] = torch.randn(_ONLY_TERMS[name], generator=gen, dtype=F64)
    x, y = torch.randn(n, 3, generator=gen, dtype=F64), torch.randn(n, 2, generator=gen,
                                                                      dtype=F64)
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "structured"
    # separable terms have a diagonal H_R, kept; others take a backward pass through R
    assert (H.chain_products._terms.diagonal is not None) == (name in _SEPARABLE)
    check_products(H, f, p, (x, y), [random_like(p, i) for i in range(3)], single=True)
    leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}
    loss = f(leaves, x, y)
    assert_close(H.value, loss.detach())
    assert_close(H.gradient, dict(zip(p, torch.autograd.grad(loss, list(leaves.values())),
                                      strict=True)))
    dense = hf.reference.hessian(f(leaves, x, y), list(leaves.values()))
    assert_nested_close(hf.hessian(f)(p, x, y), dense, p)  # the chain's, + H_R
    # a budget of a few bytes: H_R one unit tangent at a time, samples one at a time
    for budget in (64, 3 * 2 * 8 * sum(t.numel() for t in p.values())):  # chunks of 1, 3
        monkeypatch.setattr(sys.modules["hessfunc.graph.chain_plan"], "CHUNK_BUDGET_BYTES",
                            budget)
        assert_nested_close(hf.hessian(f)(p, x, y), dense, p)
    monkeypatch.undo()
    # one parameter's tangent alone (the others zero), its rows only
    first = next(iter(p))
    t = random_like(p, 4)[first]
    rows = H.chain_products({first: t}, wanted=list(p))
    assert_close(rows, oracle_hvp(f, p, (x, y), {k: t if k == first else torch.zeros_like(v)
                                                 for k, v in p.items()}))
    if name == "a parameter only the terms read":  # no tangent reaches the model: zero rows
        t = random_like(p, 5)["s"]
        rows = H.chain_products({"s": t}, wanted=list(p))
        assert_close(rows, oracle_hvp(f, p, (x, y), {k: t if k == "s" else torch.zeros_like(v)
                                                     for k, v in p.items()}))
    assert hf.explain(f, p, x, y)["hessian"].engine == "chain in the captured graph"
    op = hf.HessianOperator(f, p, (x, y))
    assert_close(op.to_dense(), dense)
    eig = torch.linalg.eigvalsh(dense)
    for which, truth in (("largest", eig[-2:].flip(0)), ("smallest", eig[:2])):
        torch.testing.assert_close(op.eigenvalues(2, which=which, tol=1e-12, seed=0), truth,
                                   rtol=1e-8, atol=1e-10)


def _gaussian_nll(o, t):
    return F.gaussian_nll_loss(o[:, :1], t, F.softplus(o[:, 1:]) + 1e-3)


def _branching_loss(o, t):  # a Python branch on a value; couples the samples
    loss = ((o - t) ** 2).mean()
    return loss * loss if loss.item() < 1e6 else loss


def _in_place_loss(o, t):  # writes into the model's output, then branches on a value
    o.sub_(t)
    return (o ** 2).sum() if bool(o.sum() > -1e9) else o.sum()


@pytest.mark.parametrize("loss_fn", [_gaussian_nll, _branching_loss, _in_place_loss])
def test_a_loss_the_trace_cannot_take_keeps_the_models_chain(loss_fn):
    """NOTE [a loss the trace cannot take]: a functionalize model whose loss cannot be
    captured (gaussian_nll_loss checks its variance; a branch on a value) takes the chain
    of the model's own graph, the loss run as it is: products, batched and one-shot,
    equal the oracle, and explain says why. A model that cannot be captured either
    keeps the cached gradient graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    f, params = hf.functionalize(model, loss_fn)
    x = torch.randn(5, 3, dtype=F64)
    y = torch.randn(5, 1 if loss_fn is _gaussian_nll else 2, dtype=F64)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    check_products(H, f, params, (x, y), [random_like(params, i) for i in range(2)],
                   single=True)
    assert_close(H.value, f(params, x, y))
    why = hf.explain(f, params, x, y)["hvp, hvp_fn, HessianOperator"].why
    assert why.startswith("the model's graph, its loss run as it is (f could not be "
                          "captured as a graph: Python reads a tensor's value"), why

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            out = self.net(x)
            return out if out.sum() > -1e9 else -out

    f, params = hf.functionalize(Gated(), loss_fn)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "graph"
    check_products(H, f, params, (x, y), [random_like(params, 0)])


class _Stacked(nn.Module):  # the chain stops before the model's output
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        o = self.net(x)
        return torch.cat([o, o.cumsum(1)], 1)


def test_where_the_models_own_graph_gives_no_chain():
    """NOTE [a loss the trace cannot take], where the model alone gives no chain (its
    chain stops before its output): the cached gradient graph, and explain gives both
    reasons. A loss model called without targets, or with two, raises the model's own
    error."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)

    def loss_fn(o, t):
        return _branching_loss(o[:, :2], t)

    f, params = hf.functionalize(_Stacked(net), loss_fn)
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "graph"
    check_products(H, f, params, (x, y), [random_like(params, 0)])
    why = hf.explain(f, params, x, y)["hvp, hvp_fn, HessianOperator"].why
    assert why.endswith("; the model alone: the model's graph does not end at its output"), why
    f, params = hf.functionalize(net, loss_fn)
    for args in ((params, x), (params, x, y, y)):
        with pytest.raises(hf.ArgumentError, match="expected one `targets` argument"):
            hf.hvp_fn(f, args)


def test_a_parameter_f_does_not_read_keeps_the_cached_graph():
    """A parameter that f never reads (its gradient and Hessian rows are zero) is not a
    chain step: the cached gradient graph, exact, and method='structured' names it."""
    gen = torch.Generator().manual_seed(3)
    p = {"w1": torch.randn(4, 3, generator=gen, dtype=F64),
         "b1": torch.randn(4, generator=gen, dtype=F64),
         "w2": torch.randn(2, 4, generator=gen, dtype=F64),
         "unused": torch.randn(3, generator=gen, dtype=F64)}
    x, y = torch.randn(6, 3, generator=gen, dtype=F64), torch.randn(6, 2, generator=gen,
                                                                      dtype=F64)
    H = hf.hvp_fn(_chain_loss, (p, x, y))
    assert H.method == "graph"
    check_products(H, _chain_loss, p, (x, y), [random_like(p, i) for i in range(2)])
    with pytest.raises(hf.ArgumentError, match="parameter 'unused' does not enter f"):
        hf.hvp_fn(_chain_loss, (p, x, y), method="structured")


def test_a_penalty_over_hundreds_of_parameters_is_one_term():
    """A penalty summed in Python over 400 parameter tensors is a chain of 400 adds of
    values of the parameters alone (walked without recursion), separable: its products
    and gradient equal the oracle's."""
    gen = torch.Generator().manual_seed(5)
    p = {"w1": torch.randn(4, 3, generator=gen, dtype=F64),
         "b1": torch.randn(4, generator=gen, dtype=F64),
         "w2": torch.randn(2, 4, generator=gen, dtype=F64)}
    p.update({f"s{i}": torch.randn(2, generator=gen, dtype=F64) for i in range(400)})

    def f(p, x, y):
        return _chain_loss(p, x, y) + sum(torch.cosh(t).sum() for t in p.values())

    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 2, generator=gen,
                                                                      dtype=F64)
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "structured" and H.chain_products._terms.diagonal is not None
    check_products(H, f, p, (x, y), [random_like(p, 0)])
    assert_close(H.gradient, oracle_grad(f, p, (x, y)))


_NOT_CHAINS = {
    "weight decay times the loss": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]), y) * (1 + (p["w1"] ** 2).sum()),
    "a penalty added to the output": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]) + (p["w2"] ** 2).sum(), y),
    "a penalty scaled by the targets": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]), y) + y.sum() * (p["w1"] ** 2).sum(),
    "targets scaled by a weight's norm": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]), y * p["w2"].norm()),
    "a constant over the sum": lambda p, x, y: y.new_ones(()) / (F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]), y) + (p["w1"] ** 2).sum()),
    "the sum times itself": lambda p, x, y: (lambda s: s * s)(F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]), y) + (p["w1"] ** 2).sum()),
    "a map of the scaled sum": lambda p, x, y: torch.exp(0.5 * (F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"])), p["w2"]), y) + (p["w1"] ** 2).sum())),
    "tied layers": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(F.linear(
        torch.tanh(F.linear(x, p["w1"])), p["w1"])), p["w2"]), y),
    "tied weight": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"])),
                                                       p["w1"].T[:2] + p["w2"]), y),
    "untransposed weight": lambda p, x, y: F.mse_loss(torch.tanh(x @ p["w1"]) @ p["w2"].T, y),
    "parameter in an activation": lambda p, x, y: F.mse_loss(F.linear(
        torch.tanh(F.linear(x, p["w1"])) * p["w2"][0, 0], p["w2"]), y),
    "identity permute": lambda p, x, y: F.mse_loss(F.linear(x @ p["w1"].permute(0, 1),
                                                            p["w2"]), y),
    "penalty on a layer's output": lambda p, x, y: _penalised(p, x, y, lambda z, a: z),
    "penalty inside an activation": lambda p, x, y: _penalised(p, x, y, lambda z, a: a),
    "an activation read by the loss": lambda p, x, y: (lambda h: F.mse_loss(
        F.linear(h, p["w2"]), y) + h.sum())(torch.tanh(F.linear(x, p["w1"]))),
}


def _penalised(p, x, y, penalised):
    z = F.linear(x, p["w1"])
    a = torch.tanh(z)
    return F.mse_loss(F.linear(a * 2, p["w2"]), y) + (penalised(z, a) ** 2).mean()


@pytest.mark.parametrize("name", list(_NOT_CHAINS))
def test_what_is_not_a_chain_takes_the_cached_graph(name):
    """A regulariser, a tied weight, a weight used as is, a parameter inside an activation,
    a penalty on a value inside the model: not a chain of layers;
    the cached gradient graph, exact, and method='structured' says where the chain
    stops."""
    f = _NOT_CHAINS[name]
    gen = torch.Generator().manual_seed(0)
    p = {"w1": torch.randn(3, 3, generator=gen, dtype=torch.float64),
         "w2": torch.randn(2, 3, generator=gen, dtype=torch.float64)}
    x, y = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, 2,
                                                                             dtype=torch.float64)
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "graph"
    check_products(H, f, p, (x, y), [random_like(p, 1)])
    with pytest.raises(hf.ArgumentError, match="method='structured' does not apply here: "
                                               "(parameters .* (stops at|several layers)|no "
                                               "layer|the loss (combines|is not a sum)|values "
                                               "inside the model are read outside)"):
        hf.hvp_fn(f, (p, x, y), method="structured")


def test_a_functionalize_chain_read_off_the_graph_keeps_check_finite():
    """A LogSoftmax module after the chain is part of the loss; ``check_finite=True``
    still names the sample that is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3),
                          nn.LogSoftmax(dim=1)).double()
    f, params = hf.functionalize(model, nn.NLLLoss(), check_finite=True)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert hf.hvp_fn(f, (params, x, y)).method == "structured"
    x[2, 1] = float("nan")
    with pytest.raises(hf.NonFiniteError,
                       match="input 0, sample 2 holds NaN/Inf, so the loss is not finite"):
        hf.hvp_fn(f, (params, x, y))


# ---- what the walk accepts and why it declines (from the graph_chain mutation group) --

def _problem(n=4, d=3, c=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = {"w1": torch.randn(d, d, generator=gen, dtype=torch.float64),
         "w2": torch.randn(c, d, generator=gen, dtype=torch.float64)}
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return p, x, y


_TRANSPOSED = {
    "t": lambda w: w.t(),
    "transpose(0, 1)": lambda w: w.transpose(0, 1),
    "transpose(-1, -2)": lambda w: w.transpose(-1, -2),
    "permute(1, 0)": lambda w: w.permute(1, 0),
    "permute(-1, -2)": lambda w: w.permute(-1, -2),
}


@pytest.mark.parametrize("name", list(_TRANSPOSED))
def test_every_spelling_of_a_transposed_weight_is_a_layer(name):
    tr = _TRANSPOSED[name]
    p, x, y = _problem()

    def f(p, x, y):
        return F.mse_loss(torch.tanh(x @ tr(p["w1"])) @ tr(p["w2"]), y)

    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "structured"
    check_products(H, f, p, (x, y), [random_like(p, 0)])


_NOT_LAYERS = {
    "identity transpose(1, 1)": lambda p, x, y: F.mse_loss(
        torch.tanh(x @ p["w1"].transpose(1, 1)) @ p["w2"].t(), y),
    "a per-sample bias parameter": lambda p, x, y: F.mse_loss(
        torch.addmm(p["B"], torch.tanh(x @ p["w1"].t()), p["w2"].t()), y),
}


@pytest.mark.parametrize("name", list(_NOT_LAYERS))
def test_look_alikes_of_layers_and_activations_are_not_a_chain(name):
    """A transpose that is the identity and a bias with a row per sample: the cached
    gradient graph, exact."""
    f = _NOT_LAYERS[name]
    p, x, y = _problem()
    if name == "a per-sample bias parameter":
        p["B"] = torch.randn(4, 2, dtype=torch.float64)
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "graph"
    check_products(H, f, p, (x, y), [random_like(p, 0)])


def test_conv1d_chains_and_what_ends_them():
    """A Conv1d chain flattened into a Linear layer, or summed over positions, is a chain
    (its 3-D values flattened), with or without a bias; a head weight sliced from a
    parameter, a grouped convolution and a chain ending in 3-D outputs are not (the cached
    gradient graph, exact)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 5, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen,
                                                                     dtype=F64)
    p = {"cw": torch.randn(3, 2, 3, generator=gen, dtype=F64),
         "cb": torch.randn(3, generator=gen, dtype=F64),
         "hw": torch.randn(2, 9, generator=gen, dtype=F64),
         "hb": torch.randn(2, generator=gen, dtype=F64)}

    def flat(p, x, y):
        h = torch.tanh(F.conv1d(x, p["cw"], p["cb"]))
        return F.mse_loss(F.linear(h.flatten(1), p["hw"], p["hb"]), y)

    def no_bias(p, x, y):
        h = torch.tanh(F.conv1d(x, p["cw"]))
        return F.mse_loss(F.linear(h.flatten(1), p["hw"], p["hb"]), y)

    def summed(p, x, y):
        h = torch.tanh(F.conv1d(x, p["cw"], p["cb"]))
        return F.mse_loss(F.linear(h.sum(-1), p["hw"], p["hb"]), y)

    def sliced(p, x, y):
        h = torch.tanh(F.conv1d(x, p["cw"], p["cb"]))
        return F.mse_loss(F.linear(h.sum(-1), p["hw"][:, :3], p["hb"]), y)

    for f, params in ((flat, p), (no_bias, {k: v for k, v in p.items() if k != "cb"}),
                      (summed, {**p, "hw": p["hw"][:, :3].contiguous()})):
        H = hf.hvp_fn(f, (params, x, y))
        assert H.method == "structured"
        check_products(H, f, params, (x, y), [random_like(params, 0)])

    def grouped(p, x, y):
        h = torch.tanh(F.conv1d(x, p["gw"], groups=2))
        return F.mse_loss(F.linear(h.flatten(1), p["gh"]), y)

    def computed_weight(p, x, y):
        h = torch.tanh(F.conv1d(x, 2.0 * p["cw"], p["cb"]))
        return F.mse_loss(F.linear(h.flatten(1), p["hw"], p["hb"]), y)

    def outputs_3d(p, x, t):
        return F.mse_loss(F.conv1d(x, p["cw"], p["cb"]), t)

    g = {"gw": torch.randn(4, 1, 3, generator=gen, dtype=F64),
         "gh": torch.randn(2, 12, generator=gen, dtype=F64)}
    for f, params, target, why in (
            (sliced, p, y, "which stops at addmm"),
            (grouped, g, y, "which stops at convolution"),
            (computed_weight, p, y, "which stops at convolution"),
            (outputs_3d, p, torch.randn(3, 3, 3, generator=gen, dtype=F64),
             r"^the chain does not end in an \(N, C\) output$")):
        plan, reason = graph_chain(f, (params, x, target), 0)
        assert plan is None and re.search(why, reason), (f.__name__, reason)
        H = hf.hvp_fn(f, (params, x, target))
        assert H.method == "graph"
        check_products(H, f, params, (x, target), [random_like(params, 1)])


def test_elementwise_runs_with_constants_and_keyword_arguments():
    """An elementwise map that reads a tensor constant of the closure (a mask) and an op
    with keyword arguments (tanh-approximated GELU): a chain, exact."""
    p, x, y = _problem()
    mask = torch.tensor([1.0, 0.5, -2.0], dtype=F64)

    def f(p, x, y):
        h = F.gelu(x @ p["w1"].t(), approximate="tanh") * mask
        return F.mse_loss(h @ p["w2"].t(), y)

    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "structured"
    check_products(H, f, p, (x, y), [random_like(p, i) for i in range(2)])


def test_a_chain_with_only_the_inputs_and_parameters():
    """f(params, inputs) without targets is a chain too."""
    p, x, _ = _problem()

    def f(p, x):
        return (torch.tanh(x @ p["w1"].t()) @ p["w2"].t()).pow(2).sum()

    H = hf.hvp_fn(f, (p, x))
    assert H.method == "structured"
    check_products(H, f, p, (x,), [random_like(p, 0)])


def test_why_a_call_is_not_a_chain():
    """Each reason the chain route declines, word for word."""
    p, x, y = _problem()

    def f(p, x, y):
        return F.mse_loss(torch.tanh(x @ p["w1"].t()) @ p["w2"].t(), y)

    def skip(p, x, y):
        h = torch.tanh(x @ p["w1"].t())
        return F.mse_loss((h + h.exp()) @ p["w2"].t(), y) + h.sum()

    def random_f(p, x, y):
        return F.mse_loss(F.dropout(x @ p["w1"].t(), 0.5) @ p["w2"].t(), y)

    def three_open(p, x, y):  # the loss reads two activations besides the output
        h1 = torch.tanh(x @ p["w1"].t())
        h2 = torch.tanh(h1 @ p["w3"].t())
        return F.mse_loss(h2 @ p["w2"].t(), y) + h1.sum() + h2.sum()

    fixed = p["w2"].clone()  # a constant layer: a chain step with no parameter

    cases = [
        ((f, (p, x, y), 1), "^argnums is not 0 or f takes no batch after the parameters$"),
        ((f, (p,), 0), "^argnums is not 0 or f takes no batch after the parameters$"),
        ((f, ({}, x, y), 0), "^the parameters are not a dict of floating-point tensors$"),
        ((f, ({**p, "i": torch.ones(2, dtype=torch.int64)}, x, y), 0),
         "^the parameters are not a dict of floating-point tensors$"),
        ((f, ((p["w1"], p["w2"]), x, y), 0),
         "^the parameters are not a dict of floating-point tensors$"),
        ((f, (p, (x, x), y), 0), "^the inputs are not one tensor$"),
        ((f, (p, x[0], y), 0), "^the inputs are not one tensor with a batch axis$"),
        ((random_f, (p, x, y), 0), "^f could not be captured as a graph \\(.*random"),
        ((lambda p, x, y: torch.tanh(x).sum(), (p, x, y), 0),
         "^no layer with a parameter on a chain from the inputs$"),
        ((lambda p, x, y: F.mse_loss(torch.tanh(x @ fixed.t()), y), (p, x, y), 0),
         "^no layer with a parameter on a chain from the inputs$"),
        ((skip, (p, x, y), 0),
         r"^values inside the model are read outside its layers, by sum[^,]* \(an op that "
         r"joins branches without a rule, or a loss that reads an activation\)$"),
        ((lambda p, x, y: (lambda o: F.mse_loss(o, y) + (o * p["w1"].sum()).sum())(
            x @ p["w2"].t()), (p, x, y), 0),
         r"^parameters \['w1'\] are used outside the chain of layers from the inputs, which "
         r"stops at a value read by 2 ops \(sub[^,]*, mul[^,]*\) \(a regulariser, a tied "
         r"weight, branches joined other than by add, or an op without a chain rule\)$"),
        ((lambda p, x, y: (p["w1"] ** 2).sum() + (p["w2"] ** 2).sum() + 0 * y.sum(), (p, x, y),
          0), "^no layer with a parameter on a chain from the inputs$"),  # x read by none
        ((three_open, ({**p, "w3": p["w1"].flip(0).clone()}, x, y), 0),
         r"^values inside the model are read outside its layers, by sum[^,]*, sum[^,]* \(an "
         r"op that joins branches without a rule, or a loss that reads an activation\)$"),
        ((lambda p, x, y: (x @ p["w1"].t() @ p["w2"].t()).detach().sum(), (p, x, y), 0),
         "^the loss does not depend on the model output$"),
        ((lambda p, x, y: (torch.tanh(x @ p["w1"].t()) @ p["w2"].t()).pow(2).sum(0),
          (p, x, y), 0), "^the loss is not a scalar$"),
        ((lambda p, x, y: (x @ p["w1"].t() @ p["w2"].t()).sum() if bool(x.sum() > 0) else
          (x @ p["w1"].t() @ p["w2"].t()).mean(), (p, x, y), 0),
         r"^f could not be captured as a graph: Python reads a tensor's value .* at .*"
         r"test_graph_chain\.py:\d+ in <lambda> \(`.*bool\(x\.sum\(\) > 0\)"),
    ]
    for (fn, args, argnums), why in cases:
        plan, reason = graph_chain(fn, args, argnums)
        assert plan is None and re.search(why, reason), (why, reason)
    with torch.enable_grad():
        carried = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        _, reason = graph_chain(f, (carried, x * torch.ones((), requires_grad=True), y), 0)
    assert reason == "called inside a torch.func transform or with inputs that carry a graph"


def test_output_blocks_kept_up_to_the_budget(monkeypatch):
    """The per-sample output blocks ``(N, C, C)`` are kept when they fit the chunk budget,
    the loss's gradient graph used otherwise; the products agree."""
    p, x, y = _problem()
    f = lambda p, x, y: F.mse_loss(torch.tanh(x @ p["w1"].t()) @ p["w2"].t(), y)  # noqa: E731
    need = 4 * 2 * 2 * 8
    chain_module = sys.modules["hessfunc.graph.chain"]
    for budget, kept in ((need, True), (need - 1, False)):
        monkeypatch.setattr(chain_module, "CHUNK_BUDGET_BYTES", budget)
        plan, _ = graph_chain(f, (p, x, y), 0)
        assert (plan.out_hessian is not None) == kept
        H = hf.hvp_fn(f, (p, x, y))
        check_products(H, f, p, (x, y), [random_like(p, 0)])


def test_check_finite_on_a_functionalize_model_that_is_not_a_chain():
    """``check_finite=True`` and a model the graph does not read as layers (a weight
    shared by two layers): no chain, no check on a plan that is not there; the cached
    gradient graph."""
    model = TiedNet(3, 4, activation="tanh").double()
    f, params = hf.functionalize(model, nn.MSELoss(), check_finite=True)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert graph_chain(f, (params, x, y), 0)[0] is None
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "graph"
    check_products(H, f, params, (x, y), [random_like(params, 0)])


def test_the_walk_on_shapes_runs_once_per_capture(monkeypatch):
    """The walk on the trace's shapes is kept with the capture: a second call (a lambda
    made afresh, the same code) walks only the values, a non-chain not at all and with
    the same reason. The plan stays exact."""
    import hessfunc.graph.chain as chain_module

    walks = []
    real = chain_module._chain_steps

    def spy(walk, *args):
        walks.append(walk.values)
        return real(walk, *args)

    monkeypatch.setattr(chain_module, "_chain_steps", spy)
    p, x, y = _problem()

    def make():
        return lambda p, x, y: F.mse_loss(torch.tanh(x @ p["w1"].t()) @ p["w2"].t(), y)

    def skip(p, x, y):
        h = torch.tanh(x @ p["w1"].t())
        return F.mse_loss(h @ p["w2"].t(), y) + h.sum()

    assert graph_chain(make(), (p, x, y), 0)[0] is not None and walks == [False, True]
    walks.clear()
    plan, _ = graph_chain(make(), (p, x, y), 0)
    assert plan is not None and walks == [True]
    f = make()
    check_products(hf.hvp_fn(f, (p, x, y)), f, p, (x, y), [random_like(p, 0)])
    walks.clear()
    first = graph_chain(skip, (p, x, y), 0)[1]
    assert graph_chain(skip, (p, x, y), 0) == (None, first) and walks == [False]


def test_full_hessian_of_a_conv_chain_finds_the_chain_once(monkeypatch):
    """A convolution chain written the torch.func way has no per-sample propagation, so
    its full Hessian is rows of the chain's products: the chain that ``hessian`` found
    serves them, without a second search. Equal to the oracle's dense Hessian."""
    import hessfunc.dense as dense
    import hessfunc.products as products

    calls = []
    for module in (dense, products):
        real = module.graph_chain
        monkeypatch.setattr(module, "graph_chain",
                            lambda *a, real=real: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3)).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=F64), torch.tensor([0, 2, 1])
    f = _torch_func(model, F.cross_entropy)
    params = {n: p.detach() for n, p in model.named_parameters()}
    H = hf.hessian(f, flat=True)(params, x, y)
    assert len(calls) == 1
    expected = oracle_hessian(f, params, x, y)
    assert_close(H, expected)


_MAPS = {
    "tanh": torch.tanh,                      # closed forms from the output
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanhshrink": F.tanhshrink,              # runs that start with tanh: not tanh's form
    "2 tanh": lambda z: 2 * torch.tanh(z),
    "logsigmoid": F.logsigmoid,              # reads zeros_like of its input
    "elu": F.elu,                            # reads its input at three ops
    "affine": lambda z: 0.5 * z + 1,         # phi' constant: phi'' by no second pass
    "step": lambda z: (z > 0).to(z.dtype),   # no derivative at all: phi' = phi'' = 0
}


@pytest.mark.parametrize("name", list(_MAPS))
def test_elementwise_derivatives_equal_autograds(name):
    """Each map's ``phi'`` and ``phi''`` in the chain against plain autograd of the map
    (float64, equal to rounding); relu's ``phi'`` at an exact zero is autograd's 0."""
    phi = _MAPS[name]
    p, x, y = _problem(n=6)
    p["w1"] = torch.eye(3, dtype=F64)         # the pre-activations are the inputs
    if name == "relu":  # elsewhere a kink's convention is the decomposition's, not torch's
        x[0, 0] = 0.0
    f = lambda p, x, y: F.mse_loss(F.linear(phi(F.linear(x, p["w1"])), p["w2"]), y)  # noqa: E731
    plan, reason = graph_chain(f, (p, x, y), 0)
    assert plan is not None, reason
    (step,) = [s for s in plan.steps if type(s).__name__ == "_Elementwise"]
    z = x.clone().requires_grad_(True)
    out = phi(z)
    d1 = torch.autograd.grad(out.sum(), z, create_graph=True)[0] if out.requires_grad else \
        torch.zeros_like(z)
    d2 = torch.autograd.grad(d1.sum(), z, allow_unused=True)[0] if d1.requires_grad else None
    d2 = torch.zeros_like(z) if d2 is None else d2
    torch.testing.assert_close(step.phi1, d1.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(step.phi2, d2, rtol=1e-14, atol=1e-15)
    assert step.phi1.dtype == F64
    check_products(hf.hvp_fn(f, (p, x, y)), f, p, (x, y), [random_like(p, 2)])


def test_a_map_torch_cannot_differentiate_twice_is_named():
    """``hardsigmoid_backward`` has no derivative in torch: the map's second derivative
    is refused with the op's name (the captured graph decomposes hardsigmoid into a
    clamp, so this is for maps that reach torch's kernel)."""
    z = torch.randn(5, dtype=F64)
    found = sys.modules["hessfunc.graph.chain_plan"].elementwise_derivatives(F.hardsigmoid, z)
    assert isinstance(found, str) and "hardsigmoid_backward" in found


@pytest.mark.parametrize("n", [1, 4])
def test_the_full_hessian_of_a_chain_under_a_loss_linear_in_its_output(n):
    """A loss linear in the output (zero output Hessian), two Linear layers in a row: the
    full Hessian is the layers' own curvature alone, in float64 throughout."""
    p, x, _ = _problem(n=n)
    p["w3"] = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    c = torch.tensor([0.7, -1.3], dtype=F64)

    def f(p, x, y):  # two Linear layers in a row at the top
        h = F.linear(torch.tanh(F.linear(x, p["w1"])), p["w2"])
        return (F.linear(h, p["w3"]) * c).sum() + 0 * y.sum()

    dense = oracle_hessian(f, p, x, x)
    assert hf.explain(f, p, x, x)["hessian"].engine == "chain in the captured graph"
    assert_nested_close(hf.hessian(f)(p, x, x), dense, p)


def _conv_chain_loss(p, x, y):
    h = torch.tanh(F.conv2d(x, p["k"], p["c"], padding=1))
    return F.mse_loss(F.linear(h.flatten(1), p["w"]), y)


_ROWS = {  # f, the parameters (name: shape), tangents given, rows wanted
    "a penalty's own parameter without a tangent": (
        lambda p, x, y: _chain_loss(p, x, y) + (p["w1"] ** 2).sum() + (p["s"] ** 2).sum(),
        {"w1": (4, 3), "b1": (4,), "w2": (2, 4), "s": (3,)}, ["w1"], None),
    "a tangent on the penalty's parameter only": (
        lambda p, x, y: _chain_loss(p, x, y) + (p["w1"] ** 2).sum() + (p["s"] ** 2).sum(),
        {"w1": (4, 3), "b1": (4,), "w2": (2, 4), "s": (3,)}, ["s"], None),
    "a layer's tangent, the penalty's rows": (
        lambda p, x, y: _chain_loss(p, x, y) + torch.cosh(p["s"] * p["w1"][0]).sum(),
        {"w1": (4, 3), "b1": (4,), "w2": (2, 4), "s": (3,)}, ["w1", "b1"], ["s"]),
    "a convolution's rows, no tangent reaching it": (
        lambda p, x, y: _conv_chain_loss(p, x, y) + (p["s"] ** 2).sum(),
        {"k": (2, 3, 3, 3), "c": (2,), "w": (2, 2 * 16), "s": (3,)}, ["s"], None),
}


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("name", list(_ROWS))
def test_rows_no_tangent_reaches(name, k):
    """Rows of a chain's products that no tangent reaches are zeros of their parameters'
    shapes (one tangent or k), beside the rows that are not: a penalty's parameter without
    a tangent, every layer's rows for a tangent on a parameter only a penalty reads (a
    Linear and a convolution chain), a parameter only the penalty reads as the one row
    wanted. Against the loop oracle."""
    f, shapes, given, wanted = _ROWS[name]
    gen = torch.Generator().manual_seed(8)
    p = {n: torch.randn(s, generator=gen, dtype=F64) for n, s in shapes.items()}
    x = torch.randn(5, *((3, 4, 4) if "k" in p else (3,)), generator=gen, dtype=F64)
    y = torch.randn(5, 2, generator=gen, dtype=F64)
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "structured"
    vs = [random_like(p, i) for i in range(1 if k is None else k)]
    tangents = {n: vs[0][n] if k is None else torch.stack([v[n] for v in vs]) for n in given}
    rows = H.chain_products(tangents, wanted=wanted or list(p))
    for i, v in enumerate(vs):
        truth = oracle_hvp(f, p, (x, y), {n: v[n] if n in given else torch.zeros_like(t)
                                          for n, t in p.items()})
        got = rows if k is None else {n: r[i] for n, r in rows.items()}
        assert_close(got, {n: truth[n] for n in (wanted or list(p))})


@given(prob=problems(kinds=("residual",), freeze=True), seed=st.integers(0, 1000),
       k=st.integers(1, 3))
def test_residual_nets_take_the_structured_products(prob, seed, k):
    """Residual nets written the torch.func way are layers with skip connections (NOTE
    [skip connections]): structured products, gradient and value equal to the oracle's,
    frozen subsets included."""
    _structured_products_match(prob, seed, k, chain=False)


def _dags():
    """Hand-written DAGs of layers: ``(f, params, inputs)``, each reading some value at
    several steps and joining branches by ``add``."""
    gen = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def input_skip(p, x, y):  # the inputs read by a layer and by the sum
        return F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])) + x, p["w2"]), y)

    def two_branches(p, x, y):  # two layers of the same value, summed
        h = torch.tanh(F.linear(x, p["w1"], p["b1"])) + torch.sigmoid(F.linear(x, p["w3"]))
        return F.cross_entropy(F.linear(F.softplus(h), p["w2"]), y.argmax(1))

    def read_three_times(p, x, y):  # h1 feeds a layer and two sums
        h1 = torch.tanh(F.linear(x, p["w1"], p["b1"]))
        h2 = h1 + torch.sin(F.linear(h1, p["w3"]))
        h3 = h2 + h1 + torch.tanh(F.linear(h2, p["w4"], p["b4"]))
        return F.mse_loss(F.linear(h3, p["w2"]), y, reduction="sum")

    def frozen_stem(p, x, y):  # a skip from a value below the first trainable layer
        h = torch.tanh(F.linear(x, stem))
        h = h + torch.tanh(F.linear(h, p["w3"]))
        return F.mse_loss(F.linear(h, p["w2"]), y) + 0.1 * (p["w3"] ** 2).sum()

    stem = r(3, 3)
    p = {"w1": r(3, 3), "b1": r(3), "w2": r(2, 3), "w3": r(3, 3), "w4": r(3, 3), "b4": r(3)}
    x, y = r(5, 3), r(5, 2)
    keep = {input_skip: ("w1", "b1", "w2"), two_branches: ("w1", "b1", "w2", "w3"),
            read_three_times: ("w1", "b1", "w2", "w3", "w4", "b4"), frozen_stem: ("w2", "w3")}
    cases = [(f, {k: p[k] for k in names}, (x, y)) for f, names in keep.items()]

    conv = {"c1": r(3, 2, 3, 3), "cb1": r(3), "c2": r(3, 3, 3, 3), "c3": r(3, 3, 1, 1),
            "w": r(2, 3 * 4 * 4), "b": r(2)}

    def conv_block(p, x, y):  # a convolution's residual block, a 1x1 convolution beside it
        h = torch.tanh(F.conv2d(x, p["c1"], p["cb1"], stride=2, padding=1))
        h = F.conv2d(h, p["c3"]) + torch.tanh(F.conv2d(h, p["c2"], padding=1))
        return F.mse_loss(F.linear(F.softplus(h).flatten(1), p["w"], p["b"]), y)

    cases.append((conv_block, conv, (r(4, 2, 7, 8), r(4, 2))))

    def interleaved(p, x, y):  # a map of h whose ops come before and after h's layer
        h = torch.tanh(F.linear(x, p["w1"], p["b1"]))
        positive = h > 0
        branch = F.linear(h, p["w3"])
        mapped = torch.where(positive, h, h.exp() - 1)
        return F.mse_loss(F.linear(mapped + branch, p["w2"]), y)

    def two_maps(p, x, y):  # two maps of one value, each into its own layer
        h = F.linear(x, p["w1"], p["b1"])
        return F.mse_loss(F.linear(torch.tanh(h), p["w2"]) + F.linear(torch.sigmoid(h),
                                                                      p["w4"]), y)

    small = {k: p[k] for k in ("w1", "b1", "w2", "w3")}
    cases += [(interleaved, small, (x, y)),
              (two_maps, {k: p[k] for k in ("w1", "b1", "w2")} | {"w4": r(2, 3)}, (x, y))]
    return cases


@pytest.mark.parametrize("case", range(7))
def test_hand_written_dags_take_the_structured_products(case):
    """Skip connections from the inputs, two branches of one value, a value read three
    times, a skip below the first trainable layer, a convolution's residual block, a map
    whose ops come before and after another reader of its input, two maps of one value:
    products (single, batched, one ``hvp``), the gradient, the full Hessian from rows and
    one parameter's rows equal the oracle's."""
    f, p, batch = _dags()[case]
    _structured_everywhere(f, p, batch, "w2" if "w2" in p else "w")


def _structured_everywhere(f, p, batch, last, method="auto"):
    """``f`` takes the R-operator (with ``method``), and its products (single, batched, the
    k-axis pass, one ``hvp``), gradient, full Hessian and the rows of parameter ``last``'s
    block (the backward pass stops there) equal the oracle's; the products carry no
    graph."""
    H = hf.hvp_fn(f, (p, *batch), method=method)
    assert H.method == "structured"
    check_products(H, f, p, batch, [random_like(p, i) for i in range(3)], single=True)
    assert not any(t.requires_grad for t in H(random_like(p, 0)).values())
    assert_close(H.gradient, oracle_grad(f, p, batch))
    dense = oracle_hessian(f, p, *batch)
    assert_nested_close(hf.hessian(f)(p, *batch), dense, p)
    names, sizes = list(p), [t.numel() for t in p.values()]
    w = names.index(last)
    start, size = sum(sizes[:w]), sizes[w]
    rows = H.block_rows(w, torch.eye(size, dtype=F64).reshape(size, *p[last].shape))
    assert_close(rows.reshape(size, size), dense[start:start + size, start:start + size])


def _scales_and_pools():
    """Hand-written models with parameters broadcast over the batch (BatchNorm in eval
    mode, gains and biases of every broadcast shape) and linear maps without parameters
    (means, sums, average pools, permutations, views): ``(f, params, inputs, last)``."""
    gen = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    stats = [(r(3) * 0.3, r(3).abs() + 0.5) for _ in range(2)]  # running mean and var

    def bn_block(p, x, y):  # a residual block with BatchNorm, global mean pooling
        h = F.conv2d(x, p["c1"], padding=1)
        h = torch.relu(F.batch_norm(h, *stats[0], p["g1"], p["b1"], training=False))
        h = h + F.batch_norm(F.conv2d(h, p["c2"], padding=(1, 2), dilation=(1, 2)), *stats[1],
                             p["g2"], p["b2"], training=False, eps=1e-3)
        h = torch.tanh(h)
        return F.cross_entropy(F.linear(h.mean((2, 3)), p["w"], p["b"]), y)

    bn = {"c1": r(3, 2, 3, 3), "g1": 1 + 0.3 * r(3), "b1": r(3), "c2": r(3, 3, 3, 3),
          "g2": 1 + 0.3 * r(3), "b2": r(3), "w": r(4, 3), "b": r(4)}
    x4, y4 = r(5, 2, 6, 5), torch.randint(0, 4, (5,), generator=gen)
    def frozen(p, x, y):  # the rest constants: the first trainable step is a BatchNorm's
        return bn_block({**bn, **p}, x, y)

    cases = [(bn_block, bn, (x4, y4), "w"),
             (frozen, {k: bn[k] for k in ("g1", "b1", "b2", "w")}, (x4, y4), "w"),
             # the first trainable step a BatchNorm's bias alone
             (frozen, {k: bn[k] for k in ("b1", "g2", "w")}, (x4, y4), "w")]

    def gains(p, x, y):  # gains and biases of every broadcast shape, a scalar gain
        h = torch.tanh(F.linear(x, p["w1"]) * p["g"] + p["c"])
        h = torch.sigmoid((h * p["s"]) * p["row"].view(1, -1)) / 3.0
        return F.mse_loss(F.linear(h - 0.5, p["w2"]), y)

    mlp = {"w1": r(4, 3), "g": r(4), "c": r(4), "s": r(()), "row": r(4), "w2": r(2, 4)}
    cases.append((gains, mlp, (r(6, 3), r(6, 2)), "w2"))

    def pools(p, x, y):  # average pools, a permutation, a transposition, a sum, views
        h = torch.tanh(F.conv2d(x, p["c"]) + p["cb"].view(-1, 1, 1))
        h = F.avg_pool2d(h, (2, 3), stride=(1, 2), padding=(1, 0), count_include_pad=False)
        h = F.adaptive_avg_pool2d(h, (2, 3)).permute(0, 2, 3, 1).transpose(1, 2).sum(1)
        return F.mse_loss(F.linear(torch.tanh(h.reshape(-1, 2, 3)).flatten(1), p["w"]), y)

    conv = {"c": r(3, 2, 2, 2), "cb": r(3), "w": r(2, 6)}
    cases.append((pools, conv, (r(4, 2, 7, 9), r(4, 2)), "w"))

    def conv1d_bias(p, x, y):  # a bias added to a convolution without one; constant gains
        h = F.conv1d(x, p["c"]) * (0.5 * torch.ones(3, 1, dtype=F64)) + p["cb"].view(1, -1, 1)
        return F.mse_loss(F.linear(torch.tanh(h).mean(-1), p["w"]), y)

    cases.append((conv1d_bias, {"c": r(3, 2, 3), "cb": r(3), "w": r(2, 3)},
                  (r(4, 2, 6), r(4, 2)), "w"))
    return cases


@pytest.mark.parametrize("case", range(6))
def test_scales_and_linear_maps_take_the_structured_products(case):
    """BatchNorm in eval mode in a residual block (its convolutions trained or frozen, its
    first bias the first trainable parameter),
    gains and biases broadcast over the batch (a vector, a row, a scalar, a bias alone,
    constant gains), average pools, permutations, sums and views: the R-operator, every
    product, the gradient, the full Hessian and rows equal the oracle's."""
    f, p, batch, last = _scales_and_pools()[case]
    _structured_everywhere(f, p, batch, last)


def _maps():
    """Hand-written models with maps of the model's values that no step's rule covers
    (NOTE [maps without a rule]): ``(f, params, inputs, last)``."""
    gen = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    p = {"w1": r(4, 3), "b1": r(4), "g": 1 + 0.3 * r(4), "c": r(4), "w3": r(4, 4),
         "w4": r(1, 4), "w2": r(2, 4)}
    x, y = r(6, 3), r(6, 2)

    def batch_norm_train(p, x, y):  # statistics of the batch: the map mixes samples
        h = F.batch_norm(F.linear(x, p["w1"], p["b1"]), None, None, p["g"], p["c"],
                         training=True)
        return F.mse_loss(F.linear(torch.tanh(h), p["w2"]), y)

    def layer_norm(p, x, y):  # statistics of the sample, then LayerNorm's affine part
        h = F.layer_norm(F.linear(x, p["w1"], p["b1"]), (4,), p["g"], p["c"])
        return F.mse_loss(F.linear(torch.tanh(h), p["w2"]), y)

    def softmax(p, x, y):  # not elementwise: one row's Jacobian is dense
        return F.mse_loss(F.linear(torch.softmax(F.linear(x, p["w1"]), -1), p["w2"]), y)

    def gated(p, x, y):  # a map of an activation gated by an earlier one
        h1 = torch.tanh(F.linear(x, p["w1"], p["b1"]))
        return F.mse_loss(F.linear(torch.tanh(F.linear(h1, p["w3"])) * h1, p["w2"]), y)

    def concatenated(p, x, y):  # branches of one value joined by cat
        h = torch.cat([torch.tanh(F.linear(x, p["w1"])), torch.sin(F.linear(x, p["wr"]))], -1)
        return F.mse_loss(F.linear(h, p["wc"]), y)

    def broadcast_join(p, x, y):  # (N, 1) + (N, 4): an add that broadcasts
        h = torch.tanh(F.linear(x, p["w1"], p["b1"]))
        return F.mse_loss(F.linear(F.linear(h, p["w4"]) + h, p["w2"]), y)

    def batch_centred(p, x, y):  # a mean over the batch axis
        h = torch.tanh(F.linear(x, p["w1"], p["b1"]))
        return F.mse_loss(F.linear(h - h.mean(0, keepdim=True), p["w2"]), y)

    def input_gated(p, x, y):  # a product one factor of which carries no tangent
        return F.mse_loss(F.linear(torch.tanh(x @ fixed) * torch.tanh(F.linear(x, p["w1"])),
                                   p["w2"]), y)

    fixed = r(3, 4)

    def channels_meaned(p, x, y):  # a mean over the batch that leaves 4 rows of 4 channels
        h = torch.tanh(F.conv1d(x.view(4, 3, 1), p["k"])).mean(0)
        return F.mse_loss(F.linear(h, p["h"]), y[:4])

    keep = {batch_norm_train: ("w1", "b1", "g", "c", "w2"), layer_norm: ("w1", "g", "c", "w2"),
            softmax: ("w1", "w2"), gated: ("w1", "b1", "w3", "w2"),
            broadcast_join: ("w1", "b1", "w4", "w2"), batch_centred: ("w1", "b1", "w2")}
    cases = [(f, {k: p[k] for k in names}, (x, y), "w2") for f, names in keep.items()]
    cases[1][1]["b1"] = p["b1"]  # LayerNorm's input bias too
    cases.append((concatenated, {"w1": p["w1"], "wr": r(4, 3), "wc": r(2, 8)}, (x, y), "wc"))
    cases.append((channels_meaned, {"k": r(4, 3, 1), "h": r(2, 1)}, (x[:4], y[:4]), "h"))
    cases.append((input_gated, {"w1": p["w1"], "w2": p["w2"]}, (x, y), "w2"))
    return cases


_FORMS = {"batch_norm_train": "_Standardise", "layer_norm": "_Standardise",
          "softmax": "_Softmax", "gated": "_Product", "input_gated": "_Product"}


@pytest.mark.parametrize("closed", [True, False], ids=["closed forms", "own ops"])
@pytest.mark.parametrize("case", range(9))
def test_maps_without_a_rule_take_the_structured_products(case, closed, monkeypatch):
    """BatchNorm in training mode, LayerNorm, a softmax between layers, a gated map (also
    by a factor without a tangent), branches joined by cat or by a broadcasting add, a
    mean over the batch (also one that leaves as many rows as samples): the R-operator,
    its maps differentiated through their own ops or, for the first four and the gate by
    a fixed factor, by their closed forms (NOTE [softmax and
    standardisation], NOTE [products of two values]); every product, the gradient, the
    full Hessian and rows equal the oracle's. ``method='auto'`` takes it where every map
    is linear or has a closed form (the others are faster on the cached gradient
    graph)."""
    f, p, batch, last = _maps()[case]
    if not closed:  # every map through its own ops, the softmax as several
        chain = sys.modules["hessfunc.graph.chain"]
        monkeypatch.setattr(chain, "_map_form", lambda *a: None)
        monkeypatch.setattr(chain, "_product_form", lambda *a: None)
    plan, _ = graph_chain(f, (p, *batch), 0)
    maps = [s for s in plan.steps if type(s).__name__ == "_Map"]
    forms = {type(s.form).__name__ for s in maps if s.form is not None}
    assert forms == ({_FORMS[f.__name__]} if closed and f.__name__ in _FORMS else set())
    curved = not closed and f.__name__ in _FORMS
    assert bool(plan.curved_maps) == curved
    # method='auto' takes the cached graph where a map is curved (faster there)
    assert hf.hvp_fn(f, (p, *batch)).method == ("graph" if curved else "structured")
    _structured_everywhere(f, p, batch, last, method="structured")


_SHAPE_OPS = {  # name: (op, args, input shape)
    "t": (torch.ops.aten.t.default, (), (4, 3)),
    "transpose": (torch.ops.aten.transpose.int, (0, -1), (4, 3, 2)),
    "permute": (torch.ops.aten.permute.default, ([2, 0, 1],), (4, 3, 2)),
    "expand": (torch.ops.aten.expand.default, ([5, 4, 3, 2],), (4, 1, 2)),
    "select": (torch.ops.aten.select.int, (1, 2), (4, 3, 2)),
    "slice": (torch.ops.aten.slice.Tensor, (-1, 1, None, 2), (4, 3, 5)),
    "slice of the batch": (torch.ops.aten.slice.Tensor, (0, 1, 3), (4, 3)),
    "view": (torch.ops.aten.view.default, ([2, 12],), (4, 3, 2)),
    "unsqueeze": (torch.ops.aten.unsqueeze.default, (1,), (4, 3)),
}


@pytest.mark.parametrize("name", [*_SHAPE_OPS, "a run"])
def test_shape_maps_against_autograd(name):
    """NOTE [shape maps]: a run of ops that move or repeat entries applies them to one
    tangent and to ``k`` tangents ``(N, k, ...)`` (each column as the op on it), and its
    transpose is the op's vector-Jacobian product, column by column."""
    from hessfunc.graph.chain_plan import _ShapeMap, _ShapeOp
    from hessfunc.graph.chain_products import _shape_forward, _shape_transpose

    chain = [_SHAPE_OPS["transpose"], (torch.ops.aten.reshape.default, ([-1, 4],), None)] \
        if name == "a run" else [_SHAPE_OPS[name]]
    gen = torch.Generator().manual_seed(9)
    shape, ops = chain[0][2], []
    for op, args, _ in chain:
        out = op(torch.zeros(shape), *args).shape
        ops.append(_ShapeOp(op, args, tuple(shape), tuple(out)))
        shape = out
    step = _ShapeMap(tuple(ops))

    def apply(a):
        for op, args, _ in chain:
            a = op(a, *args)
        return a

    a = torch.randn(chain[0][2], generator=gen, dtype=F64)
    u = torch.randn(shape, generator=gen, dtype=F64)
    _, vjp = torch.func.vjp(apply, a)
    assert_close(_shape_forward(step, a, None), apply(a))
    assert_close(_shape_transpose(step, u, None), vjp(u)[0])
    k = 3
    A = torch.randn(a.shape[0], k, *a.shape[1:], generator=gen, dtype=F64)
    U = torch.randn(shape[0], k, *shape[1:], generator=gen, dtype=F64)
    assert_close(_shape_forward(step, A, k),
                 torch.stack([apply(A[:, j].contiguous()) for j in range(k)], 1))
    assert_close(_shape_transpose(step, U, k),
                 torch.stack([vjp(U[:, j])[0] for j in range(k)], 1))


def _closed_forms():
    """Softmax and normalisations the walk reads as one map with a closed form, over
    other axes than the last: ``(f, params, inputs, last, forms)``."""
    gen = torch.Generator().manual_seed(13)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    x, y = r(5, 2, 6), r(5, 2)
    p = {"k": r(3, 2, 3), "g": 1 + 0.3 * r(3, 4), "c": r(3, 4), "w": r(2, 12)}

    def head(h, p):
        return F.mse_loss(F.linear(torch.tanh(h).flatten(1), p["w"]), y)

    def rms_norm(p, x, y):  # over both axes of a sample, with a gain
        return head(F.rms_norm(F.conv1d(x, p["k"]), (3, 4), p["g"], eps=1e-3), p)

    def layer_norm_2d(p, x, y):
        return head(F.layer_norm(F.conv1d(x, p["k"]), (3, 4), p["g"], p["c"]), p)

    def channels_softmax(p, x, y):  # over the channels, not the last axis
        return head(torch.softmax(F.conv1d(x, p["k"]), 1), p)

    def batch_softmax(p, x, y):  # over the batch: the map mixes samples
        return head(torch.softmax(F.conv1d(x, p["k"]), 0), p)

    def batch_norm_1d(p, x, y):  # statistics over the batch and the positions
        return head(F.batch_norm(F.conv1d(x, p["k"]), None, None, training=True), p)

    def twice(p, x, y):  # a softmax of a softmax, each its own map
        return head(torch.softmax(torch.softmax(F.conv1d(x, p["k"]), -1), 1), p)

    def no_form(p, x, y):  # softmax's ops, but exp is read again: a map without a form
        h = F.conv1d(x, p["k"])
        e = (h - h.amax(-1, keepdim=True)).exp()
        return head(e / e.sum(-1, keepdim=True) + e, p)

    sub = {rms_norm: ("k", "g", "w"), layer_norm_2d: ("k", "g", "c", "w")}
    forms = {rms_norm: ["_Standardise"], layer_norm_2d: ["_Standardise"],
             channels_softmax: ["_Softmax"], batch_softmax: ["_Softmax"],
             batch_norm_1d: ["_Standardise"], twice: ["_Softmax", "_Softmax"], no_form: []}
    return [(f, {k: p[k] for k in sub.get(f, ("k", "w"))}, (x, y), "k", kinds)
            for f, kinds in forms.items()]


@pytest.mark.parametrize("case", range(7))
def test_closed_forms_of_softmax_and_normalisations(case):
    """RMSNorm and LayerNorm over two axes, a softmax over the channels and one over the
    batch, BatchNorm's normalisation over the batch and the positions, a softmax of a
    softmax: each one map with its closed form (the form's axes, the centring, eps), whose
    products, gradient, full Hessian and rows equal the oracle's; softmax's ops with an
    inner value read again are a map without a form."""
    f, p, batch, last, kinds = _closed_forms()[case]
    plan, why = graph_chain(f, (p, *batch), 0)
    assert plan is not None, why
    maps = [s for s in plan.steps if type(s).__name__ == "_Map"]
    assert [type(s.form).__name__ for s in maps if s.form is not None] == kinds
    if f.__name__ == "no_form":
        assert plan.curved_maps
    else:
        assert not plan.curved_maps and len(maps) == len(kinds)
        expected = {"rms_norm": ((1, 2), 1e-3, False), "layer_norm_2d": ((1, 2), 1e-5, True),
                    "batch_norm_1d": ((0, 2), 1e-5, True), "channels_softmax": ((1,),),
                    "batch_softmax": ((0,),), "twice": ((2,),)}[f.__name__]
        form = maps[0].form
        assert (form.dims, *((form.eps, form.centred) if len(expected) > 1 else ())) == \
            expected
    _structured_everywhere(f, p, batch, last, method="structured")


class _TinyLM(nn.Module):
    """Token embeddings, a causal encoder layer (torch's own, in eval mode; attention
    in torch's math kernel) and logits of shape ``(N * T, V)``."""

    def __init__(self, vocab=5, d=4, length=3, batch_first=True):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=batch_first)
        self.head = nn.Linear(d, vocab)
        self.batch_first = batch_first
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x):
        h = self.tokens(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.layer(h, src_mask=self.mask, is_causal=True)
        return self.head(h if self.batch_first else h.transpose(0, 1)).flatten(0, 1)


def _sequences():
    """Models of token sequences: ``(f, params, inputs, last, step kinds they hold)``."""
    gen = torch.Generator().manual_seed(17)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    tokens = torch.randint(0, 5, (2, 4), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    p = {"E": r(5, 4), "q": r(4, 4), "k": r(4, 4), "w": r(3, 4), "b": r(3)}

    def attention(p, x, y):  # one head written out: lookups, 3-d layers, scores, mixing
        h = F.embedding(x, p["E"])
        s = (h @ p["q"].T) @ (h @ p["k"].T).transpose(1, 2) / 2.0
        a = torch.softmax(s.masked_fill(torch.ones(3, 3).triu(1).bool(), -torch.inf), -1)
        return F.cross_entropy(F.linear(torch.tanh(a @ h), p["w"], p["b"]).flatten(0, 1),
                               y.remainder(3))

    def pooled(p, x, y):  # a lookup, a gate of two branches, a mean over the positions
        h = F.embedding(x, p["E"])
        h = torch.tanh(h @ p["q"].T) * torch.sigmoid(h @ p["k"].T)
        h = torch.tanh(h + h.mean(1, keepdim=True).expand(-1, 3, -1))  # a value repeated
        return F.cross_entropy(F.linear(h.mean(1), p["w"], p["b"]), y[:2].remainder(3))

    frozen = {k: v for k, v in p.items() if k != "E"}

    def frozen_lookup(p, x, y):  # the table frozen: the model starts at the lookup's value
        return attention({**p, "E": table}, x, y)

    table = p["E"]
    cases = [(attention, p, (x, y), "q", ["_Embedding", "_Product", "_Softmax"]),
             (pooled, p, (x, y), "E", ["_Embedding", "_Product", "_ShapeMap", "_Add"]),
             (frozen_lookup, frozen, (x, y), "q", ["_Product", "_Softmax"])]
    for batch_first in (True, False):
        torch.manual_seed(3)
        model = _TinyLM(batch_first=batch_first).double().eval()
        lm = {n: t.detach() for n, t in model.named_parameters()}

        def language_model(p, x, y, model=model):
            return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

        last = "layer.self_attn.in_proj_" + ("weight" if batch_first else "bias")
        cases.append((language_model, lm, (x, y), last,
                      ["_Embedding", "_ShapeMap", "_Product", "_Softmax", "_Standardise"]))
    return cases


@pytest.mark.parametrize("case", range(5))
def test_sequence_models_take_the_structured_products(case):
    """An embedding lookup, Linear layers on ``(N, T, d)`` values (also as ``bmm`` with
    the weight broadcast over the leading axis, as attention records them), views and
    transposes that move the batch axis, products of two values (scores, mixing, a
    gate), attention's guarded softmax and LayerNorm: torch's encoder layer (batch first
    or not) and hand-written attention take the R-operator, whose products (single,
    batched, k-axis), gradient, full Hessian and rows equal the oracle's; where the
    logits' rows are (sample, position) pairs, the loss keeps its gradient graph."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f, p, batch, last, kinds = _sequences()[case]
    with sdpa_kernel(SDPBackend.MATH):
        plan, why = graph_chain(f, (p, *batch), 0)
        assert plan is not None, why
        held = {type(s).__name__ for s in plan.steps} | \
            {type(s.form).__name__ for s in plan.steps if getattr(s, "form", None)}
        assert set(kinds) <= held and not plan.curved_maps
        # the logits' rows are not the samples: the loss keeps its gradient graph
        assert (plan.out_hessian is None) == (f.__name__ != "pooled")
        if f.__name__ == "language_model":
            lookups = [s for s in plan.steps if type(s).__name__ == "_Embedding"]
            assert [s.weight_name for s in lookups] == ["tokens.weight"]
        _structured_everywhere(f, p, batch, last, method="structured")


def test_a_lookup_with_options_is_not_a_layer():
    """``padding_idx`` zeroes a row's gradient in torch (not the derivative of the lookup):
    such a lookup is no step, and the products take the cached graph, equal to the
    oracle's."""
    gen = torch.Generator().manual_seed(5)
    p = {"E": torch.randn(5, 3, generator=gen, dtype=F64),
         "w": torch.randn(2, 3, generator=gen, dtype=F64)}
    x = torch.randint(0, 5, (4, 2), generator=gen)
    y = torch.randn(4, 2, 2, generator=gen, dtype=F64)

    def f(p, x, y):
        return F.mse_loss(F.linear(torch.tanh(F.embedding(x, p["E"], padding_idx=0)), p["w"]), y)

    plan, why = graph_chain(f, (p, x, y), 0)
    assert plan is None and "stops at embedding" in why
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "graph"
    check_products(H, f, p, (x, y), [random_like(p, i) for i in range(2)])


def test_the_loss_is_never_a_map():
    """Maps end where a layer reads them: a cross-entropy loss with weight decay (its terms
    of the parameters alone join the loss after the softmax's ops) keeps the chain at the
    model's output, and where everything above the first layer is frozen, the rest is the
    loss; the products equal the oracle's."""
    p, x, _ = _problem(n=5, c=3)
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(2))

    def decayed(p, x, y):
        o = F.linear(torch.tanh(F.linear(x, p["w1"])), p["w2"])
        return F.cross_entropy(o, y) + 1e-2 * ((p["w1"] ** 2).sum() + (p["w2"] ** 2).sum())

    def frozen_head(p, x, y):
        return F.cross_entropy(F.linear(F.layer_norm(F.linear(x, p["w1"]), (3,)), head), y)

    def frozen_rms_head(p, x, y):  # an RMS normalisation's ops start as elementwise ones
        return F.cross_entropy(F.linear(F.rms_norm(F.linear(x, p["w1"]), (3,)), head), y)

    head = p["w2"].clone()
    for f, params, kinds in ((decayed, p, ["_Linear", "_Elementwise", "_Linear"]),
                             (frozen_head, {"w1": p["w1"]}, ["_Linear"]),
                             (frozen_rms_head, {"w1": p["w1"]}, ["_Linear"])):
        plan, why = graph_chain(f, (params, x, y), 0)
        assert [type(s).__name__ for s in plan.steps] == kinds, why
        H = hf.hvp_fn(f, (params, x, y))
        assert H.method == "structured"
        check_products(H, f, params, (x, y), [random_like(params, i) for i in range(2)])


_NOT_SCALES = {  # name: (f, the shapes of the parameters it reads besides w1 and w2)
    "a gain per sample": (lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"]) * p["g"]), p["w2"]), y), {"g": (4, 3)}),
    "a gain that widens its input": (lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"]).sum(1, keepdim=True) * p["g"]), p["w2"]), y), {"g": (3,)}),
    "a gain computed from a parameter": (lambda p, x, y: F.mse_loss(F.linear(torch.tanh(
        F.linear(x, p["w1"]) * p["g"].exp()), p["w2"]), y), {"g": (3,)}),
}


@pytest.mark.parametrize("name", list(_NOT_SCALES))
def test_what_is_not_a_scale_or_a_linear_map(name):
    """A gain with a row per sample, a gain that widens its input and a gain computed from
    a parameter are no step of a chain: the cached gradient graph, exact, and
    method='structured' says where the chain stops."""
    f, extra = _NOT_SCALES[name]
    gen = torch.Generator().manual_seed(3)
    p = {"w1": torch.randn(3, 3, generator=gen, dtype=F64),
         "w2": torch.randn(2, 3, generator=gen, dtype=F64)}
    p |= {k: torch.randn(*shape, generator=gen, dtype=F64) for k, shape in extra.items()}
    x, y = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen,
                                                                     dtype=F64)
    H = hf.hvp_fn(f, (p, x, y))
    assert H.method == "graph"
    check_products(H, f, p, (x, y), [random_like(p, 1)])
    with pytest.raises(hf.ArgumentError, match="method='structured' does not apply here: "
                                               "(parameters .* stops at|values inside)"):
        hf.hvp_fn(f, (p, x, y), method="structured")


@given(prob=problems(kinds=("normed",), freeze=True))
def test_full_hessian_of_normalised_chains_propagates_per_sample(prob):
    """MLPs with BatchNorm in eval mode, LayerNorm, RMSNorm or a softmax, frozen subsets
    included, written the torch.func way: the full Hessian's per-sample backpropagation
    takes the scale and the map (NOTE [full Hessian] in ``chain_plan.py``) and equals the
    oracle."""
    f = _torch_func(prob.model, prob.loss_fn)
    p = {n: t.detach() for n, t in prob.model.named_parameters() if t.requires_grad}
    assume(p)
    batch = (prob.inputs, prob.targets)
    plan, why = graph_chain(f, (p, *batch), 0)
    assert why == "ok" and plan.per_sample_blocks()
    assert hf.explain(f, p, *batch)["hessian"].engine == "chain in the captured graph"
    dense = oracle_hessian(f, p, *batch)
    assert_nested_close(hf.hessian(f)(p, *batch), dense, p)


class _Gain(nn.Module):
    """``x * w``, ``w`` one entry (``per_feature=False``) or one per feature."""

    def __init__(self, width, per_feature=True):
        super().__init__()
        self.w = nn.Parameter(torch.rand(width if per_feature else ()) + 0.5)

    def forward(self, x):
        return x * self.w


class _Shift(nn.Module):
    """``x + b``, one ``b`` per feature."""

    def __init__(self, width):
        super().__init__()
        self.b = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return x + self.b


def _normalised_chains():
    """Chains whose full Hessian propagates per sample through scales and maps: each
    form at the first, a middle and the last step, affine parts with a weight or a bias
    alone, BatchNorm's shift and factor before its gain, one scale above another."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return {
        "layernorm first": nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 4), nn.Sigmoid(),
                                         nn.Linear(4, 2)),
        "every form": nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(),
                                    nn.Linear(6, 6), nn.Softmax(-1), nn.Linear(6, 3), bn,
                                    nn.Linear(3, 2)),
        "normalisation last": nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3),
                                            nn.LayerNorm(3)),
        "weight alone": nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4, bias=False),
                                      nn.Softplus(), nn.Linear(4, 2)),
        "gain on a gain": nn.Sequential(nn.Linear(5, 4, bias=False), nn.RMSNorm(4),
                                        _Gain(4), nn.Tanh(), nn.Linear(4, 2)),
        "bias alone": nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), _Shift(4),
                                    nn.Linear(4, 2)),
        "no affine part": nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(
            4, elementwise_affine=False), nn.Tanh(), nn.Linear(4, 2)),
        "activation last": nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(),
                                         nn.Linear(4, 2), nn.Sigmoid()),
    }


@pytest.mark.parametrize("name", list(_normalised_chains()))
def test_full_hessian_through_scales_and_maps_equals_the_oracle(name, monkeypatch):
    """The full Hessian's per-sample backpropagation through per-feature scales and
    softmaxes or normalisations over the features (NOTE [full Hessian]): equal to the
    oracle, whole and with samples taken one at a time, in float64."""
    model = _normalised_chains()[name].double()
    for module in model.modules():  # affine parts away from 1 and 0
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=gen, dtype=F64)
    y = torch.randn(7, 2 if name != "normalisation last" else 3, generator=gen, dtype=F64)
    f = _torch_func(model, F.mse_loss)
    p = {n: t.detach() for n, t in model.named_parameters()}
    plan, why = graph_chain(f, (p, x, y), 0)
    assert why == "ok" and plan.why_not_per_sample() is None
    assert_close(plan.full(), plan.full())  # the plan's own values are left as they were
    dense = oracle_hessian(f, p, x, y)
    assert_nested_close(hf.hessian(f)(p, x, y), dense, p)
    monkeypatch.setattr(sys.modules["hessfunc.graph.chain_plan"], "CHUNK_BUDGET_BYTES", 1)
    assert_nested_close(hf.hessian(f)(p, x, y), dense, p)


def test_a_gain_shared_by_every_feature_has_no_per_sample_full_hessian():
    """A gain of one entry broadcast over the features is a scale the full Hessian's
    backpropagation has no rule for: the plan says so, and the Hessian (one-hot products)
    still equals the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Gain(4, per_feature=False), nn.Tanh(),
                          nn.Linear(4, 1)).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    f = _torch_func(model, F.mse_loss)
    p = {n: t.detach() for n, t in model.named_parameters()}
    plan, _ = graph_chain(f, (p, x, y), 0)
    assert plan.why_not_per_sample() == (
        "a chain with steps other than Linear layers, elementwise maps, per-feature scales "
        "and softmaxes or normalisations over features (convolutions, views, pooling, "
        "statistics over the batch), which the full Hessian's backpropagation has no rule "
        "for")
    dense = oracle_hessian(f, p, x, y)
    assert_nested_close(hf.hessian(f)(p, x, y), dense, p)


@pytest.mark.parametrize("form", ["softmax", "layernorm", "rmsnorm"])
def test_map_blocks_equal_autograd(form):
    """``map_blocks``' Jacobian and second-order term of a softmax, a standardisation and
    an RMS normalisation over the features, per sample, against ``jacrev`` and the
    Hessian of ``<g, F(a)>`` by autograd."""
    from hessfunc.graph.chain_plan import _Softmax, _Standardise, map_blocks
    spec, fn = {
        "softmax": (_Softmax((1,)), lambda t: torch.softmax(t, -1)),
        "layernorm": (_Standardise((1,), 1e-3, True),
                      lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-3)),
        "rmsnorm": (_Standardise((1,), 1e-3, False),
                    lambda t: F.rms_norm(t, t.shape[-1:], eps=1e-3)),
    }[form]
    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(4, 5, generator=gen, dtype=F64), torch.randn(4, 5, generator=gen,
                                                                    dtype=F64)
    A, M = map_blocks(spec, a, g)
    for n in range(4):
        assert_close(A[n], torch.func.jacrev(fn)(a[n]))
        assert_close(M[n], torch.func.hessian(lambda t, n=n: (g[n] * fn(t)).sum())(a[n]))


def test_a_dag_has_no_per_sample_full_hessian():
    """The full Hessian's per-sample backpropagation has no rule for skip connections:
    the plan and ``explain`` say so, and name the products' route."""
    f, p, batch = _dags()[0]
    plan, why = graph_chain(f, (p, *batch), 0)
    assert why == "ok" and plan.sources[-2] == (2, 0) and not plan.chain
    assert plan.why_not_per_sample() == ("layers with skip connections, which the full "
                                         "Hessian's backpropagation has no rule for")
    explained = hf.explain(f, p, *batch)
    assert explained["hvp, hvp_fn, HessianOperator"].engine == (
        "R-operator on the layers and their skip connections in the captured graph (hvp: "
        "with method='structured')")
    assert explained["hessian"].why.endswith("chain route: layers with skip connections, "
                                             "which the full Hessian's backpropagation has "
                                             "no rule for")


def _layers():
    """Linear layers and scales written other ways: a bias added before the product, a
    constant bias in ``addmm``, ``(T, N, d)`` inputs (``matmul`` records them as ``bmm``
    with the weight broadcast), with and without a bias, a contiguous ``(N, T, d)`` input
    (``matmul`` folds it into ``mm``), constant shifts and divisors before a gain, a
    constant minus the value: ``(f, params, inputs, last)``."""
    gen = torch.Generator().manual_seed(19)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    p = {"w1": r(4, 3), "b1": r(4), "w2": r(2, 4)}
    x, y, xs, ys = r(5, 3), r(5, 2), r(5, 6, 3), r(30, 2)
    constant = r(4)

    def bias_first(p, x, y):
        return F.mse_loss(torch.tanh(p["b1"] + x @ p["w1"].T) @ p["w2"].T, y)

    def constant_bias(p, x, y):
        return F.mse_loss(torch.tanh(torch.addmm(constant, x, p["w1"].T)) @ p["w2"].T, y)

    def positions_first(p, x, y):  # (T, N, d): bmm, its bias added after
        h = torch.tanh(x.transpose(0, 1) @ p["w1"].T + p["b1"]) @ p["w2"].T
        return F.mse_loss(h.transpose(0, 1).flatten(0, 1), y)

    def positions_first_no_bias(p, x, y):
        h = torch.tanh(x.transpose(0, 1) @ p["w1"].T) @ p["w2"].T
        return F.mse_loss(h.transpose(0, 1).flatten(0, 1), y)

    def positions_first_bias_first(p, x, y):
        h = torch.tanh(p["b1"] + x.transpose(0, 1) @ p["w1"].T) @ p["w2"].T
        return F.mse_loss(h.transpose(0, 1).flatten(0, 1), y)

    def samples_first(p, x, y):  # (N, T, d) contiguous: matmul folds it into mm
        return F.mse_loss((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T).flatten(0, 1), y)

    shift, spread = r(4), r(4).abs() + 0.5

    def standardised(p, x, y):  # constant shifts and divisors before a gain and a bias
        h = (F.linear(x, p["w1"]) - shift) / spread * p["g"] + p["b1"]
        return F.mse_loss(torch.tanh(h) @ p["w2"].T, y)

    def reflected(p, x, y):  # a constant minus the value: a factor of -1, not a shift
        return F.mse_loss(torch.tanh((0.5 - F.linear(x, p["w1"])) * p["g"]) @ p["w2"].T, y)

    frozen = r(4, 3).requires_grad_(True)  # a frozen weight of a user's module

    def frozen_weight(p, x, y):
        return F.mse_loss(torch.tanh(x @ frozen.T) @ p["w2"].T, y)

    def rms_reversed(p, x, y):  # an RMS normalisation written out, its factors swapped
        h = F.linear(x, p["w1"])
        return F.mse_loss(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * h @ p["w2"].T, y)

    def sum_normalised(p, x, y):  # a sum of squares, not their mean: no form
        h = F.linear(x, p["w1"])
        return F.mse_loss(h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6) @ p["w2"].T, y)

    def unbiased(p, x, y):  # var_mean's default correction of 1: no form
        h = F.linear(x, p["w1"])
        var, mean = torch.var_mean(h, -1, keepdim=True)
        return F.mse_loss(torch.tanh((h - mean) * torch.rsqrt(var + 1e-5)) @ p["w2"].T, y)

    def no_eps(p, x, y):  # LayerNorm with eps = 0
        h = F.layer_norm(F.linear(x, p["w1"]), (4,), eps=0.0)
        return F.mse_loss(torch.tanh(h) @ p["w2"].T, y)

    def crossed_axes(p, x, y):  # softmax's ops with the max and the sum over other axes
        h = F.linear(x, p["w1"])
        e = (h - h.amax(-1, keepdim=True)).exp()
        return F.mse_loss((e / e.sum(1, keepdim=True) @ p["w2"].T).flatten(0, 1), y)

    def product_then_bias(p, x, y):  # mm and then add: one layer
        return F.mse_loss(torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T, y)

    def shift_first(p, x, y):  # a constant shift written before the value
        return F.mse_loss(torch.tanh((shift + F.linear(x, p["w1"])) * p["g"]) @ p["w2"].T, y)

    def gain_read_twice(p, x, y):  # a scale's output read by two ops
        h = F.linear(x, p["w1"]) * p["g"]
        return F.mse_loss((torch.tanh(h) + h) @ p["w2"].T, y)

    no_bias = {k: p[k] for k in ("w1", "w2")}
    gains = {**p, "g": 1 + 0.3 * r(4)}
    return [(bias_first, p, (x, y), "w2"), (constant_bias, no_bias, (x, y), "w2"),
            (positions_first, p, (xs, ys), "w1"),
            (positions_first_no_bias, no_bias, (xs, ys), "w1"),
            (positions_first_bias_first, p, (xs, ys), "w1"),
            (samples_first, p, (xs, ys), "w1"), (standardised, gains, (x, y), "g"),
            (reflected, {k: gains[k] for k in ("w1", "g", "w2")}, (x, y), "g"),
            (frozen_weight, {"w2": p["w2"]}, (x, y), "w2"),
            *[(f, no_bias, (x, y), "w1") for f in (rms_reversed, sum_normalised, unbiased,
                                                   no_eps)],
            (crossed_axes, no_bias, (xs, ys), "w1"), (product_then_bias, p, (x, y), "b1"),
            *[(f, {k: gains[k] for k in ("w1", "g", "w2")}, (x, y), "g")
              for f in (shift_first, gain_read_twice)]]


@pytest.mark.parametrize("case", range(17))
def test_layers_and_scales_written_other_ways_take_the_structured_products(case):
    """A bias added before the product or held constant in ``addmm``, layers of ``(T, N,
    d)`` values as ``bmm`` (with a bias after, before or none) and of contiguous ``(N, T,
    d)`` values, a gain after constant shifts and divisors, a gain of a constant minus the
    value, a frozen weight that requires grad (its products carry no graph), normalisations
    and a softmax written out (an RMS normalisation with its factors swapped, LayerNorm
    with eps 0; a sum of squares, the unbiased variance and crossed axes, which have no
    closed form), a product and then its bias, a constant shift written first, a scale
    read twice: the R-operator, whose products, gradient, full Hessian and rows equal the
    oracle's (the walk's reading of each: ``test_the_walk_reads_each_model_as_its_plan``)."""
    f, p, batch, last = _layers()[case]
    _structured_everywhere(f, p, batch, last, method="structured")


def _name(name, value=True):
    """A parameter's name in a plan's signature: ``-`` for none, ``const`` for a constant."""
    return name if name is not None else "-" if value is None else "const"


def _step_token(step):
    """One step of a plan in a few characters: its kind, the parameters it reads, a
    closed form's axes and options, a shape map's ops."""
    kind = type(step).__name__[1:]
    if kind in ("Linear", "Conv"):
        rows = "3d" if kind == "Linear" and step.inputs.dim() == 3 else ""
        return f"{kind}{rows}({_name(step.weight_name)},{_name(step.bias_name, None)})"
    if kind == "Embedding":
        return f"Embedding({_name(step.weight_name)})"
    if kind == "Scale":
        pre = ";pre" if step.pre is not None else ""
        return (f"Scale({_name(step.weight_name, step.weight)},"
                f"{_name(step.bias_name, step.bias)}{pre})")
    if kind == "ShapeMap":
        return "Shape(" + ",".join(op.op.__name__.split(".")[0] for op in step.ops) + ")"
    if kind == "Map":
        form = step.form
        if form is None:
            return "Map(linear)" if step.linear else "Map"
        name = type(form).__name__[1:]
        if name == "Softmax":
            return f"Softmax{list(form.dims)}"
        if name == "Standardise":
            return f"{'Std' if form.centred else 'RMS'}{list(form.dims)}eps{form.eps:g}"
        return "Bmm" if form.batched_matmul else "Mul"
    return {"Elementwise": "Elem", "LinearMap": "LinMap"}.get(kind, kind)


def _signature(plan):
    """The plan's steps, each with the values it reads where that is not the value
    before it (``@i,j``: value 0 the inputs, value ``j + 1`` step ``j``'s output)."""
    return " ".join(_step_token(s) + ("" if src == (i,) else "@" + ",".join(map(str, src)))
                    for i, (s, src) in enumerate(zip(plan.steps, plan.sources, strict=True)))


def _walked_models():
    """Every hand-written model of this file's structured tests, by a name: ``(f,
    params, inputs)``."""
    models = {}
    for group, cases in (("dags", _dags()), ("scales", _scales_and_pools()),
                         ("maps", _maps()), ("forms", _closed_forms()),
                         ("sequences", _sequences()), ("layers", _layers())):
        for i, (f, p, batch, *_) in enumerate(cases):
            models[f"{group} {i}: {f.__name__}"] = (f, p, batch)
    for i, (f, p, batch, _) in enumerate(_maps()):  # read with the forms switched off
        models[f"own ops {i}: {f.__name__}"] = (f, p, batch)
    return models


_PLANS = {  # the walk's reading of each model: _signature(plan)
    "dags 0: input_skip":
        "Linear(w1,b1) Elem Add@2,0 Linear(w2,-)",
    "dags 1: two_branches":
        "Linear(w1,b1) Elem Linear(w3,-)@0 Elem Add@2,4 Elem Linear(w2,-)",
    "dags 2: read_three_times":
        "Linear(w1,b1) Elem Linear(w3,-) Elem Add@2,4 Add@5,2 Linear(w4,b4)@5 Elem Add@6,8 "
        "Linear(w2,-)",
    "dags 3: frozen_stem":
        "Linear(const,-) Elem Linear(w3,-) Elem Add@2,4 Linear(w2,-)",
    "dags 4: conv_block":
        "Conv(c1,cb1) Elem Conv(c3,-) Conv(c2,-)@2 Elem Add@3,5 Elem Flatten Linear(w,b)",
    "dags 5: interleaved":
        "Linear(w1,b1) Elem Elem Linear(w3,-)@2 Add@3,4 Linear(w2,-)",
    "dags 6: two_maps":
        "Linear(w1,b1) Elem Linear(w2,-) Elem@1 Linear(w4,-) Add@3,5",
    "scales 0: bn_block":
        "Conv(c1,-) Scale(g1,b1;pre) Elem Conv(c2,-) Scale(g2,b2;pre) Add@3,5 Elem LinMap "
        "Linear(w,b)",
    "scales 1: frozen":
        "Conv(const,-) Scale(g1,b1;pre) Elem Conv(const,-) Scale(-,b2;pre) Add@3,5 Elem LinMap "
        "Linear(w,-)",
    "scales 2: frozen":
        "Conv(const,-) Scale(-,b1;pre) Elem Conv(const,-) Scale(g2,const;pre) Add@3,5 Elem "
        "LinMap Linear(w,-)",
    "scales 3: gains":
        "Linear(w1,-) Scale(g,c) Elem Scale(s,-) Scale(row,-) Elem Linear(w2,-)",
    "scales 4: pools":
        "Conv(c,-) Scale(-,cb) Elem LinMap LinMap Shape(permute,transpose) LinMap Shape() Elem "
        "Flatten Linear(w,-)",
    "scales 5: conv1d_bias":
        "Conv(c,-) Scale(-,cb;pre) Elem LinMap Linear(w,-)",
    "maps 0: batch_norm_train":
        "Linear(w1,b1) Std[0]eps1e-05 Scale(g,c) Elem Linear(w2,-)",
    "maps 1: layer_norm":
        "Linear(w1,b1) Std[1]eps1e-05 Scale(g,c) Elem Linear(w2,-)",
    "maps 2: softmax":
        "Linear(w1,-) Softmax[1] Linear(w2,-)",
    "maps 3: gated":
        "Linear(w1,b1) Elem Linear(w3,-) Elem Mul@4,2 Linear(w2,-)",
    "maps 4: broadcast_join":
        "Linear(w1,b1) Elem Linear(w4,-) Map(linear)@3,2 Linear(w2,-)",
    "maps 5: batch_centred":
        "Linear(w1,b1) Elem Map(linear) Map(linear)@2,3 Linear(w2,-)",
    "maps 6: concatenated":
        "Linear(w1,-) Elem Linear(wr,-)@0 Elem Map(linear)@2,4 Linear(wc,-)",
    "maps 7: channels_meaned":
        "Shape(view) Conv(k,-) Elem Map(linear) Linear(h,-)",
    "maps 8: input_gated":
        "Map(linear) Elem Linear(w1,-)@0 Elem Mul@2,4 Linear(w2,-)",
    "forms 0: rms_norm":
        "Conv(k,-) RMS[1, 2]eps0.001 Scale(g,-) Elem Flatten Linear(w,-) Elem",
    "forms 1: layer_norm_2d":
        "Conv(k,-) Std[1, 2]eps1e-05 Scale(g,c) Elem Flatten Linear(w,-) Elem",
    "forms 2: channels_softmax":
        "Conv(k,-) Softmax[1] Elem Flatten Linear(w,-) Elem",
    "forms 3: batch_softmax":
        "Conv(k,-) Softmax[0] Elem Flatten Linear(w,-) Elem",
    "forms 4: batch_norm_1d":
        "Conv(k,-) Std[0, 2]eps1e-05 Elem Flatten Linear(w,-) Elem",
    "forms 5: twice":
        "Conv(k,-) Softmax[2] Softmax[1] Elem Flatten Linear(w,-) Elem",
    "forms 6: no_form":
        "Conv(k,-) Map(linear) Map(linear)@1,2 Elem LinMap Map@4,5 Add@6,4 Elem Flatten "
        "Linear(w,-) Elem",
    "sequences 0: attention":
        "Embedding(E) Shape(view) Linear(q,-) Shape(_unsafe_view) Shape(view)@1 Linear(k,-) "
        "Shape(_unsafe_view,transpose) Bmm@4,7 Shape() Elem Softmax[2] Shape() Shape()@1 "
        "Bmm@12,13 Shape() Elem Shape(view) Linear(w,b) Shape(view,view)",
    "sequences 1: pooled":
        "Embedding(E) Shape(view) Linear(q,-) Shape(_unsafe_view) Elem Shape(view)@1 "
        "Linear(k,-) Shape(_unsafe_view) Elem Mul@5,9 LinMap Shape(expand) Add@10,12 Elem "
        "LinMap Linear(w,b)",
    "sequences 2: frozen_lookup":
        "Embedding(const) Shape(view) Linear(q,-) Shape(_unsafe_view) Shape(view)@1 Linear(k,-) "
        "Shape(_unsafe_view,transpose) Bmm@4,7 Shape() Elem Softmax[2] Shape() Shape()@1 "
        "Bmm@12,13 Shape() Elem Shape(view) Linear(w,b) Shape(view,view)",
    "sequences 3: language_model":
        "Embedding(tokens.weight) Shape(transpose) "
        "Linear3d(layer.self_attn.in_proj_weight,layer.self_attn.in_proj_bias) "
        "Shape(view,unsqueeze,transpose,squeeze) Shape(select,view,transpose,view) "
        "Shape(select,view,transpose,view,transpose)@4 Shape(select,view,transpose,view,view)@4 "
        "Elem@5 Elem@6 Shape(view)@8 Shape(view)@9 Bmm@10,11 Shape(_unsafe_view) Elem "
        "Softmax[3] Shape(view) Bmm@16,7 Shape(_unsafe_view,permute,_unsafe_view) "
        "Linear(layer.self_attn.out_proj.weight,layer.self_attn.out_proj.bias) "
        "Shape(view,transpose) Add@1,20 Std[2]eps1e-05 "
        "Scale(layer.norm1.weight,layer.norm1.bias) Shape(view) "
        "Linear(layer.linear1.weight,layer.linear1.bias) Shape(view) Elem Shape(view) "
        "Linear(layer.linear2.weight,layer.linear2.bias) Shape(view) Add@23,30 Std[2]eps1e-05 "
        "Scale(layer.norm2.weight,layer.norm2.bias) Shape(view) Linear(head.weight,head.bias) "
        "Shape(view,view)",
    "sequences 4: language_model":
        "Embedding(tokens.weight) Shape(transpose) "
        "Linear3d(layer.self_attn.in_proj_weight,layer.self_attn.in_proj_bias) "
        "Shape(view,unsqueeze,transpose,squeeze) Shape(select,view,transpose,view) "
        "Shape(select,view,transpose,view,transpose)@4 Shape(select,view,transpose,view,view)@4 "
        "Elem@5 Elem@6 Shape(view)@8 Shape(view)@9 Bmm@10,11 Shape(_unsafe_view) Elem "
        "Softmax[3] Shape(view) Bmm@16,7 Shape(_unsafe_view,permute,_unsafe_view) "
        "Linear(layer.self_attn.out_proj.weight,layer.self_attn.out_proj.bias) Shape(view) "
        "Add@2,20 Shape() Std[2]eps1e-05 Scale(layer.norm1.weight,layer.norm1.bias) Shape(view) "
        "Linear(layer.linear1.weight,layer.linear1.bias) Shape(view) Elem Shape(view) "
        "Linear(layer.linear2.weight,layer.linear2.bias) Shape(view) Add@24,31 Std[2]eps1e-05 "
        "Scale(layer.norm2.weight,layer.norm2.bias) Shape(transpose) "
        "Linear3d(head.weight,head.bias) Shape(view)",
    "layers 0: bias_first":
        "Linear(w1,-) Scale(-,b1) Elem Linear(w2,-)",
    "layers 1: constant_bias":
        "Linear(w1,-) Elem Linear(w2,-)",
    "layers 2: positions_first":
        "Shape(transpose) Linear3d(w1,b1) Elem Shape(view) Linear(w2,-) "
        "Shape(_unsafe_view,transpose,_unsafe_view)",
    "layers 3: positions_first_no_bias":
        "Shape(transpose) Linear3d(w1,-) Elem Shape(view) Linear(w2,-) "
        "Shape(_unsafe_view,transpose,_unsafe_view)",
    "layers 4: positions_first_bias_first":
        "Shape(transpose) Linear3d(w1,-) Scale(-,b1) Elem Shape(view) Linear(w2,-) "
        "Shape(_unsafe_view,transpose,_unsafe_view)",
    "layers 5: samples_first":
        "Shape(view) Linear(w1,-) Shape(_unsafe_view) Scale(-,b1) Elem Shape(view) Linear(w2,-) "
        "Shape(_unsafe_view,view)",
    "layers 6: standardised":
        "Linear(w1,-) Scale(g,b1;pre) Elem Linear(w2,-)",
    "layers 7: reflected":
        "Linear(w1,-) Elem Scale(g,-) Elem Linear(w2,-)",
    "layers 8: frozen_weight":
        "Linear(const,-) Elem Linear(w2,-)",
    "layers 9: rms_reversed":
        "Linear(w1,-) RMS[1]eps1e-06 Linear(w2,-)",
    "layers 10: sum_normalised":
        "Linear(w1,-) Elem LinMap Elem Mul@1,4 Linear(w2,-)",
    "layers 11: unbiased":
        "Linear(w1,-) Map Elem Linear(w2,-)",
    "layers 12: no_eps":
        "Linear(w1,-) Std[1]eps0 Elem Linear(w2,-)",
    "layers 13: crossed_axes":
        "Shape(view) Linear(w1,-) Shape(_unsafe_view) Map(linear) Map(linear)@3,4 Elem LinMap "
        "Map@6,7 Shape(view) Linear(w2,-) Shape(_unsafe_view,view)",
    "layers 14: product_then_bias":
        "Linear(w1,b1) Elem Linear(w2,-)",
    "layers 15: shift_first":
        "Linear(w1,-) Scale(g,-) Elem Linear(w2,-)",
    "layers 16: gain_read_twice":
        "Linear(w1,-) Scale(g,-) Elem Linear(w2,-)",
    "own ops 0: batch_norm_train":
        "Linear(w1,b1) Map Scale(g,c) Elem Linear(w2,-)",
    "own ops 1: layer_norm":
        "Linear(w1,b1) Map Scale(g,c) Elem Linear(w2,-)",
    "own ops 2: softmax":
        "Linear(w1,-) Map(linear) Map(linear)@1,2 Elem LinMap Map@4,5 Linear(w2,-)",
    "own ops 3: gated":
        "Linear(w1,b1) Elem Linear(w3,-) Elem Map@4,2 Linear(w2,-)",
    "own ops 4: broadcast_join":
        "Linear(w1,b1) Elem Linear(w4,-) Map(linear)@3,2 Linear(w2,-)",
    "own ops 5: batch_centred":
        "Linear(w1,b1) Elem Map(linear) Map(linear)@2,3 Linear(w2,-)",
    "own ops 6: concatenated":
        "Linear(w1,-) Elem Linear(wr,-)@0 Elem Map(linear)@2,4 Linear(wc,-)",
    "own ops 7: channels_meaned":
        "Shape(view) Conv(k,-) Elem Map(linear) Linear(h,-)",
    "own ops 8: input_gated":
        "Map(linear) Elem Linear(w1,-)@0 Elem Map@2,4 Linear(w2,-)",
}


@pytest.mark.parametrize("name", list(_PLANS))
def test_the_walk_reads_each_model_as_its_plan(name, monkeypatch):
    """The steps the walk reads off each model's graph, the parameters each step holds
    and the values it reads, word for word (``_signature``): a layer missed or a bias
    left out of its layer still gives the oracle's numbers through a slower route, which
    only this test tells. The maps' models are also read with the closed forms switched
    off, as maps without a rule."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f, p, batch = _walked_models()[name]
    if name.startswith("own ops"):
        chain = sys.modules["hessfunc.graph.chain"]
        monkeypatch.setattr(chain, "_map_form", lambda *a: None)
        monkeypatch.setattr(chain, "_product_form", lambda *a: None)
    with sdpa_kernel(SDPBackend.MATH):
        plan, why = graph_chain(f, (p, *batch), 0)
    assert plan is not None, why
    assert _signature(plan) == _PLANS[name]
    assert set(_PLANS) == set(_walked_models())  # every model has its plan written out


@pytest.mark.parametrize("option", [{"sparse": True}, "a computed table"])
def test_a_lookup_with_options_is_no_step(option):
    """Beside ``padding_idx`` (above): ``sparse`` changes a lookup's layout; a table
    computed from a parameter is no parameter of the lookup: such a lookup is no step
    (``scale_grad_by_freq`` is refused outright: ``test_graph.py``)."""
    gen = torch.Generator().manual_seed(5)
    p = {"E": torch.randn(5, 3, generator=gen, dtype=F64),
         "w": torch.randn(2, 3, generator=gen, dtype=F64)}
    x = torch.randint(0, 5, (4, 2), generator=gen)

    def f(p, x, y):
        table, kw = (p["E"] * 2.0, {}) if isinstance(option, str) else (p["E"], option)
        return F.mse_loss(F.linear(torch.tanh(F.embedding(x, table, **kw)), p["w"]), y)

    plan, why = graph_chain(f, (p, x, torch.zeros(4, 2, 2, dtype=F64)), 0)
    assert plan is None and "stops at embedding" in why


def test_a_bias_added_with_alpha_is_no_step():
    """``torch.add(z, b, alpha=a)`` adds ``a b``: not read as a bias (the chain stops
    there), and the cached graph's products equal the oracle's."""
    gen = torch.Generator().manual_seed(4)
    p = {"w1": torch.randn(4, 3, generator=gen, dtype=F64),
         "b1": torch.randn(4, generator=gen, dtype=F64),
         "w2": torch.randn(2, 4, generator=gen, dtype=F64)}
    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 2, generator=gen,
                                                                     dtype=F64)

    def f(p, x, y):
        z = torch.add(F.linear(x, p["w1"]), p["b1"], alpha=0.5)
        return F.mse_loss(torch.tanh(z) @ p["w2"].T, y)

    plan, why = graph_chain(f, (p, x, y), 0)
    assert plan is None and "stops at add.Tensor" in why
    check_products(hf.hvp_fn(f, (p, x, y)), f, p, (x, y), [random_like(p, 0)])
