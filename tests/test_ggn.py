"""GGN and Fisher transforms against the loop oracle (float64): J row by row, J^T H_o J by
loops, H - G against the model-curvature term by loops, Fisher by its definition."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    Attention,
    assert_close,
    count_captures,
    custom_function,
    flat,
    leaf_params,
    unflat,
)
from hypothesis import given
from torch import nn

import hessfunc as hf
from hessfunc._autodiff import second_order_kernels
from hessfunc.testing.models import ResidualMLP, TiedNet, build_mlp
from hessfunc.testing.strategies import problems

DT = torch.float64
C = 3


def _nll_of_log_softmax(o, y):
    return F.nll_loss(F.log_softmax(o, dim=-1), y)


LOSSES = {
    "mse": nn.MSELoss(),
    "sum-mse": nn.MSELoss(reduction="sum"),
    "ce": nn.CrossEntropyLoss(),
    "ce-smoothed": nn.CrossEntropyLoss(label_smoothing=0.1),
    "nll-of-log-softmax": _nll_of_log_softmax,
    "bce": nn.BCEWithLogitsLoss(),
}


def _targets(name, n, gen):
    if name.startswith(("ce", "nll")):
        return torch.randint(0, C, (n,), generator=gen)
    if name == "bce":
        return torch.randint(0, 2, (n, C), generator=gen).to(DT)
    return torch.randn(n, C, generator=gen, dtype=DT)


def _problem(name, n, seed=0, frozen=False, act="tanh"):
    gen = torch.Generator().manual_seed(seed)
    model = build_mlp([2, 4, C], act, seed)
    if frozen:
        model[0].weight.requires_grad_(False)
    x = torch.randn(n, 2, generator=gen, dtype=DT)
    return model, LOSSES[name], x, _targets(name, n, gen)


def _oracle(model, loss_fn, x, y):
    """Outputs on fresh leaves (a plain autograd graph), the leaves, the oracle GGN."""
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    out = g(leaves, x)
    return g, params, out, leaves, hf.reference.ggn(out, loss_fn, y, list(leaves.values()))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("frozen", [False, True])
def test_ggn_products_dense_and_diagonal_match_oracle(name, n, frozen):
    model, loss_fn, x, y = _problem(name, n, frozen=frozen)
    g, params, _, _, G = _oracle(model, loss_fn, x, y)
    assert G.shape == (sum(p.numel() for p in params.values()),) * 2
    assert_close(hf.ggn(g, loss_fn, flat=True)(params, x, y), G)
    blocks = hf.ggn(g, loss_fn)(params, x, y)
    names = list(params)
    assert blocks[names[0]][names[-1]].shape == params[names[0]].shape + params[names[-1]].shape
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
         for k, t in params.items()}
    assert_close(flat(hf.ggn_vp(g, loss_fn, (params, x, y), v)), G @ flat(v))
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))


@given(problems(max_batch=4, freeze=True))
def test_ggn_on_drawn_problems(prob):
    """Drawn models (MLPs, two inputs, tied weights, frozen subsets), losses (Huber and a
    non-convex custom loss included) and batches: the GGN, its products and diagonal equal
    the oracle's loops, and H - G is the model-curvature term."""
    g, params = hf.functionalize(prob.model)
    if not params:
        return
    leaves = leaf_params(params)
    out = g(leaves, prob.inputs)
    flat_leaves = list(leaves.values())
    G = hf.reference.ggn(out, prob.loss_fn, prob.targets, flat_leaves)
    batch = (params, prob.inputs, prob.targets)
    assert_close(hf.ggn(g, prob.loss_fn, flat=True)(*batch), G)
    assert_close(flat(hf.ggn_diag(g, prob.loss_fn)(*batch)), torch.diagonal(G))
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype)
         for k, t in params.items()}
    assert_close(flat(hf.ggn_vp(g, prob.loss_fn, batch, v)), G @ flat(v))
    H = hf.reference.hessian(prob.loss_fn(out, prob.targets), flat_leaves)
    R = hf.reference.ggn_residual(out, prob.loss_fn, prob.targets, flat_leaves)
    assert_close(H - G, R)


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "nll-of-log-softmax", "ce-smoothed"])
def test_hessian_minus_ggn_is_the_model_curvature_term(name):
    model, loss_fn, x, y = _problem(name, 4, seed=1)
    g, params, out, leaves, G = _oracle(model, loss_fn, x, y)
    H = hf.reference.hessian(loss_fn(out, y), list(leaves.values()))
    R = hf.reference.ggn_residual(out, loss_fn, y, list(leaves.values()))
    assert R.abs().max() > 1e-3  # a curved model: the GGN is not the Hessian
    assert_close(H - G, R)
    assert_close(H - hf.ggn(g, loss_fn, flat=True)(params, x, y), R)


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    torch.manual_seed(0)
    model = nn.Linear(3, C).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=DT)
    for name in ("mse", "ce", "bce"):
        y = _targets(name, 6, gen)
        loss_fn = LOSSES[name]
        g, params, out, leaves, G = _oracle(model, loss_fn, x, y)
        H = hf.reference.hessian(loss_fn(out, y), list(leaves.values()))
        assert_close(G, H)
        assert_close(hf.ggn(g, loss_fn, flat=True)(params, x, y), H)


@pytest.mark.parametrize("name", ["mse", "sum-mse", "ce", "ce-smoothed", "bce"])
def test_ggn_is_psd_for_convex_losses(name):
    model, loss_fn, x, y = _problem(name, 5, seed=2)
    g, params = hf.functionalize(model)
    G = hf.ggn(g, loss_fn, flat=True)(params, x, y)
    assert torch.allclose(G, G.T, rtol=0, atol=1e-13)
    assert torch.linalg.eigvalsh(G)[0] >= -1e-12 * G.abs().max()


@pytest.mark.parametrize("name", ["ce", "mse", "sum-mse", "bce", "ce-smoothed"])
@pytest.mark.parametrize("route", ["closed form", "autograd", "no graph"])
def test_per_sample_ggn_diagonal(name, route, monkeypatch):
    """Each sample's own loss (for mean-MSE of C outputs, 1/C of its squared error), with
    the loss's output Hessian in closed form or by autograd, or where the graph declines,
    one dense GGN diagonal per sample under vmap."""
    if route == "autograd":
        monkeypatch.setattr(sys.modules["hessfunc.ggn"], "output_factor",
                            lambda *args: None)
    if route == "no graph":
        monkeypatch.setattr(sys.modules["hessfunc.ggn"], "plan_ggn_diagonal",
                            lambda *args, **kwargs: (None, "forced"))
    model, loss_fn, x, y = _problem(name, 4, seed=3)
    g, params = hf.functionalize(model)
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for n in range(4):
        *_, G = _oracle(model, loss_fn, x[n:n + 1], y[n:n + 1])
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(G))


def test_ggn_diagonal_of_a_model_with_two_heads():
    """``g`` returns two heads of different widths, each with its own loss: the loss's
    Hessian couples neither head to the other (a backward pass that reaches one head
    alone), and the diagonal and per-sample diagonals equal the dense ``J^T H J``."""
    gen = torch.Generator().manual_seed(4)
    p = {"w1": torch.randn(3, 4, generator=gen, dtype=DT),
         "w2": torch.randn(4, 2, generator=gen, dtype=DT),
         "w3": torch.randn(4, 3, generator=gen, dtype=DT)}
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    y = (torch.randn(5, 2, generator=gen, dtype=DT), torch.tensor([0, 2, 1, 1, 0]))

    def g(p, x):
        h = torch.tanh(x @ p["w1"])
        return h @ p["w2"], h @ p["w3"]

    def loss_fn(out, y):
        return F.mse_loss(out[0], y[0]) + F.cross_entropy(out[1], y[1])

    def dense_ggn(x, y):
        outputs = lambda t: torch.cat([o.reshape(-1) for o in g(unflat(t, p), x)])  # noqa: E731
        J = torch.autograd.functional.jacobian(outputs, flat(p))
        n = x.shape[0]
        H = torch.autograd.functional.hessian(lambda o: loss_fn(
            (o[:2 * n].reshape(n, 2), o[2 * n:].reshape(n, 3)), y), outputs(flat(p)))
        return torch.diagonal(J.T @ H @ J)

    assert_close(flat(hf.ggn_diag(g, loss_fn)(p, x, y)), dense_ggn(x, y))
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(p, x, y)
    for n in range(5):
        assert_close(flat({k: v[n] for k, v in rows.items()}),
                     dense_ggn(x[n:n + 1], (y[0][n:n + 1], y[1][n:n + 1])))


# --------------------------------------------------------------------- Fisher
FISHER = {"mse": "gaussian", "sum-mse": "gaussian", "ce": "categorical",
          "ce-smoothed": "categorical", "bce": "bernoulli"}


def _scale(name, n):
    """(c, s) of hessfunc.ggn's docstring, computed here from the definitions."""
    if name == "sum-mse":
        return 1.0, 1.0
    if name.startswith("ce"):
        return 1.0 / n, 1.0
    return 1.0 / (n * C), 1.0 / C


def _fisher_route(route, monkeypatch):
    """Force the per-sample products route, or spy that the captured graph's sweep takes
    the Fisher's factor."""
    from hessfunc.graph.curvature import GraphPlan

    if route == "products":  # hessfunc.ggn is also the function: the module by name
        monkeypatch.setattr(sys.modules["hessfunc.ggn"], "plan_ggn_diagonal",
                            lambda *args, **kwargs: (None, "forced"))
    taken, real = [], GraphPlan._given_factor

    def spy(plan):
        taken.append(True)
        return real(plan)

    monkeypatch.setattr(GraphPlan, "_given_factor", spy)
    return taken


def _distribution_nll(likelihood, o, y):
    """``-log p(y | o)`` summed, from torch.distributions (the Gaussian of variance 1/2,
    whose NLL is ``||o - y||^2`` up to a constant), or torch's NLL of log-probabilities."""
    D = torch.distributions
    if likelihood == "gaussian":
        return -D.Normal(o, 0.5 ** 0.5).log_prob(y).sum()
    if likelihood == "categorical":
        return -D.Categorical(logits=o).log_prob(y).sum()
    if likelihood == "bernoulli":
        return -D.Bernoulli(logits=o).log_prob(y).sum()
    return F.nll_loss(o.reshape(-1, o.shape[-1]), y.reshape(-1), reduction="sum")


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical", "log-categorical",
                                        "bernoulli"])
def test_nll_gradient_is_autograd_of_the_distributions_log_likelihood(likelihood):
    gen = torch.Generator().manual_seed(5)
    o = torch.randn(2, 5, C, generator=gen, dtype=DT)  # (draws, samples, classes)
    if likelihood == "log-categorical":
        o = torch.log_softmax(o, -1)
    y = {"gaussian": torch.randn(2, 5, C, generator=gen, dtype=DT),
         "bernoulli": torch.randint(0, 2, (2, 5, C), generator=gen).to(DT)}.get(
        likelihood, torch.randint(0, C, (2, 5), generator=gen))
    leaf = o.clone().requires_grad_()
    (truth,) = torch.autograd.grad(_distribution_nll(likelihood, leaf, y), leaf)
    assert_close(sys.modules["hessfunc.ggn"].nll_gradient(likelihood, o, y), truth)


@pytest.mark.parametrize("route", ["graph", "products"])
@pytest.mark.parametrize("name", list(FISHER))
@pytest.mark.parametrize("n", [1, 4])
def test_mc_fisher_equals_its_definition(name, n, route, monkeypatch):
    model, loss_fn, x, y = _problem(name, n, seed=4)
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    taken = _fisher_route(route, monkeypatch)
    diag = hf.fisher_diag(g, loss_fn, mc_samples=3,
                          generator=torch.Generator().manual_seed(5))(params, x, y)
    assert taken == [True] * (route == "graph" and n > 1)  # one sample: no batch to prove
    c, _ = _scale(name, n)
    ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                 FISHER[name], c, 3, torch.Generator().manual_seed(5))
    assert_close(flat(diag), torch.diagonal(ref))


def test_mc_fisher_of_log_probabilities_equals_its_definition():
    model, _, x, y = _problem("ce", 4, seed=4)
    g0, params = hf.functionalize(model)

    def g(p, inp):
        return F.log_softmax(g0(p, inp), dim=-1)

    leaves = leaf_params(params)
    diag = hf.fisher_diag(g, F.nll_loss, mc_samples=2,
                          generator=torch.Generator().manual_seed(1))(params, x, y)
    ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                 "log-categorical", 1 / 4, 2, torch.Generator().manual_seed(1))
    assert_close(flat(diag), torch.diagonal(ref))


@pytest.mark.parametrize("traceable", [True, False])
def test_ggn_operator_linearises_each_batch_once(traceable, monkeypatch):
    """Off a chain of layers (a weight shared by two layers), the operator's ``J v`` runs a
    model linearised once per batch (tangent ops only); where ``torch.func.linearize``
    cannot trace the model, a fresh ``jvp`` per product. Both give the oracle's products,
    single and batched."""
    _, loss_fn, _, y = _problem("ce", 9, seed=3)
    torch.manual_seed(3)
    model = TiedNet(C, 4).double()
    x = torch.randn(9, C, generator=torch.Generator().manual_seed(3), dtype=DT)
    *_, G = _oracle(model, loss_fn, x, y)
    calls = []
    real = torch.func.linearize

    def linearize(fn, *primals):
        calls.append(fn)
        if not traceable:
            raise RuntimeError("cannot trace")
        return real(fn, *primals)

    monkeypatch.setattr(torch.func, "linearize", linearize)
    op = hf.GGNOperator.from_model(model, loss_fn, _split(x, y, [4, 5]))
    V = torch.randn(G.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    for _ in range(2):
        assert_close(op @ V[:, 0], G @ V[:, 0])
        assert_close(op @ V, G @ V)
    assert len(calls) == 2  # once per batch, however many products


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", ["mse", "ce-smoothed", "bce", "nll-of-log-softmax"])
def test_operators_on_a_chain_take_the_chains_products(name, frozen, monkeypatch):
    """On a chain of layers (an MLP with two curved activations, a convolution chain, a
    residual MLP) the GGN and Fisher operators' products are the chain's R-operator in its
    Gauss-Newton form (no model linearised): single and batched, over three batches (one of
    one sample), equal to the oracle's ``J^T M J`` (the Hessian's second-order terms would
    differ from it)."""
    def linearize(*_):
        raise AssertionError("a chain's products linearise no model")

    monkeypatch.setattr(torch.func, "linearize", linearize)
    gen = torch.Generator().manual_seed(4)
    mlp = build_mlp([2, 4, 3, C], "tanh", 4)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Softplus(),
                         nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4, C)).double()
    torch.manual_seed(4)
    residual = ResidualMLP(2, 4, 2, C, activation="sigmoid").double()
    for model, x in ((mlp, torch.randn(9, 2, generator=gen, dtype=DT)),
                     (conv, torch.randn(9, 2, 5, 5, generator=gen, dtype=DT)),
                     (residual, torch.randn(9, 2, generator=gen, dtype=DT))):
        if frozen:
            next(model.parameters()).requires_grad_(False)
        loss_fn, y = LOSSES[name], _targets(name, 9, gen)
        g, params, out, leaves, G = _oracle(model, loss_fn, x, y)
        op = hf.GGNOperator.from_model(model, loss_fn, _split(x, y, [1, 3, 5]))
        assert all(type(b).__name__ == "_ChainProduct" for _, b in op._batch_products("H @ v"))
        V = torch.randn(G.shape[0], 3, generator=gen, dtype=DT)
        assert_close(op @ V[:, 0], G @ V[:, 0])
        assert_close(op @ V, G @ V)
        if name in FISHER:
            c, s = _scale(name, 9)
            losses = [loss_fn(g(leaves, x[i:i + 1]), y[i:i + 1]) for i in range(9)]
            ref = hf.reference.empirical_fisher(losses, list(leaves.values()), c / s ** 2)
            fisher = hf.FisherOperator.from_model(model, loss_fn, (x, y), kind="empirical")
            assert_close(fisher @ V, ref @ V)
            ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                         FISHER[name], c, 2, torch.Generator().manual_seed(3))
            fisher = hf.FisherOperator.from_model(model, loss_fn, (x, y), mc_samples=2, seed=3)
            assert_close(fisher @ V[:, 0], ref @ V[:, 0])
            assert_close(fisher @ V, ref @ V)


def _bn_models(gen):
    """A convolution with BatchNorm in eval mode, ELU and average pooling; the same in
    training mode; an MLP with LayerNorm; a gate by a softmax: chains with scales, linear
    maps and maps."""
    bn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ELU(),
                       nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, C)).double()
    with torch.no_grad():  # running statistics and affine parameters away from 0 and 1
        bn[1].running_mean.normal_(0, 0.3, generator=gen)
        bn[1].running_var.uniform_(0.5, 1.5, generator=gen)
        bn[1].weight.normal_(1, 0.3, generator=gen)
        bn[1].bias.normal_(0, 0.3, generator=gen)
    x = torch.randn(6, 2, 5, 5, generator=gen, dtype=DT)
    ln = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, C)).double()
    return [(copy.deepcopy(bn).eval(), x), (bn.train(), x),
            (ln, torch.randn(6, 2, generator=gen, dtype=DT)),
            (_Gated().double(), torch.randn(6, 2, generator=gen, dtype=DT))]


class _Gated(nn.Module):
    """A product of two values, one a softmax: ``tanh(h) * softmax(h B^T)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, C)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.tanh(h) * torch.softmax(self.b(h), -1))


@pytest.mark.parametrize("name", ["mse", "ce-smoothed"])
def test_gauss_newton_form_of_scales_linear_maps_and_maps(name):
    """The R-operator's Gauss-Newton form (``output_matrix``) through BatchNorm's scale in
    eval mode, average pooling, BatchNorm's and LayerNorm's normalisations (maps without
    a rule): ``J^T M J v`` equals the oracle's, single and with a k axis. The operators
    take the linearised model on these chains (measured faster), also equal to it."""
    from hessfunc.graph.chain import model_chain
    from hessfunc.graph.chain_products import ChainProducts

    gen = torch.Generator().manual_seed(8)
    for model, x in _bn_models(gen):
        loss_fn, y = LOSSES[name], _targets(name, 6, gen)
        g, params, out, leaves, G = _oracle(model, loss_fn, x, y)
        plan, why = model_chain(g, params, x, lambda o: loss_fn(o, y))
        assert plan is not None, why
        M = hf.reference.output_hessian(loss_fn, out, y)
        chain = ChainProducts(plan, output_matrix=lambda u, M=M: (M @ u.reshape(-1)).view(
            u.shape))
        V = torch.randn(G.shape[0], 3, generator=gen, dtype=DT)
        tangents = [unflat(V[:, j], params) for j in range(3)]
        stacked = {k: torch.stack([t[k] for t in tangents]) for k in params}
        wide = chain(stacked)
        for j, t in enumerate(tangents):
            assert_close(flat(chain(t)), G @ V[:, j])
            assert_close(flat({k: w[j] for k, w in wide.items()}), G @ V[:, j])
        op = hf.GGNOperator.from_model(model, loss_fn, (x, y))
        assert all(type(b).__name__ == "_BatchProduct" for _, b in op._batch_products("H @ v"))
        assert_close(op @ V, G @ V)


def test_ggn_operator_of_parameters_in_a_tuple():
    """Parameters as a tuple (no names for the chain): the linearised route, the oracle's
    products."""
    gen = torch.Generator().manual_seed(2)
    params = (torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(2, 4, generator=gen,
                                                                       dtype=DT))
    x, y = torch.randn(6, 3, generator=gen, dtype=DT), torch.randn(6, 2, generator=gen,
                                                                     dtype=DT)

    def g(p, x):
        return torch.tanh(x @ p[0].T) @ p[1].T

    leaves = [t.clone().requires_grad_(True) for t in params]
    G = hf.reference.ggn(g(leaves, x), nn.MSELoss(), y, leaves)
    op = hf.GGNOperator(g, nn.MSELoss(), params, (x, y))
    V = torch.randn(G.shape[0], 2, generator=gen, dtype=DT)
    assert_close(op @ V, G @ V)
    assert_close(op @ V[:, 0], G @ V[:, 0])


class _Noisy(nn.Module):  # a noise layer of its own: no dropout module to find
    def __init__(self, net, skip):
        super().__init__()
        self.net, self.skip = net, skip

    def forward(self, x):
        h = self.net(x + 1e-3 * torch.randn_like(x))
        return h + h if self.skip else h


@pytest.mark.parametrize("skip", [False, True])
def test_operators_refuse_a_model_that_draws_random_numbers(skip):
    """A model drawing random numbers in its forward pass would give ``J`` and ``J^T``
    from different draws: ggn_vp and the Gauss-Newton and Fisher operators refuse it (a
    chain of layers or not), naming ``g`` and the fixes, and leave the global RNG as it
    was. With one fixed draw the products, single and batched, are the oracle's."""
    model = _Noisy(build_mlp([2, 4, C], "tanh", 0), skip)
    x, y = torch.randn(5, 2, dtype=DT), torch.randn(5, C, dtype=DT)
    g, params = hf.functionalize(model)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    ones = torch.ones(sum(t.numel() for t in params.values()), dtype=DT)
    for call in (lambda: hf.ggn_vp(g, nn.MSELoss(), (params, x, y), v),
                 lambda: hf.GGNOperator(g, nn.MSELoss(), params, (x, y)) @ ones,
                 lambda: hf.FisherOperator(g, nn.MSELoss(), params, (x, y),
                                           kind="empirical") @ ones,
                 lambda: hf.GGNOperator(g, nn.MSELoss(), params, ((x,), y)) @ ones):  # no chain
        state = torch.random.get_rng_state()
        with pytest.raises(hf.ArgumentError, match=r"(Operator|ggn_vp): `g` drew random "
                                                   r"numbers.*randomness='fixed'"):
            call()
        assert torch.equal(state, torch.random.get_rng_state())
    # one fixed draw (a trace would not replay it: products by fresh jvps), the oracle's G
    fixed, params = hf.functionalize(model, randomness="fixed", seed=0)
    leaves = leaf_params(params)
    G = hf.reference.ggn(fixed(leaves, x), nn.MSELoss(), y, list(leaves.values()))
    op = hf.GGNOperator(fixed, nn.MSELoss(), params, (x, y))
    eye = torch.eye(G.shape[0], dtype=DT)
    assert_close(op @ eye, G)
    assert_close(op @ eye[:, 3], G[:, 3])
    assert_close(op.to_dense(), G)


@pytest.mark.parametrize("name", ["mse", "ce-smoothed", "bce"])
def test_mc_fisher_is_unbiased_for_the_exact_fisher_which_is_the_ggn(name):
    """The exact Fisher equals the GGN for these losses; the mean of R one-draw estimates is
    within 5 standard errors of diag(GGN) (of the oracle), entry by entry."""
    model, loss_fn, x, y = _problem(name, 3, seed=6)
    g, params, *_, G = _oracle(model, loss_fn, x, y)
    gen = torch.Generator().manual_seed(0)
    fisher = hf.fisher_diag(g, loss_fn, mc_samples=1, generator=gen)
    R = 400
    draws = torch.stack([flat(fisher(params, x, y)) for _ in range(R)])
    mean, se = draws.mean(0), draws.std(0) / R ** 0.5
    assert ((mean - torch.diagonal(G)).abs() <= 5 * se + 1e-12).all()
    # mc_samples=R with the same generator state is the same average
    again = hf.fisher_diag(g, loss_fn, mc_samples=R, generator=torch.Generator().manual_seed(0))
    assert_close(flat(again(params, x, y)), mean)


@pytest.mark.parametrize("route", ["graph", "products"])
@pytest.mark.parametrize("name", list(FISHER))
def test_empirical_fisher_is_the_sum_of_per_sample_gradient_squares(name, route, monkeypatch):
    n = 4
    model, loss_fn, x, y = _problem(name, n, seed=7)
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    c, s = _scale(name, n)
    losses = [loss_fn(g(leaves, x[i:i + 1]), y[i:i + 1]) for i in range(n)]
    ref = hf.reference.empirical_fisher(losses, list(leaves.values()), c / s ** 2)
    taken = _fisher_route(route, monkeypatch)
    diag = hf.fisher_diag(g, loss_fn, kind="empirical")(params, x, y)
    assert taken == [True] * (route == "graph")
    assert_close(flat(diag), torch.diagonal(ref))


def test_fisher_reproducible_and_refusals():
    model, loss_fn, x, y = _problem("mse", 3)
    g, params = hf.functionalize(model)

    def run(seed):
        return hf.fisher_diag(g, loss_fn, mc_samples=2,
                              generator=torch.Generator().manual_seed(seed))(params, x, y)

    assert all(torch.equal(a, b) for a, b in zip(run(3).values(), run(3).values(), strict=True))
    huber = nn.HuberLoss()
    with pytest.raises(hf.ArgumentError, match=r"fisher_diag: `loss_fn` HuberLoss.*no "
                                               r"probabilistic interpretation.*MSE.*cross-entropy"
                                               r".*NLL.*BCE-with-logits.*`likelihood=`"):
        hf.fisher_diag(g, huber)
    with pytest.raises(hf.ArgumentError, match=r"fisher_diag: `mc_samples` must be an int >= 1"
                                               r".*got 0"):
        hf.fisher_diag(g, loss_fn, mc_samples=0)
    for bad in (True, 2.0):  # a bool is an int to Python, not a count of draws
        with pytest.raises(hf.ArgumentError, match=rf"`mc_samples` .*got {bad!r}"):
            hf.fisher_diag(g, loss_fn, mc_samples=bad)
    # the default is one draw a sample
    assert all(torch.equal(a, b) for a, b in zip(
        hf.fisher_diag(g, loss_fn, generator=torch.Generator().manual_seed(5))(
            params, x, y).values(),
        hf.fisher_diag(g, loss_fn, mc_samples=1, generator=torch.Generator().manual_seed(5))(
            params, x, y).values(), strict=True))
    with pytest.raises(hf.ArgumentError, match=r"fisher_diag: `kind` must be 'mc' or "
                                               r"'empirical', got 'exact'"):
        hf.fisher_diag(g, loss_fn, kind="exact")
    with pytest.raises(hf.ArgumentError, match=r"class weights"):
        hf.fisher_diag(g, nn.CrossEntropyLoss(weight=torch.ones(C, dtype=DT)))
    # a wrapper of a supported loss, stated
    wrapped = hf.fisher_diag(g, lambda o, t: F.mse_loss(o, t), likelihood="gaussian",
                             reduction="mean", kind="empirical")(params, x, y)
    plain = hf.fisher_diag(g, loss_fn, kind="empirical")(params, x, y)
    assert_close(wrapped, plain)


def test_ggn_refusals():
    model, loss_fn, x, y = _problem("mse", 3)
    g, params = hf.functionalize(model)
    with pytest.raises(hf.DenseMemoryError, match=r"ggn: the dense \d+ x \d+ GGN needs"):
        hf.ggn(g, loss_fn, max_memory=64)(params, x, y)
    with pytest.raises(hf.ArgumentError, match=r"ggn_vp: `v` .*shape"):
        hf.ggn_vp(g, loss_fn, (params, x, y), {k: torch.zeros(1, dtype=DT) for k in params})
    with pytest.raises(hf.ArgumentError, match=r"ggn_vp: `primals` must be the tuple"):
        hf.ggn_vp(g, loss_fn, (params, x), params)
    with pytest.raises(hf.ArgumentError, match=r"loss_fn\(outputs, targets\)` must return a "
                                               r"scalar"):
        hf.ggn_diag(g, nn.MSELoss(reduction="none"))(params, x, y)


# ------------------------------------------------------------------ operators
def _split(x, y, sizes):
    out, lo = [], 0
    for s in sizes:
        out.append((x[lo:lo + s], y[lo:lo + s]))
        lo += s
    return out


@pytest.mark.parametrize("name", ["mse", "ce"])
@pytest.mark.parametrize("layout", ["one", "unequal", "loader"])
def test_ggn_operator_is_the_full_batch_ggn(name, layout):
    model, loss_fn, x, y = _problem(name, 9, seed=8)
    *_, G = _oracle(model, loss_fn, x, y)
    data = {"one": (x, y), "unequal": _split(x, y, [2, 4, 3]),
            "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                  batch_size=4)}[layout]
    op = hf.GGNOperator.from_model(model, loss_fn, data)
    P = G.shape[0]
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert_close(op @ V[:, 0], G @ V[:, 0])
    assert_close(op @ V, G @ V)
    assert_close(op.to_dense(), G)
    assert_close(op.diagonal(), torch.diagonal(G))
    assert_close(op.trace(), torch.diagonal(G).sum())
    assert_close(op.eigenvalues(k=2, seed=0), torch.linalg.eigvalsh(G).flip(0)[:2])
    b = V[:, 1]
    sol = op.solve(b, damping=0.1)
    assert_close(sol, torch.linalg.solve(G + 0.1 * torch.eye(P, dtype=DT), b), scale=1e3)
    scipy_op = op.to_scipy()
    assert_close(torch.from_numpy(scipy_op.matvec(b.numpy())), G @ b)
    assert "GGNOperator(P=" in repr(op)


@pytest.mark.parametrize("name", ["mse", "ce-smoothed", "bce"])
def test_empirical_fisher_operator_over_batches(name):
    n = 7
    model, loss_fn, x, y = _problem(name, n, seed=9)
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    c, s = _scale(name, n)
    losses = [loss_fn(g(leaves, x[i:i + 1]), y[i:i + 1]) for i in range(n)]
    ref = hf.reference.empirical_fisher(losses, list(leaves.values()), c / s ** 2)
    op = hf.FisherOperator.from_model(model, loss_fn, _split(x, y, [3, 4]), kind="empirical")
    assert_close(op.to_dense(), ref)
    assert_close(op.diagonal(), torch.diagonal(ref))
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    assert_close(op @ v, ref @ v)


@pytest.mark.parametrize("name", ["mse", "ce", "bce"])
def test_mc_fisher_operator_is_its_definition_with_fixed_draws(name):
    n = 5
    model, loss_fn, x, y = _problem(name, n, seed=10)
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    c, _ = _scale(name, n)
    ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                 FISHER[name], c, 2, torch.Generator().manual_seed(3))
    op = hf.FisherOperator.from_model(model, loss_fn, (x, y), mc_samples=2, seed=3)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    assert_close(op @ v, ref @ v)  # the draws are made once and kept
    assert_close(op.to_dense(), ref)
    assert_close(op.diagonal(), torch.diagonal(ref))
    fast = hf.fisher_diag(g, loss_fn, mc_samples=2,
                          generator=torch.Generator().manual_seed(3))(params, x, y)
    assert_close(op.diagonal(), flat(fast))
    with pytest.raises(hf.ArgumentError, match=r"FisherOperator: `mc_samples` must be an int"):
        hf.FisherOperator.from_model(model, loss_fn, (x, y), mc_samples=0)
    with pytest.raises(hf.ArgumentError, match=r"FisherOperator: `loss_fn` HuberLoss.*no "
                                               r"probabilistic interpretation"):
        hf.FisherOperator.from_model(model, nn.HuberLoss(), (x, y))


# ----------------------------------------------------------------------- K-FAC
def _layer_indices(model, layer):
    """Where a layer's ``[W | b]``, row-major, sits in the flat trainable parameters."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    offsets, lo = {}, 0
    for k, p in model.named_parameters():
        if p.requires_grad:
            offsets[k] = lo
            lo += p.numel()
    w, b = (f"{layer}.weight", f"{layer}.bias") if layer else ("weight", "bias")
    weight = dict(model.named_parameters())[w]
    d_out, d_in = weight.shape[0], weight[0].numel()  # a convolution's as (C_out, C_in k)
    idx = []
    for i in range(d_out):
        idx += [offsets[w] + i * d_in + j for j in range(d_in)]
        if b in names:
            idx.append(offsets[b] + i)
    return torch.tensor(idx), lo


def _kron_dense(K, model, block=lambda layer, A, G: torch.kron(G, A)):
    """The block-diagonal dense matrix from ``K.factors`` (each ``block(layer, A, G)``),
    laid out in params order, built here with torch.kron and explicit index maps."""
    D = None
    for layer, (A, G) in K.factors.items():
        idx, total = _layer_indices(model, layer)
        D = torch.zeros(total, total, dtype=DT) if D is None else D
        D[idx[:, None], idx[None, :]] = block(layer, A, G)
    return D


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "ce-smoothed"])
def test_kfac_is_the_exact_ggn_for_one_linear_layer_and_one_sample(name):
    torch.manual_seed(1)
    layer = nn.Linear(4, C).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, generator=gen, dtype=DT)
    y = _targets(name, 1, gen)
    *_, G = _oracle(layer, LOSSES[name], x, y)
    K = hf.KFACOperator.from_model(layer, LOSSES[name], (x, y))
    assert_close(K.to_dense(), G)
    assert_close(_kron_dense(K, layer), G)


def _eigenbasis(A, G):
    """``Q_G ⊗ Q_A`` of the factors, by torch.linalg.eigh."""
    return torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])


@pytest.mark.parametrize("name", ["mse", "ce", "bce"])
def test_ekfac_is_the_exact_ggn_diagonal_in_the_kfac_eigenbasis(name):
    """EKFAC's ``S`` is the diagonal of each layer's exact GGN block (the loop oracle's)
    in the eigenbasis of K-FAC's factors, over batches; its products, dense matrix,
    diagonal and inverse are those of ``Q diag(S) Q^T``."""
    n = 6
    model, loss_fn, x, y = _problem(name, n, seed=21)
    *_, GGN = _oracle(model, loss_fn, x, y)
    data = _split(x, y, [2, 4])
    K = hf.KFACOperator.from_model(model, loss_fn, data)
    E = hf.KFACOperator.from_model(model, loss_fn, data, eigenvalue_correction=True)
    assert K.corrections is None
    for layer, (A, G) in E.factors.items():
        assert_close(A, K.factors[layer][0])
        assert_close(G, K.factors[layer][1])
        idx, _ = _layer_indices(model, layer)
        Q = _eigenbasis(A, G)
        S = torch.diagonal(Q.T @ GGN[idx[:, None], idx[None, :]] @ Q)
        assert_close(E.corrections[layer], S.reshape(G.shape[0], A.shape[0]))
    D = _kron_dense(E, model, lambda layer, A, G: _eigenbasis(A, G) @ torch.diag(
        E.corrections[layer].reshape(-1)) @ _eigenbasis(A, G).T)
    assert_close(E.to_dense(), D)
    assert_close(E.diagonal(), torch.diagonal(D))
    v = torch.randn(D.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    assert_close(E @ v, D @ v)
    assert_close(E.solve(v, damping=0.1), torch.linalg.solve(D + 0.1 * torch.eye(len(v),
                                                                                  dtype=DT), v))
    assert not torch.allclose(E.to_dense(), K.to_dense())  # a correction, not a copy


def test_ekfac_is_kfac_and_the_exact_ggn_for_one_linear_layer_and_one_sample():
    torch.manual_seed(1)
    layer = nn.Linear(4, C).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 4, generator=gen, dtype=DT), torch.randint(0, C, (1,), generator=gen)
    *_, G = _oracle(layer, LOSSES["ce"], x, y)
    E = hf.KFACOperator.from_model(layer, LOSSES["ce"], (x, y), eigenvalue_correction=True)
    assert_close(E.to_dense(), G)


def test_ekfac_of_the_mc_fisher_draws_again_from_its_generator():
    """The correction's pass draws fresh labels from the same generator: the same seed
    gives the same ``S``, non-negative, and one draw per pass differs from the exact."""
    model, loss_fn, x, y = _problem("ce", 5, seed=3)
    runs = [hf.KFACOperator.from_model(model, loss_fn, (x, y), fisher="mc", seed=4,
                                       eigenvalue_correction=True) for _ in range(2)]
    exact = hf.KFACOperator.from_model(model, loss_fn, (x, y), eigenvalue_correction=True)
    for layer, S in runs[0].corrections.items():
        assert torch.equal(S, runs[1].corrections[layer])
        assert bool((S >= 0).all())
        assert S.shape == exact.corrections[layer].shape
        assert not torch.allclose(S, exact.corrections[layer])


def test_ekfac_per_sample_gradients_in_chunks_of_samples(monkeypatch):
    """A convolution's per-sample gradients are formed a chunk of samples at a time: a
    budget of one sample per chunk gives the same corrections."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(15, C)).double()
    x, y = torch.randn(4, 2, 5, dtype=DT), torch.randint(0, C, (4,))
    whole = hf.KFACOperator.from_model(model, nn.CrossEntropyLoss(), (x, y),
                                       eigenvalue_correction=True).corrections
    monkeypatch.setattr(sys.modules["hessfunc.operators.kfac"], "CHUNK_BUDGET_BYTES", 8)
    chunked = hf.KFACOperator.from_model(model, nn.CrossEntropyLoss(), (x, y),
                                         eigenvalue_correction=True).corrections
    assert_close(chunked, whole)


def test_ekfac_refuses_a_non_boolean_switch():
    model, loss_fn, x, y = _problem("mse", 2)
    with pytest.raises(hf.ArgumentError, match=r"KFACOperator: `eigenvalue_correction` must "
                                               r"be True or False, got 'yes'"):
        hf.KFACOperator.from_model(model, loss_fn, (x, y), eigenvalue_correction="yes")


def _two_layer_factors(model, loss_fn, x, y):
    """``{layer: (A, G)}`` of the 2-4-C tanh net by their definitions, written out."""
    n = x.shape[0]
    W1, b1, W2 = model[0].weight, model[0].bias, model[2].weight
    with torch.no_grad():
        h = torch.tanh(x @ W1.T + b1)
        out = model(x)
    Ho = hf.reference.output_hessian(loss_fn, out, y).reshape(n, C, n, C)
    ones = torch.ones(n, 1, dtype=DT)
    a1, a2 = torch.cat([x, ones], 1), torch.cat([h, ones], 1)
    G1 = sum((W2 * (1 - h[i] ** 2)).T @ Ho[i, :, i, :] @ (W2 * (1 - h[i] ** 2))
             for i in range(n))
    G2 = sum(Ho[i, :, i, :] for i in range(n))
    return {"0": (a1.T @ a1 / n, G1), "2": (a2.T @ a2 / n, G2)}


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_kfac_factors_products_and_inverse_on_a_two_layer_net(name):
    n = 6
    model, loss_fn, x, y = _problem(name, n, seed=11)
    K = hf.KFACOperator.from_model(model, loss_fn, _split(x, y, [2, 4]))
    for layer, (A, G) in _two_layer_factors(model, loss_fn, x, y).items():
        assert_close(K.factors[layer][0], A)
        assert_close(K.factors[layer][1], G)
    D = _kron_dense(K, model)
    assert_close(K.to_dense(), D)
    v = torch.randn(D.shape[0], generator=torch.Generator().manual_seed(0), dtype=DT)
    assert_close(K @ v, D @ v)
    assert_close(K.diagonal(), torch.diagonal(D))
    sol = K.solve(K.flat_to_params(v), damping=0.1)
    truth = torch.linalg.solve(D + 0.1 * torch.eye(D.shape[0], dtype=DT), v)
    assert_close(K.params_to_flat(sol), truth, scale=1e2)
    assert_close(K.solve(v, damping=0.1, method="cg"), truth, scale=1e3)
    assert_close(K.eigenvalues(k=1, seed=0), torch.linalg.eigvalsh(D)[-1:])


def test_kfac_empirical_and_mc_fisher_for_one_linear_layer_and_one_sample():
    torch.manual_seed(1)
    layer = nn.Linear(3, C).double()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 3, generator=gen, dtype=DT), torch.randint(0, C, (1,), generator=gen)
    g, params = hf.functionalize(layer)
    leaves = leaf_params(params)
    loss_fn = nn.CrossEntropyLoss()
    ref = hf.reference.empirical_fisher([loss_fn(g(leaves, x), y)], list(leaves.values()), 1.0)
    K = hf.KFACOperator.from_model(layer, loss_fn, (x, y), fisher="empirical")
    assert_close(K.to_dense(), ref)
    ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                 "categorical", 1.0, 4, torch.Generator().manual_seed(5))
    K = hf.KFACOperator.from_model(layer, loss_fn, (x, y), fisher="mc", mc_samples=4, seed=5)
    assert_close(K.to_dense(), ref)


def test_kfac_refusals():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)).double()
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    with pytest.raises(hf.ArgumentError, match=r"KFACOperator: the trainable parameters "
                                               r"\['1.weight', '1.bias'\] do not belong to "
                                               r"nn.Linear"):
        hf.KFACOperator.from_model(model, nn.MSELoss(), (x, y))
    layer = nn.Linear(3, 1, bias=False).double()
    K = hf.KFACOperator.from_model(layer, nn.MSELoss(), (torch.randn(1, 3, dtype=DT),
                                                         torch.zeros(1, 1, dtype=DT)))
    with pytest.raises(hf.ArgumentError, match=r"KFACOperator.solve: K \+ damping I is "
                                               r"singular .*damping > 0"):
        K.solve(torch.ones(3, dtype=DT))
    with pytest.raises(hf.ArgumentError, match=r"`fisher` must be 'exact', 'mc' or"):
        hf.KFACOperator.from_model(layer, nn.MSELoss(), (x[:, :1], y), fisher="true")


@pytest.mark.parametrize("arch", ["residual", "concat", "layernorm"])
@pytest.mark.parametrize("name", ["mse", "ce-smoothed", "bce"])
def test_ggn_diagonal_of_dags_from_the_captured_graph(arch, name):
    """NOTE [Gauss-Newton over the graph]: the same sweep as the Hessian with g's own
    curvature left out; skip connections, concatenations and LayerNorm, full and per
    sample, equal the oracle's loops."""
    from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal
    from hessfunc.testing.models import ConcatNet, ResidualMLP

    torch.manual_seed(0)
    model = {"residual": lambda: ResidualMLP(2, 4, 2, C),
             "concat": lambda: ConcatNet(2, 3, C),
             "layernorm": lambda: nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Tanh(),
                                                nn.Linear(4, C))}[arch]().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, generator=gen, dtype=DT), _targets(name, 4, gen)
    loss_fn = LOSSES[name]
    g, params, _, _, G = _oracle(model, loss_fn, x, y)
    plan, why = plan_ggn_diagonal(GGNLoss(g, loss_fn), (params, x, y))
    assert plan is not None, why
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    each = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for n in range(4):
        leaves = leaf_params(params)
        Gn = hf.reference.ggn(g(leaves, x[n:n + 1]), loss_fn, y[n:n + 1],
                              list(leaves.values()))
        assert_close(torch.cat([each[k][n].reshape(-1) for k in params]), torch.diagonal(Gn))


# -- K-FAC for layers applied at several places: convolutions, Linear on (N, T, d) ------

class _MeanOverPlaces(nn.Module):
    def forward(self, h):
        return h.mean(1)


def _convolutions():
    torch.manual_seed(4)
    return {
        "conv2d": (nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                   (2, 5, 6)),
        "conv1d-same-circular": (nn.Conv1d(2, 2, 3, padding="same", padding_mode="circular",
                                           bias=False), (2, 7)),
        "conv1d-strided": (nn.Conv1d(1, 2, 2, stride=3, dilation=2), (1, 9)),
    }


@pytest.mark.parametrize("kind", list(_convolutions()))
def test_kfac_expand_is_the_exact_ggn_of_a_convolution_under_squared_error(kind):
    """Squared error over every output treats the positions as independent samples with
    the same output matrix: K-FAC-expand is then exact, for any batch."""
    conv, shape = _convolutions()[kind]
    model = nn.Sequential(conv, nn.Flatten()).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, *shape, generator=gen, dtype=DT)
    y = torch.randn_like(model(x))
    *_, G = _oracle(model, nn.MSELoss(), x, y)
    K = hf.KFACOperator.from_model(model, nn.MSELoss(), _split(x, y, [2, 1]))
    assert_close(K.to_dense(), G)
    reduced = hf.KFACOperator.from_model(model, nn.MSELoss(), (x, y), kfac_approx="reduce")
    assert not torch.allclose(reduced.to_dense(), G)  # the convention matters here


@pytest.mark.parametrize("name", ["ce", "mse"])
def test_kfac_reduce_is_the_exact_ggn_of_a_pooled_linear_layer_for_one_sample(name):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, C), _MeanOverPlaces()).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, 4, generator=gen, dtype=DT)
    y = _targets(name, 1, gen)
    *_, G = _oracle(model, LOSSES[name], x, y)
    K = hf.KFACOperator.from_model(model, LOSSES[name], (x, y), kfac_approx="reduce")
    assert_close(K.to_dense(), G)
    expanded = hf.KFACOperator.from_model(model, LOSSES[name], (x, y))
    assert not torch.allclose(expanded.to_dense(), G)


def _patches_by_loop(x, conv):
    """``(N, L, C_in k1 k2)``: each output position's input patch, read off by indices."""
    (k1, k2), (s1, s2), (p1, p2), (d1, d2) = (conv.kernel_size, conv.stride, conv.padding,
                                              conv.dilation)
    xp = F.pad(x, (p2, p2, p1, p1))
    h_out = (xp.shape[2] - d1 * (k1 - 1) - 1) // s1 + 1
    w_out = (xp.shape[3] - d2 * (k2 - 1) - 1) // s2 + 1
    rows = [xp[:, :, i * s1:i * s1 + d1 * (k1 - 1) + 1:d1,
               j * s2:j * s2 + d2 * (k2 - 1) + 1:d2].reshape(x.shape[0], -1)
            for i in range(h_out) for j in range(w_out)]
    return torch.stack(rows, 1)


@pytest.mark.parametrize("weighted", [False, True], ids=["ce", "class-weighted ce"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors_of_a_conv_net_by_their_definitions(approx, weighted):
    """Also for a loss without a closed-form factor: its eigenvalues weigh each sample's
    columns differently, at every place of that sample."""
    n = 3
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1))
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(C)).double()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(n, 2, 5, 6, generator=gen, dtype=DT)
    model(x)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT)
                                  if weighted else None)
    y = torch.randint(0, C, (n,), generator=gen)
    K = hf.KFACOperator.from_model(model, loss_fn, (x, y), kfac_approx=approx)
    with torch.no_grad():
        out, s = model(x), conv(x)
    Ho = hf.reference.output_hessian(loss_fn, out, y).reshape(n, C, n, C)
    rest = lambda z: model[1:](z)  # noqa: E731
    J = torch.autograd.functional.jacobian(rest, s)  # (n, C, n, C_out, H, W)
    J = torch.stack([J[i, :, i].flatten(2) for i in range(n)])  # (n, C, C_out, L)
    a = _patches_by_loop(x, conv)
    a = torch.cat([a, torch.ones_like(a[..., :1])], -1)  # (n, L, d_in + 1)
    places = a.shape[1]
    if approx == "expand":
        A = torch.einsum("nli,nlj->ij", a, a) / (n * places)
        G = sum(J[i, :, :, l].T @ Ho[i, :, i] @ J[i, :, :, l]
                for i in range(n) for l in range(places))
    else:
        abar, Jsum = a.mean(1), J.sum(-1)
        A = abar.T @ abar / n
        G = sum(Jsum[i].T @ Ho[i, :, i] @ Jsum[i] for i in range(n))
    assert_close(K.factors["0"][0], A)
    assert_close(K.factors["0"][1], G)
    # EKFAC: the diagonal of the layer's exact GGN block (the oracle's) in K-FAC's
    # eigenbasis, whichever convention made the basis
    E = hf.KFACOperator.from_model(model, loss_fn, (x, y), kfac_approx=approx,
                                   eigenvalue_correction=True)
    *_, GGN = _oracle(model, loss_fn, x, y)
    idx, _ = _layer_indices(model, "0")
    Q = _eigenbasis(*E.factors["0"])  # its own: reduce's A is singular, its basis not unique
    S = torch.diagonal(Q.T @ GGN[idx[:, None], idx[None, :]] @ Q)
    assert_close(E.corrections["0"], S.reshape(G.shape[0], A.shape[0]))
    v = torch.randn(K.shape[0], generator=gen, dtype=DT)
    m = conv.weight.numel()
    V = torch.cat([v[:m].reshape(2, -1), v[m:m + 2, None]], 1)  # [W | b], W as (C_out, -1)
    KV = G @ V @ A
    assert_close((K @ v)[:m + 2], torch.cat([KV[:, :-1].reshape(-1), KV[:, -1]]))


class _SharedTwice(nn.Module):
    """``o(tanh(l(tanh(l(x)))))``: layer ``l`` called twice, its weight shared; ``unused``
    is never called."""

    def __init__(self):
        super().__init__()
        self.l, self.o, self.unused = nn.Linear(3, 3), nn.Linear(3, C), nn.Linear(3, 3)

    def forward(self, x, d1=0.0, d2=0.0):
        s1 = self.l(x) + d1
        s2 = self.l(torch.tanh(s1)) + d2
        return self.o(torch.tanh(s2))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["mse", "ce"])
def test_kfac_of_a_layer_called_twice_has_the_places_of_both_calls(approx, name):
    """A weight shared between two calls is one layer applied at ``R = 2`` places a
    sample (Eschenhagen et al.'s weight sharing); its factors by their definitions from
    the oracle's output Hessian and the Jacobians to each call's output. A layer the
    forward pass never calls has zero factors."""
    n = 4
    torch.manual_seed(3)
    model = _SharedTwice().double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, 3, generator=gen, dtype=DT)
    y = _targets(name, n, gen)
    loss_fn = LOSSES[name]
    K = hf.KFACOperator.from_model(model, loss_fn, (x, y), kfac_approx=approx)
    with torch.no_grad():
        out = model(x)
        s1 = model.l(x)
        a = torch.stack([x, torch.tanh(s1)], 1)  # (n, 2, 3): the inputs of the two calls
    a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
    Ho = hf.reference.output_hessian(loss_fn, out, y).reshape(n, C, n, C)
    zero = torch.zeros(n, 3, dtype=DT)
    J1, J2 = torch.autograd.functional.jacobian(lambda d1, d2: model(x, d1, d2), (zero, zero))
    B = torch.stack([torch.stack([J1[i, :, i], J2[i, :, i]]) for i in range(n)])  # (n, 2, C, 3)
    if approx == "expand":
        A = torch.einsum("nri,nrj->ij", a, a) / (n * 2)
        G = sum(B[i, r].T @ Ho[i, :, i] @ B[i, r] for i in range(n) for r in range(2))
    else:
        abar, Bsum = a.mean(1), B.sum(1)
        A = abar.T @ abar / n
        G = sum(Bsum[i].T @ Ho[i, :, i] @ Bsum[i] for i in range(n))
    assert_close(K.factors["l"][0], A)
    assert_close(K.factors["l"][1], G)
    assert not K.factors["unused"][0].any() and not K.factors["unused"][1].any()
    # EKFAC: the exact GGN block's diagonal in the factors' eigenbasis (both calls' terms)
    E = hf.KFACOperator.from_model(model, loss_fn, (x, y), kfac_approx=approx,
                                   eigenvalue_correction=True)
    *_, GGN = _oracle(model, loss_fn, x, y)
    idx, _ = _layer_indices(model, "l")
    Q = _eigenbasis(*E.factors["l"])
    S = torch.diagonal(Q.T @ GGN[idx[:, None], idx[None, :]] @ Q)
    assert_close(E.corrections["l"], S.reshape(G.shape[0], A.shape[0]))


def test_kfac_refuses_a_layer_whose_inputs_do_not_have_the_samples_first():
    class SamplesLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, C)

        def forward(self, x):  # the layer sees (d, N) -> the wrong rows
            return self.l(x.T.reshape(4, -1).T.reshape(-1, 4)[:2]).repeat(2, 1)

    model = SamplesLast().double()
    x, y = torch.randn(4, 4, dtype=DT), torch.randn(4, C, dtype=DT)
    with pytest.raises(hf.ArgumentError, match=r"KFACOperator: layer 'l' was called on inputs "
                                               r"of 2 rows in a batch of 4 samples"):
        hf.KFACOperator.from_model(model, nn.MSELoss(), (x, y))


def test_kfac_refuses_grouped_convolutions_parametrized_weights_and_unknown_conventions():
    model = nn.Sequential(nn.Conv1d(2, 2, 2, groups=2), nn.Flatten()).double()
    x = torch.randn(2, 2, 4, dtype=DT)
    y = torch.randn(2, 6, dtype=DT)
    with pytest.raises(hf.ArgumentError, match=r"KFACOperator: convolution '0' has groups=2"):
        hf.KFACOperator.from_model(model, nn.MSELoss(), (x, y))
    model = nn.Sequential(nn.Conv1d(2, 2, 2), nn.Flatten()).double()
    with pytest.raises(hf.ArgumentError, match=r"`kfac_approx` must be 'expand' or 'reduce', "
                                               r"got 'mean'"):
        hf.KFACOperator.from_model(model, nn.MSELoss(), (x, y), kfac_approx="mean")
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(2, 3)),
                           nn.Tanh(), nn.Linear(3, 1)).double()
    with pytest.raises(hf.ArgumentError, match=r"KFACOperator: layer '0' computes its weight "
                                               r"from other parameters \(_WeightNorm"):
        hf.KFACOperator.from_model(normed, nn.MSELoss(), (torch.randn(4, 2, dtype=DT),
                                                          torch.randn(4, 1, dtype=DT)))


@pytest.mark.parametrize("backward", ["batched", "chunks of one", "one column at a time"])
def test_kfac_factors_the_same_however_the_columns_go_back(backward, monkeypatch):
    """The output matrix's columns go back through the model in batched passes, in chunks
    under a small budget, or one at a time where torch cannot batch: the same factors."""
    kfac_module = sys.modules["hessfunc.operators.kfac"]
    model, loss_fn, x, y = _problem("ce", 5, seed=12)
    truth = _two_layer_factors(model, loss_fn, x, y)
    if backward == "chunks of one":
        monkeypatch.setattr(kfac_module, "CHUNK_BUDGET_BYTES", 1)
    if backward == "one column at a time":
        real = torch.autograd.grad

        def unbatched(*args, is_grads_batched=False, **kwargs):
            if is_grads_batched:
                raise RuntimeError("no batching rule")
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", unbatched)
    K = hf.KFACOperator.from_model(model, loss_fn, (x, y))
    for name, (A, G) in truth.items():
        assert_close(K.factors[name][0], A)
        assert_close(K.factors[name][1], G)


def _blocks_of(G, params):
    """Each leaf's diagonal block of the dense ``(P, P)`` matrix ``G``, in ``params`` order."""
    out, lo = {}, 0
    for k, p in params.items():
        out[k] = G[lo:lo + p.numel(), lo:lo + p.numel()]
        lo += p.numel()
    return out


@pytest.mark.parametrize("route", ["graph", "jacobian"])
@pytest.mark.parametrize("arch", ["mlp", "residual", "conv", "frozen", "indefinite"])
def test_ggn_blocks_are_the_oracles_diagonal_blocks(arch, route, monkeypatch):
    """Each parameter's own block of the loop oracle's GGN, from the captured graph's
    factors (a DAG and a convolution included) or from the Jacobian where it declines;
    "indefinite": a loss whose output Hessian has negative eigenvalues (signed factors)."""
    from hessfunc.graph.curvature import GraphPlan

    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    if arch == "conv":
        model = nn.Sequential(nn.Conv1d(2, 3, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.LazyLinear(C)).double()
        x = torch.randn(5, 2, 6, generator=gen, dtype=DT)
        model(x)
    else:
        model = ResidualMLP(2, 4, 2, C).double() if arch == "residual" else \
            build_mlp([2, 4, 4, C], "tanh", 3)
        x = torch.randn(5, 2, generator=gen, dtype=DT)
    if arch == "frozen":
        model[2].requires_grad_(False)  # a whole middle layer
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, C, (5,), generator=gen)
    if arch == "indefinite":
        loss_fn = lambda o, t: (torch.sin(o) * t).mean()  # noqa: E731
        y = torch.randn(5, C, generator=gen, dtype=DT)
    g, params, _, _, G = _oracle(model, loss_fn, x, y)
    calls = []
    real = GraphPlan.blocks

    def spy(plan):
        calls.append(plan)
        return real(plan)

    monkeypatch.setattr(GraphPlan, "blocks", spy)
    if route == "jacobian":
        monkeypatch.setattr(sys.modules["hessfunc.ggn"], "plan_ggn_diagonal",
                            lambda *args, **kwargs: (None, "forced"))
    blocks = hf.ggn_blocks(g, loss_fn)(params, x, y)
    assert len(calls) == (route == "graph")
    assert list(blocks) == list(params)
    for k, want in _blocks_of(G, params).items():
        assert_close(blocks[k], want)


@pytest.mark.parametrize("quantity", ["ggn", "fisher"])
def test_wide_convolutions_take_the_graph_with_factors_within_their_own_budget(quantity,
                                                                              monkeypatch):
    """The Gauss-Newton sweep holds ``N x width x C`` factors, not ``N x width^2`` blocks:
    under a budget the Hessian's frontier exceeds, the GGN and Fisher diagonals still
    take the captured graph, and a convolution pulls the factor's columns back by its
    input gradient, without building its Jacobian. Both equal the definitions."""
    from hessfunc.graph import curvature, rules
    from hessfunc.graph.curvature import GGNLoss, plan_diagonal, plan_ggn_diagonal

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4 * 12 * 12, C)).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 12, 12, generator=gen, dtype=DT)
    y = torch.randint(0, C, (3,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    g, params, _, leaves, G = _oracle(model, loss_fn, x, y)
    monkeypatch.setattr(curvature, "available_bytes", lambda device: 4 * 2 ** 23)  # 8 MiB
    f = lambda p, a, b: loss_fn(g(p, a), b)  # noqa: E731
    assert plan_diagonal(f, (params, x, y))[0] is None  # the Hessian's blocks: over budget
    assert plan_ggn_diagonal(GGNLoss(g, loss_fn), (params, x, y))[0] is not None
    widths = []
    real = rules.Convolution._input_grad

    def spy(rule, grads):
        widths.append(grads.shape[0])
        return real(rule, grads)

    monkeypatch.setattr(rules.Convolution, "_input_grad", spy)
    if quantity == "ggn":
        assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
        assert widths == [C * 3]  # the second convolution's K x N columns, no Jacobian
    else:
        got = hf.fisher_diag(g, loss_fn, mc_samples=2,
                             generator=torch.Generator().manual_seed(1))(params, x, y)
        ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                     "categorical", 1 / 3, 2, torch.Generator().manual_seed(1))
        assert_close(flat(got), torch.diagonal(ref))
        assert widths == [2 * 3]


def test_ggn_diag_built_inline_traces_once_and_keeps_nothing_alive(monkeypatch):
    """``hf.ggn_diag(g, loss_fn)(...)`` written inline in a loop reuses one capture per
    ``(g, loss_fn)`` (not a new trace per call), and holds neither alive: once the caller
    drops the model, its memo entry goes too."""
    import gc
    import weakref

    from hessfunc.graph.curvature import GGNLoss

    traced = count_captures(monkeypatch)
    model, loss_fn, x, y = _problem("ce", 5, seed=13)
    g, params, *_, G = _oracle(model, loss_fn, x, y)
    for _ in range(3):
        assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    assert len(traced) == 2  # the composition and the model alone, once each
    alive = weakref.ref(g)
    del g
    gc.collect()
    assert alive() is None
    assert all(alive() is not key for key in GGNLoss._made.keys())


class _SlottedModel:
    """A callable ``g`` without ``__weakref__``: it cannot be weakly referenced."""

    __slots__ = ("model",)

    def __init__(self, model):
        self.model = model

    def __call__(self, p, x):
        return torch.func.functional_call(self.model, p, (x,))


def test_per_sample_ggn_of_a_loss_with_the_batch_size_inside_its_sum():
    """``((o - y) ** 2 / N).sum()`` puts the batch size below the loss's sum: each
    sample's own loss divides by 1, so the one-sample trace is refused (it once gave the
    batch's ``1/N`` per sample), each sample's loss is swept under ``vmap``, and the rows
    equal the oracle's."""
    from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal

    model, _, x, y = _problem("mse", 4, seed=15)
    loss_fn = lambda o, t: ((o - t) ** 2 / o.shape[0]).sum()  # noqa: E731
    g = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    params = {k: v.detach() for k, v in model.named_parameters()}
    from hessfunc.graph.curvature import _one_sample_graph, plan_diagonal

    composed = GGNLoss.of(g, loss_fn)
    batch, _ = plan_diagonal(composed, (params, x, y), check_memory=False)
    why = _one_sample_graph(composed, (params, x, y), batch)
    assert "div.Tensor takes 4 on the batch and 1 on one sample" in why
    plan, why = plan_ggn_diagonal(composed, (params, x, y), per_sample=True)
    assert plan is not None and plan.own_losses, why
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for n in range(4):
        *_, G = _oracle(model, loss_fn, x[n:n + 1], y[n:n + 1])
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(G))


def test_ggn_diag_of_a_g_that_cannot_be_weakly_referenced():
    """Such a ``g`` is held strongly by a plain wrapper: the diagonal and per-sample
    diagonals still take the captured graph, equal to the oracle's."""
    import weakref

    from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal

    model, loss_fn, x, y = _problem("ce", 5, seed=14)
    g = _SlottedModel(model)
    with pytest.raises(TypeError):
        weakref.ref(g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    plan, why = plan_ggn_diagonal(GGNLoss.of(g, loss_fn), (params, x, y))
    assert plan is not None, why
    *_, G = _oracle(model, loss_fn, x, y)
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for n in range(5):
        *_, G = _oracle(model, loss_fn, x[n:n + 1], y[n:n + 1])
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(G))


@pytest.mark.parametrize("per_sample", [False, True])
def test_ggn_of_a_loss_linear_in_the_output_is_zero_on_the_graph(per_sample, monkeypatch):
    from hessfunc.graph.curvature import GraphPlan

    taken, real = [], GraphPlan._output_hessian
    monkeypatch.setattr(GraphPlan, "_output_hessian",
                        lambda plan: taken.append(True) or real(plan))
    model, _, x, y = _problem("mse", 4, seed=2)

    def linear(o, t):
        return (o * t).sum()

    g, params, out, leaves, G = _oracle(model, linear, x, y)
    assert torch.count_nonzero(G) == 0  # the oracle's own H_o is zero
    got = hf.ggn_diag(g, linear, per_sample=per_sample)(params, x, y)
    assert taken, "the captured graph's sweep was not taken"
    want = torch.diagonal(G) if not per_sample else torch.zeros(4, G.shape[0], dtype=DT)
    assert_close(flat(got) if not per_sample else
                 torch.cat([v.reshape(4, -1) for v in got.values()], 1), want)


@pytest.mark.parametrize("name", ["mse", "sum-mse", "ce", "ce-smoothed", "bce", "ce-function",
                                  "mse-function"])
@pytest.mark.parametrize("own", [False, True])
def test_closed_form_output_factor_is_the_oracles_output_hessian(name, own):
    """S_n S_n^T against the loop oracle's d^2 loss / do^2, block by block: the batch's
    loss, or (own) the given loss on each sample alone."""
    ggn_module = sys.modules["hessfunc.ggn"]
    n = 4
    gen = torch.Generator().manual_seed(7)
    loss_fn = {"ce-function": F.cross_entropy, "mse-function": F.mse_loss}.get(name)
    loss_fn = loss_fn or LOSSES[name]
    y = _targets(name.replace("-function", ""), n, gen)
    out = 3 * torch.randn(n, C, generator=gen, dtype=DT)
    S = ggn_module.output_factor(loss_fn, out, y, own)
    assert S is not None and S.shape == (n, C, C)
    for i in range(n):
        rows = slice(i, i + 1) if own else slice(None)
        Ho = hf.reference.output_hessian(loss_fn, out[rows], y[rows])
        k = 0 if own else i
        want = Ho.reshape(Ho.shape[0] // C, C, -1, C)[k, :, k, :]
        assert_close(S[i] @ S[i].T, want)


@pytest.mark.parametrize("name", ["mse", "sum-mse", "ce", "ce-smoothed", "bce", "ce-function"])
def test_closed_form_output_product_is_the_oracles_output_hessian_product(name):
    """``u -> H_o u`` in O(N C) (``output_product``) against the loop oracle's dense
    ``d^2 loss / do^2`` times ``u``; None where the factor declines."""
    ggn_module = sys.modules["hessfunc.ggn"]
    n = 4
    gen = torch.Generator().manual_seed(9)
    loss_fn = F.cross_entropy if name == "ce-function" else LOSSES[name]
    y = _targets(name.replace("-function", ""), n, gen)
    out = 3 * torch.randn(n, C, generator=gen, dtype=DT)
    u = torch.randn(n, C, generator=gen, dtype=DT)
    product = ggn_module.output_product(loss_fn, out, y)
    Ho = hf.reference.output_hessian(loss_fn, out, y)
    assert_close(product(u), (Ho @ u.reshape(-1)).view(n, C))
    assert ggn_module.output_product(nn.CrossEntropyLoss(ignore_index=1),
                                     out, torch.tensor([0, 1, 2, 1])) is None


def test_closed_form_output_factor_declines_what_it_does_not_know():
    ggn_module = sys.modules["hessfunc.ggn"]
    out = torch.randn(4, C, dtype=DT)
    classes = torch.tensor([0, 1, 2, 1])
    declined = {
        "class weights": (nn.CrossEntropyLoss(weight=torch.ones(C, dtype=DT)), classes),
        "an ignored target": (nn.CrossEntropyLoss(ignore_index=1), classes),
        "torch's default ignored target": (F.cross_entropy, torch.tensor([0, -100, 2, 1])),
        "probability targets": (nn.CrossEntropyLoss(), torch.softmax(out, 1)),
        "pos_weight": (nn.BCEWithLogitsLoss(pos_weight=torch.ones(C, dtype=DT)),
                       torch.zeros(4, C, dtype=DT)),
        "broadcast targets": (nn.MSELoss(), torch.zeros(1, C, dtype=DT)),
        "reduction none": (nn.MSELoss(reduction="none"), torch.zeros(4, C, dtype=DT)),
        "an unknown loss": (lambda o, t: ((o - t) ** 2).mean(), torch.zeros(4, C, dtype=DT)),
        "log-probabilities": (nn.NLLLoss(), classes),
    }
    for why, (loss_fn, y) in declined.items():
        assert ggn_module.output_factor(loss_fn, out, y) is None, why
    assert ggn_module.output_factor(nn.MSELoss(), out[:, :, None], out[:, :, None]) is None


CALLS = {
    "ggn_diag": lambda g, loss: (lambda p, x, y: hf.ggn_diag(g, loss)(p, x, y)),
    "ggn": lambda g, loss: (lambda p, x, y: hf.ggn(g, loss)(p, x, y)),
    "ggn_blocks": lambda g, loss: (lambda p, x, y: hf.ggn_blocks(g, loss)(p, x, y)),
    "ggn_vp": lambda g, loss: (lambda p, x, y: hf.ggn_vp(g, loss, (p, x, y), p)),
    "fisher_diag": lambda g, loss: (lambda p, x, y: hf.fisher_diag(g, loss)(p, x, y)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_gauss_newton_errors_name_the_call_the_argument_and_the_fix(name):
    """Every Gauss-Newton entry point names itself and the argument at fault."""
    model, loss_fn, x, y = _problem("mse", 3)
    g, params = hf.functionalize(model)
    call = CALLS[name]
    with pytest.raises(hf.ArgumentError, match=rf"^{name}: `params\[.0\.weight.\]` has"):
        call(g, loss_fn)({k: v.long() for k, v in params.items()}, x, y)
    with pytest.raises(hf.ArgumentError, match=rf"^{name}: `g` "):
        call(None, loss_fn)(params, x, y)
    with pytest.raises(hf.ArgumentError, match=rf"^{name}: `loss_fn` "):
        call(g, "mse")(params, x, y)
    if name in ("ggn", "ggn_vp"):  # the routes that evaluate g and loss_fn directly
        with pytest.raises(hf.ArgumentError,
                           match=rf"^{name}: `g\(params, inputs\)` must return one floating"):
            call(lambda p, inp: (g(p, inp),), loss_fn)(params, x, y)
        with pytest.raises(hf.ArgumentError,
                           match=rf"^{name}: `loss_fn\(outputs, targets\)` must return a "
                                 r"scalar, got Tensor\(shape=\(3, 3\)"):
            call(g, nn.MSELoss(reduction="none"))(params, x, y)
    with pytest.raises(hf.ArgumentError, match=r"^ggn_vp: `primals` must be the tuple .*got "
                                               r"list of length 3"):
        hf.ggn_vp(g, loss_fn, [params, x, y], params)


def test_dense_gauss_newton_memory_guards_say_what_they_refuse(monkeypatch):
    """The dense GGN and the Jacobian fallback of the blocks are refused before allocating,
    each naming what would not fit and what to do instead."""
    model = build_mlp([2, 4, C], "tanh", 0)
    g, params = hf.functionalize(model)
    n = 200  # O = 600 outputs against P = 27 parameters: the P x P GGN fits, J does not
    x, y = torch.randn(n, 2, dtype=DT), torch.randn(n, C, dtype=DT)
    with pytest.raises(hf.DenseMemoryError, match=r"^ggn: the 600 x 27 Jacobian and 600 x "
                                                  r"600 output Hessian .*split the batch"):
        # 600 x 27 + 600^2 float64 entries are 3,009,600 bytes: over, by the Jacobian alone
        hf.ggn(g, nn.MSELoss(), max_memory=2_950_000)(params, x, y)
    with pytest.raises(hf.DenseMemoryError,
                       match=r"^ggn_blocks: storing the diagonal blocks .*use `ggn_diag`"):
        hf.ggn_blocks(g, nn.MSELoss(), max_memory=64)(params, x, y)
    monkeypatch.setattr(sys.modules["hessfunc.ggn"], "plan_ggn_diagonal",
                        lambda *args, **kwargs: (None, "forced"))
    with pytest.raises(hf.DenseMemoryError, match=r"^ggn_blocks: the 600 x 27 Jacobian"):
        hf.ggn_blocks(g, nn.MSELoss(), max_memory=2_950_000)(params, x, y)


def test_dense_ggn_of_a_single_tensor_parameter_is_shaped_like_it():
    """``ggn(g, loss)(w, ...)`` with a tensor ``w`` (not a dict) nests as ``w.shape * 2``."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(2, 3, generator=gen, dtype=DT)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    y = torch.randn(5, 2, generator=gen, dtype=DT)

    def g(p, inp):
        return torch.tanh(inp @ p.T)

    leaf = w.clone().requires_grad_()
    want = hf.reference.ggn(g(leaf, x), nn.MSELoss(), y, [leaf])
    got = hf.ggn(g, nn.MSELoss())(w, x, y)
    assert got.shape == (2, 3, 2, 3)
    assert_close(got.reshape(6, 6), want)


def test_fisher_likelihood_and_reduction_are_checked_and_used():
    model, _, x, y = _problem("bce", 4)
    g, params = hf.functionalize(model)
    with pytest.raises(hf.ArgumentError, match=r"^fisher_diag: `loss_fn` .* has class "
                                               r"weights; the Fisher needs a plain negative "
                                               r"log-likelihood \(no `weight` or `pos_weight`\)"):
        hf.fisher_diag(g, nn.BCEWithLogitsLoss(pos_weight=torch.ones(C, dtype=DT)))
    with pytest.raises(hf.ArgumentError, match=r"^fisher_diag: `likelihood` must be one of"):
        hf.fisher_diag(g, lambda o, t: o.sum(), likelihood="poisson")
    with pytest.raises(hf.ArgumentError, match=r"^fisher_diag: the loss's reduction must be "
                                               r"'mean' or 'sum', got 'none'"):
        hf.fisher_diag(g, nn.MSELoss(reduction="none"))
    with pytest.raises(hf.ArgumentError, match=r"no probabilistic interpretation hessfunc "
                                               r"knows; the Fisher is defined for negative "
                                               r"log-likelihoods: MSE \(Gaussian\).*pass "
                                               r"`likelihood=`"):
        hf.fisher_diag(g, lambda o, t: ((o - t) ** 4).mean())
    # a wrapper's stated reduction is the one used; the empirical Fisher of the summed
    # MSE is N C times that of the mean (c = 1 against 1 / (N C), module docstring)
    yy = torch.randn(4, C, dtype=DT)
    summed = hf.fisher_diag(g, lambda o, t: F.mse_loss(o, t, reduction="sum"),
                            likelihood="gaussian", reduction="sum", kind="empirical")
    plain = hf.fisher_diag(g, nn.MSELoss(reduction="sum"), kind="empirical")
    assert_close(summed(params, x, yy), plain(params, x, yy))
    meaned = hf.fisher_diag(g, nn.MSELoss(), kind="empirical")(params, x, yy)
    ratio = flat(plain(params, x, yy)) / flat(meaned)
    assert_close(ratio, torch.full_like(ratio, 4 * C))


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0],
                                                                             dtype=DT)),
                                     lambda o, t: ((o - t) ** 4).mean()],
                         ids=["class-weighted ce (batched blocks)", "own loss (jacobian)"])
def test_kfac_factors_for_losses_without_a_closed_form(loss_fn, monkeypatch):
    """Losses ``output_factor`` declines take the per-sample output Hessian from autograd
    (batched double backward for torch's losses, the whole Jacobian of the gradient for
    any other): the factors still equal their definitions."""
    kfac_module = sys.modules["hessfunc.operators.kfac"]
    batched, real = [], kfac_module.output_hessian_blocks
    monkeypatch.setattr(kfac_module, "output_hessian_blocks",
                        lambda *args: batched.append(True) or real(*args))
    n = 5
    model, _, x, _ = _problem("mse", n, seed=13)
    gen = torch.Generator().manual_seed(14)
    y = torch.randint(0, C, (n,), generator=gen) if isinstance(loss_fn, nn.Module) else \
        torch.randn(n, C, generator=gen, dtype=DT)
    K = hf.KFACOperator.from_model(model, loss_fn, (x, y))
    assert bool(batched) == isinstance(loss_fn, nn.Module)
    for layer, (A, G) in _two_layer_factors(model, loss_fn, x, y).items():
        assert_close(K.factors[layer][0], A)
        assert_close(K.factors[layer][1], G)


class _TinyEncoderLM(nn.Module):
    """Token embeddings, torch's encoder layer and logits of shape ``(N * T, V)``: the
    output rows are (sequence, position) pairs, not the samples."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.layer(self.emb(x))).flatten(0, 1)


class _TokenMLP(nn.Module):
    """Embeddings, a tanh layer and logits for every position, ``(N * T, V)``."""

    def __init__(self):
        super().__init__()
        self.emb, self.hidden, self.head = nn.Embedding(5, 4), nn.Linear(4, 3), nn.Linear(3, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.emb(x)))).flatten(0, 1)


@pytest.mark.parametrize("loss", ["cross-entropy", "mse", "bce-with-logits"])
def test_gauss_newton_of_outputs_with_several_rows_per_sample(loss):
    """Each output row of a sequence model (a position of a sample) has its own factor of
    the loss's Hessian, ``S_r S_r^T``: the sample's factor holds them in separate columns
    (one ``K`` columns per row, not their sum, which was off by the rows' cross terms).
    ``ggn_diag``, ``ggn_blocks`` and the empirical ``fisher_diag`` equal the dense
    ``J^T H_o J`` and the sum of each row's gradient's outer product."""
    torch.manual_seed(0)
    model = _TokenMLP().double()
    x = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (12,), generator=torch.Generator().manual_seed(2))
    loss_fn = {"cross-entropy": nn.CrossEntropyLoss(), "mse": nn.MSELoss(),
               "bce-with-logits": nn.BCEWithLogitsLoss()}[loss]
    if loss != "cross-entropy":
        y = torch.rand(12, 5, dtype=DT, generator=torch.Generator().manual_seed(2))
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    G = hf.reference.ggn(g(leaves, x), loss_fn, y, list(leaves.values()))
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    blocks = hf.ggn_blocks(g, loss_fn)(params, x, y)
    for k, want in _blocks_of(G, params).items():
        assert_close(blocks[k], want)
    if loss == "cross-entropy":
        _check_fisher_diagonals(g, params, x, y)


def test_gauss_newton_and_fisher_of_an_encoder_layer_in_eval_mode():
    """In eval mode torch's encoder layer takes a fused kernel without a forward-mode
    rule where no input requires grad, as under ``torch.func.jvp`` (NOTE [attention
    kernels]); its output rows are positions, not samples. ``ggn_vp``, ``GGNOperator``,
    ``FisherOperator`` (empirical) and ``fisher_diag`` (both kinds) equal the oracle's: the
    dense ``J^T H_o J``, the Monte-Carlo Fisher by its definition with the same draws, and
    the sum of each row's gradient's outer product."""
    torch.manual_seed(0)
    model = _TinyEncoderLM().double().eval()
    x = torch.randint(0, 5, (2, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(2))
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    out = g(leaves, x)
    G = hf.reference.ggn(out, F.cross_entropy, y, list(leaves.values()))
    v = torch.randn(G.shape[0], dtype=DT, generator=torch.Generator().manual_seed(3))
    assert_close(flat(hf.ggn_vp(g, F.cross_entropy, (params, x, y), unflat(v, params))), G @ v)
    assert_close(hf.GGNOperator.from_model(model, nn.CrossEntropyLoss(), (x, y)) @ v, G @ v)
    empirical = _check_fisher_diagonals(g, params, x, y)
    fisher = hf.FisherOperator.from_model(model, nn.CrossEntropyLoss(), (x, y),
                                          kind="empirical")
    assert_close(fisher @ v, empirical @ v)


def test_per_sample_diagonals_need_the_samples_on_every_first_axis():
    """A language model's targets flattened to one row per position do not split into its
    sequences: ``per_sample=True`` says so, naming the sizes, for the Hessian's and the
    GGN's diagonals (it was vmap's error)."""
    torch.manual_seed(0)
    model = _TinyEncoderLM().double().eval()
    x, y = torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (6,))
    f, params = hf.functionalize(model, nn.CrossEntropyLoss())
    g, _ = hf.functionalize(model)
    match = r"per_sample=True splits the inputs and targets .* sizes \[2, 6\]\. Give"
    with pytest.raises(hf.ArgumentError, match=r"hessian_diag: " + match):
        hf.hessian_diag(f, per_sample=True)(params, x, y)
    with pytest.raises(hf.ArgumentError, match=r"ggn_diag: " + match):
        hf.ggn_diag(g, nn.CrossEntropyLoss(), per_sample=True)(params, x, y)


def test_gauss_newton_products_without_forward_mode():
    """Weight normalisation (``parametrizations.weight_norm``) runs an op torch has no
    forward-mode rule for: ``J v`` comes from reverse mode twice (``reverse_jvp``), and
    ``ggn_vp``, ``GGNOperator`` products (single and batched) and the empirical Fisher's
    equal the oracle's dense ``J^T H_o J`` and ``sum_n g_n g_n^T``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.GELU(),
                          nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen, dtype=DT), torch.randn(5, 2, generator=gen, dtype=DT)
    g, params = hf.functionalize(model)
    leaves = leaf_params(params)
    G = hf.reference.ggn(g(leaves, x), F.mse_loss, y, list(leaves.values()))
    V = torch.randn(G.shape[0], 3, generator=gen, dtype=DT)
    assert_close(flat(hf.ggn_vp(g, F.mse_loss, (params, x, y), unflat(V[:, 0], params))),
                 G @ V[:, 0])
    op = hf.GGNOperator.from_model(model, nn.MSELoss(), (x, y))
    assert_close(op @ V[:, 1], G @ V[:, 1])
    assert_close(op @ V, G @ V)
    rows = [F.mse_loss(g(leaves, x[n:n + 1]), y[n:n + 1]) for n in range(5)]
    empirical = hf.reference.empirical_fisher(rows, list(leaves.values()), 2 / 5)  # c / s^2
    fisher = hf.FisherOperator.from_model(model, nn.MSELoss(), (x, y), kind="empirical")
    assert_close(fisher @ V, empirical @ V)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("route", ["ggn_vp", "GGNOperator", "FisherOperator"])
def test_gauss_newton_products_name_an_op_without_forward_mode_or_double_backward(route):
    """``embedding_bag`` has no forward-mode rule and its backward no derivative, so ``J v``
    has no route through autograd: the products say so, naming the op and what applies
    (the diagonal, which needs ``J^T`` alone, equals the oracle's), instead of torch's
    bare NotImplementedError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(5, 3, mode="mean"), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.tensor([[0, 1], [1, 1], [2, 4]]), torch.randn(3, 2, dtype=DT)
    g, params = hf.functionalize(model)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    products = {
        "ggn_vp": lambda: hf.ggn_vp(g, F.mse_loss, (params, x, y), v),
        "GGNOperator": lambda: hf.GGNOperator(g, F.mse_loss, params, (x, y)) @ flat(v),
        "FisherOperator": lambda: hf.FisherOperator(g, F.mse_loss, params, (x, y),
                                                    kind="mc", seed=0) @ flat(v)}
    with pytest.raises(hf.ArgumentError, match=rf"{route}: J v needs .*_embedding_bag_backward"
                       r".*ggn_diag, ggn\) need J\^T alone"):
        products[route]()
    leaves = leaf_params(params)
    G = hf.reference.ggn(g(leaves, x), F.mse_loss, y, list(leaves.values()))
    assert_close(flat(hf.ggn_diag(g, F.mse_loss)(params, x, y)), torch.diagonal(G))


class _LastStep(nn.Module):
    """An LSTM read at its last step: vmap cannot run it sample by sample."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, C)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_fisher_diagonal_of_a_model_vmap_cannot_split():
    """``fisher_diag`` where ``vmap`` cannot evaluate the model one sample at a time (an
    LSTM: torch raised a shape mismatch inside vmap): each sample's gradient from the
    whole batch's vector-Jacobian product, equal to the oracle's MC Fisher with the same
    draws and to the empirical Fisher's diagonal."""
    torch.manual_seed(0)
    model = _LastStep().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, 3, generator=gen, dtype=DT), torch.randint(0, C, (5,), generator=gen)
    g, params = hf.functionalize(model)
    _check_fisher_diagonals(g, params, x, y)


def _check_fisher_diagonals(g, params, x, y):
    """``fisher_diag`` of a cross-entropy loss, both kinds, against the oracle: the MC
    Fisher by its definition with the same draws, and the sum of the outer products of
    each output row's gradient (through the whole batch)."""
    leaves = leaf_params(params)
    rows = g(leaves, x).shape[0]
    diag = hf.fisher_diag(g, nn.CrossEntropyLoss(), mc_samples=2,
                          generator=torch.Generator().manual_seed(2))(params, x, y)
    ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                 "categorical", 1 / rows, 2, torch.Generator().manual_seed(2))
    assert_close(flat(diag), torch.diagonal(ref))
    losses = [F.cross_entropy(g(leaves, x)[r:r + 1], y[r:r + 1]) for r in range(rows)]
    empirical = hf.reference.empirical_fisher(losses, list(leaves.values()), 1 / rows)
    diag = hf.fisher_diag(g, nn.CrossEntropyLoss(), kind="empirical")(params, x, y)
    assert_close(flat(diag), torch.diagonal(empirical))
    return empirical


def test_batchnorm_in_training_mode_per_sample_and_fisher():
    """BatchNorm in training mode couples the samples: ``per_sample=True`` (each sample's
    loss alone) says why it cannot be had (it was BatchNorm's own ValueError), and
    ``fisher_diag`` takes each row's gradient through the whole batch, as the model runs,
    equal to the oracle's MC Fisher with the same draws and to the empirical Fisher."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, C))
    model = model.double().train()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen, dtype=DT), torch.randint(0, C, (5,), generator=gen)
    f, params = hf.functionalize(model, nn.CrossEntropyLoss())
    with pytest.raises(hf.ArgumentError, match="per_sample=True evaluates f on each sample "
                                               "alone.*BatchNorm in training mode"):
        hf.hessian_diag(f, per_sample=True)(params, x, y)
    g, _ = hf.functionalize(model)
    _check_fisher_diagonals(g, params, x, y)


@pytest.mark.parametrize("name", ["mse", "ce", "nll-of-log-softmax", "bce"])
def test_gauss_newton_and_fisher_in_parts_of_the_batch(name, monkeypatch):
    """Over the memory budget the Gauss-Newton sweep runs on parts of the batch (NOTE [the
    batch in parts]): the loss's factor at the outputs is the batch's, cut to each part,
    or (no closed form: the NLL of a log-softmax) each part's output Hessian is seeded
    with the batch's dL/db. The GGN diagonal and blocks, each sample's own diagonal, and
    the empirical and MC Fisher diagonals equal the oracle's."""
    from hessfunc.graph import curvature

    n = 7
    model, loss_fn, x, y = _problem(name, n, seed=16)
    g, params, out, leaves, G = _oracle(model, loss_fn, x, y)
    plan, why = curvature.plan_ggn_diagonal(curvature.GGNLoss.of(g, loss_fn), (params, x, y))
    assert plan is not None and not plan.parts, why
    need = -(-plan.captured.analysis("ggn bytes", None) * 2 // n)
    monkeypatch.setattr(curvature, "available_bytes", lambda device: 4 * need)
    for per_sample in (False, True):
        plan, why = curvature.plan_ggn_diagonal(curvature.GGNLoss.of(g, loss_fn),
                                                (params, x, y), per_sample=per_sample)
        assert plan is not None, why
        assert [(part.lo, part.hi) for part in plan.parts] == [(0, 2), (2, 4), (4, 7)]
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    plan, _ = curvature.plan_ggn_diagonal(curvature.GGNLoss.of(g, loss_fn), (params, x, y))
    assert all(b is not None for b in plan.blocks())  # every block from the parts' sweeps
    blocks, at = hf.ggn_blocks(g, loss_fn)(params, x, y), 0
    for k, p in params.items():
        assert_close(blocks[k], G[at:at + p.numel(), at:at + p.numel()])
        at += p.numel()
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for i in range(n):
        *_, Gi = _oracle(model, loss_fn, x[i:i + 1], y[i:i + 1])
        assert_close(flat({k: v[i] for k, v in rows.items()}), torch.diagonal(Gi))
    if name not in FISHER:
        return
    c, s = _scale(name, n)
    losses = [loss_fn(g(leaves, x[i:i + 1]), y[i:i + 1]) for i in range(n)]
    ref = hf.reference.empirical_fisher(losses, list(leaves.values()), c / s ** 2)
    assert_close(flat(hf.fisher_diag(g, loss_fn, kind="empirical")(params, x, y)),
                 torch.diagonal(ref))
    diag = hf.fisher_diag(g, loss_fn, mc_samples=3,
                          generator=torch.Generator().manual_seed(5))(params, x, y)
    ref = hf.reference.mc_fisher(lambda inp: g(leaves, inp), list(leaves.values()), x,
                                 FISHER[name], c, 3, torch.Generator().manual_seed(5))
    assert_close(flat(diag), torch.diagonal(ref))


class _Tokens(nn.Module):
    """Token logits from ``(N, T)`` token ids: an embedding, a Linear with tanh and a Linear
    head on every position; rows ``(N T, V)``, or sequence-first ``(T N, V)``."""

    def __init__(self, first="batch", vocab=5, d=3):
        super().__init__()
        self.first = first
        self.emb, self.mix, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), \
            nn.Linear(d, vocab)

    def forward(self, x):
        h = self.head(torch.tanh(self.mix(self.emb(x))))
        return (h if self.first == "batch" else h.transpose(0, 1)).reshape(-1, h.shape[-1])


#: name -> (loss of (logits (N T, V), targets (N, T): T = 3), whether a sum over rows)
_TOKEN_LOSSES = {
    "cross-entropy, targets flattened inside": (
        lambda o, t: F.cross_entropy(o, t.reshape(-1)), True),
    "label smoothing": (lambda o, t: F.cross_entropy(o, t.reshape(-1), label_smoothing=0.2),
                        True),
    "a softplus of each logit, summed": (lambda o, t: F.softplus(o).sum() / 7, True),
    "a sine of each logit (curvature of both signs)": (
        lambda o, t: torch.sin(o * (1 + t.reshape(-1, 1))).sum(), True),
    "linear in the logits (no curvature)": (
        lambda o, t: (o * (1.0 + t.reshape(-1, 1))).sum() / 7, True),
    "the positions of a sample summed, then squared": (
        lambda o, t: (o.reshape(*t.shape, -1).sum(t.shape.index(3)) ** 2).mean(), False),
}


def test_per_sample_ggn_without_a_plan_takes_the_samples_a_few_at_a_time(monkeypatch):
    """Where no per-sample plan exists (a weight used twice takes one-hot products), each
    sample's GGN diagonal comes from its dense Jacobian under ``vmap``, as many samples at
    once as fit the memory limit (it held the whole batch's at once: about 39 GiB for
    ``bench_architectures``' LM, past the machine's memory), equal to the oracle's; one
    sample over the limit is refused with the reason."""
    from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal

    ggn_module = sys.modules["hessfunc.ggn"]  # (hf.ggn is the function)

    torch.manual_seed(0)
    model = TiedNet(4, 5).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=gen, dtype=DT), torch.randn(5, 4, generator=gen, dtype=DT)
    g, params = hf.functionalize(model)
    loss_fn = nn.MSELoss()
    plan, why = plan_ggn_diagonal(GGNLoss.of(g, loss_fn), (params, x, y), per_sample=True)
    assert plan is None, why
    P, O = sum(t.numel() for t in params.values()), 4
    one = (3 * O * P + O * O) * 8  # bytes of one sample's arrays, float64
    chunks = []
    real = ggn_module._per_sample
    monkeypatch.setattr(ggn_module, "_per_sample", lambda *a: chunks.append(a[-1]) or real(*a))
    rows = hf.ggn_diag(g, loss_fn, per_sample=True, max_memory=2 * one + one // 2)(params, x, y)
    assert chunks == [2]
    leaves = leaf_params(params)
    for n in range(5):
        Gn = hf.reference.ggn(g(leaves, x[n:n + 1]), loss_fn, y[n:n + 1], list(leaves.values()))
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(Gn))
    with pytest.raises(hf.DenseMemoryError, match=f"one sample's {O} x .* Jacobian"):
        hf.ggn_diag(g, loss_fn, per_sample=True, max_memory=one - 1)(params, x, y)


@pytest.mark.parametrize("loss", ["ce", "ce-sum", "label smoothing", "mse"])
def test_per_sample_ggn_of_attention_sweeps_each_samples_loss_under_vmap(loss, monkeypatch):
    """NOTE [per-sample losses]: with ``nn.MultiheadAttention`` one sample runs other ops
    than the batch, so each sample's loss is traced under ``vmap`` and ``g``'s ops are found
    by tracing ``g`` on each sample under ``vmap`` too (the targets' own view may come
    before them). Each sample's GGN diagonal equals the oracle's, whole and in parts of
    the batch; before, it took one dense Jacobian per sample."""
    from hessfunc.graph import curvature

    ggn_module = sys.modules["hessfunc.ggn"]
    monkeypatch.setattr(ggn_module, "_per_sample", lambda *a: pytest.fail("dense route"))
    loss_fn = {"ce": nn.CrossEntropyLoss(), "ce-sum": nn.CrossEntropyLoss(reduction="sum"),
               "label smoothing": lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2),
               "mse": nn.MSELoss()}[loss]
    torch.manual_seed(0)
    model = Attention().double().eval()
    gen = torch.Generator().manual_seed(1)
    n = 5
    x = torch.randn(n, 3, 4, generator=gen, dtype=DT)
    y = torch.randn(n, C, generator=gen, dtype=DT) if loss == "mse" else \
        torch.randint(0, C, (n,), generator=gen)
    g, params = hf.functionalize(model)
    composed = curvature.GGNLoss.of(g, loss_fn)
    traced = count_captures(monkeypatch)
    plan, why = curvature.plan_ggn_diagonal(composed, (params, x, y), per_sample=True)
    assert plan is not None and plan.own_losses, why
    captures = len(traced)  # the batch, one sample, each sample's loss and g under vmap
    assert curvature.plan_ggn_diagonal(composed, (params, x, y), per_sample=True)[0] \
        is not None and len(traced) == captures  # kept: none traced again
    leaves = leaf_params(params)
    with second_order_kernels():
        own = [torch.diagonal(hf.reference.ggn(g(leaves, x[i:i + 1]), loss_fn, y[i:i + 1],
                                               list(leaves.values()))) for i in range(n)]
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for i in range(n):
        assert_close(flat({k: v[i] for k, v in rows.items()}), own[i])
    need = -(-plan.captured.analysis("ggn bytes", None) * 2 // n)
    monkeypatch.setattr(curvature, "available_bytes", lambda device: 4 * need)
    plan, why = curvature.plan_ggn_diagonal(composed, (params, x, y), per_sample=True)
    assert plan is not None and [(p.lo, p.hi) for p in plan.parts] == [(0, 2), (2, 5)], why
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for i in range(n):
        assert_close(flat({k: v[i] for k, v in rows.items()}), own[i])


@pytest.mark.parametrize("first", ["batch", "sequence"])
@pytest.mark.parametrize("closed_form", [True, False])
def test_ggn_in_parts_with_targets_flattened_over_the_batch(first, closed_form, monkeypatch):
    """NOTE [rows of every sample]: targets passed flattened in the logits' row order,
    ``(N T,)`` or ``(T N,)``, are cut to each part of the batch in that order, for the
    cross-entropy's closed-form factor and for a loss given as a function (its Hessian
    row by row in each part): the GGN diagonal equals the oracle's (it took the dense
    Jacobian before, out of memory at a language model's size)."""
    from hessfunc.graph import curvature

    loss_fn = F.cross_entropy if closed_form else \
        (lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2))
    torch.manual_seed(3)
    model = _Tokens(first).double()
    x, y = torch.randint(0, 5, (7, 3)), torch.randint(0, 5, (7, 3))
    y = (y if first == "batch" else y.T).reshape(-1)
    g = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = curvature.GGNLoss.of(g, loss_fn)
    plan, why = curvature.plan_ggn_diagonal(f, (params, x, y))
    assert plan is not None and not plan.parts, why
    need = -(-plan.captured.analysis("ggn bytes", None) * 2 // 7)
    monkeypatch.setattr(curvature, "available_bytes", lambda device: 4 * need)
    plan, why = curvature.plan_ggn_diagonal(f, (params, x, y))
    assert plan is not None and [(p.lo, p.hi) for p in plan.parts] == [(0, 2), (2, 4), (4, 7)]
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    G = hf.reference.ggn(g(leaves, x), loss_fn, y, list(leaves.values()))
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))


@pytest.mark.parametrize("first", ["batch", "sequence"])
@pytest.mark.parametrize("case", list(_TOKEN_LOSSES))
def test_ggn_of_token_losses_without_a_closed_form_row_by_row(case, first, monkeypatch):
    """NOTE [rows of the output]: a token-level loss given as a function (no closed-form
    factor) is proved a sum over the rows of the logits, and its Hessian there taken
    row by row; a loss that couples the positions of a sample is not. The GGN diagonal,
    and each sample's own, equal the oracle's either way. (With label smoothing the
    composition's trace records a Linear's ``t`` and ``view`` in the other order than
    g's own: g's ops are found as the first ops in any order.)"""
    from hessfunc.graph.curvature import GGNLoss, GraphPlan, _rows_apart, plan_ggn_diagonal

    loss_fn, apart = _TOKEN_LOSSES[case]
    torch.manual_seed(3)
    model = _Tokens(first).double()
    x, y = torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3))
    if first == "sequence":  # the targets in the logits' order, (T, N) flattened
        loss_fn = (lambda fn: lambda o, t: fn(o, t.T))(loss_fn)
    g = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    params = {k: v.detach() for k, v in model.named_parameters()}
    plan, why = plan_ggn_diagonal(GGNLoss.of(g, loss_fn), (params, x, y))
    assert plan is not None, why
    assert _rows_apart(plan) == apart
    if apart:  # the whole per-sample output Hessian is never formed
        monkeypatch.setattr(GraphPlan, "_output_hessian", lambda self: pytest.fail(
            "the loss's Hessian taken whole, not row by row"))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    G = hf.reference.ggn(g(leaves, x), loss_fn, y, list(leaves.values()))
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    for n in range(4):
        Gn = hf.reference.ggn(g(leaves, x[n:n + 1]), loss_fn, y[n:n + 1],
                              list(leaves.values()))
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(Gn))


@pytest.mark.parametrize(("as_function", "padding"), [(False, 0), (True, 3)])
def test_gauss_newton_products_carry_no_tangent_from_an_embeddings_padding_row(as_function,
                                                                             padding):
    """Autograd gives an embedding's padding row no gradient, so the oracle's ``J`` has no
    column for it; forward mode carried the tangent's padding row into ``J v``, and
    ``ggn_vp``, ``GGNOperator`` and ``FisherOperator`` products of a tangent with that row
    non-zero were wrong (by 1e-2 here) in every entry. Now they equal the oracle's, for a
    ``functionalize`` model and a ``functional_call`` function alike."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=padding), nn.Tanh(), nn.Flatten(),
                          nn.Linear(9, 2)).double()
    x, y = torch.tensor([[1, 1, 2], [3, 0, 3], [4, 1, 1]]), torch.tensor([0, 1, 1])
    loss_fn = nn.CrossEntropyLoss()
    g, params, _, _, G = _oracle(model, loss_fn, x, y)
    if as_function:
        g = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    v = {k: torch.randn_like(t) for k, t in params.items()}
    assert v["0.weight"][padding].abs().min() > 0
    assert_close(flat(hf.ggn_vp(g, loss_fn, (params, x, y), v)), G @ flat(v))
    op = hf.GGNOperator(g, loss_fn, params, [(x, y)])
    assert_close(op @ flat(v), G @ flat(v))
    assert_close(flat(hf.ggn_diag(g, loss_fn)(params, x, y)), torch.diagonal(G))
    leaves = leaf_params(params)
    losses = [loss_fn(g(leaves, x[i:i + 1]), y[i:i + 1]) for i in range(3)]
    E = hf.reference.empirical_fisher(losses, list(leaves.values()), 1 / 3)  # c / s^2
    op = hf.FisherOperator(g, loss_fn, params, [(x, y)], kind="empirical")
    assert_close(op @ flat(v), E @ flat(v))


def test_per_sample_ggn_diagonals_of_a_loss_vmap_cannot_run():
    """``F.gaussian_nll_loss`` checks ``torch.any(var < 0)``: no trace, and no ``vmap``
    over samples (torch's bare error before). Each sample then goes alone, equal to the
    oracle's GGN of that sample's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)

    def loss_fn(out, target):
        return F.gaussian_nll_loss(out[:, :2], target, torch.exp(out[:, 2:]).expand(-1, 2))

    g, params = hf.functionalize(model)
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    leaves = leaf_params(params)
    for n in range(5):
        Gn = hf.reference.ggn(g(leaves, x[n:n + 1]), loss_fn, y[n:n + 1], list(leaves.values()))
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(Gn))


#: the identity, as a ``Function``: a model that applies it is not captured
_PassThrough = custom_function(lambda z: z.clone(), 1.0)


class _UncapturedLookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(5, 3, padding_idx=0), nn.Linear(9, 2)

    def forward(self, x):
        return self.h(torch.tanh(_PassThrough.apply(self.e(x))).flatten(1))


def test_padding_rows_of_a_model_that_cannot_be_captured_come_from_its_modules():
    """The products' padding rows came from the capture alone: a model that cannot be
    captured (here: it applies a custom ``Function``) carried the tangent's padding row
    into ``J v`` (2e-2 off). A ``functionalize`` model's ``nn.Embedding`` modules say."""
    torch.manual_seed(2)
    model = _UncapturedLookup().double()
    x, y = torch.tensor([[1, 1, 2], [3, 0, 3], [4, 1, 1]]), torch.tensor([0, 1, 1])
    g, params, _, _, G = _oracle(model, nn.CrossEntropyLoss(), x, y)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    assert_close(flat(hf.ggn_vp(g, nn.CrossEntropyLoss(), (params, x, y), v)), G @ flat(v))
    op = hf.GGNOperator(g, nn.CrossEntropyLoss(), params, [(x, y)])
    assert_close(op @ flat(v), G @ flat(v))


class _TwoSums(nn.Module):
    """``a + b`` twice: the sum's rule hands both operands one factor, so ``a`` and ``b``
    start with the same tensor before the other sum adds to each."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(3, 4)
        self.h1, self.h2 = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        a, b = torch.tanh(self.l1(x)), torch.sin(self.l2(x))
        return self.h1(torch.tanh(a + b)) + self.h2(torch.sin(b + a))


def test_factors_summed_over_uses_are_added_to_in_place_only_where_made_by_a_sum():
    """The sweep adds a value's later factors in place only to the sum it made itself: a
    factor a rule hands two operands at once (here ``a + b``'s) is shared, and adding to
    it in place gave ``b`` ``a``'s share too (0.3 off the oracle's diagonal)."""
    torch.manual_seed(0)
    model = _TwoSums().double()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    g, params, _, _, G = _oracle(model, F.cross_entropy, x, y)
    assert_close(flat(hf.ggn_diag(g, F.cross_entropy)(params, x, y)), torch.diagonal(G))


class _TwoSequences(nn.Module):
    """Self-attention over two sequences joined: ``g(params, (a, b))``, two tensors in
    ``x``."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, C)

    def forward(self, a, b):
        x = torch.cat([a, b], 1)
        return self.h(self.a(x, x, x)[0].mean(1))


def test_per_sample_ggn_of_a_model_of_two_inputs_finds_its_ops_under_vmap():
    """``x`` a tuple of two tensors: both are ``g``'s inputs when its ops are told from the
    targets' in each sample's loss under ``vmap`` (taking the second for a target dropped
    the plan), and each sample's GGN diagonal equals the oracle's."""
    from hessfunc.graph import curvature

    torch.manual_seed(1)
    model = _TwoSequences().double().eval()
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 4, generator=gen, dtype=DT), torch.randn(4, 2, 4, generator=gen,
                                                                        dtype=DT))
    y = torch.randint(0, C, (4,), generator=gen)
    g = lambda p, x: torch.func.functional_call(model, p, x)  # noqa: E731
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()
    plan, why = curvature.plan_ggn_diagonal(curvature.GGNLoss.of(g, loss_fn), (params, x, y),
                                            per_sample=True)
    assert plan is not None and plan.own_losses, why
    rows = hf.ggn_diag(g, loss_fn, per_sample=True)(params, x, y)
    leaves = leaf_params(params)
    with second_order_kernels():
        for n in range(4):
            one = tuple(t[n:n + 1] for t in x)
            Gn = hf.reference.ggn(g(leaves, one), loss_fn, y[n:n + 1], list(leaves.values()))
            assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(Gn))


@pytest.mark.parametrize("chunked", [False, True])
def test_ggn_diagonal_of_a_grouped_convolution_pushes_tangents_through_the_factor(chunked,
                                                                                monkeypatch):
    """A grouped convolution's weight has no closed form: its diagonal pushes one tangent
    per element through the op and squares them against the factor with its signs, equal
    to the oracle's (per sample too), also a few tangents at a time."""
    from hessfunc.graph import curvature

    if chunked:  # a few columns per chunk
        monkeypatch.setattr(curvature, "CHUNK_BUDGET_BYTES", 3 * 64 * 8 * 3)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(16, C)).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.randint(0, C, (3,))
    g, params, _, _, G = _oracle(model, F.cross_entropy, x, y)
    assert_close(flat(hf.ggn_diag(g, F.cross_entropy)(params, x, y)), torch.diagonal(G))
    rows = hf.ggn_diag(g, F.cross_entropy, per_sample=True)(params, x, y)
    for n in range(3):
        *_, Gn = _oracle(model, F.cross_entropy, x[n:n + 1], y[n:n + 1])
        assert_close(flat({k: v[n] for k, v in rows.items()}), torch.diagonal(Gn))
