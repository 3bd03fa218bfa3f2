"""Surface that was exact but untested: every elementwise module of the structured engine,
``argnums`` other than 0, float32 against the float64 truth, edge inputs, and layers
that torch can differentiate only once.

Truth is always independent of hessfunc's routes: ``hf.reference`` (loop-based
autograd) on a graph plain autograd builds from ``torch.func.functional_call``, or a
closed form. float64 results must match at rtol 1e-10 with atol 1e-12 times the
largest magnitude of the truth; float32 results (same point: float32 numbers are
exact in float64) must match the float64 truth within ``tests/_helpers.TOL``'s
float32 row, rtol 2e-4 with atol 1e-5 times that magnitude.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOL, flat, unflat
from torch import nn

import hessfunc as hf
from hessfunc.graph.chain import graph_chain
from hessfunc.graph.chain_plan import _Elementwise, _Linear

F64, F32 = torch.float64, torch.float32


def _close(actual, expected, dtype=F64):
    """Leaf by leaf (dicts, tuples, or one tensor), atol scaled by the truth's magnitude
    (the leaf's, or the largest of all leaves where the leaf is zero)."""
    rtol, atol = TOL[dtype]
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        actual, expected = list(actual.values()), list(expected.values())
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        top = max(float(e.abs().max()) for e in expected) or 1.0
        for a, e in zip(actual, expected, strict=True):
            mag = float(e.abs().max()) or top
            torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=atol * mag)
        return
    mag = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * mag)


def _plain_loss(model, loss_fn, params, x, y):
    """The loss on a graph plain autograd builds from fresh float64 leaves."""
    leaves = {k: p.detach().to(F64).clone().requires_grad_(True) for k, p in params.items()}
    return loss_fn(torch.func.functional_call(model, leaves, (x,)), y), leaves


def _oracle(model, loss_fn, params, x, y, v=None):
    """Flat Hessian, diagonal, blocks and (given v) H v from the loop oracle."""
    loss, leaves = _plain_loss(model, loss_fn, params, x, y)
    H = hf.reference.hessian(loss, list(leaves.values()))
    out = {"hessian": H, "diag": unflat(H.diagonal(), params),
           "blocks": hf.reference.hessian_blocks(loss, leaves)}
    if v is not None:
        out["hvp"] = unflat(H @ flat(v).to(F64), params)
    return out


def _per_sample_oracle(model, loss_fn, params, x, y):
    diags = []
    for n in range(x.shape[0]):
        loss, leaves = _plain_loss(model, loss_fn, params, x[n:n + 1], y[n:n + 1])
        diags.append(hf.reference.hessian_diag(loss, leaves))
    return {k: torch.stack([d[k] for d in diags]) for k in params}




def _tangent(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
            for k, p in params.items()}


# ---------------------------------------------------------------- elementwise modules
class HardsigmoidByHardtanh(nn.Module):
    """``hardsigmoid(x) = hardtanh(x / 6 + 1/2, 0, 1)``, twice differentiable by autograd
    (torch has no derivative of ``hardsigmoid_backward``): the oracle's Hardsigmoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x / 6 + 0.5, 0.0, 1.0)


ACTIVATION_MODULES = [
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.ReLU,
    nn.LeakyReLU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.ReLU6,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
]
#: where each piecewise activation (or its derivative) has a kink
KINKS = {
    nn.ReLU: [0.0], nn.LeakyReLU: [0.0], nn.ELU: [0.0], nn.CELU: [0.0], nn.SELU: [0.0],
    nn.Softsign: [0.0], nn.ReLU6: [0.0, 6.0], nn.Hardtanh: [-1.0, 1.0],
    nn.Hardswish: [-3.0, 3.0], nn.Hardsigmoid: [-3.0, 3.0],
}
ACT_SIZES = [3, 5, 4, 2]
ACT_N = 10


@pytest.mark.parametrize("act", ACTIVATION_MODULES, ids=lambda a: a.__name__)
def test_every_activation_is_one_elementwise_link_of_the_graph_chain(act):
    """Whatever ops an activation decomposes into (ELU's where of two branches reads its
    input three times, LogSigmoid's a zeros_like of it), the chain in the captured graph
    takes it as one elementwise map; Identity leaves no op."""
    _, _, f, params, x, y = _act_problem(act)
    plan, reason = graph_chain(f, (params, x, y), 0)
    assert plan is not None, reason
    kinds = [type(s) for s in plan.steps]
    between = [] if act is nn.Identity else [_Elementwise]
    assert kinds == [_Linear, *between, _Linear, *between, _Linear]


def _act_model(act, oracle=False):
    torch.manual_seed(4)
    layers = []
    for i, (a, b) in enumerate(zip(ACT_SIZES[:-1], ACT_SIZES[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(ACT_SIZES) - 2:
            layers.append(HardsigmoidByHardtanh() if oracle and act is nn.Hardsigmoid
                          else act())
    model = nn.Sequential(*layers).double()
    if act in KINKS:  # spread the pre-activations over every piece of the activation
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(6.0)
                    m.bias.mul_(6.0)
    return model


@functools.cache
def _act_problem(act):
    model = _act_model(act)
    g = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(ACT_N, ACT_SIZES[0], generator=g, dtype=F64)
    y = torch.randn(ACT_N, ACT_SIZES[-1], generator=g, dtype=F64)
    loss_fn = nn.MSELoss()
    f, params = hf.functionalize(model, loss_fn)
    return model, loss_fn, f, params, x, y


def _pre_activations(model, x):
    zs = []
    with torch.no_grad():
        h = x
        for m in model:
            if not isinstance(m, nn.Linear):
                zs.append(h)
            h = m(h)
    return zs


@functools.cache
def _act_truth(act):
    model, loss_fn, _, params, x, y = _act_problem(act)
    oracle_model = _act_model(act, oracle=True)
    oracle_model.load_state_dict(model.state_dict())
    truth = _oracle(oracle_model, loss_fn, params, x, y, _tangent(params))
    truth["per-sample"] = _per_sample_oracle(oracle_model, loss_fn, params, x, y)
    return truth


@pytest.mark.parametrize("act", list(KINKS), ids=lambda a: a.__name__)
def test_piecewise_activations_see_every_piece_and_no_kink(act):
    model, *_, x, _ = _act_problem(act)
    for z in _pre_activations(model, x):
        for kink in KINKS[act]:
            assert (z < kink - 0.05).any() and (z > kink + 0.05).any(), (act, kink)
            assert ((z - kink).abs() > 1e-6).all(), (act, kink)
        if act in (nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid):  # the middle piece
            lo, hi = KINKS[act]
            assert ((z > lo) & (z < hi)).any(), act


@pytest.mark.parametrize("quantity", ["hvp-structured", "diag", "diag-per-sample",
                                      "hessian-flat"])
@pytest.mark.parametrize("act", ACTIVATION_MODULES, ids=lambda a: a.__name__)
def test_activation_quantity_equals_oracle(act, quantity):
    _, _, f, params, x, y = _act_problem(act)
    truth = _act_truth(act)
    assert truth["hessian"].abs().max() > 1e-3
    if quantity == "hvp-structured":
        _close(hf.hvp(f, (params, x, y), _tangent(params), method="structured"), truth["hvp"])
    elif quantity == "diag":
        _close(hf.hessian_diag(f, method="structured")(params, x, y), truth["diag"])
    elif quantity == "diag-per-sample":
        got = hf.hessian_diag(f, per_sample=True, method="structured")(params, x, y)
        _close(got, truth["per-sample"])
    else:
        plan, reason = graph_chain(f, (params, x, y), 0)
        assert plan.per_sample_blocks(), reason  # hf.hessian takes the structured full Hessian
        _close(hf.hessian(f, flat=True)(params, x, y), truth["hessian"])


# ------------------------------------------------ layers torch differentiates once
ONCE = [nn.Hardsigmoid, nn.Hardswish, nn.ReLU6, nn.Hardtanh]


def _plain_f(model, loss_fn):
    """Not made by functionalize: every quantity takes the generic (graph) route."""
    return lambda p, x, y: loss_fn(torch.func.functional_call(model, p, (x,)), y)


@pytest.mark.parametrize("act", ONCE, ids=lambda a: a.__name__)
def test_hard_activations_on_the_generic_route(act):
    """Hardswish, ReLU6 and Hardtanh have second-derivative rules in torch: the generic
    route equals the oracle. Hardsigmoid has none (aten::hardsigmoid_backward): the
    diagonal, the blocks, and the products (a single ``hvp`` too, when the double backward
    meets the missing derivative), the operator and the full Hessian on the chain read off
    the captured graph, where hardsigmoid is decomposed into clamps, equal the oracle;
    every other generic second-order quantity raises hessfunc's ArgumentError
    naming the op, the module and the fix, instead of torch's bare RuntimeError."""
    model, loss_fn, _, params, x, y = _act_problem(act)
    f = _plain_f(model, loss_fn)
    v = _tangent(params)
    calls = {
        "hvp": lambda: hf.hvp(f, (params, x, y), v),
        "hvp-forward": lambda: hf.hvp(f, (params, x, y), v, mode="forward-over-reverse"),
        "hvp_fn": lambda: hf.hvp_fn(f, (params, x, y))(v),
        "diag": lambda: hf.hessian_diag(f)(params, x, y),
        "hessian": lambda: hf.hessian(f, flat=True)(params, x, y),
        "blocks": lambda: hf.hessian_blocks(f)(params, x, y),
        "operator": lambda: hf.HessianOperator(f, params, (x, y)) @ flat(v),
        "vmap-diag": lambda: torch.func.vmap(hf.hessian_diag(f), in_dims=(None, 0, 0))(
            params, x[:, None], y[:, None]),
    }
    if act is nn.Hardsigmoid:
        truth = _act_truth(act)
        _close(calls.pop("diag")(), truth["diag"])
        _close(calls.pop("blocks")(), truth["blocks"])
        # a chain in the captured graph, hardsigmoid's clamps an elementwise map
        _close(calls.pop("hvp_fn")(), truth["hvp"])
        _close(calls.pop("hvp")(), truth["hvp"])
        _close(calls.pop("hvp-forward")(), truth["hvp"])
        _close(calls.pop("operator")(), flat(truth["hvp"]))
        _close(calls.pop("hessian")(), truth["hessian"])
        for name, call in calls.items():
            with pytest.raises(hf.ArgumentError,
                               match=r"no derivative for aten::hardsigmoid_backward.*"
                                     r"nn\.Hardsigmoid.*Replace it with F\.hardtanh") as info:
                call()
            assert info.value.__cause__ is None and info.value.__suppress_context__, name
        return
    truth = _act_truth(act)
    for name in ("hvp", "hvp-forward", "hvp_fn"):
        _close(calls[name](), truth["hvp"])
    _close(calls["diag"](), truth["diag"])
    _close(calls["hessian"](), truth["hessian"])
    _close(calls["blocks"](), truth["blocks"])
    _close(calls["operator"](), flat(truth["hvp"]))
    _close(calls["vmap-diag"](), truth["per-sample"])


def test_hardsigmoid_chain_takes_the_structured_route_everywhere():
    """A Linear/Hardsigmoid chain made by functionalize: every quantity (hvp, hvp_fn,
    diagonal, per-sample diagonals, blocks, full Hessian, operator) is structured and
    equals the oracle of the same model with hardtanh(x / 6 + 1/2)."""
    model, loss_fn, f, params, x, y = _act_problem(nn.Hardsigmoid)
    truth = _act_truth(nn.Hardsigmoid)
    v = _tangent(params)
    _close(hf.hvp(f, (params, x, y), v), truth["hvp"])
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    _close(H(v), truth["hvp"])
    _close(hf.hessian_diag(f)(params, x, y), truth["diag"])
    _close(hf.hessian_diag(f, per_sample=True)(params, x, y), truth["per-sample"])
    _close(hf.hessian_blocks(f)(params, x, y), truth["blocks"])
    _close(hf.hessian(f, flat=True)(params, x, y), truth["hessian"])
    op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    _close(op @ flat(v), flat(truth["hvp"]))
    _close(op.diagonal(), truth["hessian"].diagonal())


def test_hardsigmoid_derivatives_in_the_graph_chain():
    """The captured graph decomposes Hardsigmoid into ``clamp(z + 3, 0, 6) / 6``, whose
    derivatives torch has: phi' = 1/6 inside (-3, 3) and 0 outside, phi'' = 0. In float64
    phi' is 1/6 to double precision: torch 2.13's own hardsigmoid_backward multiplies by
    float32(1/6), 5e-9 off."""
    for dtype in (F64, F32):
        z = torch.tensor([[-5.0, -3.5, -2.9, 0.0, 1.0, 2.99, 3.5, 7.0]], dtype=dtype)
        model = nn.Sequential(nn.Linear(1, 1), nn.Hardsigmoid(), nn.Linear(1, 1)).to(dtype)
        with torch.no_grad():  # the first layer is the identity: z is the pre-activation
            model[0].weight.fill_(1.0)
            model[0].bias.zero_()
        f, params = hf.functionalize(model, nn.MSELoss())
        plan, reason = graph_chain(f, (params, z.T, torch.zeros(8, 1, dtype=dtype)), 0)
        assert plan is not None, reason
        (act,) = [s for s in plan.steps if isinstance(s, _Elementwise)]
        expected = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]], dtype=dtype).T / 6
        assert torch.equal(act.phi1, expected)
        assert torch.equal(act.phi2, torch.zeros_like(expected))


# ------------------------------------------------------------------------- argnums
@functools.cache
def _arg_problem():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Softplus(),
                          nn.Linear(2, 2)).double()
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    y = torch.randn(4, 2, generator=g, dtype=F64)
    loss_fn = nn.MSELoss()
    f, params = hf.functionalize(model, loss_fn)
    return model, loss_fn, f, params, x, y


def _input_loss(model, loss_fn, params):
    """x -> loss, on a plain graph (parameters fixed)."""
    fixed = {k: p.detach() for k, p in params.items()}
    return lambda x, y: loss_fn(torch.func.functional_call(model, fixed, (x,)), y)


def test_argnums_1_grad_and_both():
    model, loss_fn, f, params, x, y = _arg_problem()
    loss, leaves = _plain_loss(model, loss_fn, params, xl := x.clone().requires_grad_(True), y)
    grads = torch.autograd.grad(loss, [*leaves.values(), xl])
    _close(hf.grad(f, argnums=1)(params, x, y), grads[-1])
    gp, gx = hf.grad(f, argnums=(0, 1))(params, x, y)
    _close(gp, dict(zip(leaves, grads[:-1], strict=True)))
    _close(gx, grads[-1])
    gy = hf.grad(f, argnums=-1)(params, x, y)  # closed form: d/dy mean (o - y)^2
    with torch.no_grad():
        out = model(x)
    _close(gy, -2 * (out - y) / y.numel())


def test_argnums_1_second_order_quantities():
    model, loss_fn, f, params, x, y = _arg_problem()
    u = _input_loss(model, loss_fn, params)
    xl = x.clone().requires_grad_(True)
    loss = u(xl, y)
    H = hf.reference.hessian(loss, [xl])                    # (N d, N d)
    vx = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    (hv,) = hf.reference.hvp(loss, [xl], [vx])
    _close(hf.hvp(f, (params, x, y), vx, argnums=1), hv)
    _close(hf.hvp(f, (params, x, y), vx, argnums=1, mode="forward-over-reverse"), hv)
    _close(hf.hvp_fn(f, (params, x, y), argnums=1)(vx), hv)
    _close(hf.hessian(f, argnums=1)(params, x, y), H.reshape(*x.shape, *x.shape))
    _close(hf.hessian(f, argnums=1, flat=True)(params, x, y), H)
    _close(hf.hessian_blocks(f, argnums=1)(params, x, y), H)
    diag = hf.reference.input_hessian_diag(lambda t: u(t, y), x)
    _close(diag, H.diagonal().reshape(x.shape))            # the two oracles agree
    _close(hf.hessian_diag(f, argnums=1)(params, x, y), diag)
    # the samples do not interact: H is block diagonal over samples
    n, d = x.shape
    off = H.reshape(n, d, n, d).clone()
    off[range(n), :, range(n), :] = 0
    assert torch.equal(off, torch.zeros_like(off))


def test_argnums_targets_closed_form():
    """d^2/dy^2 of mean((o - y)^2) is 2 / numel * I, whatever the model."""
    _, _, f, params, x, y = _arg_problem()
    eye = torch.eye(y.numel(), dtype=F64) * 2 / y.numel()
    _close(hf.hessian(f, argnums=2, flat=True)(params, x, y), eye)
    _close(hf.hessian(f, argnums=-1)(params, x, y), eye.reshape(*y.shape, *y.shape))
    _close(hf.hessian_diag(f, argnums=2)(params, x, y), torch.full_like(y, 2 / y.numel()))
    _close(hf.hessian_blocks(f, argnums=2)(params, x, y), eye)
    _close(hf.hvp(f, (params, x, y), y, argnums=2), 2 * y / y.numel())


@pytest.mark.parametrize("name", ["hvp", "hvp_fn", "hessian", "hessian_diag",
                                  "hessian_blocks"])
def test_tuple_argnums_refused_where_unsupported(name):
    _, _, f, params, x, y = _arg_problem()
    calls = {
        "hvp": lambda: hf.hvp(f, (params, x, y), (params, x), argnums=(0, 1)),
        "hvp_fn": lambda: hf.hvp_fn(f, (params, x, y), argnums=(0, 1)),
        "hessian": lambda: hf.hessian(f, argnums=(0, 1))(params, x, y),
        "hessian_diag": lambda: hf.hessian_diag(f, argnums=(0, 1))(params, x, y),
        "hessian_blocks": lambda: hf.hessian_blocks(f, argnums=(0, 1))(params, x, y),
    }
    with pytest.raises(hf.ArgumentError, match=r"`argnums` must be an int, got \(0, 1\)"):
        calls[name]()


# ------------------------------------------------------------------------- float32
@functools.cache
def _f32_problem():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(),
                          nn.Linear(5, 3))  # float32
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 4, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    f, params = hf.functionalize(model, loss_fn)
    model64 = _copy64(model)
    truth = _oracle(model64, loss_fn, params, x.double(), y, _tangent(params))
    truth["per-sample"] = _per_sample_oracle(model64, loss_fn, params, x.double(), y)
    return model, loss_fn, f, params, x, y, truth


def _copy64(model):
    return copy.deepcopy(model).double()


def test_float32_point_is_exact_in_float64():
    _, _, _, params, x, _, truth = _f32_problem()
    assert all(p.dtype == F32 for p in params.values()) and x.dtype == F32
    assert torch.equal(x.double().float(), x)
    assert truth["hessian"].dtype == F64


@pytest.mark.parametrize("quantity", ["hessian", "hessian-nested", "hessian_blocks",
                                      "diag", "diag-per-sample", "hvp", "operator-matvec",
                                      "operator-matmat", "operator-diagonal",
                                      "operator-dense"])
def test_float32_agrees_with_float64_oracle(quantity):
    """float32 within rtol 2e-4, atol 1e-5 x max|truth| of the float64 oracle."""
    model, loss_fn, f, params, x, y, truth = _f32_problem()
    v = _tangent(params)
    if quantity == "hessian":
        got = hf.hessian(f, flat=True)(params, x, y)
        assert got.dtype == F32
        _close(got, truth["hessian"], F32)
    elif quantity == "hessian-nested":
        nested = hf.hessian(f)(params, x, y)
        rows = [torch.cat([nested[a][b].reshape(params[a].numel(), -1) for b in params], 1)
                for a in params]
        _close(torch.cat(rows), truth["hessian"], F32)
    elif quantity == "hessian_blocks":
        _close(hf.hessian_blocks(f)(params, x, y), truth["blocks"], F32)
    elif quantity == "diag":
        _close(hf.hessian_diag(f)(params, x, y), truth["diag"], F32)
    elif quantity == "diag-per-sample":
        got = hf.hessian_diag(f, per_sample=True)(params, x, y)
        assert all(t.dtype == F32 for t in got.values())
        _close(got, truth["per-sample"], F32)
    elif quantity == "hvp":
        _close(hf.hvp(f, (params, x, y), v), truth["hvp"], F32)
        _close(hf.hvp(f, (params, x, y), v, method="graph"), truth["hvp"], F32)
    else:
        op = hf.HessianOperator.from_model(model, loss_fn, [(x[:3], y[:3]), (x[3:], y[3:])])
        assert op.dtype == F32
        H = truth["hessian"]
        if quantity == "operator-matvec":
            _close(op @ flat(v), H @ flat(v).double(), F32)
        elif quantity == "operator-matmat":
            V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(5))
            _close(op @ V, H @ V.double(), F32)
        elif quantity == "operator-diagonal":
            _close(op.diagonal(), H.diagonal(), F32)
        else:
            _close(op.to_dense(), H, F32)


def _conv_model(dim):
    torch.manual_seed(9)
    if dim == 1:
        layers = [nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2),
                  nn.Softplus(), nn.Flatten(), nn.Linear(2 * 3, 3)]
        x = torch.randn(5, 2, 6)
    else:
        layers = [nn.Conv2d(2, 3, (2, 3), padding=(1, 0)), nn.Tanh(),
                  nn.Conv2d(3, 2, 2, stride=(2, 1)), nn.Softplus(), nn.Flatten(),
                  nn.Linear(2 * 2 * 1, 3)]
        x = torch.randn(5, 2, 3, 4)
    return nn.Sequential(*layers), x


@pytest.mark.parametrize("dim", [1, 2])
def test_float32_convolution_products_agree_with_float64_oracle(dim):
    """Structured conv products in float32: hvp, hvp_fn (k tangents) and the operator,
    within rtol 2e-4, atol 1e-5 x max|truth| of the float64 oracle."""
    model, x = _conv_model(dim)
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    loss_fn = nn.CrossEntropyLoss()
    f, params = hf.functionalize(model, loss_fn)
    v = _tangent(params)
    truth = _oracle(_copy64(model), loss_fn, params, x.double(), y, v)
    H = truth["hessian"]
    _close(hf.hvp(f, (params, x, y), v, method="structured"), truth["hvp"], F32)
    Hf = hf.hvp_fn(f, (params, x, y), method="structured")
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(4))
    batched = Hf.batched(_unflat_batched(V, params))
    _close(torch.cat([t.reshape(3, -1) for t in batched.values()], 1), (H @ V.double().T).T,
           F32)
    op = hf.HessianOperator(f, params, (x, y))
    _close(op @ flat(v), H @ flat(v).double(), F32)
    _close(op.diagonal(), H.diagonal(), F32)


def _unflat_batched(V, params):
    out, i = {}, 0
    for k, p in params.items():
        out[k] = V[:, i:i + p.numel()].reshape(V.shape[0], *p.shape)
        i += p.numel()
    return out


# --------------------------------------------------------------------- edge inputs
def _edge(case):
    """(model, loss_fn, x, y) for an edge case, float64."""
    g = torch.Generator().manual_seed(11)
    loss_fn = nn.MSELoss()
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Softplus(),
                          nn.Linear(3, 2)).double()
    x = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.randn(5, 2, generator=g, dtype=F64)
    if case == "zero-inputs":
        x = torch.zeros_like(x)
    elif case == "duplicate-rows":
        x = torch.cat([x[:2], x[:2], x[:1]])
        y = torch.cat([y[:2], y[:2], y[:1]])
    elif case == "saturated-tanh":
        x = 1e3 * x
    elif case == "tiny-inputs":
        x = 1e-8 * x
    elif case == "single-sample":
        x, y = x[:1], y[:1]
    elif case == "no-bias":
        model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(),
                              nn.Linear(4, 3, bias=False), nn.Softplus(),
                              nn.Linear(3, 2, bias=False)).double()
    elif case == "seven-classes-ce":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 7)).double()
        y = torch.tensor([0, 6, 3, 5, 1])
        loss_fn = nn.CrossEntropyLoss()
    else:  # pragma: no cover
        raise AssertionError(case)
    return model, loss_fn, x, y


EDGES = ["zero-inputs", "duplicate-rows", "saturated-tanh", "tiny-inputs", "single-sample",
         "no-bias", "seven-classes-ce"]


@functools.cache
def _edge_problem(case):
    model, loss_fn, x, y = _edge(case)
    f, params = hf.functionalize(model, loss_fn)
    truth = _oracle(model, loss_fn, params, x, y, _tangent(params))
    truth["per-sample"] = _per_sample_oracle(model, loss_fn, params, x, y)
    return model, loss_fn, f, params, x, y, truth


def test_edge_cases_are_what_they_claim():
    model, _, _, params, x, _, truth = _edge_problem("saturated-tanh")
    with torch.no_grad():
        t = torch.tanh(model[0](x))
    assert (t.abs() == 1).float().mean() > 0.5       # tanh' is exactly 0 there
    assert _edge_problem("single-sample")[4].shape[0] == 1
    assert not any(k.endswith("bias") for k in _edge_problem("no-bias")[3])
    assert _edge_problem("seven-classes-ce")[3]["2.weight"].shape[0] == 7
    assert torch.equal(_edge_problem("zero-inputs")[3]["0.weight"] * 0,
                       _edge_problem("zero-inputs")[6]["diag"]["0.weight"])
    tiny = _edge_problem("tiny-inputs")[6]["diag"]["0.weight"]
    assert 0 < tiny.abs().max() < 1e-14               # a^2 H: about 1e-16, not zero


@pytest.mark.parametrize("quantity", ["diag", "diag-per-sample", "hvp", "hvp-graph",
                                      "hessian", "hessian_blocks", "operator"])
@pytest.mark.parametrize("case", EDGES)
def test_edge_inputs_equal_oracle(case, quantity):
    model, loss_fn, f, params, x, y, truth = _edge_problem(case)
    v = _tangent(params)
    if quantity == "diag":
        _close(hf.hessian_diag(f)(params, x, y), truth["diag"])
    elif quantity == "diag-per-sample":
        _close(hf.hessian_diag(f, per_sample=True)(params, x, y), truth["per-sample"])
    elif quantity == "hvp":
        _close(hf.hvp(f, (params, x, y), v), truth["hvp"])
    elif quantity == "hvp-graph":
        _close(hf.hvp(f, (params, x, y), v, method="graph"), truth["hvp"])
    elif quantity == "hessian":
        _close(hf.hessian(f, flat=True)(params, x, y), truth["hessian"])
    elif quantity == "hessian_blocks":
        _close(hf.hessian_blocks(f)(params, x, y), truth["blocks"])
    else:
        op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
        _close(op @ flat(v), flat(truth["hvp"]))
        _close(op.diagonal(), truth["hessian"].diagonal())


def test_duplicate_rows_count_twice():
    """Closed form: a batch of rows (a, b, a, b, a) under a summed loss has the Hessian
    3 H(a) + 2 H(b) with H(.) the oracle of the one-row loss."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.MSELoss(reduction="sum")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 1, 3, generator=g, dtype=F64)
    ya, yb = torch.randn(2, 1, 2, generator=g, dtype=F64)
    x, y = torch.cat([a, b, a, b, a]), torch.cat([ya, yb, ya, yb, ya])
    f, params = hf.functionalize(model, loss_fn)
    Ha = _oracle(model, loss_fn, params, a, ya)["hessian"]
    Hb = _oracle(model, loss_fn, params, b, yb)["hessian"]
    _close(hf.hessian(f, flat=True)(params, x, y), 3 * Ha + 2 * Hb)
