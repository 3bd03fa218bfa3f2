"""Chains of layers read off the captured graph of any ``f`` (NOTE [chains from the
graph] in ``hessfunc/graph/chain.py``): which functions are chains, and their products,
gradients and values against the loop oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, check_products, oracle_grad
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import hessfunc as hf
from hessfunc.testing.strategies import problems, random_like


def _torch_func(model, loss_fn):
    return lambda p, x, y: loss_fn(torch.func.functional_call(model, p, (x,)), y)


@given(prob=problems(kinds=("mlp",), freeze=True), seed=st.integers(0, 1000),
       k=st.integers(1, 3))
def test_torch_func_chains_take_the_structured_products(prob, seed, k):
    """The same chains written the torch.func way (functional_call inside the loss):
    hvp_fn finds the chain in the captured graph, every activation an elementwise run
    of ops (GELU, softplus, a user's Sin), frozen parameters constants; its products,
    gradient and value equal the oracle's."""
    f = _torch_func(prob.model, prob.loss_fn)
    params = {n: p.detach() for n, p in prob.model.named_parameters() if p.requires_grad}
    assume(params)
    batch = (prob.inputs, prob.targets)
    H = hf.hvp_fn(f, (params, *batch))
    assert H.method == "structured"
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
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    H = hf.hvp_fn(g, (p, x, y))
    assert H.method == "structured"
    check_products(H, g, p, (x, y), [random_like(p, i) for i in range(2)], single=True)


@pytest.mark.parametrize("n", [1, 4])
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
        check_products(H, f, params, (x, y), [random_like(params, i) for i in range(2)])


_NOT_CHAINS = {
    "weight decay": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"])),
                                                        p["w2"]), y) + (p["w1"] ** 2).sum(),
    "skip connection": lambda p, x, y: F.mse_loss(F.linear(torch.tanh(F.linear(x, p["w1"])) +
                                                           x, p["w2"]), y),
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
    """A regulariser, a skip connection, a tied weight, a weight used as is, a parameter
    inside an activation, a penalty on a value inside the model: not a chain of layers;
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
                                               "(parameters .* stops at|no layer)"):
        hf.hvp_fn(f, (p, x, y), method="structured")


def test_a_functionalize_chain_read_off_the_graph_keeps_check_finite():
    """A LogSoftmax module ends the Linear chain of the hook route but not the chain read
    off the graph; ``check_finite=True`` still names the sample that is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3),
                          nn.LogSoftmax(dim=1)).double()
    f, params = hf.functionalize(model, nn.NLLLoss(), check_finite=True)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert hf.hvp_fn(f, (params, x, y)).method == "structured"
    x[2, 1] = float("nan")
    with pytest.raises(hf.NonFiniteError, match="input 0, sample 2"):
        hf.hvp_fn(f, (params, x, y))
