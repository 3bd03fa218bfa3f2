"""hessfunc.forward against dense torch.func Hessians, nested autograd and closed forms.

Every fast result is compared with something computed another way:
``vmap(torch.func.hessian(u))`` (trace, diagonal, ``C``-weighted sum), nested
``torch.autograd.grad`` directional derivatives (Taylor coefficients), nested
Hessian traces (biharmonic) and closed forms.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, hessian, vmap

from hessfunc.errors import ArgumentError
from hessfunc.forward import (
    biharmonic,
    forward_laplacian,
    hutchinson_laplacian,
    input_hessian_diag,
    taylor,
)
from hessfunc.forward._derivatives import DERIVATIVES
from hessfunc.forward._propagate import rule_report
from hessfunc.forward.diagonal import _input_hessian_diag_forward
from hessfunc.testing.models import ACTIVATIONS, build_mlp

#: (rtol, atol) per dtype: float64 agrees with the references to rounding.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4)}
F64 = torch.float64


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = F64) -> None:
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def dense_hessians(u, X: torch.Tensor) -> torch.Tensor:
    """(N, n, n) input Hessians, flattened over x's shape."""
    n = X[0].numel()
    return vmap(lambda x: hessian(u)(x).reshape(n, n))(X)


def directional_derivatives(u, x: torch.Tensor, v: torch.Tensor, order: int) -> torch.Tensor:
    """``d^k/dt^k u(x + t v) / k!`` at t = 0 by nested torch.autograd.grad."""
    t = torch.zeros((), dtype=x.dtype, requires_grad=True)
    value = u(x + t * v)
    if value.dim() > 0:  # one output at a time
        parts = [
            directional_derivatives(lambda z, i=i: u(z).reshape(-1)[i], x, v, order)
            for i in range(value.numel())
        ]
        return torch.stack(parts, -1).reshape((order + 1, *value.shape))
    y, out = value, [value.detach()]
    for k in range(1, order + 1):
        if y.requires_grad:
            (y,) = torch.autograd.grad(y, t, create_graph=True, allow_unused=True)
        else:
            y = None
        if y is None:
            y = torch.zeros((), dtype=x.dtype)
        out.append(y.detach() / math.factorial(k))
    return torch.stack(out)


def test_reference_helpers_on_closed_forms():
    d = 3
    x = torch.zeros(d, dtype=F64)
    v = torch.ones(d, dtype=F64)
    # exp(sum(x + t v)) = exp(t d): c_k = d^k / k!
    expected = torch.tensor([d**k / math.factorial(k) for k in range(6)], dtype=F64)
    close(directional_derivatives(lambda z: z.sum().exp(), x, v, 5), expected)
    H = dense_hessians(lambda z: (z**2).sum(), torch.rand(2, d, dtype=F64))
    close(H, 2 * torch.eye(d, dtype=F64).expand(2, d, d))


# --- models --------------------------------------------------------------------------


def make_mlp(d: int, widths: list[int], act: str, seed: int) -> nn.Module:
    return build_mlp([d, *widths, 1], act, seed)


@st.composite
def mlp_problems(draw):
    d = draw(st.integers(1, 6))
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    seed = draw(st.integers(0, 2**16))
    net = make_mlp(d, widths, act, seed)
    X = 2 * torch.rand(3, d, dtype=F64, generator=torch.Generator().manual_seed(seed)) - 1
    return (lambda x: net(x).squeeze(-1)), X


@settings(deadline=None)
@given(mlp_problems())
def test_mlp_strategy_draws_curved_functions(problem):
    """The helper's nets have non-zero input Hessians (a test on zero proves nothing)."""
    u, X = problem
    assert dense_hessians(u, X).abs().max() > 0


@settings(deadline=None)
@given(mlp_problems())
def test_laplacian_of_random_mlp_matches_hessian_trace(problem):
    u, X = problem
    H = dense_hessians(u, X)
    close(vmap(forward_laplacian(u))(X), H.diagonal(dim1=1, dim2=2).sum(-1))


@settings(deadline=None)
@given(mlp_problems())
def test_diagonal_of_random_mlp_matches_hessian_diagonal(problem):
    u, X = problem
    expected = dense_hessians(u, X).diagonal(dim1=1, dim2=2)
    close(vmap(input_hessian_diag(u))(X), expected)
    close(vmap(_input_hessian_diag_forward(u))(X), expected)


@settings(deadline=None)
@given(mlp_problems(), st.integers(0, 2**16))
def test_weighted_operator_matches_hessian_contraction(problem, seed):
    u, X = problem
    d = X.shape[1]
    C = torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    H = dense_hessians(u, X)
    close(vmap(forward_laplacian(u, coefficients=C))(X), (H * C).sum((1, 2)))


# --- functions that are not MLPs -----------------------------------------------------

_LN = nn.LayerNorm(4).double()
with torch.no_grad():
    _LN.weight.uniform_(0.5, 1.5)
    _LN.bias.uniform_(-0.5, 0.5)
_W = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(3))


def _residual(x):
    h = torch.tanh(x @ _W)
    return (x + h).pow(2).sum() + (x * h).sum()


FUNCTIONS = {
    "product of coordinates": lambda x: x.prod(),
    "products x0 x1 + x2 x3^2": lambda x: x[0] * x[1] + x[2] * x[3] ** 2,
    "composition": lambda x: torch.sin(torch.exp(0.3 * x).sum()) * torch.cos(x[0]),
    "methods": lambda x: x.sin().mul(x.cos()).sum() + x.tanh().sigmoid().sum(),
    "layer norm": lambda x: (_LN(x) ** 3).sum() + _LN(x)[0] * x[1],
    "residual": _residual,
    "division": lambda x: (x.sin() / (2 + x.cos())).sum() + x[0] / (1 + x.pow(2).sum()),
    "softmax": lambda x: (torch.softmax(x, 0) * x).sum(),
    "log_softmax": lambda x: torch.log_softmax(x, 0)[1] * x[0],
    "x-dependent matmul": lambda x: (torch.outer(x.sin(), x) @ torch.outer(x, x.cos())).sum(),
    "variance": lambda x: x.var() * x.mean() + x.std(),
    "cat and index": lambda x: torch.cat([x, x.exp()])[::2].pow(3).sum() + x[[0, 2]].prod(),
    "where and stack": lambda x: torch.stack([x, x**2]).sum(0).mul(torch.where(x > 0, x, -x)).sum(),
    "sqrt log rsqrt pow": lambda x: (
        (1 + x**2).sqrt().sum() * torch.log(2 + x).sum()
        + torch.rsqrt(2 + x).sum()
        + (2 + x).pow(2.5).sum()
    ),
    "erf gelu silu softplus": lambda x: (
        torch.erf(x).sum() * F.gelu(x).sum() + F.silu(x).sum() + F.softplus(x, beta=2.0).sum()
    ),
    "norm and atan (generic rule)": lambda x: x.norm() * torch.atan(x).sum(),
    "in-place ops": lambda x: x.clone().mul_(2).sin_().sum() * x[0],
    "matrix input": None,  # see test_matrix_shaped_input
}


@pytest.mark.parametrize("name", [k for k, v in FUNCTIONS.items() if v is not None])
def test_functions_match_dense_hessian(name):
    u = FUNCTIONS[name]
    X = 0.5 + torch.rand(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    X[1] -= 1.0  # mixed signs
    H = dense_hessians(u, X)
    close(vmap(forward_laplacian(u))(X), H.diagonal(dim1=1, dim2=2).sum(-1))
    close(vmap(input_hessian_diag(u))(X), H.diagonal(dim1=1, dim2=2))
    close(vmap(_input_hessian_diag_forward(u))(X), H.diagonal(dim1=1, dim2=2))
    C = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    close(vmap(forward_laplacian(u, coefficients=C))(X), (H * C).sum((1, 2)))


def test_matrix_shaped_input():
    W = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))

    def u(x):  # x has shape (2, 3)
        return torch.tanh(x @ W).pow(2).sum() + x[0, 1] * x[1, 2]

    X = torch.rand(2, 2, 3, dtype=F64)
    H = dense_hessians(u, X)
    close(vmap(forward_laplacian(u))(X), H.diagonal(dim1=1, dim2=2).sum(-1))
    close(vmap(input_hessian_diag(u))(X), H.diagonal(dim1=1, dim2=2).reshape(X.shape))


# --- coefficients, coordinates, chunks -----------------------------------------------


@pytest.mark.parametrize("kind", ["non-symmetric", "indefinite", "psd", "diagonal"])
def test_coefficient_matrices(kind):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, dtype=F64, generator=g)
    C = {
        "non-symmetric": A,
        "indefinite": A + A.T,
        "psd": A @ A.T,
        "diagonal": torch.diag(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)),
    }[kind]
    u = FUNCTIONS["composition"]
    X = torch.rand(3, 4, dtype=F64, generator=g)
    H = dense_hessians(u, X)
    close(vmap(forward_laplacian(u, coefficients=C))(X), (H * C).sum((1, 2)))


def test_coordinates_and_coefficients_over_a_subset():
    u = FUNCTIONS["methods"]
    X = torch.rand(3, 4, dtype=F64)
    H = dense_hessians(u, X)
    idx = [3, 0]
    close(vmap(forward_laplacian(u, coordinates=idx))(X), H[:, 3, 3] + H[:, 0, 0])
    C = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64)
    sub = H[:, idx][:, :, idx]
    close(vmap(forward_laplacian(u, coefficients=C, coordinates=idx))(X), (sub * C).sum((1, 2)))


def test_chunk_size_gives_the_same_numbers():
    u = FUNCTIONS["composition"]
    X = torch.rand(3, 4, dtype=F64)
    C = torch.randn(4, 4, dtype=F64)
    for full, chunked in [
        (forward_laplacian(u), forward_laplacian(u, chunk_size=3)),
        (forward_laplacian(u, coefficients=C), forward_laplacian(u, coefficients=C, chunk_size=1)),
        (input_hessian_diag(u), input_hessian_diag(u, chunk_size=3)),
    ]:
        close(vmap(chunked)(X), vmap(full)(X))


# --- closed forms --------------------------------------------------------------------


def test_closed_forms():
    x = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    d = x.numel()
    close(forward_laplacian(lambda x: x.sin().sum())(x), -x.sin().sum())
    close(forward_laplacian(lambda x: (x**2).sum())(x), torch.tensor(2.0 * d, dtype=F64))
    gauss = torch.exp(-(x**2).sum() / 2)
    close(
        forward_laplacian(lambda x: torch.exp(-(x**2).sum() / 2))(x),
        ((x**2).sum() - d) * gauss,
    )
    close(input_hessian_diag(lambda x: x.sin().sum())(x), -x.sin())
    close(input_hessian_diag(lambda x: torch.exp(-(x**2).sum() / 2))(x), (x**2 - 1) * gauss)
    close(biharmonic(lambda x: (x**2).sum() ** 2)(x), torch.tensor(8.0 * d * (d + 2), dtype=F64))


def test_function_that_ignores_x_and_linear_function():
    x = torch.rand(3, dtype=F64)
    c = torch.tensor(2.0, dtype=F64)
    assert forward_laplacian(lambda x: c)(x) == 0
    assert torch.equal(input_hessian_diag(lambda x: c)(x), torch.zeros(3, dtype=F64))
    assert forward_laplacian(lambda x: (3 * x).sum())(x) == 0


# --- Taylor mode ---------------------------------------------------------------------

TAYLOR_FUNCTIONS = {
    "mlp tanh": (lambda net: lambda x: net(x).squeeze(-1))(make_mlp(3, [5, 4], "tanh", 0)),
    "mlp sigmoid": (lambda net: lambda x: net(x).squeeze(-1))(make_mlp(3, [4], "sigmoid", 1)),
    "mlp gelu": (lambda net: lambda x: net(x).squeeze(-1))(make_mlp(3, [4], "gelu", 2)),
    "mlp softplus": (lambda net: lambda x: net(x).squeeze(-1))(make_mlp(3, [4], "softplus", 3)),
    "mlp silu": (lambda net: lambda x: net(x).squeeze(-1))(make_mlp(3, [4], "silu", 4)),
    "exp log sin cos": lambda x: (
        x.exp().sum() * torch.log(3 + x).sum() + x.sin().prod() + x.cos()[0]
    ),
    "powers": lambda x: (
        (2 + x).pow(3).sum()
        + (2 + x).sqrt().sum()
        + (2 + x).pow(-1.5).sum()
        + torch.reciprocal(3 + x).sum()
    ),
    "products and division": lambda x: x.prod() / (1 + x.pow(2).sum()) + x[0] * x[1] * x[2],
    "erf sinh cosh log1p expm1": lambda x: (
        torch.erf(x).sum()
        + x.sinh().sum() * x.cosh()[1]
        + torch.log1p(x.abs() + 0.1).sum()
        + torch.expm1(x).sum()
    ),
    "layer norm": lambda x: (F.layer_norm(x, (3,)) ** 3).sum(),
    "generic ops (atan, norm)": lambda x: torch.atan(x).sum() * x.norm(),
    "vector output": lambda x: torch.stack([x.sin().sum(), x.prod()]),
}


def _layer_norm_written_out(x):
    m = x.mean()
    return (((x - m) / torch.sqrt(((x - m) ** 2).mean() + 1e-5)) ** 3).sum()


# NOTE: torch's own higher derivatives of native_layer_norm are wrong: nested
# autograd.grad from order 3 on (pytorch/pytorch#175754), nested jvp from order
# 2 on (pytorch/pytorch#196700), torch 2.13. hessfunc decomposes layer norm into
# elementary ops, so the reference differentiates the written-out formula.
TAYLOR_REFERENCES = {"layer norm": _layer_norm_written_out}


@pytest.mark.parametrize("name", sorted(TAYLOR_FUNCTIONS))
def test_taylor_matches_nested_autograd(name):
    u = TAYLOR_FUNCTIONS[name]
    ref = TAYLOR_REFERENCES.get(name, u)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, dtype=F64, generator=g) * 0.7
    v = torch.randn(3, dtype=F64, generator=g)
    close(taylor(u, x, v, order=6), directional_derivatives(ref, x, v, 6))


@pytest.mark.parametrize("op", sorted(DERIVATIVES, key=str))
def test_derivative_tables_to_order_six(op):
    """Each closed-form derivative table against autograd, through taylor."""
    name = str(op)
    if "pow.Scalar" in name:
        fn = lambda z: torch.pow(1.7, z)  # noqa: E731
    elif "pow.Tensor_Tensor" in name:
        fn = lambda z: torch.pow(z, torch.tensor([2.5, 3.0, -0.5], dtype=F64))  # noqa: E731
    elif "pow.Tensor_Scalar" in name:
        fn = lambda z: z**3.5  # noqa: E731
    elif "softplus" in name:
        fn = lambda z: F.softplus(z, beta=1.5)  # noqa: E731
    else:
        fn = lambda z: op(z)  # noqa: E731
    x = torch.tensor([0.4, 0.9, 1.3], dtype=F64)
    v = torch.tensor([1.0, -0.5, 0.25], dtype=F64)

    def u(z):
        return fn(z).sum()

    assert any(rule == "elementwise" for _, rule in rule_report(u, [x], order=6))
    close(taylor(u, x, v, order=6), directional_derivatives(u, x, v, 6))


def test_taylor_under_vmap_over_points_and_directions():
    u = TAYLOR_FUNCTIONS["mlp tanh"]
    X = torch.randn(4, 3, dtype=F64)
    V = torch.randn(4, 3, dtype=F64)
    got = vmap(lambda x, v: taylor(u, x, v, order=3))(X, V)
    for i in range(4):
        close(got[i], directional_derivatives(u, X[i], V[i], 3))


# --- biharmonic ----------------------------------------------------------------------


def test_biharmonic_matches_nested_hessian_traces():
    net = make_mlp(3, [5], "tanh", 0)

    def u(x):
        return net(x).squeeze(-1) + x.sin().prod()

    def lap(x):
        return hessian(u)(x).trace()

    X = torch.randn(3, 3, dtype=F64)
    close(vmap(biharmonic(u))(X), vmap(lambda x: hessian(lap)(x).trace())(X))


# --- the generic rule ----------------------------------------------------------------


def test_generic_rule_runs_for_an_op_without_a_rule():
    u = FUNCTIONS["norm and atan (generic rule)"]
    x = torch.rand(4, dtype=F64)
    rules = dict(rule_report(u, [x]))
    assert rules["aten.atan.default"] == "generic"
    assert rules["aten.linalg_vector_norm.default"] == "generic"
    assert rules["aten.mul.Tensor"] == "multilinear"
    close(forward_laplacian(u)(x), hessian(u)(x).trace())


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_laplacian_through_every_padding_mode(mode):
    """Circular padding writes its output by ``copy_`` into slices, which
    functionalization leaves in the graph: the capture once dropped the writes and gave
    a Laplacian of 0. Now that capture is refused (the generic rule); every mode
    equals the Hessian's trace and diagonal."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode).double()

    def u(x):
        return torch.tanh(conv(x.reshape(1, 1, 4, 4))).pow(2).sum()

    x = torch.randn(16, dtype=F64)
    H = hessian(u)(x)
    close(forward_laplacian(u)(x), H.trace())
    close(input_hessian_diag(u)(x), H.diagonal())


def test_untraceable_function_takes_the_exact_generic_path():
    def u(x):  # data-dependent control flow: cannot be traced with fake tensors
        if x.sum() > 0:
            return (x.sin() * x).sum()
        return x.cos().prod()

    for x in (torch.rand(3, dtype=F64), -torch.rand(3, dtype=F64)):
        ((op, rule),) = rule_report(u, [x])
        assert op == "u" and re.fullmatch(
            r"generic \(untraceable u: Python reads a tensor's value .* at "
            + re.escape(__file__) + r":\d+ in u \(`if x\.sum\(\) > 0:`\)\)", rule), rule
        H = hessian(u)(x)
        close(forward_laplacian(u)(x), H.trace())
        close(input_hessian_diag(u)(x), H.diagonal())


# --- composition with transforms and autograd ----------------------------------------


def test_gradients_through_the_laplacian():
    net = make_mlp(3, [5], "tanh", 0)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(x, p):
        return torch.func.functional_call(net, p, (x,)).squeeze(-1)

    X = torch.randn(4, 3, dtype=F64)

    def ref(p):
        return vmap(lambda x: hessian(f)(x, p).trace())(X).sum()

    expected = grad(ref)(params)
    as_argument = grad(lambda p: vmap(forward_laplacian(f), (0, None))(X, p).sum())(params)
    in_closure = grad(lambda p: vmap(forward_laplacian(lambda x: f(x, p)))(X).sum())(params)
    for k in params:
        close(as_argument[k], expected[k])
        close(in_closure[k], expected[k])
    # d/dx of the Laplacian, and plain autograd into closure parameters
    u = lambda x: net(x).squeeze(-1)  # noqa: E731
    close(grad(forward_laplacian(u))(X[0]), grad(lambda x: hessian(u)(x).trace())(X[0]))
    forward_laplacian(u)(X[0]).backward()
    got = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    hessian(u)(X[0]).trace().backward()
    for a, p in zip(got, net.parameters(), strict=True):
        close(a, torch.zeros_like(p) if p.grad is None else p.grad)


def test_cached_trace_sees_new_and_updated_parameters():
    net = make_mlp(3, [4], "tanh", 0)
    state = {"params": {k: v.detach().clone() for k, v in net.named_parameters()}}

    def u(x):
        return torch.func.functional_call(net, state["params"], (x,)).squeeze(-1)

    lap = forward_laplacian(u)
    x = torch.randn(3, dtype=F64)
    close(lap(x), hessian(u)(x).trace())
    state["params"] = {k: 2 * v for k, v in state["params"].items()}  # rebound
    close(lap(x), hessian(u)(x).trace())
    state["params"]["0.weight"].mul_(0.5)  # updated in place
    close(lap(x), hessian(u)(x).trace())


def test_trace_is_reused_across_calls_and_under_vmap():
    net = make_mlp(3, [4], "tanh", 0)
    lap = forward_laplacian(lambda x: net(x).squeeze(-1))
    x = torch.randn(3, dtype=F64)
    first = lap.engine.cache.get([x])
    assert first is not None and lap.engine.cache.get([2 * x]) is first
    vmap(lap)(torch.randn(5, 3, dtype=F64))  # same per-point signature: no new trace
    assert lap.engine.cache.get([x]) is first
    with torch.no_grad():
        net[0].weight.mul_(2)  # in-place update: same graph, new numbers
    assert lap.engine.cache.get([x]) is first
    close(lap(x), hessian(lambda x: net(x).squeeze(-1))(x).trace())


def test_dtype_is_preserved_and_float32_is_accurate():
    net64 = make_mlp(3, [5], "tanh", 0)
    net32 = make_mlp(3, [5], "tanh", 0).float()
    X = torch.randn(4, 3, dtype=F64)
    exp_lap = vmap(forward_laplacian(lambda x: net64(x).squeeze(-1)))(X)
    exp_diag = vmap(input_hessian_diag(lambda x: net64(x).squeeze(-1)))(X)
    u32 = lambda x: net32(x).squeeze(-1)  # noqa: E731
    lap = vmap(forward_laplacian(u32))(X.float())
    diag = vmap(input_hessian_diag(u32))(X.float())
    bi = biharmonic(u32)(X[0].float())
    tay = taylor(u32, X[0].float(), X[1].float(), order=3)
    for t in (lap, diag, bi, tay):
        assert t.dtype == torch.float32
    close(lap.double(), exp_lap, torch.float32)
    close(diag.double(), exp_diag, torch.float32)


# --- Hutchinson ----------------------------------------------------------------------


def test_hutchinson_is_reproducible_and_converges():
    u = FUNCTIONS["composition"]
    x = torch.rand(4, dtype=F64)
    exact = hessian(u)(x).trace()

    def estimate(seed, n):
        g = torch.Generator().manual_seed(seed)
        return hutchinson_laplacian(u, num_samples=n, generator=g)(x)

    assert torch.equal(estimate(0, 50), estimate(0, 50))
    assert not torch.equal(estimate(0, 50), estimate(1, 50))
    # unbiased, with variance 2 (|H|_F^2 - sum H_ii^2) / S: check within 4 sigma
    H = hessian(u)(x)
    n = 4000
    sigma = math.sqrt(2 * float((H**2).sum() - (H.diagonal() ** 2).sum()) / n)
    assert abs(float(estimate(3, n) - exact)) < 4 * sigma + 1e-12
    # with S = 1 the estimate is v^T H v for one Rademacher v: check that exactly
    g = torch.Generator().manual_seed(5)
    v = torch.randint(0, 2, (1, 4), generator=g).to(F64) * 2 - 1
    close(estimate(5, 1), (v @ H @ v.T).squeeze())


def test_hutchinson_under_vmap_needs_randomness_flag():
    u = FUNCTIONS["composition"]
    X = torch.rand(3, 4, dtype=F64)
    est = hutchinson_laplacian(u, num_samples=8, generator=torch.Generator().manual_seed(0))
    assert vmap(est, randomness="different")(X).shape == (3,)
    with pytest.raises(ArgumentError, match="randomness="):
        vmap(est)(X)


# --- bad input -----------------------------------------------------------------------


def test_bad_inputs_raise_argument_error():
    x = torch.rand(3, dtype=F64)
    u = lambda x: x.sin().sum()  # noqa: E731
    with pytest.raises(ArgumentError, match="u must return a 0-d"):
        forward_laplacian(lambda x: x.sin())(x)
    with pytest.raises(ArgumentError, match="u must return a 0-d"):
        input_hessian_diag(lambda x: x.sum(0, keepdim=True))(x)
    with pytest.raises(ArgumentError, match="floating-point"):
        forward_laplacian(u)(torch.arange(3))
    with pytest.raises(ArgumentError, match="must be a tensor"):
        forward_laplacian(u)([1.0, 2.0])
    with pytest.raises(ArgumentError, match="coefficients must be square"):
        forward_laplacian(u, coefficients=torch.ones(3, 2, dtype=F64))
    with pytest.raises(ArgumentError, match=r"coefficients must be \(3, 3\)"):
        forward_laplacian(u, coefficients=torch.eye(4, dtype=F64))(x)
    with pytest.raises(ArgumentError, match="coefficients must be a floating"):
        forward_laplacian(u, coefficients=[[1.0]])
    with pytest.raises(ArgumentError, match=r"coefficients must be \(2, 2\)"):
        forward_laplacian(u, coefficients=torch.eye(3, dtype=F64), coordinates=[0, 1])
    with pytest.raises(ArgumentError, match=r"coordinates must lie in \[0, 3\)"):
        forward_laplacian(u, coordinates=[0, 3])(x)
    with pytest.raises(ArgumentError, match="non-negative"):
        forward_laplacian(u, coordinates=[-1])
    with pytest.raises(ArgumentError, match="distinct"):
        forward_laplacian(u, coordinates=[1, 1])
    with pytest.raises(ArgumentError, match="integer indices"):
        forward_laplacian(u, coordinates=[0.5])
    with pytest.raises(ArgumentError, match="order must be an int >= 1"):
        taylor(u, x, x, order=0)
    with pytest.raises(ArgumentError, match="direction v must have x's shape"):
        taylor(u, x, torch.ones(2, dtype=F64), order=2)
    with pytest.raises(ArgumentError, match="argnums=2 is out of range"):
        forward_laplacian(u, argnums=2)(x)
    with pytest.raises(ArgumentError, match="argnums must be an int"):
        forward_laplacian(u, argnums=(0, 1))
    with pytest.raises(ArgumentError, match="num_samples must be a positive int"):
        hutchinson_laplacian(u, num_samples=0)
    with pytest.raises(ArgumentError, match="chunk_size must be a positive int"):
        forward_laplacian(u, chunk_size=0)
    with pytest.raises(ArgumentError, match="u must be a callable"):
        forward_laplacian(3.0)
    drop = nn.Dropout(0.5).train()
    with pytest.raises(ArgumentError, match="random operation"):
        forward_laplacian(lambda x: drop(x).sum())(x)
