"""The captured-graph engine (hessfunc/graph): exact diagonals of any f, the per-sample
proof op by op, the route of every parameter, and the trace cache.

Every truth is the loop oracle (hessfunc.reference) or a dense Jacobian from autograd.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    Attention,
    assert_close,
    count_captures,
    custom_function,
    flat,
    oracle_hessian,
    oracle_loss,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import hessfunc as hf
from hessfunc._autodiff import second_order_kernels
from hessfunc.graph.capture import LOSS_DECOMPOSITIONS, capture, run_nodes
from hessfunc.graph.chain import graph_chain
from hessfunc.graph.curvature import GraphPlan, _cache, _plan_own_losses, plan_diagonal
from hessfunc.graph.samples import Value, analyze_samples
from hessfunc.testing.models import ConcatNet, ResidualMLP, TiedNet, build_mlp
from hessfunc.testing.strategies import losses

F64 = torch.float64


def _oracle_diag(f, params, *batch):
    with second_order_kernels():
        loss, leaves = oracle_loss(f, params, *batch)
        return hf.reference.hessian_diag(loss, leaves)


def _plain(model, loss_fn):
    """f written the torch.func way, not by functionalize."""
    return lambda p, x, y: loss_fn(functional_call(model, p, (x,)), y)


def _params(model, skip=()):
    return {k: v.detach() for k, v in model.named_parameters() if k not in skip}


# ---- DAGs drawn by hypothesis ------------------------------------------------------

@st.composite
def _dags(draw):
    kind = draw(st.sampled_from(["residual", "concat", "mlp", "tied"]))
    act = draw(st.sampled_from(["tanh", "sigmoid", "softplus", "gelu", "silu", "sin"]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if kind == "residual":
        model = ResidualMLP(3, draw(st.integers(2, 5)), draw(st.integers(1, 2)),
                            draw(st.integers(1, 4)), activation=act)
    elif kind == "concat":
        model = ConcatNet(3, draw(st.integers(2, 4)), draw(st.integers(1, 4)), activation=act)
    elif kind == "tied":
        model = TiedNet(3, draw(st.integers(2, 4)), activation=act)
    else:
        model = build_mlp([3, *draw(st.lists(st.integers(2, 5), min_size=1, max_size=3)),
                           draw(st.integers(1, 4))], act, seed)
    return kind, model.double()


def _outputs(model):
    with torch.no_grad():
        return model(torch.zeros(1, 3, dtype=F64)).shape[1]


def _targets(loss, n, c):
    if loss.targets == "class":
        return torch.randint(0, c, (n,))
    if loss.targets == "binary":
        return torch.randint(0, 2, (n, c)).to(F64)
    return torch.randn(n, c, dtype=F64)


def _drawn_loss(model, data, penalty):
    """A drawn loss of ``model``'s outputs on 2-6 samples, a drawn frozen subset and,
    half the time, ``1e-2 * sum(penalty(w))`` over the parameters: ``(f, loss, params,
    x, y, frozen, decay)``."""
    loss = data.draw(losses(num_outputs=_outputs(model)))
    n = data.draw(st.integers(2, 6))
    x = torch.randn(n, 3, dtype=F64)
    y = _targets(loss, n, _outputs(model))
    names = [k for k, _ in model.named_parameters()]
    frozen = set(data.draw(st.lists(st.sampled_from(names), max_size=len(names) - 1,
                                    unique=True)))
    decay = data.draw(st.sampled_from([0.0, 1e-2]))

    def f(p, x, y):
        out = loss.fn(functional_call(model, p, (x,)), y)
        return out + decay * sum(penalty(w).sum() for w in p.values()) if decay else out

    return f, loss, _params(model, frozen), x, y, frozen, decay


@settings(deadline=None)
@given(dag=_dags(), data=st.data())
def test_diagonal_of_any_dag_equals_the_oracle(dag, data):
    """Skip connections, concatenations, tied weights, every activation, every loss,
    frozen subsets, weight decay: the diagonal of the torch.func-style f equals the loop
    oracle to rounding, and the functionalize model gives the same numbers to rounding."""
    kind, model = dag
    f, loss, params, x, y, frozen, decay = _drawn_loss(model, data, lambda w: w ** 2)
    truth = _oracle_diag(f, params, x, y)
    assert_close(hf.hessian_diag(f)(params, x, y), truth)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    if kind == "tied" and "enc.weight" not in frozen:
        assert plan.products  # used twice: one-hot products for that weight
    if not frozen and not decay:
        g, all_params = hf.functionalize(model, loss.fn)
        # to rounding: a tied weight's rows are batched or looped by measurement (NOTE
        # [batched or looped products]), and the two differ in the last bit
        assert_close(hf.hessian_diag(g)(all_params, x, y), hf.hessian_diag(f)(all_params, x, y),
                     scale=1e-3)


def _oracle_blocks(f, params, *batch):
    with second_order_kernels():
        loss, leaves = oracle_loss(f, params, *batch)
        return hf.reference.hessian_blocks(loss, leaves)


def _graph_blocks(f, params, *batch):
    """The captured graph's own blocks (None where a leaf takes Hessian rows)."""
    plan, why = plan_diagonal(f, (params, *batch))
    assert plan is not None, why
    return dict(zip(params, plan.blocks(), strict=True)), plan


@settings(deadline=None)
@given(dag=_dags(), data=st.data())
def test_blocks_of_any_dag_equal_the_oracle(dag, data):
    """Each parameter's own Hessian block from the curvature at its place in the graph:
    skip connections, concatenations, every activation and loss, frozen subsets and a
    separable regulariser, against the loop oracle; only a tied weight takes rows."""
    _, model = dag
    f, _, params, x, y, _, _ = _drawn_loss(model, data, torch.cosh)
    truth = _oracle_blocks(f, params, x, y)
    blocks, plan = _graph_blocks(f, params, x, y)
    rows = {k for i, k in enumerate(params) if i in plan.products}
    assert rows <= {"enc.weight"}
    assert_close({k: b for k, b in blocks.items() if k not in rows},
                 {k: b for k, b in truth.items() if k not in rows})
    assert_close(hf.hessian_blocks(f)(params, x, y), truth)


@settings(deadline=None)
@given(dag=_dags(), data=st.data())
def test_full_hessian_of_any_dag_equals_the_oracle(dag, data):
    """The full Hessian of a chain comes from the chain read off the graph (NOTE [chains
    from the graph]); of any other DAG, the largest leaf's block from the graph and the
    rest from the other leaves' Hessian rows (their rows hold every cross block): against
    the loop oracle's full Hessian, over drawn DAGs, losses, frozen subsets and a
    regulariser."""
    _, model = dag
    f, _, params, x, y, _, _ = _drawn_loss(model, data, torch.cosh)
    chain = graph_chain(f, (params, x, y), 0)[0]
    chain = chain is not None and chain.per_sample_blocks()
    with second_order_kernels():
        loss, leaves = oracle_loss(f, params, x, y)
        truth = hf.reference.hessian(loss, list(leaves.values()))
    plan, _ = plan_diagonal(f, (params, x, y))
    largest = max((i for i in range(len(params)) if i not in plan.products),
                  key=lambda i: list(params.values())[i].numel(), default=None)
    calls = []
    blocks = GraphPlan.blocks

    def spy(self, leaves=None):
        calls.append(leaves)
        return blocks(self, leaves)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(GraphPlan, "blocks", spy)
        H = hf.hessian(f, flat=True)(params, x, y)
    assert calls == ([] if largest is None or chain else [{largest}])
    assert_close(H, truth)
    a, b = list(params)[-1], list(params)[0]  # a cross block, nested like torch.func's
    na, nb = params[a].numel(), params[b].numel()
    assert_close(hf.hessian(f)(params, x, y)[a][b].reshape(na, nb), truth[-na:, :nb])


def test_full_hessian_of_a_torch_func_chain_takes_the_chain(monkeypatch):
    """A chain written the torch.func way gets the chain route's full Hessian (NOTE [full
    Hessian]) from the graph's chain, as a functionalize model does: equal to the
    oracle; with a coupling loss (no per-sample blocks) the graph's block and rows."""
    from hessfunc.graph.chain_plan import ChainPlan

    torch.manual_seed(0)
    model = build_mlp([3, 4, 4, 2], "softplus", 0).double()
    params = _params(model)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    full, real = [], ChainPlan.full
    monkeypatch.setattr(ChainPlan, "full", lambda self, *a: full.append(1) or real(self, *a))
    for loss_fn, chained in ((F.mse_loss, True), (lambda o, t: ((o - t).sum()) ** 2, False)):
        f = _plain(model, loss_fn)
        with second_order_kernels():
            loss, leaves = oracle_loss(f, params, x, y)
            truth = hf.reference.hessian(loss, list(leaves.values()))
        full.clear()
        assert_close(hf.hessian(f, flat=True)(params, x, y), truth)
        assert full == ([1] if chained else [])


def test_blocks_in_sample_chunks(monkeypatch):
    """The closed-form blocks of Linear and convolution weights summed over chunks of
    samples (a budget of one sample per chunk) equal the oracle; a site whose Jacobian
    columns would not fit that budget takes Hessian rows."""
    import hessfunc.graph.curvature as curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Softplus(), nn.Flatten(),
                          nn.Linear(12, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x, y = torch.randn(4, 2, 4, dtype=F64), torch.randn(4, 2, dtype=F64)
    f = _plain(model, F.mse_loss)
    params = _params(model)
    truth = _oracle_blocks(f, params, x, y)
    monkeypatch.setattr(curvature, "CHUNK_BUDGET_BYTES", 8)
    blocks, plan = _graph_blocks(f, params, x, y)
    assert list(plan.chunks(4, 1)) == [slice(i, i + 1) for i in range(4)]
    assert all(b is not None for b in blocks.values())
    assert_close(blocks, truth)

    def g(p, x, y):  # a scale: a generic site, its Jacobian columns over the budget
        return F.mse_loss(functional_call(model, p, (x,)) * p["scale"], y)

    scaled = {**params, "scale": torch.tensor([0.5, -2.0], dtype=F64)}
    fits, plan = _graph_blocks(g, scaled, x, y)
    assert not plan.products and fits["scale"] is None and fits["3.weight"] is not None
    assert_close(hf.hessian_blocks(g)(scaled, x, y), _oracle_blocks(g, scaled, x, y))


# ---- architectures users bring ---------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.tanh(self.bn(self.conv(x)))


class _TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = _Block(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.stem(x))).mean((2, 3)))


class _TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 7)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens))).flatten(0, 1)


def _lm_loss(out, y):
    return F.cross_entropy(out, y.flatten())


ARCHITECTURES = {
    "resnet-bn-eval": (lambda: _TinyResNet().eval(), lambda n: torch.randn(n, 2, 4, 4),
                       lambda n: torch.randint(0, 3, (n,)), F.cross_entropy),
    "transformer": (lambda: _TinyTransformer().eval(), lambda n: torch.randint(0, 7, (n, 5)),
                    lambda n: torch.randint(0, 7, (n, 5)), _lm_loss),
    "layernorm-mlp": (lambda: nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.GELU(),
                                            nn.Linear(5, 2)),
                      lambda n: torch.randn(n, 3), lambda n: torch.randn(n, 2), F.mse_loss),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Softplus(),
                                     nn.Flatten(), nn.Linear(9, 2)),
               lambda n: torch.randn(n, 2, 6), lambda n: torch.randn(n, 2), F.mse_loss),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_take_the_graph_route_exactly(name):
    make, inputs, targets, loss_fn = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = make().double()
    x, y = inputs(3), targets(3)
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    f = _plain(model, loss_fn)
    params = _params(model)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    blocks, plan = _graph_blocks(f, params, x, y)
    truth = _oracle_blocks(f, params, x, y)
    rows = {k for i, k in enumerate(params) if i in plan.products}
    assert len(rows) <= 1 and all(blocks[k] is not None for k in params if k not in rows)
    assert_close({k: b for k, b in blocks.items() if k not in rows},
                 {k: b for k, b in truth.items() if k not in rows})
    assert_close(hf.hessian_blocks(f)(params, x, y), truth)
    with second_order_kernels():  # the full Hessian: the largest block and the other rows
        loss, leaves = oracle_loss(f, params, x, y)
        full = hf.reference.hessian(loss, list(leaves.values()))
    assert_close(hf.hessian(f, flat=True)(params, x, y), full)


def test_batchnorm_in_training_is_refused_with_the_op_and_still_exact():
    """Batch statistics couple the samples: the proof stops at the op (named, with the
    line), method='structured' raises, the default route is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    model = model.double()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    f = _plain(model, F.mse_loss)
    params = _params(model)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is None and "var_mean" in why and "batch axis" in why
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hf.ArgumentError, match="var_mean.*batch axis"):
        hf.hessian_diag(f, method="structured")(params, x, y)
    got = hf.hessian_diag(f)(params, x, y)
    model.load_state_dict(state)  # the running statistics moved in every forward pass
    assert_close(got, _oracle_diag(f, params, x, y))


@pytest.mark.parametrize(("name", "loss", "op"), [
    ("log of the mean", lambda o, y: torch.log(F.mse_loss(o, y)), "log"),
    ("centred outputs", lambda o, y: F.mse_loss(o - o.mean(0), y), "sub"),
    ("square of a sum", lambda o, y: ((o - y).sum()) ** 2, "pow"),
    ("softmax over the batch", lambda o, y: (F.softmax(o, dim=0) * y).sum(), "amax"),
    ("max over samples", lambda o, y: ((o - y) ** 2).amax(), "amax"),
])
def test_losses_that_couple_samples_are_refused(name, loss, op):
    """Nothing is probed numerically: a loss coupling samples by any amount is refused,
    with the op, and the default route stays exact."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 2], "tanh", 0).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.rand(4, 2, dtype=F64)
    f = _plain(model, loss)
    params = _params(model)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is None and why.startswith(op), why
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))


def test_weakly_coupled_loss_is_refused_not_approximated():
    """A coupling of 1e-9 relative, which a random probe in float32 cannot see."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 1], "tanh", 0).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64)
    f = lambda p, x, y: (F.mse_loss(functional_call(model, p, (x,)), y)  # noqa: E731
                         + 1e-9 * functional_call(model, p, (x,)).sum() ** 2)
    params = _params(model)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is None and "pow" in why
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))


def test_parameter_routes_are_named():
    """A tied weight and a non-separable regulariser take one-hot products (said per
    parameter); the rest take the graph; with method='structured' the call names them."""
    torch.manual_seed(0)
    model = TiedNet(3, 4).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)

    def f(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y) + p["dec_bias"].norm()

    with torch.no_grad():
        model.dec_bias.normal_()  # the norm is not twice differentiable at 0
    params = _params(model)
    plan, _ = plan_diagonal(f, (params, x, y))
    names = list(params)
    routes = {names[i]: why for i, why in plan.products.items()}
    assert "used at 2 places" in routes["enc.weight"]
    assert "linalg_vector_norm" in routes["dec_bias"]
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    with pytest.raises(hf.ArgumentError, match="parameter 'enc.weight' used at 2 places"):
        hf.hessian_diag(f, method="structured")(params, x, y)
    report = hf.explain(f, params, x, y)
    assert report["hessian_diag"].engine == "captured graph"
    assert set(report.parameters) == {"enc.weight", "dec_bias"}
    assert "parameter 'enc.weight': one-hot products, used at 2 places" in str(report)


def test_explain_names_every_route():
    """A functionalize chain: structured everywhere; the same network as a torch.func
    function: the diagonal, the blocks and the full Hessian from the captured graph, the
    products from the chain read off it; with a weight decay the products and the full
    Hessian take the chain too, with the decay's own curvature; BatchNorm in training:
    the op that stops the graph."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 1], "tanh", 0).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64)
    g, params = hf.functionalize(model, nn.MSELoss())
    chain = hf.explain(g, params, x, y)
    assert {r.name for r in chain.routes} == {"structured"}
    plain = hf.explain(_plain(model, F.mse_loss), params, x, y)
    assert plain["hessian_diag"].engine == "captured graph" and not plain.parameters
    assert plain["hessian_diag(per_sample=True)"].engine == "captured graph"
    products = plain["hvp, hvp_fn, HessianOperator"]
    assert products.name == "structured" and "captured graph" in products.engine
    assert plain["hessian_blocks"].engine == "captured graph"
    assert plain["hessian"].engine == "chain in the captured graph"
    assert {r.name for r in plain.routes} == {"structured"}

    def decayed(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y) + 1e-3 * (p["0.weight"] ** 2).sum()

    report = hf.explain(decayed, params, x, y)
    products = report["hvp, hvp_fn, HessianOperator"]
    assert products.name == "structured" and "captured graph" in products.engine
    assert report["hessian"].engine == "chain in the captured graph"
    coupled = hf.explain(_plain(model, lambda o, t: ((o - t).sum()) ** 2), params, x, y)
    assert coupled["hvp, hvp_fn, HessianOperator"].name == "structured"
    assert "a chain, but its loss's Hessian is not kept per sample (not proved a sum over " \
        "samples, or over the memory budget)" in coupled["hessian"].why
    conv = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 1)).double()
    report = hf.explain(_plain(conv, F.mse_loss), _params(conv), x[:, None, :], y)
    assert "a chain with steps other than Linear layers, elementwise maps, per-feature " \
        "scales and softmaxes or normalisations over features (convolutions, views, " \
        "pooling, statistics over the batch), which the full Hessian's backpropagation " \
        "has no rule for" in report["hessian"].why
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    report = hf.explain(_plain(bn, F.mse_loss), _params(bn), x, y)
    assert report["hessian_diag"].name == "generic"
    assert "var_mean" in report["hessian_diag"].why and "batch axis" in str(report)


def _gaussian_nll(o, t):
    return F.gaussian_nll_loss(o[:, :1], t, F.softplus(o[:, 1:]) + 1e-3)  # checks var < 0


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 1)

    def forward(self, x):
        h = self.l(x)
        if h.sum() > 0:  # a Python branch on a value
            return h
        return -h


def test_a_unit_scaling_reads_as_its_operand_only_where_exact():
    """``t * 1`` (vmap's rule for addmm scales the bias by its beta) reads as ``t``, so a
    bias so scaled is still its layer's site; an integer tensor times ``1.0`` is a cast
    and stays. The values are the function's."""
    aten = torch.ops.aten

    def fn(b, i):
        return aten.mul.Scalar(b, 1) + aten.mul.Scalar(i, 1.0) + aten.mul.Scalar(b, 2)

    b, i = torch.randn(3, dtype=F64), torch.arange(3)
    gm = capture(fn, (b, i), "test").graph_module
    scalings = [nd.args[1] for nd in gm.graph.nodes if nd.target is aten.mul.Scalar]
    assert sorted(scalings) == [1.0, 2]
    torch.testing.assert_close(gm(b, i), fn(b, i))


def test_a_failed_capture_names_the_op_and_the_line_of_the_users_code():
    """explain, and method='structured', say why f could not be captured and where:
    the torch function that read a value (gaussian_nll_loss checking its variance), the
    line of the user's code that called it, a branch in a module's forward, .item() in
    f; the numbers still come from the generic route."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 2], "tanh", 0).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    here = re.escape(__file__)

    def branchy(p, x, y):
        loss = F.mse_loss(functional_call(model, p, (x,))[:, :1], y)
        return loss if loss.item() < 1e3 else loss / 2

    g_gated, p_gated = hf.functionalize(_Gated().double(), nn.MSELoss())
    cases = [
        (*hf.functionalize(model, _gaussian_nll),
         r"in torch\.nn\.functional\.gaussian_nll_loss \(`.*var < 0.*`\), called at "
         + here + r":\d+ in _gaussian_nll \(`return F\.gaussian_nll_loss"),
        (branchy, _params(model),
         r"at " + here + r":\d+ in branchy \(`return loss if loss\.item\(\) < 1e3"),
        (g_gated, p_gated, r"at " + here + r":\d+ in forward \(`if h\.sum\(\) > 0:"),
    ]
    for f, params, where in cases:
        why = r"f could not be captured as a graph: Python reads a tensor's value .*" + where
        report = hf.explain(f, params, x, y)
        for route in ("hessian_diag", "hvp, hvp_fn, HessianOperator", "hessian"):
            assert re.search(why, report[route].why), (route, report[route].why)
        with pytest.raises(hf.ArgumentError, match=r"method='structured' does not apply "
                                                   r"here: " + why):
            hf.hessian_diag(f, method="structured")(params, x, y)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        truth = hf.reference.hessian_diag(f(leaves, x, y), leaves)
        got = hf.hessian_diag(f)(params, x, y)
        for k in params:
            torch.testing.assert_close(got[k], truth[k], rtol=1e-10, atol=1e-12)


def test_an_in_place_write_left_after_functionalization_is_refused():
    """Circular padding writes the padded tensor by ``copy_`` into its slices, which
    functionalization leaves in the graph; its functional twin would drop the write
    (the graph then saw an uninitialised tensor). The capture is refused, naming the op;
    an in-place view op (metadata only) is still rewritten."""
    x = torch.randn(2, 1, 3, 3, dtype=F64)

    def padded(x):
        return (F.pad(x, (1, 1, 1, 1), mode="circular") ** 2).sum()

    with pytest.raises(RuntimeError, match=r"copy_\.default( at .*)? writes into a tensor "
                                           r"that is read later"):
        capture(padded, (x,), "test")
    v = torch.randn(3, dtype=F64)
    captured = capture(lambda w: torch.tanh(w @ x[0, 0]).sum(), (v,), "test")  # squeeze_
    assert_close(captured.graph_module(v), torch.tanh(v @ x[0, 0]).sum())
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Tanh(),
                          nn.Flatten(), nn.Linear(18, 1)).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    y = torch.randn(2, 1, dtype=F64)
    why = hf.explain(f, params, x, y)["hessian_diag"].why
    assert re.search(r"could not be captured as a graph: RuntimeError: copy_\.default", why)
    loss, leaves = oracle_loss(f, params, x, y)
    truth = hf.reference.hessian_diag(loss, leaves)
    assert_close(hf.hessian_diag(f)(params, x, y), truth)


# ---- the batch-axis rules, each against a dense Jacobian ------------------------------

N = 3
RULES = {
    "reshape-merge": (lambda x: x.reshape(N * 4, 2).tanh().reshape(N, 8), (N, 4, 2)),
    "sequence-first": (lambda x: x.transpose(0, 1).reshape(4 * N, 2).sin()
                       .reshape(4, N, 2).transpose(0, 1).reshape(N, 8), (N, 4, 2)),
    "permute": (lambda x: x.permute(2, 0, 1).exp().permute(1, 2, 0).reshape(N, 8),
                (N, 4, 2)),
    "expand": (lambda x: (x[:, None, :].expand(N, 2, 4) * 1.5).reshape(N, 8), (N, 4)),
    "reduce-inner": (lambda x: x.pow(2).sum(-1, keepdim=True).expand(N, 4, 2)
                     .reshape(N, 8), (N, 4, 2)),
    "bmm": (lambda x: torch.bmm(x, x.transpose(1, 2)).reshape(N, 16), (N, 4, 2)),
    "cat": (lambda x: torch.cat([x, x.sin()], dim=1), (N, 4)),
    "stack": (lambda x: torch.stack([x, x.cos()], dim=0).transpose(0, 1).reshape(N, 8),
              (N, 4)),
    "transpose of a matrix": (lambda x: (x.reshape(N, 8).t() * 2.0).t().cos(), (N, 4, 2)),
    "softmax": (lambda x: F.softmax(x, dim=-1), (N, 4)),
    "layer-norm": (lambda x: F.layer_norm(x, (4,)), (N, 4)),
    "sums over an axis before the samples": (
        lambda x: x.transpose(0, 1).sin().sum(0) * x.transpose(0, 1).cos().sum(
            0, keepdim=True)[0], (N, 4, 2)),
    "factories": (lambda x: x * x.new_ones(N, 4) + torch.ones_like(x) * x.sin(), (N, 4)),
    "variance, maximum, mean and its pair over features": (
        lambda x: x.var(-1, keepdim=True) * x - x.amax(-1, keepdim=True)
        + torch.var_mean(x, -1, keepdim=True)[1] * x.std(1, keepdim=True), (N, 4)),
    "matrix on the left": (lambda x: (torch.linspace(-1, 1, 16, dtype=F64).reshape(4, 4)
                                      @ x.T).T.tanh(), (N, 4)),
    "slices, selections and padding of features": (
        lambda x: torch.cat([x[:, 1:], x.narrow(1, 0, 1) * x.select(1, 2)[:, None],
                             F.pad(x, (1, 0))[:, :1]], 1), (N, 4)),
    "gather and index_select of features": (
        lambda x: x.gather(1, torch.tensor([[3, 0, 1, 2]] * N)) * x.index_select(
            1, torch.tensor([1, 1, 0, 3])), (N, 4)),
    "where and integer masks": (lambda x: torch.where(x > 0, x, 0.1 * x) * (
        1.0 + (x.argmax(-1, keepdim=True) == 0)), (N, 4)),
    "a per-sample bias in addmm": (lambda x: torch.addmm(x.cos(), x, torch.linspace(
        -1, 1, 16, dtype=F64).reshape(4, 4)).tanh(), (N, 4)),
    "convolution": (lambda x: F.conv1d(x[:, None], torch.ones(2, 1, 2, dtype=F64)
                                       ).flatten(1)[:, :4].tanh(), (N, 4)),
}


def _rows(x):
    """(N, 4) -> (2N, 2), sample n in rows 2n and 2n + 1: the layout (1, 2)."""
    return x.reshape(2 * N, 2)


def _sequence_rows(x):
    """(N, 4) -> (2N, 2) sequence-first, sample n in rows n and N + n: the layout (2, 1)."""
    return x.reshape(N, 2, 2).transpose(0, 1).reshape(2 * N, 2)


def _from_sequence_rows(y):
    return y.reshape(2, N, -1).transpose(0, 1).reshape(N, -1)


_M = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=F64)
# samples interleaved with other positions on the batch axis, through every rule that
# must carry that layout along
RULES.update({
    "padding, slices and selections of sequence-first rows": (lambda x: _from_sequence_rows(
        F.pad(_sequence_rows(x), (1, 0))[:, 1:] * _sequence_rows(x).narrow(1, 0, 1)
        + _sequence_rows(x).select(1, 1)[:, None]), (N, 4)),
    "cat, stack and reductions of sequence-first rows": (lambda x: _from_sequence_rows(
        torch.cat([_sequence_rows(x),
                   torch.stack([_sequence_rows(x).sum(1), _sequence_rows(x).amax(1)], 1),
                   torch.stack([_sequence_rows(x).sin(), _sequence_rows(x)]).mean(0)], 1)),
        (N, 4)),
    "an embedding, a gather and index_select of sequence-first rows": (
        lambda x: _from_sequence_rows(
            F.embedding((_sequence_rows(x)[:, 0] > 0).long(), _M) * _sequence_rows(x)
            + _sequence_rows(x).gather(1, (_sequence_rows(x) < 0).long())
            * _sequence_rows(x).index_select(1, torch.tensor([1, 0]))), (N, 4)),
    "factories of sequence-first rows": (lambda x: _from_sequence_rows(
        _sequence_rows(x) * torch.ones_like(_sequence_rows(x))
        + torch.full_like(_sequence_rows(x), 2.0) * _sequence_rows(x).sin()
        + _sequence_rows(x).new_ones(2 * N, 2) + _M[0] * _sequence_rows(x)), (N, 4)),
    "the transpose of a vector": (lambda x: x.sum(1).t()[:, None] * x, (N, 4)),
    "stack at a negative dim": (lambda x: torch.stack([x, x.sin()], dim=-3).transpose(0, 1)
                                .reshape(N, 8), (N, 4)),
    "a row and a column of factories": (lambda x: x * torch.ones_like(x)[0]
                                        + x * torch.ones_like(x.T)[:, 0], (N, 4)),
    "integer masks of a transpose": (lambda x: (x.T * (x.T > 0)).T, (N, 4)),
    "constants that mix samples": (lambda x: x * ((x > 0).double().T @ (x > 0).double()
                                                 ).sum(), (N, 4)),
    "bmm with the samples on the right": (lambda x: torch.bmm(
        torch.linspace(-1, 1, 8 * N, dtype=F64).reshape(N, 2, 4), x[:, :, None]).flatten(1),
        (N, 4)),
    "split, chunk and unbind of features": (lambda x: torch.cat([
        x.split(1, dim=1)[3] * x.chunk(2, dim=-1)[0], x.split([3, 1], 1)[0][:, 1:].sin(),
        torch.stack(x.reshape(N, 2, 2).unbind(2), 1).reshape(N, 4)], 1), (N, 4)),
    "split and unbind of sequence-first rows": (lambda x: _from_sequence_rows(
        _sequence_rows(x).split(1, dim=1)[1] * _sequence_rows(x)
        + torch.stack(_sequence_rows(x)[None].expand(2, 2 * N, 2).unbind(0)).mean(0)
        + torch.stack(_sequence_rows(x).T.unbind(0), 1).cos()), (N, 4)),
    "matrix products, addmm and a convolution of rows": (lambda x: (
        (_rows(x) @ _M).tanh() + (_M @ _rows(x).T).T
        * F.conv1d(_rows(x)[:, None], _M[None, :1]).flatten(1)
        + torch.addmm(_rows(x).cos(), _rows(x), _M)
        + torch.bmm(_rows(x)[:, :, None], _rows(x)[:, None, :1]).flatten(1)).reshape(N, 4),
        (N, 4)),
})


def _proved(loss, w, x):
    """``loss(w, x)`` captured, and the proof's labels with ``w`` the parameter and ``x``
    the batch (axis 0): ``(graph module, structure)``."""
    gm = capture(loss, (w, x), "t", LOSS_DECOMPOSITIONS).graph_module
    return gm, analyze_samples(gm, {0}, {1: 0}, N)


@pytest.mark.parametrize("name", list(RULES))
def test_batch_axis_rules_match_the_dense_jacobian(name):
    """Each rule says the output is per-sample along axis 0: the dense Jacobian of the
    traced function is then zero between different samples, and non-zero within."""
    fn, shape = RULES[name]
    w = torch.randn(shape[1:], dtype=F64)
    x = torch.randn(shape, dtype=F64)
    g = lambda w, x: fn(x * w)  # noqa: E731  the parameter makes every value live
    _, structure = _proved(lambda w, x: g(w, x).sum(), w, x)
    assert structure.reason is None
    J = torch.autograd.functional.jacobian(lambda x: g(w, x), x)  # (N, ..., N, ...)
    J = J.reshape(N, -1, N, x[0].numel())
    for n in range(N):
        for m in range(N):
            block = J[n, :, m]
            assert (block.abs().max() > 0) == (n == m)


#: rules where a value of the parameters alone meets the samples' constants
_PARAMETERS_MEET_SAMPLES = {
    "a parameter gathered by each sample's index": (
        lambda w, x: w.expand(N, 4).gather(1, (x > 0).long()) * x, (N, 4)),
    "a parameter's rows looked up by each sample's indices": (
        lambda w, x: F.embedding((x > 0).long(), w.reshape(2, 2)).sum(-1) * x, (N, 4)),
}


@pytest.mark.parametrize("name", list(RULES) + list(_PARAMETERS_MEET_SAMPLES))
def test_every_label_of_the_proof_holds_on_the_values(name):
    """Every node's label against the traced values themselves: a constant does not move
    when the parameters do; with the constants held (they may mix samples freely), a live
    value without a batch axis that is not a sum over samples does not move when the data
    do, and a value with a batch axis, of the length its layout says, moves only in the
    positions its layout gives sample k when only sample k's data move."""
    if name in RULES:
        fn, shape = RULES[name]
        g = lambda w, x: fn(x * w)  # noqa: E731
    else:
        g, shape = _PARAMETERS_MEET_SAMPLES[name]
    torch.manual_seed(1)
    w, x = torch.randn(shape[1:], dtype=F64), torch.randn(shape, dtype=F64)
    gm, structure = _proved(lambda w, x: g(w, x).sum(), w, x)
    assert structure.reason is None
    base = run_nodes(gm, [w, x])
    w_moved = run_nodes(gm, [w + 1e-6 * torch.randn_like(w), x])
    labels = structure.values

    def hold_constants(node, value):
        label = labels.get(node)
        return base[node] if isinstance(label, Value) and not label.live else value

    x_moved = []
    for k in range(N):
        dx = torch.zeros_like(x)
        dx[k] = torch.randn_like(x[k])
        x_moved.append(run_nodes(gm, [w, x + dx], hold_constants))
    per_sample = 0
    for node, label in labels.items():
        value = base[node]
        if not (isinstance(label, Value) and isinstance(value, torch.Tensor)
                and value.is_floating_point()):
            continue
        if not label.live:
            assert torch.equal(w_moved[node], value), node
        if label.axis is None:
            if label.live and not label.aggregate:
                assert all(torch.equal(env[node], value) for env in x_moved), node
            continue
        size = label.size(N)
        assert value.shape[label.axis] == size, (node, label)
        owner = (torch.arange(size) // label.layout[1]) % N
        for k, env in enumerate(x_moved):
            change = (env[node] - value).abs().movedim(label.axis, 0).reshape(size, -1)
            assert not change[owner != k].any(), (node, label, k)
        per_sample += label.live
    assert per_sample >= 1


def test_a_function_that_returns_per_sample_values_is_not_a_loss():
    """``f`` returning a value per sample is refused: not a scalar loss."""
    _, structure = _proved(lambda w, x: (x * w).tanh().sum(1), torch.randn(4, dtype=F64),
                           torch.randn(N, 4, dtype=F64))
    assert structure.reason == "f does not return a scalar loss"


_NO_RULE = "has no batch-axis rule for these operands (or mixes samples)"
_COMBINES = ("combines a sum over samples with per-sample values, so samples interact (e.g. "
             "BatchNorm's batch statistics in training)")
_SELECTS = "selects along the batch axis"
_NON_LINEAR = ("is applied to a sum over samples non-linearly, so the loss is not a sum of "
               "per-sample terms")


@pytest.mark.parametrize(("name", "data", "pooled"), [
    ("the batch's mean taken off", lambda x: x - x.mean(0), True),
    ("one sample's row for all", lambda x: x * x[0], True),
    ("the samples flipped, added", lambda x: x + x.flip(0), True),
    ("the batch's sum of squares", lambda x: x / (x ** 2).sum(), True),
    ("a mask from the batch's mean", lambda x: x * (x.mean(0) > 0), True),
    ("each sample's own mean taken off", lambda x: x - x.mean(1, keepdim=True), False),
    ("scaled and shifted", lambda x: 2.0 * x + 1.0, False),
    ("a fresh constant of its dtype", lambda x: x + x.new_zeros(()), False),
    ("zeros like it", lambda x: x + torch.zeros_like(x), False),
    # a shared table read at each sample's indices (a class weight per target, as vmap
    # writes a weighted cross-entropy): each sample's own values
    ("a table gathered at each sample's index", lambda x: x * torch.linspace(
        1.0, 2.0, 4, dtype=F64).expand(N, 4).gather(1, (x > 0).long()), False),
    ("a table gathered at the batch's index", lambda x: x * torch.linspace(
        1.0, 2.0, 4, dtype=F64).expand(N, 4).gather(1, (x.mean(0) > 0).long().expand(N, 4)),
     True),
])
def test_constants_from_several_samples_are_pooled(name, data, pooled):
    """NOTE [per-sample structure]: a constant computed from the data of several samples,
    and what is computed from it, is pooled (the batch's Hessian is still a sum over
    samples, but one sample or part of the batch alone would compute other values)."""
    w = torch.randn(4, dtype=F64)
    x = torch.randn(N, 4, dtype=F64)
    gm, structure = _proved(lambda w, x: torch.tanh(data(x) * w).sum(), w, x)
    assert structure.reason is None
    (tanh,) = [nd for nd in gm.graph.nodes if nd.target is torch.ops.aten.tanh.default]
    label = structure.values[tanh]
    assert label.per_sample and label.pooled == pooled


@pytest.mark.parametrize(("name", "fn", "op", "why"), [
    ("contract the batch", lambda x: x.T @ x, "mm.default", _NO_RULE),
    ("samples on two axes", lambda x: x[:, :, None] * x.T[None], "mul.Tensor", _NO_RULE),
    ("a bias with samples on another axis", lambda x: torch.addmm(
        (x[:, :1] * x.new_ones(N, N)).T, x, x.new_ones(4, N)), "addmm.default", _NO_RULE),
    ("convolve with samples as kernels", lambda x: F.conv1d(x[:, None], x[:, None, :2]),
     "convolution.default", _NO_RULE),
    ("samples on two axes, stacked", lambda x: torch.stack([x[:, :1] * x.new_ones(N, N),
                                                             (x[:, :1] * x.new_ones(N, N)).T]),
     "stack.default", _NO_RULE),
    ("sum over the batch, then use", lambda x: x - x.mean(0), "sub.Tensor", _COMBINES),
    ("slice samples", lambda x: x[1:], "slice.Tensor", _SELECTS),
    ("roll samples", lambda x: torch.cat([x[1:], x[:1]]), "slice.Tensor", _SELECTS),
    ("flatten sequence-first wrongly", lambda x: x.reshape(-1)[:N * 4].reshape(4, N).T,
     "slice.Tensor", _SELECTS),
    ("maximum over the batch", lambda x: x * x.amax(0), "amax.default",
     "reduces over the batch axis non-linearly, so samples interact"),
    ("a sum over samples, then tanh", lambda x: x.sum(0), "tanh.default", _NON_LINEAR),
    ("a sum over samples times another", lambda x: x.sum(0) * x.mean(0), "mul.Tensor",
     "multiplies or divides a sum over samples by a value that depends on the parameters"),
    ("a sum over samples times itself", lambda x: (lambda s: s * s)(x.sum(0)), "mul.Tensor",
     "multiplies or divides a sum over samples by a value that depends on the parameters"),
    ("a sum over samples divided by itself", lambda x: (lambda s: s / s)(x.sum(0)),
     "div.Tensor",
     "multiplies or divides a sum over samples by a value that depends on the parameters"),
    ("a constant divided by a sum over samples", lambda x: 2.0 / x.sum(0),
     "reciprocal.default", _NON_LINEAR),
    ("concatenate samples", lambda x: torch.cat([x, x], 0), "cat.default",
     "concatenates along the batch axis"),
    ("select a sample", lambda x: x[0], "select.int", _SELECTS),
    ("convolve across samples", lambda x: F.conv1d(x.T[None], torch.ones(1, 4, 2, dtype=F64)),
     "convolution.default", _NO_RULE),
    ("contract the batch with a constant", lambda x: x.T @ x.new_ones(N, 2), "mm.default",
     _NO_RULE),
    ("samples on both sides of a product", lambda x: x @ x.T, "mm.default", _NO_RULE),
    ("a per-sample vector as the bias of addmm", lambda x: torch.addmm(
        x.sum(1), x, x.new_ones(4, N)), "addmm.default", _NO_RULE),
    ("look up rows of the samples", lambda x: F.embedding(torch.tensor([[0, 1]]), x),
     "embedding.default", _NO_RULE),
    ("pad the batch axis", lambda x: F.pad(x, (0, 1, 1, 0)), "constant_pad_nd.default",
     _NO_RULE),
    ("pad the batch axis of a transpose", lambda x: F.pad(x.T, (1, 0)),
     "constant_pad_nd.default", _NO_RULE),
    ("gather fewer rows than samples", lambda x: x.gather(
        1, torch.zeros(N - 1, 4, dtype=torch.long)), "gather.default", _NO_RULE),
    ("flip the samples", lambda x: x.flip(0), "flip.default", _NO_RULE),
    ("the mantissas of the samples", lambda x: torch.frexp(x)[0], "frexp.Tensor", _NO_RULE),
    ("contract the samples from the left", lambda x: x.new_ones(2, N) @ x, "mm.default",
     _NO_RULE),
    ("split the samples", lambda x: torch.cat(x.split([1, N - 1])[::-1]),
     "split_with_sizes.default", "splits along the batch axis"),
    ("chunk the samples", lambda x: x.chunk(N)[0] * x, "split.Tensor",
     "splits along the batch axis"),
    ("unbind the samples", lambda x: torch.stack(x.unbind(0)[::-1]), "unbind.int",
     "splits along the batch axis"),
    ("a batched product of rows in two layouts", lambda x: torch.bmm(
        _rows(x)[:, None, :], _sequence_rows(x)[:, :, None]), "bmm.default", _NO_RULE),
])

def test_ops_that_mix_samples_are_refused(name, fn, op, why):
    """Each of these makes output sample n depend on other samples: refused, with the op
    and the reason, word for word."""
    w = torch.randn(4, dtype=F64)
    x = torch.randn(N, 4, dtype=F64)
    assert _proved(lambda w, x: fn(x * w).tanh().sum(), w, x)[1].reason == f"{op} {why}"


@pytest.mark.parametrize(("name", "loss"), [
    ("a constant times a sum", lambda x: torch.tensor(2.0, dtype=F64) * x.sum()),
    ("sums, means and differences", lambda x: x.sum(0).sum() / 4.0 - x.mean() + 1.0),
    ("a sum over samples, then over features", lambda x: x.tanh().sum(0).mul(3.0).sum()),
])
def test_linear_maps_of_sums_over_samples_are_a_sum_of_per_sample_terms(name, loss):
    """A loss that is a linear map of sums over samples is proved, its value an
    aggregate; whichever operand of a product the sum is."""
    w = torch.randn(4, dtype=F64)
    x = torch.randn(N, 4, dtype=F64)
    gm, structure = _proved(lambda w, x: loss(x * w), w, x)
    assert structure.reason is None
    (out,) = [nd for nd in gm.graph.nodes if nd.op == "output"]
    assert structure.values[out.args[0]] == Value(True, None, True)


def test_a_squared_sum_over_samples_gets_the_exact_diagonal_and_hessian():
    """``s * s`` with ``s`` a sum of residuals over the batch couples every pair of
    samples; read as a product of one live factor (the same node twice), it was taken for
    a sum of per-sample terms: the diagonal was off by 50 on the last bias, the full
    Hessian by 16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)

    def f(p, x, y):
        s = (functional_call(model, p, (x,)) - y).sum()
        return s * s

    params = _params(model)
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    assert_close(hf.hessian(f, flat=True)(params, x, y), oracle_hessian(f, params, x, y))


def test_an_elementwise_op_with_two_outputs_is_refused_by_the_proof_not_raised():
    """``frexp`` is elementwise with two outputs; the proof has no rule for it (it raised
    a TypeError from inside the proof): the diagonal still equals the oracle's."""
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4, dtype=F64), "v": torch.randn(4, 2, dtype=F64)}
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)

    def f(p, x, y):
        h = torch.tanh(x @ p["w"])
        return F.mse_loss(torch.frexp(h)[0] * h @ p["v"], y)

    assert_close(hf.hessian_diag(f)(p, x, y), _oracle_diag(f, p, x, y))


@pytest.mark.parametrize("shape", ["chain", "skip"])
def test_scalar_parameters_used_or_not(shape):
    """0-d leaves: a shared gain, and one that f never reads (its zero diagonal was built
    as ``new_zeros()`` with no size, a TypeError, on both routes)."""
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4, dtype=F64), "gain": torch.randn((), dtype=F64),
         "unused": torch.randn((), dtype=F64), "v": torch.randn(4, 2, dtype=F64)}
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)

    def f(p, x, y):
        z = x @ p["w"]
        h = torch.tanh(z * p["gain"]) + (z if shape == "skip" else 0.0)
        return F.mse_loss(h @ p["v"], y)

    assert_close(hf.hessian_diag(f)(p, x, y), _oracle_diag(f, p, x, y))
    assert_close(hf.hessian_blocks(f)(p, x, y), _oracle_blocks(f, p, x, y))
    assert_close(hf.hessian(f, flat=True)(p, x, y), oracle_hessian(f, p, x, y))


def test_why_a_call_has_no_graph_plan():
    """Each reason the graph's plan declines before the proof, word for word; a batch of
    scalars (1-D inputs) and a plan without the memory check are planned."""
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 2, dtype=F64)}
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)

    def f(p, x, y):
        return F.mse_loss(torch.tanh(x @ p["w"]), y)

    with_graph = (x.clone().requires_grad_() * 1.0, y)
    cases = [
        ((p, x, y), {"argnums": 1}, "argnums is not 0 (the batch must follow the parameters)"),
        ((p, *with_graph), {},
         "called inside a torch.func transform or with inputs that carry a graph"),
        (({}, x, y), {}, "the parameters are not floating-point tensors"),
        (({"w": p["w"].long()}, x, y), {}, "the parameters are not floating-point tensors"),
        (({"w": 1.0}, x, y), {}, "the parameters are not floating-point tensors"),
        ((p, x[:1], y[:1]), {}, "no batch of at least two samples after the parameters"),
        ((p, x[0, 0], y[0, 0]), {}, "no batch of at least two samples after the parameters"),
    ]
    for args, kwargs, why in cases:
        plan, reason = plan_diagonal(f, args, **kwargs)
        assert plan is None and reason == why, (reason, why)
    _, reason = plan_diagonal(lambda p, x, y: F.mse_loss(F.dropout(x @ p["w"], 0.5), y),
                              (p, x, y))
    assert "random operation" in reason
    assert plan_diagonal(f, (p, x, y), check_memory=False)[1] == "ok"

    def scalars(p, x, y):  # one scalar input per sample
        return ((torch.tanh(x[:, None] * p["w"][0]) - y) ** 2).mean()

    plan, reason = plan_diagonal(scalars, (p, x[:, 0], y))
    assert plan is not None, reason


def test_a_parameter_divided_by_samples_is_a_site_and_a_divisor_is_not():
    """``a / h`` is linear in the parameter ``a`` (its one per-sample site); ``h / s`` is
    not linear in ``s``, which takes the products route. Both diagonals are exact."""
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4, dtype=F64), "s": torch.rand(4, dtype=F64) + 1.0,
         "a": torch.randn(4, dtype=F64)}
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 4, dtype=F64)

    def f(p, x, y):
        h = torch.tanh(x @ p["w"])
        return F.mse_loss(h / p["s"] + p["a"] / (h + 3.0), y)

    plan, why = plan_diagonal(f, (p, x, y))
    assert plan is not None, why
    assert set(plan.sites) == {0, 2}
    assert plan.products == {1: "enters div.Tensor non-linearly"}
    assert_close(hf.hessian_diag(f)(p, x, y), _oracle_diag(f, p, x, y))


# ---- the trace cache ---------------------------------------------------------------------

def test_changed_modes_and_buffers_recapture():
    """A model switched between eval and train, or whose running statistics change
    between calls, is never served a stale graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    model = model.double().eval()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    f = _plain(model, F.mse_loss)
    params = _params(model)
    first = hf.hessian_diag(f)(params, x, y)
    assert_close(first, _oracle_diag(f, params, x, y))
    with torch.no_grad():
        model[1].running_var.mul_(4.0)
        model[1].running_mean.add_(1.0)
    second = hf.hessian_diag(f)(params, x, y)
    assert_close(second, _oracle_diag(f, params, x, y))
    assert (flat_diff := (second["0.weight"] - first["0.weight"]).abs().max()) > 1e-3, flat_diff
    model.train()
    assert plan_diagonal(f, (params, x, y))[0] is None  # batch statistics now


def test_a_lambda_made_afresh_reuses_the_trace_only_over_the_same_objects(monkeypatch):
    """``lambda p, x, y: ...`` made anew on every call: one trace while it reaches the same
    model and scale; another model, or another scale, is traced again and exact."""
    traces = count_captures(monkeypatch)
    torch.manual_seed(0)
    models = [build_mlp([3, 4, 1], "tanh", s).double() for s in (0, 1)]
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)

    def make(model, scale):
        return lambda p, x, y: scale * F.mse_loss(functional_call(model, p, (x,)), y)

    for model, scale, new_traces in ((models[0], 1.0, 1), (models[0], 1.0, 0),
                                     (models[1], 1.0, 1), (models[0], 2.0, 1)):
        f = make(model, scale)
        params = _params(model)
        before = len(traces)
        assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
        assert len(traces) - before == new_traces


def test_data_dependent_control_flow_takes_the_exact_fallback():
    torch.manual_seed(0)
    model = build_mlp([3, 4, 1], "tanh", 0).double()

    def f(p, x, y):
        out = functional_call(model, p, (x,))
        return F.mse_loss(out, y) if out.sum() > 0 else F.l1_loss(out, y)

    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64)
    params = _params(model)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is None and "captured" in why
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))


def test_the_model_is_not_changed():
    torch.manual_seed(0)
    model = _TinyResNet().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(3, 2, 4, 4, dtype=F64), torch.randint(0, 3, (3,))
    hf.hessian_diag(_plain(model, F.cross_entropy))(_params(model), x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training


# ---- every op-family rule against dense autograd ------------------------------------

def _dense_rule_truth(plan, node, inputs):
    """J_i (per sample, dense) and the curvature sum_k g_k d^2 v_k/du du from autograd."""
    op = plan.op(node, inputs)
    primals = tuple(plan.env[u] for u in inputs)
    jac = torch.autograd.functional.jacobian(op, primals)  # per input: (*v, *u)
    g = plan.grads[node]
    curv = torch.autograd.functional.hessian(lambda *u: (op(*u) * g).sum(), primals)
    return jac, curv


RULE_CASES = {
    "Elementwise": lambda x, w: torch.tanh(x @ w).sin(),
    "RowAffine": lambda x, w: torch.tanh(torch.tanh(x @ w) @ w.T),
    # two rows a sample (a sequence of 2): the diagonal goes through the generic sandwich
    "RowAffine-rows": lambda x, w: torch.tanh(torch.tanh(x @ w).reshape(2 * N, 2)
                                              @ w[:2, 1:3]).reshape(N, 4),
    "Reorder": lambda x, w: torch.tanh(torch.tanh(x @ w).reshape(N, 2, 2).reshape(N, 4)),
    "Reorder-sum": lambda x, w: torch.tanh(torch.tanh(x @ w) - (x @ w) ** 2),
    "Rule": lambda x, w: torch.tanh(F.softmax(x @ w, dim=-1) * (x @ w) + torch.bmm(
        (x @ w)[:, None, :], torch.tanh(x @ w)[:, :, None]).squeeze(-1)),
    # a sum scaled by alpha is not the identity's sum
    "Broadcast-add-alpha": lambda x, w: torch.tanh(torch.add(torch.tanh(x @ w), x @ w, alpha=2.0)),
    # transposes, copies of an element (expand), padding by a constant, pieces, cat
    "Selection": lambda x, w: (lambda h: torch.tanh(torch.cat([
        F.pad(h.reshape(N, 2, 2).transpose(1, 2), (1, 0), value=3.0).flatten(1),
        h[:, None, :2].expand(N, 2, 2).reshape(N, 4),
        torch.stack(h.split(2, dim=1), 2).reshape(N, 4)[:, 1:],
        # as many elements out as in, yet no permutation (one copied twice, one dropped)
        h.index_select(1, torch.tensor([0, 0, 1, 2]))], 1)))(torch.tanh(x @ w)),
    # elementwise ops of two operands, or of one broadcast within each sample
    "Broadcast": lambda x, w: (lambda h: torch.tanh(
        (h - h.amax(-1, keepdim=True)).exp() / h.exp().sum(-1, keepdim=True)
        + h * torch.tanh(h[:, :1]) + torch.where(h > 0, h.sin(), h ** 2)
        + h / (1.5 + h[:, 1:2] ** 2)
        + torch.addcmul(h.cos(), h, h.sin())))(torch.tanh(x @ w)),
    # batched matrix products of two per-sample values (attention's q k^T and a v)
    "BatchedProduct": lambda x, w: (lambda h: torch.tanh(torch.bmm(
        torch.bmm(h, h.transpose(1, 2).tanh()).softmax(-1), h.sin()).flatten(1)))(
        torch.tanh(x @ w).reshape(N, 2, 2)),
    # a gather by each sample's own index moves elements differently per sample
    "Rule-gather-by-sample": lambda x, w: torch.tanh(torch.tanh(x @ w).gather(
        1, (x > 0).long())),
    "Convolution": lambda x, w: torch.tanh(F.conv1d(torch.tanh(x @ w)[:, None], w[None, :1, :3],
                                                    padding=1, stride=2)).flatten(1),
    "Convolution-groups": lambda x, w: torch.tanh(F.conv1d(
        torch.tanh(x @ w).reshape(N, 2, 2), w[:, :2].reshape(4, 1, 2), padding=1,
        groups=2)).flatten(1),
}


@pytest.mark.parametrize("name", [*RULE_CASES, "Convolution-batched",
                                  *(f"Rule-for-every-op-of-{case}" for case in
                                    ("Rule", "Broadcast", "BatchedProduct", "Selection"))])
def test_every_rule_family_equals_dense_autograd(name, monkeypatch):
    """Each family's row pullback, sandwich (J^T H J plus the curvature term) and
    diagonal-only sandwich on random per-sample blocks equal dense Jacobians and
    Hessians from autograd (convolutions both with their dense Jacobian and batched;
    the generic rule also on every op that a family of its own takes)."""
    from hessfunc.graph.rules import Convolution, Rule, rule_for

    if name == "Convolution-batched":
        monkeypatch.setattr(Convolution, "_DENSE_BYTES", 0)
        name = "Convolution"
    if name.startswith("Rule-for-every-op-of-"):
        name = name.removeprefix("Rule-for-every-op-of-")
        rule_for = Rule  # noqa: F811
        family = "Rule"
    else:
        family = name.split("-")[0]
    torch.manual_seed(0)
    fn = RULE_CASES[name]
    w = torch.randn(4, 4, dtype=F64)
    x = torch.randn(N, 4, dtype=F64)
    f = lambda p, x: (fn(x, p["w"]) ** 2).sum()  # noqa: E731
    plan, why = plan_diagonal(f, ({"w": w}, x))
    assert plan is not None, why
    plan.evaluate()
    seen = set()
    for node in plan._per_sample_nodes():
        inputs = plan._inputs(node)
        if not inputs:
            continue
        rule = rule_for(plan, node, inputs)
        seen.add(type(rule).__name__)
        w_v = plan.width(node)
        jac, curv = _dense_rule_truth(plan, node, inputs)
        H = torch.randn(N, w_v, w_v, dtype=F64)
        H = H + H.transpose(1, 2)
        R = torch.randn(N, w_v, 3, dtype=F64)
        per_sample_j = []
        for i, u in enumerate(inputs):
            J = jac[i].reshape(N, w_v, N, plan.width(u)).permute(0, 2, 1, 3)
            assert not J[~torch.eye(N, dtype=torch.bool)].any()  # samples stay apart
            per_sample_j.append(J[torch.arange(N), torch.arange(N)])  # (N, w_v, w_u)
        for i, pulled in enumerate(rule.pull_rows(R)):
            torch.testing.assert_close(pulled, per_sample_j[i].transpose(1, 2) @ R)
        blocks = rule.sandwich(H)
        for i, u in enumerate(inputs):
            for j, x_ in enumerate(inputs):
                C = curv[i][j].reshape(N, plan.width(u), N, plan.width(x_))
                C = C.permute(0, 2, 1, 3)[torch.arange(N), torch.arange(N)]
                expected = per_sample_j[i].transpose(1, 2) @ H @ per_sample_j[j] + C
                got = blocks.get((u, x_), torch.zeros_like(expected))
                torch.testing.assert_close(got, expected)
        if len(inputs) == 1:
            d = rule.sandwich_diagonal(H)
            torch.testing.assert_close(d, torch.diagonal(blocks[(inputs[0], inputs[0])],
                                                         dim1=1, dim2=2))
            # a block held as its diagonal (N, w_v) reads as that diagonal matrix
            diag = H.diagonal(dim1=1, dim2=2)
            torch.testing.assert_close(rule.sandwich_diagonal(diag), rule.sandwich_diagonal(
                torch.diag_embed(diag)))
            expected = (per_sample_j[0].transpose(1, 2) @ torch.diag_embed(diag)
                        @ per_sample_j[0]).diagonal(dim1=1, dim2=2)
            C = curv[0][0].reshape(N, plan.width(inputs[0]), N, plan.width(inputs[0]))
            expected = expected + C.permute(0, 2, 1, 3)[torch.arange(N), torch.arange(N)
                                                         ].diagonal(dim1=1, dim2=2)
            torch.testing.assert_close(rule.sandwich_diagonal(diag), expected)
    assert family in seen, seen


@pytest.mark.parametrize("kind", ["chain", "reordered", "skip"])
def test_only_the_first_layers_are_held_as_diagonals(kind):
    """A value whose block the sweep reads only on its diagonal (one consumer, closed-form
    parameter sites, then elementwise or reordering ops down to the data) is held as its
    diagonal: a chain's first layer and its activation, also through a reshape; with a
    skip connection the activation has two consumers and is held whole. The diagonal
    equals the oracle either way."""
    torch.manual_seed(5)
    w1, w2, w3 = (torch.randn(3, 4, dtype=F64), torch.randn(4, 4, dtype=F64),
                  torch.randn(4, 2, dtype=F64))

    def f(p, x, y):
        a = torch.tanh(x @ p["w1"])
        if kind == "reordered":
            a = torch.sin(a.reshape(-1, 2, 2)).reshape(-1, 4)
        h = torch.tanh(a @ p["w2"])
        if kind == "skip":
            h = h + a
        return F.mse_loss(h @ p["w3"], y)

    params = {"w1": w1, "w2": w2, "w3": w3}
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    plan.evaluate()
    nodes = plan._per_sample_nodes()
    by_node = {}
    for i, site in plan.sites.items():
        by_node.setdefault(site.node, []).append(i)
    held = [nd.target for nd in nodes if nd in plan._diagonal_only(nodes, by_node)]
    aten = torch.ops.aten
    expected = {"chain": [aten.mm.default, aten.tanh.default],
                "reordered": [aten.mm.default, aten.tanh.default, aten.view.default,
                              aten.sin.default, aten.view.default],
                "skip": [aten.mm.default]}[kind]
    assert held == expected
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    # per sample: weights used as x @ W (not x W^T), w2 square
    assert_close(hf.hessian_diag(f, per_sample=True)(params, x, y),
                 _oracle_per_sample(f, params, x, y))


# ---- per-sample diagonals ------------------------------------------------------------

def _oracle_per_sample(f, params, x, y):
    rows = [_oracle_diag(f, params, x[n:n + 1], y[n:n + 1]) for n in range(x.shape[0])]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


@settings(deadline=None)
@given(dag=_dags(), data=st.data())
def test_per_sample_diagonals_of_any_dag_equal_the_oracle(dag, data):
    """Each sample's own loss f(p, x[n:n+1], y[n:n+1]): the captured graph seeds its
    sweep from f traced on one sample (means, weighted means and spelled-out counts
    alike), equal to the per-sample loop oracle."""
    kind, model = dag
    loss = data.draw(losses(num_outputs=_outputs(model)))
    n = data.draw(st.integers(2, 4))
    x, y = torch.randn(n, 3, dtype=F64), _targets(loss, n, _outputs(model))
    f = _plain(model, loss.fn)
    params = _params(model)
    plan, why = plan_diagonal(f, (params, x, y), per_sample=True)
    assert (plan is None) == (kind == "tied"), why
    assert_close(hf.hessian_diag(f, per_sample=True)(params, x, y),
                 _oracle_per_sample(f, params, x, y))


@settings(deadline=None)
@given(dag=_dags(), data=st.data())
def test_each_samples_loss_under_vmap_of_any_dag_equals_the_oracle(dag, data):
    """The route taken where the one-sample trace cannot seed the batch's sweep: each
    sample's loss traced under vmap as one graph, swept with rows per sample (also with
    the inputs centred by the batch's mean, which each sample alone sees as zeros),
    equal to the per-sample loop oracle."""
    kind, model = dag
    loss = data.draw(losses(num_outputs=_outputs(model)))
    n = data.draw(st.integers(2, 4))
    x, y = torch.randn(n, 3, dtype=F64), _targets(loss, n, _outputs(model))
    if data.draw(st.booleans(), label="centred"):
        f = lambda p, x, y: loss.fn(functional_call(model, p, (x - x.mean(0),)), y)  # noqa: E731
    else:
        f = _plain(model, loss.fn)
    params = _params(model)
    plan, why = _plan_own_losses(f, (params, x, y), True, None, "test", "asked")
    assert (plan is None) == (kind == "tied"), why
    if plan is not None:
        want = _oracle_per_sample(f, params, x, y)
        assert_close(dict(zip(params, plan.diagonal(), strict=True)), want)


@pytest.mark.parametrize(("name", "loss"), [
    ("class weights", lambda o, t: F.cross_entropy(o, t, weight=torch.tensor(
        [0.5, 2.0, 1.0], dtype=F64))),
    ("spelled-out count", lambda o, t: F.cross_entropy(o, t, reduction="sum") / 64),
    ("ignored targets", lambda o, t: F.cross_entropy(o, t, ignore_index=1)),
])
def test_per_sample_losses_normalised_by_the_batch(name, loss):
    """The batch's per-sample block is not each sample's loss when the normalisation
    depends on the batch: the one-sample trace gets it right."""
    torch.manual_seed(0)
    model = ResidualMLP(3, 4, 1, 3).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.tensor([0, 2, 1, 2, 0])
    f = _plain(model, loss)
    params = _params(model)
    assert plan_diagonal(f, (params, x, y), per_sample=True)[0] is not None
    assert_close(hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y),
                 _oracle_per_sample(f, params, x, y))


_PER_SAMPLE_CASES = {  # name -> (loss of (out, y, p), why the one-sample trace is refused)
    "mean squared error": (lambda o, y, p: F.mse_loss(o, y), None),
    "a term of the parameters": (lambda o, y, p: F.mse_loss(o, y) + (p["0.bias"] ** 2).sum(),
                                 "the loss has terms of the parameters alone"),
    "a term of the parameters in each sample's values": (lambda o, y, p: (
        (o - y) ** 2 + (p["0.bias"] ** 2).sum()).mean(), "the loss has terms of the parameters"),
    "other ops on one sample": (lambda o, y, p: F.mse_loss(o * 2.0 if o.shape[0] > 1 else o, y),
                                "f on one sample runs other ops than on the batch: "
                                "sub.Tensor where the batch runs mul.Tensor"),
    "a copy summed": (lambda o, y, p: ((o - y) ** 2).clone().mean(),
                      "f on one sample runs other ops than on the batch: a value the loss "
                      "sums over is a copy"),
    "samples interleaved": (lambda o, y, p: F.mse_loss(o.T.reshape(-1), y.T.reshape(-1)),
                            None),
    "a weight used twice": (lambda o, y, p: F.mse_loss(o @ p["2.weight"] @ p["2.weight"].T, y),
                            "some parameters take one-hot products"),
    "a fresh constant from the targets": (lambda o, y, p: F.mse_loss(o + y.new_zeros(()), y),
                                          None),
    # the batch's numbers below the loss's sum: one sample alone computes others
    "targets centred by the batch": (lambda o, y, p: F.mse_loss(o, y - y.mean(0)),
                                     "mean.dim computes from the data of several samples"),
    "the count inside the sum": (lambda o, y, p: ((o - y) ** 2 / o.shape[0]).sum(),
                                 "f on one sample computes with other numbers: div.Tensor "
                                 "takes 4 on the batch and 1 on one sample"),
    "a fill by the batch size": (lambda o, y, p: ((o - y) ** 2 * torch.full_like(
        y, 1.0 / len(y))).sum(), "f on one sample computes with other numbers: full_like"),
    "a tensor of the batch size": (lambda o, y, p: ((o - y) ** 2 * torch.tensor(
        [1.0 / len(y)], dtype=F64)).sum(), "f on one sample computes with other numbers: the "
        "constant _tensor_constant0 differs from the batch's"),
    "a statistic of the targets in the loss's tail, then the count": (lambda o, y, p: (
        y.abs().mean() * ((o - y) ** 2 / o.shape[0]).sum()),
        "f on one sample computes with other numbers: div.Tensor takes 4 on the batch and 1"),
    "a copy, then the count": (lambda o, y, p: ((o - y).clone() ** 2 / o.shape[0]).sum(),
                               "f on one sample computes with other numbers: div.Tensor "
                               "takes 4 on the batch and 1"),
    "a NaN among the numbers (alike in both)": (lambda o, y, p: torch.nan_to_num(
        (o - y) ** 2, nan=float("nan")).mean(), None),
    "a tensor alike in both, then the count": (lambda o, y, p: (
        (o - y) ** 2 * torch.tensor([2.0], dtype=F64) / o.shape[0]).sum(),
        "f on one sample computes with other numbers: div.Tensor takes 4 on the batch and 1"),
}
#: cases whose losses under vmap take one-hot products: per_sample=True takes the generic route
_PRODUCTS_UNDER_VMAP = {"a term of the parameters", "a weight used twice",
                        "a term of the parameters in each sample's values"}


@pytest.mark.parametrize("case", list(_PER_SAMPLE_CASES))
def test_per_sample_diagonals_from_the_one_sample_trace_or_refused_with_the_reason(case):
    """The one-sample trace replays the loss's ops on each sample; where it cannot stand
    for each sample's loss, the plan says why and traces each sample's loss under vmap
    instead (unless that graph takes one-hot products), and the per-sample diagonals
    equal the oracle whatever the route."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 2], "tanh", 3)
    loss, why = _PER_SAMPLE_CASES[case]
    f = lambda p, x, y: loss(functional_call(model, p, (x,)), y, p)  # noqa: E731
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    params = _params(model)
    plan, reason = plan_diagonal(f, (params, x, y), per_sample=True)
    if why is None:
        assert plan is not None and plan.one_sample is not None, reason
    elif case in _PRODUCTS_UNDER_VMAP:
        assert plan is None and reason.startswith(why), reason
    else:
        assert plan is not None and plan.one_sample is None and plan.each_sample, reason
        assert reason.startswith(f"each sample's loss traced under vmap ({why}"), reason
        route = hf.explain(f, params, x, y)["hessian_diag(per_sample=True)"]
        assert (route.name, route.why) == ("structured", reason)
    assert_close(hf.hessian_diag(f, per_sample=True)(params, x, y),
                 _oracle_per_sample(f, params, x, y))


def test_per_sample_diagonals_under_vmap_trace_once_for_a_function_built_inline(monkeypatch):
    """``hessian_diag(lambda p, x, y: ..., per_sample=True)`` written inline in a loop, on
    a model whose one-sample trace differs from the batch's (attention): the batch, the
    one sample and each sample's loss under vmap are traced once each, not on every
    call, and the rows equal the oracle's every time."""
    traced = count_captures(monkeypatch)
    torch.manual_seed(0)
    model = _RowsModel("attention").double()
    params = _params(model)
    x, y = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    want = _oracle_per_sample(_plain(model, F.mse_loss), params, x, y)
    for _ in range(3):
        f = lambda p, x, y: F.mse_loss(functional_call(model, p, (x,)), y)  # noqa: E731
        assert_close(hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y),
                     want)
    assert len(traced) == 3, traced


@pytest.mark.parametrize("dims", [1, 2])
def test_convolution_weights_by_the_unfolded_input(dims):
    """The convolution sites' closed form (weight and bias from the unfolded input):
    non-square kernels, strides, padding and dilation; the diagonal, per-sample diagonals
    and the GGN diagonal against the loop oracles."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2) if dims == 1 else \
        nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    x = torch.randn(3, 2, *([7] if dims == 1 else [5, 6]), dtype=F64)
    body = nn.Sequential(conv, nn.Tanh(), nn.Flatten()).double()
    model = nn.Sequential(body, nn.Linear(body(x).shape[1], 2)).double()
    y = torch.randint(0, 2, (3,))
    f = _plain(model, F.cross_entropy)
    params = _params(model)
    assert_close(hf.hessian_diag(f, method="structured")(params, x, y),
                 _oracle_diag(f, params, x, y))
    assert_close(hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y),
                 _oracle_per_sample(f, params, x, y))
    g = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    G = hf.reference.ggn(g(leaves, x), F.cross_entropy, y, list(leaves.values()))
    got = hf.ggn_diag(g, F.cross_entropy)(params, x, y)
    assert_close(torch.cat([got[k].reshape(-1) for k in params]), torch.diagonal(G))


# ---- parameter-only terms: separable ones add their diagonal, the rest take rows ------

_WEIGHTS = torch.linspace(0.5, 2.0, 12, dtype=torch.float64).reshape(4, 3)

#: term -> (the term, whether it is separable, the leaves it reads)
_PARAMETER_TERMS = {
    "squares": (lambda p: 1e-2 * (p["0.weight"] ** 2).sum(), True, {"0.weight"}),
    "sin, scaled after the sum": (lambda p: 2 * torch.sin(p["0.weight"]).sum(), True,
                                  {"0.weight"}),
    "cosh of the bias, mean": (lambda p: torch.cosh(p["0.bias"]).mean(), True, {"0.bias"}),
    "weighted squares, divided after the sum": (
        lambda p: (_WEIGHTS * p["0.weight"] ** 2).sum() / 4, True, {"0.weight"}),
    "linear": (lambda p: 3 * p["0.bias"].sum(), True, {"0.bias"}),
    "tanh-approximate GELU": (lambda p: F.gelu(p["0.weight"], approximate="tanh").sum(), True,
                              {"0.weight"}),
    "square of the sum": (lambda p: p["0.weight"].sum() ** 2, False, {"0.weight"}),
    "a sum times itself": (lambda p: (lambda s: s * s)(p["0.weight"].sum()), False,
                           {"0.weight"}),
    "a sum of squares times itself": (
        lambda p: (lambda s: s * s)((p["0.weight"] ** 2).sum()), False, {"0.weight"}),
    "flipped product": (lambda p: (p["0.weight"] * p["0.weight"].flip(0)).sum(), False,
                        {"0.weight"}),
    "bias times a weight column": (lambda p: (p["0.bias"] * p["0.weight"][:, 0]).sum(), False,
                                   {"0.weight", "0.bias"}),
    "broadcast product": (lambda p: (p["0.bias"][:, None] * p["0.weight"]).sum(), False,
                          {"0.weight", "0.bias"}),
    "product of two sums": (lambda p: p["0.weight"].sum() * p["2.weight"].sum(), False,
                            {"0.weight", "2.weight"}),
    "sums over one axis, squared": (lambda p: (p["0.weight"].sum(0) ** 2).sum(), False,
                                    {"0.weight"}),
    "a constant divided by a sum": (
        lambda p: torch.div(_WEIGHTS[0, 0], (p["0.weight"] ** 2).sum()), False, {"0.weight"}),
    "a sum divided by a sum": (lambda p: (p["0.weight"] ** 2).sum() / p["0.bias"].sum(),
                               False, {"0.weight", "0.bias"}),
}


@pytest.mark.parametrize("inside", [False, True, None], ids=[
    "added to the loss", "broadcast into each sample's values", "the whole loss"])
@pytest.mark.parametrize("term", list(_PARAMETER_TERMS))
def test_parameter_only_terms_are_exact_whether_separable_or_not(term, inside):
    """A term of the parameters alone is added as its own diagonal only when it is a sum
    of elementwise functions of single entries; coupled terms (a square of a sum, a
    flipped or broadcast product, two leaves together, a sum as a divisor) must not be:
    their blocks have off-diagonal entries, and their diagonals cross terms. Each term
    takes the route its form allows (a separable one is not sent to products), also when
    it is added to every sample's values before the mean over them, or is all the loss."""
    model = build_mlp([3, 4, 2], "tanh", 7)
    loss_fn = nn.MSELoss()
    penalty, separable, read = _PARAMETER_TERMS[term]
    # the whole loss scaled: the term's coefficient in the aggregate is 1/2
    if inside is None:
        f = lambda p, x, y: penalty(p) / 2  # noqa: E731
    elif inside:
        f = lambda p, x, y: (  # noqa: E731
            (functional_call(model, p, (x,)) - y) ** 2 + penalty(p)).mean() / 2
    else:
        f = lambda p, x, y: (  # noqa: E731
            loss_fn(functional_call(model, p, (x,)), y) + penalty(p)) / 2
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    params = _params(model)
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    assert_close(hf.hessian(f, flat=True)(params, x, y), oracle_hessian(f, params, x, y))
    assert_close(hf.hessian_blocks(f)(params, x, y), _oracle_blocks(f, params, x, y))
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    names = list(params)
    assert {names[i] for i in plan.separable} == (read if separable else set())
    assert {names[i] for i in plan.products} == (set() if separable else read)


def _through_views(p, x, y):
    h = torch.tanh(x @ p["w"].reshape(3, 4)) * p["s"].t()
    return F.mse_loss(torch.tanh(h) @ p["v"], y)


def _matrix_on_the_left(p, x, y):
    return F.mse_loss(torch.tanh(p["v"] @ torch.tanh(x @ p["w"]).T).T, y)


def _through_detach(p, x, y):
    h = torch.tanh(x @ p["w"]) @ p["v"]
    return ((F.softmax(h, -1).detach() * h - y) ** 2).mean()


def _attention_of_a_chunked_projection(p, x, y):
    h = (x @ p["e"]).reshape(-1, 2, 4)  # (N, T = 2, d = 4)
    q, k, v = (h @ p["qkv"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(-1, 2, 2, 2).transpose(1, 2) for t in (q, k, v))  # two heads
    a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    return F.mse_loss(torch.tanh(a.transpose(1, 2).reshape(-1, 8)) @ p["o"], y)


#: name -> (f, parameter shapes, outputs, whether the per-sample diagonal is structured)
_HAND_WRITTEN = {
    # a weight stored (4, 3) used as w.reshape(3, 4), a scale stored (4, 1) used as s.t()
    "weights through views": (_through_views, {"w": (4, 3), "s": (4, 1), "v": (4, 2)}, 2,
                              True),
    # W @ h^T: the per-sample operand on the right of mm is no row-wise affine map
    "a matrix on the left of the samples": (_matrix_on_the_left, {"w": (3, 4), "v": (2, 4)},
                                            2, False),
    # no gradient reaches the softmax: it adds no curvature, and none is asked of it
    "a value read through detach": (_through_detach, {"w": (3, 4), "v": (4, 4)}, 4, False),
    # q, k, v cut from one projection; the head reshapes copy on a batch, view on one sample
    "attention of a chunked projection": (_attention_of_a_chunked_projection,
                                          {"e": (3, 8), "qkv": (4, 12), "o": (8, 2)}, 2, True),
}


@pytest.mark.parametrize("case", list(_HAND_WRITTEN))
def test_hand_written_graphs_equal_the_oracle(case):
    """Graphs written by hand that the rules must not mistake for their neighbours: the
    structured diagonal and the per-sample diagonals equal the oracle (diagonals of
    weights reached through views go back to the stored layout)."""
    f, shapes, outputs, structured = _HAND_WRITTEN[case]
    torch.manual_seed(1)
    params = {k: torch.randn(*shape, dtype=F64) for k, shape in shapes.items()}
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, outputs, dtype=F64)
    assert_close(hf.hessian_diag(f, method="structured")(params, x, y),
                 _oracle_diag(f, params, x, y))
    each = hf.hessian_diag(f, per_sample=True, method="structured" if structured else "auto")
    assert_close(each(params, x, y), _oracle_per_sample(f, params, x, y))


class _RowsModel(nn.Module):
    """A Linear on the rows of each sample's sequence ``(N, T = 3, 4)``, written three ways
    torch lowers differently: ``(N T, 4)`` rows through ``addmm``; sequence-first rows made
    contiguous (``addmm`` on rows ``t N + n``); and sequence-first rows as they are,
    ``bmm`` by the weight expanded over positions. Then nn.MultiheadAttention
    (``batch_first``: its input projection is such a ``bmm``)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.embed, self.rows, self.head = nn.Linear(2, 12), nn.Linear(4, 4), nn.Linear(12, 2)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h = torch.tanh(self.embed(x)).reshape(-1, 3, 4)
        if self.form == "batch-first":
            h = self.rows(h)
        elif self.form == "sequence-first":
            h = self.rows(h.transpose(0, 1).contiguous()).transpose(0, 1)
        elif self.form == "sequence-first, not contiguous":
            h = self.rows(h.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.attention(h, h, h, need_weights=True)[0]
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("form", ["batch-first", "sequence-first",
                                  "sequence-first, not contiguous", "attention"])
def test_weights_shared_over_the_rows_of_each_sample(form):
    """NOTE [weights shared over rows]: a weight applied to every position of a sample is
    a site of the graph (no one-hot products), and its diagonal, block, per-sample
    diagonals and Gauss-Newton diagonal equal the oracle's: the copies of an expanded
    weight summed with their cross terms."""
    torch.manual_seed(0)
    model = _RowsModel(form).double()
    params = _params(model)
    x, y = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    f = _plain(model, F.mse_loss)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None and not plan.products, (why, plan and plan.products)
    assert_close(hf.hessian_diag(f, method="structured")(params, x, y),
                 _oracle_diag(f, params, x, y))
    got, _ = _graph_blocks(f, params, x, y)
    for k, want in _oracle_blocks(f, params, x, y).items():
        assert_close(got[k], want)
    each, why = plan_diagonal(f, (params, x, y), per_sample=True)
    assert each is not None, why
    if form not in ("batch-first", "sequence-first"):  # one sample's rows are contiguous,
        # so the others' bmm is an mm there: each sample's loss is traced under vmap
        assert each.one_sample is None and why.startswith(
            "each sample's loss traced under vmap (f on one sample runs other ops than on "
            "the batch: view.default where the batch runs t.default at"), why
    assert_close(hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y),
                 _oracle_per_sample(f, params, x, y))
    g = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    G = hf.reference.ggn(g(leaves, x), F.mse_loss, y, list(leaves.values())).diagonal()
    diag = hf.ggn_diag(g, F.mse_loss)(params, x, y)
    assert_close(torch.cat([diag[k].reshape(-1) for k in params]), G)


@pytest.mark.parametrize(("weight", "shape", "shared"), [
    ("one matrix, unsqueezed and expanded", (4, 4), True),
    ("one matrix per position, expanded to its own shape", (3, 4, 4), False),
    ("one matrix expanded, then added to", (4, 4), False),
    ("one matrix expanded, then transposed", (4, 4), False),
])
def test_bmm_by_a_weight_expanded_by_hand(weight, shape, shared):
    """``bmm`` of each position's rows by ``W`` expanded over the positions is a shared
    site only when every position gets the same matrix; otherwise the weight takes one-hot
    products, saying why. The diagonal equals the oracle's either way."""
    def f(p, x, y):
        h = torch.tanh(x @ p["e"]).reshape(-1, 3, 4).transpose(0, 1)  # (T, N, 4)
        w = p["w"] if p["w"].dim() == 3 else p["w"][None]
        w = w.expand(3, 4, 4)
        if weight.endswith("added to"):
            w = w + torch.linspace(0, 1, 3, dtype=F64)[:, None, None]
        if weight.endswith("transposed"):
            w = w.transpose(1, 2)
        return F.mse_loss(torch.tanh(torch.bmm(h, w)).transpose(0, 1).flatten(1) @ p["o"], y)

    torch.manual_seed(0)
    params = {"e": torch.randn(2, 12, dtype=F64), "w": torch.randn(*shape, dtype=F64),
              "o": torch.randn(12, 2, dtype=F64)}
    x, y = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    assert (1 in plan.sites) == shared and (1 in plan.products) != shared
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))


def test_a_leaf_the_loss_does_not_read_or_reads_in_a_term_alone():
    """A parameter that ``f`` never reads has a zero diagonal (per sample too, with the
    samples' axis), and one read only by a separable term of the parameters has that
    term's diagonal alone."""
    model = build_mlp([3, 4, 2], "tanh", 7)
    loss_fn = nn.MSELoss()

    def f(p, x, y):
        net = {k: v for k, v in p.items() if k not in ("unused", "decayed")}
        return loss_fn(functional_call(model, net, (x,)), y) + torch.cosh(p["decayed"]).sum()

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    y = torch.randn(5, 2, generator=gen, dtype=F64)
    params = {**_params(model), "unused": torch.randn(2, 3, generator=gen, dtype=F64),
              "decayed": torch.randn(3, generator=gen, dtype=F64)}
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    got = hf.hessian_diag(f)(params, x, y)
    assert_close(got, _oracle_diag(f, params, x, y))
    assert torch.equal(got["unused"], torch.zeros(2, 3, dtype=F64))
    assert_close(got["decayed"], torch.cosh(params["decayed"]))

    g = lambda p, x, y: loss_fn(functional_call(model, {k: v for k, v in p.items()  # noqa: E731
                                                         if k != "unused"}, (x,)), y)
    del params["decayed"]
    per_sample = hf.hessian_diag(g, per_sample=True)(params, x, y)
    assert plan_diagonal(g, (params, x, y), per_sample=True)[0] is not None
    assert torch.equal(per_sample["unused"], torch.zeros(5, 2, 3, dtype=F64))
    assert_close(per_sample, _oracle_per_sample(g, params, x, y))


def test_generic_curvature_in_chunks_of_columns_equals_the_oracle(monkeypatch):
    """An op without a closed form (softmax, LayerNorm, a product of two live values) gets
    its curvature from vmapped double backward passes over unit columns; under a budget
    of one column per chunk the chunks are concatenated in order, and the diagonal and
    the blocks still equal the oracle. (The product goes to the generic rule here: the
    Broadcast family, which would take it, is declined.)"""
    from hessfunc.graph import curvature, rules

    class Declined(rules.Broadcast):
        def __init__(self, plan, node, inputs):
            rules.Rule.__init__(self, plan, node, inputs)
            self.index = [None]

    monkeypatch.setattr(rules, "Broadcast", Declined)
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.Softmax(-1),
                          nn.Linear(3, 2)).double()

    def f(p, x, y):
        h = functional_call(model, p, (x,))
        return (h[:, 0] * h[:, 1] - y).pow(2).mean()  # a product of two live values

    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, generator=gen, dtype=torch.float64)
    params = _params(model)
    monkeypatch.setattr(curvature, "CHUNK_BUDGET_BYTES", 8)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    plan.evaluate()
    assert len(list(plan.chunks(4, 1))) == 4  # one column per chunk
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    assert_close(hf.hessian_blocks(f)(params, x, y), _oracle_blocks(f, params, x, y))

    # the Gauss-Newton sweep's factor at a per-feature scale (no closed form), in chunks
    def g(p, x):
        return functional_call(model, {k: v for k, v in p.items() if k != "scale"},
                               (x,)) * p["scale"]

    params["scale"] = torch.linspace(0.5, 1.5, 2, dtype=torch.float64)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    G = hf.reference.ggn(g(leaves, x), F.mse_loss, y, list(leaves.values()))
    assert curvature.plan_ggn_diagonal(curvature.GGNLoss.of(g, F.mse_loss),
                                       (params, x, y))[0] is not None
    got = hf.ggn_diag(g, F.mse_loss)(params, x, y)
    assert_close(torch.cat([got[k].reshape(-1) for k in params]), torch.diagonal(G))


@pytest.mark.parametrize("loss", ["bce-with-logits", "logsigmoid", "bce pos_weight"])
def test_a_logit_of_exactly_zero_keeps_its_curvature(loss):
    """log sigmoid is smooth, but torch's decomposition ``min(0, x) - log1p(exp(-|x|))``
    has autograd derivatives 0 and 1/2 at ``x = 0``: a sample whose logit is exactly 0
    (here by cancellation, as GELU's exact zeros also give) lost its curvature 1/4. The
    graph's diagonal, blocks and per-sample diagonals against the loop oracle."""
    torch.manual_seed(0)
    w = {"w": torch.tensor([[1.0, 1.0]], dtype=F64), "b": torch.zeros(1, dtype=F64)}
    x = torch.tensor([[1.0, -1.0], [2.0, 1.0], [-0.5, 0.5]], dtype=F64)  # logits 0, 3, 0
    y = torch.tensor([[1.0], [0.0], [1.0]], dtype=F64)

    def f(p, x, y):
        o = x @ p["w"].T + p["b"]
        if loss == "logsigmoid":
            return -(F.logsigmoid(o) * y + F.logsigmoid(-o) * (1 - y)).mean()
        pos_weight = torch.tensor([2.5], dtype=F64) if loss == "bce pos_weight" else None
        return F.binary_cross_entropy_with_logits(o, y, pos_weight=pos_weight)

    loss_value, leaves = oracle_loss(f, w, x, y)
    want = hf.reference.hessian_diag(loss_value, leaves)
    assert hf.explain(f, w, x, y)["hessian_diag"].engine == "captured graph"
    assert_close(hf.hessian_diag(f)(w, x, y), want)
    blocks = hf.hessian_blocks(f)(w, x, y)
    assert_close({k: torch.diagonal(v) for k, v in blocks.items()},
                 {k: v.reshape(-1) for k, v in want.items()})
    rows = hf.hessian_diag(f, per_sample=True)(w, x, y)
    for n in range(3):
        one, leaves = oracle_loss(f, w, x[n:n + 1], y[n:n + 1])
        assert_close({k: v[n] for k, v in rows.items()}, hf.reference.hessian_diag(one, leaves))


# ---- the batch in parts (NOTE [the batch in parts]) -------------------------------------

def _budget_for(monkeypatch, f, args, samples):
    """Set the memory budget to hold the frontier of ``samples`` samples of the batch."""
    from hessfunc.graph import curvature

    plan, why = plan_diagonal(f, args, check_memory=False)
    assert plan is not None, why
    need = -(-curvature._frontier_bytes(plan) * samples // plan.n)
    monkeypatch.setattr(curvature, "available_bytes", lambda device: 4 * need)


class _TokenModel(nn.Module):
    """Per-token logits of ``(N, T = 3, 2)`` sequences, rows batch-first ``(N T, 3)`` or
    sequence-first ``(T N, 3)``, with attention-free mixing of the positions."""

    def __init__(self, first):
        super().__init__()
        self.first = first
        self.embed, self.mix, self.head = nn.Linear(2, 4), nn.Linear(12, 12), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + torch.tanh(self.mix(h.flatten(1))).reshape(h.shape)
        if self.first == "sequence":
            h = h.transpose(0, 1)
        return self.head(h).reshape(-1, 3)


_CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 1.0], dtype=F64)  # dL/db differs by sample


def _token_loss(first):
    def loss(o, y):
        return F.cross_entropy(o, (y.T if first == "sequence" else y).reshape(-1),
                               weight=_CLASS_WEIGHTS)
    return loss


_PARTS = {  # name -> (model, loss of (out, y, p), inputs, targets)
    "residual MLP, weight decay": (
        lambda: ResidualMLP(3, 4, 2, 3).double(),
        lambda o, y, p: F.cross_entropy(o, y, weight=_CLASS_WEIGHTS)
        + 0.1 * (p["head.weight"] ** 2).sum(),
        lambda g: torch.randn(7, 3, dtype=F64, generator=g),
        lambda g: torch.randint(0, 3, (7,), generator=g)),
    "tied weights (one-hot products beside the parts)": (
        lambda: TiedNet(3, 4).double(), lambda o, y, p: F.mse_loss(o, y),
        lambda g: torch.randn(7, 3, dtype=F64, generator=g),
        lambda g: torch.randn(7, 3, dtype=F64, generator=g)),
    "tokens, batch-first rows": (
        lambda: _TokenModel("batch").double(), lambda o, y, p: _token_loss("batch")(o, y),
        lambda g: torch.randn(7, 3, 2, dtype=F64, generator=g),
        lambda g: torch.randint(0, 3, (7, 3), generator=g)),
    "tokens, sequence-first rows": (
        lambda: _TokenModel("sequence").double(), lambda o, y, p: _token_loss("sequence")(o, y),
        lambda g: torch.randn(7, 3, 2, dtype=F64, generator=g),
        lambda g: torch.randint(0, 3, (7, 3), generator=g)),
}


@pytest.mark.parametrize("case", list(_PARTS))
def test_the_batch_in_parts_equals_the_oracle(case, monkeypatch):
    """Over the memory budget the sweep runs on parts of the batch seeded with the batch's
    ``dL/db``: the diagonal and blocks (parameter-only terms added once) and each
    sample's own diagonal (the parts' rows in order) equal the oracle's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    make, loss, inputs, targets = _PARTS[case]
    model = make()
    x, y = inputs(g), targets(g)
    params = _params(model)
    f = lambda p, x, y: loss(functional_call(model, p, (x,)), y, p)  # noqa: E731
    _budget_for(monkeypatch, f, (params, x, y), 2)
    plan, why = plan_diagonal(f, (params, x, y))
    assert plan is not None, why
    assert [(part.lo, part.hi) for part in plan.parts] == [(0, 2), (2, 4), (4, 7)]
    route = hf.explain(f, params, x, y)["hessian_diag"]
    assert (route.name, route.why) == ("structured", "the batch in 3 parts of 2 or 3 samples, "
                                       "to fit the frontier's per-sample curvature in the "
                                       "memory budget")
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    assert_close(hf.hessian_blocks(f)(params, x, y), _oracle_blocks(f, params, x, y))
    f = lambda p, x, y: loss(functional_call(model, p, (x,)), y, {  # noqa: E731
        "head.weight": torch.zeros(())})
    plan, why = plan_diagonal(f, (params, x, y), per_sample=True)
    evaluated = []  # the batch's plan is evaluated only where it seeds its parts
    evaluate = GraphPlan.evaluate
    monkeypatch.setattr(GraphPlan, "evaluate", lambda self, *args: (
        evaluated.append(bool(self.parts)), evaluate(self, *args))[1])
    if "sequence-first" in case:  # on one sample the transpose is a view, on the batch t:
        # each sample's loss under vmap, in parts too
        assert plan is not None and plan.one_sample is None, why
        assert len(plan.parts) >= 2 and all(part.plan.each_sample for part in plan.parts)
    elif "tied" in case:
        assert plan is None and why.startswith("some parameters take one-hot products"), why
    else:  # per-position losses too: each sample's rows of the batch axis
        assert len(plan.parts) == 3, why
    assert_close(hf.hessian_diag(f, per_sample=True)(params, x, y),
                 _oracle_per_sample(f, params, x, y))
    if plan is not None:
        assert evaluated.count(True) == (plan.one_sample is None), evaluated


@pytest.mark.parametrize(("loss", "samples", "why"), [
    (lambda o, y: ((o.reshape(-1) - y[1:]) ** 2).mean(), 2,  # (2 N + 1,): not rows
     "(f on part of the batch gets the inputs whose first axis has the batch's size, 5, "
     "cut to the part, and those whose first axis holds rows of every sample where their "
     "rows are proved, the others whole)"),
    (lambda o, y: F.mse_loss(o.reshape(-1), y[:o.numel()]), 2,  # the batch's first targets
     "f on part of the batch computes with other numbers: slice.Tensor takes 0, 0, 10 on "
     "the batch and 0, 0, 4 on part of the batch"),
    (lambda o, y: F.mse_loss(o, y - y.mean(0)), 2,
     "and the batch cannot be taken in parts: mean.dim computes from the data of several "
     "samples at once, and the values the loss sums over depend on it; f on part of the "
     "batch would see other data"),
    (lambda o, y: ((o - y) ** 2 / o.shape[0]).sum(), 2,
     "and the batch cannot be taken in parts: f on part of the batch computes with other "
     "numbers: div.Tensor takes 5 on the batch and 2 on part of the batch"),
    (F.mse_loss, 1, "even for two samples at a time"),
])
def test_the_batch_in_parts_refused_with_the_reason(loss, samples, why, monkeypatch):
    """Parts that f cannot take (targets of ``2 N + 1``, no rows of every sample: passed
    whole), whose values would not be the batch's (a value pooled from several samples'
    data, a number of the batch size below the sum), or a budget that two samples
    exceed: the plan says why, and the diagonal still equals the oracle's by products."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 2], "tanh", 3)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    if "cut to the part" in why or "slice" in why:
        y = torch.cat([y.reshape(-1), y[0, :1]])
    f = _plain(model, loss)
    params = _params(model)
    _budget_for(monkeypatch, f, (params, x, y), samples)
    plan, reason = plan_diagonal(f, (params, x, y))
    assert plan is None and reason.startswith("the per-sample curvature over the widest "
                                              "frontier needs") and reason.endswith(why), reason
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))


def _gathered_nll(o, y):
    """The NLL by ``gather``, with no op pairing the targets with the logits elementwise."""
    return -F.log_softmax(o, -1).gather(1, y.unsqueeze(1)).mean()


def _transposed_rows(o, y):  # the targets' rows paired with the logits' (N, T) transposed
    return (o.sum(-1).reshape(-1, 3).t().reshape(-1) - y.to(o.dtype)).pow(2).mean()


#: name -> (model's rows, loss of (out, y), targets (N, T = 3) -> flattened, why refused)
_FLAT_TARGETS = {
    "cross-entropy, batch-first rows": ("batch", F.cross_entropy, lambda y: y.reshape(-1),
                                        None),
    "cross-entropy, sequence-first rows, targets (T N,)": (
        "sequence", F.cross_entropy, lambda y: y.T.reshape(-1), None),
    "weighted, label smoothing": (
        "batch", lambda o, y: F.cross_entropy(o, y, weight=_CLASS_WEIGHTS, label_smoothing=0.1),
        lambda y: y.reshape(-1), None),
    "NLL by gather": ("batch", _gathered_nll, lambda y: y.reshape(-1), None),
    "read only above the sum": ("batch", lambda o, y: (o ** 2).sum() / (1 + y.sum()),
                                lambda y: y.reshape(-1), None),
    "centred by the batch's targets": (
        "batch", lambda o, y: F.cross_entropy(o - y.to(o.dtype).mean(), y),
        lambda y: y.reshape(-1), "(f on part of the batch gets the inputs"),
    "targets read only pooled (whole in every part)": (
        "batch", lambda o, y: ((o - y.to(o.dtype).mean()) ** 2).mean(),
        lambda y: y.reshape(-1), None),
    "rows paired in two layouts": (
        "batch", lambda o, y: _gathered_nll(o, y) + 0.1 * _transposed_rows(o, y),
        lambda y: y.reshape(-1), "(f on part of the batch gets the inputs"),
}


@pytest.mark.parametrize("case", list(_FLAT_TARGETS))
def test_targets_flattened_over_the_batch_cut_in_their_proved_rows(case, monkeypatch):
    """NOTE [rows of every sample]: targets passed flattened, ``(N T,)`` or ``(T N,)``, are
    cut to each part in the layout that the proof pairs with the logits' rows; a layout
    that only some of their uses pair with, or a value pooled from them below the sum,
    keeps them whole (the parts are refused where f cannot take them whole, and taken
    where it reads them only pooled). The diagonal and blocks equal the oracle's either
    way."""
    first, loss, flatten, why = _FLAT_TARGETS[case]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = _TokenModel(first).double()
    x, y = torch.randn(7, 3, 2, dtype=F64, generator=g), flatten(torch.randint(0, 3, (7, 3),
                                                                               generator=g))
    params = _params(model)
    f = lambda p, x, y: loss(functional_call(model, p, (x,)), y)  # noqa: E731
    _budget_for(monkeypatch, f, (params, x, y), 2)
    plan, reason = plan_diagonal(f, (params, x, y))
    if why is None:
        assert plan is not None and len(plan.parts) == 3, reason
    else:
        assert plan is None and why in reason, reason
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    assert_close(hf.hessian_blocks(f)(params, x, y), _oracle_blocks(f, params, x, y))


def test_flattened_targets_beside_other_inputs_cut_in_parts(monkeypatch):
    """Flattened targets among other inputs: per-sample weights ``(N,)``, a Python number,
    soft targets ``(N T, V)`` with a trailing axis, a table of ``2 N + 1`` rows read only
    pooled, above the loss's sum, and a scalar tensor. Each input is cut by its own rows
    (the weights by sample, the targets by the logits' rows) or passed whole, and the
    diagonal and blocks from three parts equal the oracle's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = _TokenModel("batch").double()
    x = torch.randn(7, 3, 2, dtype=F64, generator=g)
    w = torch.rand(7, dtype=F64, generator=g) + 0.5
    soft = torch.softmax(torch.randn(21, 3, dtype=F64, generator=g), -1)
    table, tau = torch.randn(15, dtype=F64, generator=g), torch.tensor(1.5, dtype=F64)

    def f(p, x, w, scale, soft, table, tau):
        o = functional_call(model, p, (x,)) / tau
        rows = -(soft * F.log_softmax(o, -1)).sum(-1)  # (N T,)
        weights = w[:, None].expand(-1, 3).reshape(-1)
        return scale * (weights * rows).mean() * (1 + 0.1 * table.mean())

    params = _params(model)
    args = (params, x, w, 0.5, soft, table, tau)
    _budget_for(monkeypatch, f, args, 2)
    plan, why = plan_diagonal(f, args)
    assert plan is not None and [(p.lo, p.hi) for p in plan.parts] == [(0, 2), (2, 4), (4, 7)], \
        why
    assert_close(hf.hessian_diag(f)(*args), _oracle_diag(f, *args))
    assert_close(hf.hessian_blocks(f)(*args), _oracle_blocks(f, *args))


@settings(deadline=None)
@given(dag=_dags(), data=st.data())
def test_the_batch_in_parts_of_any_dag_equals_the_oracle(dag, data):
    """Any drawn DAG, loss, frozen subset and weight decay, with a budget that holds two
    or three samples: the diagonal and blocks from parts of the batch (and each sample's
    own diagonal, without the decay) equal the loop oracle's."""
    kind, model = dag
    f, loss, params, x, y, frozen, decay = _drawn_loss(model, data, lambda w: w ** 2)
    n = x.shape[0]
    samples = data.draw(st.integers(2, 3))
    with pytest.MonkeyPatch.context() as mp:
        _budget_for(mp, f, (params, x, y), samples)
        plan, why = plan_diagonal(f, (params, x, y))
        if n <= samples:
            assert plan is not None and not plan.parts, why
        elif n < 4:  # no two parts of two samples or more
            assert plan is None and why.endswith("do not split into parts of two or more")
        else:
            assert plan is not None and len(plan.parts) >= 2, why
        assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
        assert_close(hf.hessian_blocks(f)(params, x, y), _oracle_blocks(f, params, x, y))
        if not decay and plan is not None and not plan.products:
            assert_close(hf.hessian_diag(f, per_sample=True)(params, x, y),
                         _oracle_per_sample(f, params, x, y))


def test_one_dimensional_targets_pooled_below_the_sum_keep_the_batch_whole(monkeypatch):
    """Targets ``(N,)`` are the batch's inputs as well as ``(N, C)`` ones: centred by their
    mean inside the loss, the parts are refused (f on part of the batch would centre by
    the part's mean), and each sample's own diagonal centres by its own target; both
    equal the oracle's."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 1], "tanh", 3)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, dtype=F64)
    f = _plain(model, lambda o, y: ((o[:, 0] - y + y.mean()) ** 2).mean())
    params = _params(model)
    _budget_for(monkeypatch, f, (params, x, y), 2)
    plan, reason = plan_diagonal(f, (params, x, y))
    assert plan is None and "mean.default computes from the data of several samples" in \
        reason, reason
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))
    assert_close(hf.hessian_diag(f, per_sample=True)(params, x, y),
                 _oracle_per_sample(f, params, x, y))


def test_three_samples_over_the_budget_do_not_split(monkeypatch):
    """Parts hold two samples or more: a batch of three whose two fit but whose three do
    not is refused (one part of three would be over the budget), and still exact."""
    torch.manual_seed(0)
    model = build_mlp([3, 4, 2], "tanh", 3)
    x, y = torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64)
    f = _plain(model, F.mse_loss)
    params = _params(model)
    _budget_for(monkeypatch, f, (params, x, y), 2)
    plan, reason = plan_diagonal(f, (params, x, y))
    assert plan is None and reason.endswith("and 3 samples do not split into parts of two "
                                            "or more"), reason
    assert_close(hf.hessian_diag(f)(params, x, y), _oracle_diag(f, params, x, y))


# ---- parameters read one element at a time (NOTE [parameters read one element at a time]) --

class _ReadOnce(nn.Module):
    """Token logits ``(N T, 2)`` through parameters each element of a value reads one
    element of: an embedding table (tokens repeated within a sample), positional
    embeddings ``(T, d)``, a LayerNorm, a scale, a dividend ``(1, d)``, offsets subtracted
    both ways and added with ``alpha``."""

    def __init__(self, padding_idx=None, vocab=5, length=3, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Parameter(torch.randn(length, d))
        self.norm = nn.LayerNorm(d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.div = nn.Parameter(torch.rand(1, d) + 1.0)
        self.minus, self.minuend, self.plus = (nn.Parameter(torch.randn(d)) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.emb(x) + self.pos))
        h = torch.sin(self.scale * h) + self.div / (1 + h * h)
        h = torch.tanh(h - self.minus) * torch.tanh(self.minuend - h)
        return self.head(torch.tanh(torch.add(h, self.plus, alpha=2.0))).reshape(-1, 2)


#: rounding to quarters, its gradient passed straight through; the identity, its derivative
#: stated as 2
_StraightThrough = custom_function(lambda z: torch.round(z * 4) / 4, 1.0)
_DoubledGradient = custom_function(lambda z: z.clone(), 2.0)


@pytest.mark.parametrize("alias", [False, True])
@pytest.mark.parametrize("function", [_StraightThrough, _DoubledGradient])
@pytest.mark.parametrize("route", ["hvp_fn", "hessian_diag", "hessian", "HessianOperator",
                                   "ggn_diag", "ggn_vp"])
def test_custom_autograd_functions_keep_their_derivative_rules(route, function, alias):
    """A trace runs a ``torch.autograd.Function``'s forward and keeps its ops, not the
    rules it states; the captured routes differentiated those ops (1.5-3 off the oracle
    here). A function that applies one is not captured, and every route follows its
    rules, as autograd and the oracle do, whether it calls ``Function.apply`` inline or
    through an alias bound beforehand (``cube = Cube.apply``, as libraries export their
    kernels)."""
    apply = function.apply
    gen = torch.Generator().manual_seed(3)
    p = {"w1": torch.randn(4, 3, generator=gen, dtype=torch.float64),
         "w2": torch.randn(2, 4, generator=gen, dtype=torch.float64)}
    x, y = (torch.randn(8, 3, generator=gen, dtype=torch.float64),
            torch.randn(8, 2, generator=gen, dtype=torch.float64))

    def g(p, x):
        z = x @ p["w1"].T
        return torch.tanh(apply(z) if alias else function.apply(z)) @ p["w2"].T

    def f(p, x, y):
        return F.mse_loss(g(p, x), y)

    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in p.items()}
    if route.startswith("ggn"):
        loss, leaves = oracle_loss(g, p, x)
        want = hf.reference.ggn(loss, F.mse_loss, y, list(leaves.values()))
    else:
        want = oracle_hessian(f, p, x, y)
    got = {"hvp_fn": lambda: flat(hf.hvp_fn(f, (p, x, y))(v)),
           "hessian_diag": lambda: flat(hf.hessian_diag(f)(p, x, y)),
           "hessian": lambda: hf.hessian(f, flat=True)(p, x, y),
           "HessianOperator": lambda: hf.HessianOperator(f, p, (x, y)) @ flat(v),
           "ggn_diag": lambda: flat(hf.ggn_diag(g, F.mse_loss)(p, x, y)),
           "ggn_vp": lambda: flat(hf.ggn_vp(g, F.mse_loss, (p, x, y), v))}[route]()
    if route in ("hvp_fn", "HessianOperator", "ggn_vp"):
        want = want @ flat(v)
    elif route != "hessian":
        want = torch.diagonal(want)
    assert_close(got, want)


@pytest.mark.parametrize("function", [_StraightThrough, _DoubledGradient])
def test_input_laplacians_keep_a_custom_functions_rules(function):
    """The input engine captures ``u`` too: a ``Function`` in it keeps its rules there."""
    x = torch.randn(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def u(x):
        return torch.sin(function.apply(x)).sum() * x.pow(2).sum()

    assert_close(hf.laplacian(u)(x), hf.reference.laplacian(u, x))


def test_torchs_reentrant_checkpoint_is_captured_as_its_forward():
    """torch's own reentrant checkpoint is a ``Function`` whose backward recomputes the
    forward and differentiates it: the one kept in the captured graph, equal to the
    oracle's derivatives of the same model without checkpointing. The Functions' context
    class has torch's own ``__init__`` again after the capture."""
    context = torch.autograd.function.BackwardCFunction
    init = context.__dict__.get("__init__")
    gen = torch.Generator().manual_seed(4)
    p = {"w1": torch.randn(4, 3, generator=gen, dtype=torch.float64),
         "w2": torch.randn(2, 4, generator=gen, dtype=torch.float64)}
    x, y = (torch.randn(8, 3, generator=gen, dtype=torch.float64),
            torch.randn(8, 2, generator=gen, dtype=torch.float64))

    def f(p, x, y, checkpointed=True):
        h = x @ p["w1"].T
        h = checkpoint(torch.tanh, h, use_reentrant=True) if checkpointed else torch.tanh(h)
        return F.mse_loss(h @ p["w2"].T, y)

    assert _cache(f).get((p, x, y)) is not None
    assert context.__dict__.get("__init__") is init
    want = oracle_hessian(lambda p, x, y: f(p, x, y, False), p, x, y)
    assert_close(flat(hf.hessian_diag(f)(p, x, y)), torch.diagonal(want))


_COUNTED_ROUTES = {
    "hessian_diag": lambda f, g, p, v, b: hf.hessian_diag(f)(p, *b),
    "hessian_diag per sample": lambda f, g, p, v, b: hf.hessian_diag(f, per_sample=True)(p, *b),
    "hessian": lambda f, g, p, v, b: hf.hessian(f)(p, *b),
    "hessian_blocks": lambda f, g, p, v, b: hf.hessian_blocks(f)(p, *b),
    "hvp_fn": lambda f, g, p, v, b: hf.hvp_fn(f, (p, *b))(v),
    "HessianOperator": lambda f, g, p, v, b: hf.HessianOperator(f, p, b) @ flat(v),
    "ggn_diag": lambda f, g, p, v, b: hf.ggn_diag(g, F.mse_loss)(p, *b),
    "ggn_diag per sample": lambda f, g, p, v, b: hf.ggn_diag(g, F.mse_loss, per_sample=True)(
        p, *b),
    "ggn_vp": lambda f, g, p, v, b: hf.ggn_vp(g, F.mse_loss, (p, *b), v),
    "GGNOperator": lambda f, g, p, v, b: hf.GGNOperator(g, F.mse_loss, p, b) @ flat(v),
}


@pytest.mark.parametrize("table", ["parameter", "computed", "module", "bag"])
@pytest.mark.parametrize("route", sorted(_COUNTED_ROUTES))
def test_a_lookup_whose_gradient_torch_scales_by_counts_is_refused(route, table):
    """``scale_grad_by_freq=True`` makes autograd divide a table's gradient by each token's
    count in the batch: no derivative of the function, so its "Hessian" is not symmetric
    and each route gave another matrix (0.2-0.3 apart here). Every route that captures the
    function refuses it, naming the table's argument, whether the table is a parameter,
    computed from one, or a module's, and in ``embedding_bag`` too."""
    torch.manual_seed(0)
    x, y = torch.tensor([[0, 1], [1, 1], [2, 4]]), torch.randn(3, 2, 2, dtype=torch.float64)
    if table == "module":
        model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Tanh(),
                              nn.Linear(3, 2)).double()
        g, p = hf.functionalize(model)
        name = "0.weight"
    else:
        p = {"E": torch.randn(5, 3, dtype=torch.float64), "w": torch.randn(2, 3,
                                                                        dtype=torch.float64)}
        name = "E"

        def g(p, x):
            E = p["E"] * 2.0 if table == "computed" else p["E"]
            lookup = F.embedding_bag(x, E, scale_grad_by_freq=True).unsqueeze(1).expand(
                -1, 2, -1) if table == "bag" else F.embedding(x, E, scale_grad_by_freq=True)
            return F.linear(torch.tanh(lookup), p["w"])

    def f(p, x, y):
        return F.mse_loss(g(p, x), y)

    v = {k: torch.randn_like(t) for k, t in p.items()}
    with pytest.raises(hf.ArgumentError, match=re.escape(f"args[0]['{name}']") +
                       ".*scale_grad_by_freq=False"):
        _COUNTED_ROUTES[route](f, g, p, v, (x, y))


def test_a_frozen_table_with_counted_gradients_is_no_parameter():
    """The refusal is for differentiated tables only: frozen, the table is a constant, the
    counts change nothing, and the diagonals equal the oracle's. One-shot ``hvp`` does not
    capture: it returns autograd's double backward, the oracle's ``hvp`` exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Tanh(),
                          nn.Linear(3, 2)).double()
    x, y = torch.tensor([[0, 1], [1, 1], [2, 4]]), torch.randn(3, 2, 2, dtype=torch.float64)
    g, p = hf.functionalize(model)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    loss, leaves = oracle_loss(lambda q, x, y: F.mse_loss(g(q, x), y), p, x, y)
    want = hf.reference.hvp(loss, list(leaves.values()), list(v.values()))
    assert_close(flat(hf.hvp(lambda q, x, y: F.mse_loss(g(q, x), y), (p, x, y), v)),
                 torch.cat([t.reshape(-1) for t in want]))
    model[0].weight.requires_grad_(False)
    g, p = hf.functionalize(model)
    f = lambda q, x, y: F.mse_loss(g(q, x), y)  # noqa: E731
    H = oracle_hessian(f, p, x, y)
    assert_close(flat(hf.hessian_diag(f)(p, x, y)), torch.diagonal(H))
    loss, leaves = oracle_loss(g, p, x)
    G = hf.reference.ggn(loss, F.mse_loss, y, list(leaves.values()))
    assert_close(flat(hf.ggn_diag(g, F.mse_loss)(p, x, y)), torch.diagonal(G))


@pytest.mark.parametrize("padding", [None, 0])
@pytest.mark.parametrize("quantity", ["hessian", "ggn"])
def test_parameters_read_one_element_at_a_time_sum_their_reads(quantity, padding, monkeypatch):
    """Each such site's diagonal sums ``D S``'s rows by the element read before squaring
    (a token twice in a sample, a feature at every position), per sample and for the
    batch, equal to the oracle's. Autograd gives an embedding's padding row no gradient:
    its diagonal is zero there, and the table's block from pushed tangents leaves that
    row out too (forward mode gave it a derivative, a wrong number in both)."""
    from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal

    torch.manual_seed(5)
    model = _ReadOnce(padding).double()
    x = torch.tensor([[1, 1, 2], [3, 0, 3], [4, 1, 1]])
    y = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 1, 0]])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(p, x):
        return functional_call(model, p, (x,))

    def loss_fn(o, t):  # curvature of both signs at the logits: factor columns signed
        return F.cross_entropy(o, t.reshape(-1)) + torch.sin(3 * o).sum()

    def f(p, x, y):
        return loss_fn(g(p, x), y)

    if quantity == "hessian":
        plan, why = plan_diagonal(f, (params, x, y))
        fn = lambda per_sample: hf.hessian_diag(f, per_sample=per_sample)  # noqa: E731
    else:
        plan, why = plan_ggn_diagonal(GGNLoss.of(g, loss_fn), (params, x, y))
        fn = lambda per_sample: hf.ggn_diag(g, loss_fn, per_sample=per_sample)  # noqa: E731
    assert plan is not None and not plan.products, why
    plan.evaluate()
    names = list(params)
    read = {names[i] for i, site in plan.sites.items() if plan._reads(site) is not None}
    assert read == {"emb.weight", "pos", "norm.weight", "norm.bias", "scale", "div", "minus",
                    "minuend", "plus"}

    def oracle(rows):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        if quantity == "hessian":
            return torch.diagonal(hf.reference.hessian(f(leaves, x[rows], y[rows]),
                                                       list(leaves.values())))
        return torch.diagonal(hf.reference.ggn(g(leaves, x[rows]), loss_fn, y[rows],
                                               list(leaves.values())))

    with monkeypatch.context() as m:  # no tangent pushed per element of a parameter
        m.setattr(GraphPlan, "_pushed_diagonal", lambda *a: pytest.fail("pushed tangents"))
        whole, rows = fn(False)(params, x, y), fn(True)(params, x, y)
    assert_close(flat(whole), oracle(slice(None)))
    for n in range(3):
        assert_close(flat({k: v[n] for k, v in rows.items()}), oracle(slice(n, n + 1)))
    if quantity == "hessian":
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        full = hf.reference.hessian(f(leaves, x, y), list(leaves.values()))
        at = sum(p.numel() for k, p in params.items() if names.index(k) < names.index(
            "emb.weight"))
        k = params["emb.weight"].numel()
        blocks = hf.hessian_blocks(f)(params, x, y)
        assert_close(blocks["emb.weight"], full[at:at + k, at:at + k])


def test_each_samples_loss_under_vmap_takes_a_python_number_among_the_inputs():
    """NOTE [per-sample losses]: ``x = (tensor, 2.0)``; under ``vmap`` the number is no
    batched input (``in_dims`` None), and each sample's diagonal equals the oracle's."""
    torch.manual_seed(0)
    model = Attention().double().eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[0],)) / x[1], y)

    plan, why = plan_diagonal(f, (params, (x, 2.0), y), per_sample=True)
    assert plan is not None and plan.own_losses, why
    rows = hf.hessian_diag(f, per_sample=True)(params, (x, 2.0), y)
    with second_order_kernels():
        for n in range(4):
            one, leaves = oracle_loss(f, params, (x[n:n + 1], 2.0), y[n:n + 1])
            assert_close({k: v[n] for k, v in rows.items()},
                         hf.reference.hessian_diag(one, leaves))
