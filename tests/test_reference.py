"""The oracle itself, against central finite differences and closed forms (test the tests)."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import oracle_loss
from hypothesis import given
from hypothesis import strategies as st

import hessfunc as hf
from hessfunc.testing.models import build_mlp
from hessfunc.testing.strategies import problems, random_like


def _flat_grad_at(f, params, batch, flat_p):
    """Gradient of f at a flat parameter vector, by plain autograd (float64)."""
    names = list(params)
    pieces = torch.split(flat_p, [params[k].numel() for k in names])
    leaves = {k: p.reshape(params[k].shape).clone().requires_grad_(True)
              for k, p in zip(names, pieces, strict=True)}
    loss = f(leaves, *batch)
    gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return torch.cat([(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1)
                      for k, g in zip(names, gs, strict=True)])


#: NOTE [finite differences]: the oracle is checked against the fourth-order central
#: difference D(h) = (g(p - 2hu) - 8 g(p - hu) + 8 g(p + hu) - g(p + 2hu)) / 12h of the
#: gradient g along a unit direction u: truncation error O(h^4 g^(5)), rounding error
#: O(eps |g| / h), balanced at h ~ eps^(1/5) ~ 7e-4 times the length over which the
#: function curves. That length is about 1 for unit-scale models (a fixed h = eps^(1/5)
#: reaches 1e-10 there, the fixed test below), but drawn weights and inputs are scaled
#: by up to 1e3 or down to 1e-8, which moves it anywhere from 1e-8 to far above 1, so
#: each direction gets its step from a halving sweep (``_step``) with an error estimate
#: E. The bound is |oracle - D| <= 1e-7 max|Hu| + 4 E + the rounding floor. Measured over
#: 400 drawn problems (and 1200 directions of their Hessians): |oracle - D| is a median
#: 1e-12 and a 90th percentile 1e-8 of max|Hu|, and 4 E + floor a median 2e-10; the
#: worst draws (curvature 1e9 to 1e12 varying over 1e-7 in parameter space) reach 1.3e-7
#: of max|Hu| with E near 1e-7 too. About 6% of draws have curvature below what rounding
#: resolves (zero-curvature Huber regions, weights or inputs scaled by 1e-8): they are
#: checked to the absolute floor, about 64 eps / h ~ 1e-11 to 1e-8.
_EPS = torch.finfo(torch.float64).eps


def _central(grad_at, p, u, h):
    """Fourth-order central difference of the gradient along ``u`` (NOTE above)."""
    return (grad_at(p - 2 * h * u) - 8 * grad_at(p - h * u) + 8 * grad_at(p + h * u)
            - grad_at(p + 2 * h * u)) / (12 * h)


def _step(grad_at, p, u):
    """``(h, E, floor)`` for the step to use along unit ``u``: ``E = |D(2h) - D(h)|``
    estimates the error of ``D(h)``, ``floor`` what rounding leaves unresolved: ``eps`` of
    the gradient, of the unit-scale values it is computed from (a softmax probability of
    1 absorbs a change of 1e-153 in its complement, whose gradient stays 0) and of the
    evaluation points ``p +- h u``, themselves rounded to ``eps |p|``. Steps are tried going
    up from the smallest (where ``p + h u`` still moves ``p`` by 2^20 ulps), keeping the
    smallest ``E + floor``, until ``E`` has grown a hundredfold past its minimum: below the
    best step rounding dominates (``E`` falls, noisily, as ``h`` grows), above it
    truncation (``E`` grows like ``h^4``, 256x in two doublings). Not the smallest ``E`` of
    all steps: steps far wider than a sharp feature can agree with each other and not with
    the derivative."""
    size = 1 + float(p.abs().max())
    steps = [2.0 ** -4]
    while steps[-1] / 2 >= 2.0 ** 20 * _EPS * size:
        steps.append(steps[-1] / 2)
    steps.reverse()                                   # smallest first
    D = [_central(grad_at, p, u, h) for h in steps]
    g = float(grad_at(p).abs().max())
    best, lowest = (steps[0], math.inf, math.inf), math.inf
    for k in range(len(steps) - 1):
        e = float((D[k + 1] - D[k]).abs().max())
        floor = 64 * _EPS * (g + 1 + float(D[k].abs().max()) * size) / steps[k]
        if e + floor < best[1] + best[2]:
            best = (steps[k], e, floor)
        if e > 100 * lowest:
            break
        lowest = min(lowest, e)
    return best


def _assert_fd_close(actual, fd, E, floor, scale):
    bound = 1e-7 * scale + 4 * E + floor
    worst = float((actual - fd).abs().max())
    assert worst <= bound, f"|oracle - FD| = {worst:.3g} > {bound:.3g} (E = {E:.3g})"


@pytest.mark.slow  # a sweep of steps per draw: about 2 s for the profile's draws
@given(prob=problems(), seed=st.integers(0, 1000))
def test_oracle_hvp_matches_central_differences(prob, seed):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    v = random_like(params, seed)
    flat_p = torch.cat([t.reshape(-1) for t in params.values()])
    flat_v = torch.cat([t.reshape(-1) for t in v.values()])
    u = flat_v / flat_v.norm()

    def grad_at(q):
        return _flat_grad_at(f, params, prob.batch, q)

    h, E, floor = _step(grad_at, flat_p, u)
    fd = _central(grad_at, flat_p, u, h)
    loss, leaves = oracle_loss(f, params, *prob.batch)
    hv = torch.cat([t.reshape(-1) for t in
                    hf.reference.hvp(loss, list(leaves.values()), list(v.values()))])
    hu = hv / flat_v.norm()
    _assert_fd_close(hu, fd, E, floor, max(float(hu.abs().max()), float(fd.abs().max())))


def test_oracle_matches_fixed_step_differences_on_a_unit_scale_model():
    """A plain unit-scale tanh chain: h = eps^(1/5) reaches 1e-10 relative, the tolerance
    of the library's own tests (measured: 9e-12 of max|H|; the second-order difference
    at h = 1e-5 the old test used, 1.2e-10)."""
    model = build_mlp([3, 5, 4, 2], "tanh", seed=7)
    g = torch.Generator().manual_seed(7)
    x, y = (torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randn(6, 2, generator=g, dtype=torch.float64))
    f, params = hf.functionalize(model, torch.nn.MSELoss())
    flat_p = torch.cat([t.reshape(-1) for t in params.values()])
    P, h = flat_p.numel(), _EPS ** 0.2

    def grad_at(q):
        return _flat_grad_at(f, params, (x, y), q)

    fd = torch.stack([_central(grad_at, flat_p, e, h)
                      for e in torch.eye(P, dtype=torch.float64)], dim=1)
    loss, leaves = oracle_loss(f, params, x, y)
    H = hf.reference.hessian(loss, list(leaves.values()))
    torch.testing.assert_close(H, fd, rtol=1e-10, atol=1e-10 * float(fd.abs().max()))
    u = torch.randn(P, generator=g, dtype=torch.float64)
    pieces = torch.split(u, [t.numel() for t in params.values()])
    tangent = [piece.reshape(t.shape) for piece, t in zip(pieces, params.values(), strict=True)]
    hv = torch.cat([t.reshape(-1) for t in
                    hf.reference.hvp(loss, list(leaves.values()), tangent)])
    torch.testing.assert_close(hv, _central(grad_at, flat_p, u, h), rtol=1e-10,
                               atol=1e-10 * float(hv.abs().max()))


@pytest.mark.slow  # three sweeps of steps per draw: about 3 s for the profile's draws
@given(prob=problems(max_batch=3))
def test_oracle_hessian_matches_central_differences_and_is_symmetric(prob):
    """The full Hessian along three random directions against differences, each with its
    own step (columns one by one would need a sweep each: their length scales differ by
    orders of magnitude on scaled draws); its columns against the oracle's other
    algorithm, the double-backward product with a one-hot tangent."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    flat_p = torch.cat([t.reshape(-1) for t in params.values()])
    P = flat_p.numel()
    loss, leaves = oracle_loss(f, params, *prob.batch)
    H = hf.reference.hessian(loss, list(leaves.values()))
    assert H.shape == (P, P)
    scale = float(H.abs().max())
    # symmetric to rounding: H[i, j] and H[j, i] come from different backward passes whose
    # sums may cancel (drawn scales give 3e-11 of max|H|, or 1e-14 where max|H| ~ 1e-13)
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12 + 1e-10 * scale)

    def grad_at(q):
        return _flat_grad_at(f, params, prob.batch, q)

    g = torch.Generator().manual_seed(P)
    for _ in range(3):
        u = torch.randn(P, generator=g, dtype=torch.float64)
        u /= u.norm()
        h, E, floor = _step(grad_at, flat_p, u)
        fd = _central(grad_at, flat_p, u, h)
        Hu = H @ u
        _assert_fd_close(Hu, fd, E, floor, max(float(Hu.abs().max()), float(fd.abs().max())))
    shapes = [p.shape for p in params.values()]
    for j, e in enumerate(torch.eye(P, dtype=torch.float64)):
        pieces = torch.split(e, [p.numel() for p in params.values()])
        tangent = [t.reshape(shape) for t, shape in zip(pieces, shapes, strict=True)]
        column = torch.cat([t.reshape(-1) for t in
                            hf.reference.hvp(loss, list(leaves.values()), tangent)])
        torch.testing.assert_close(H[:, j], column, rtol=1e-10, atol=1e-12 + 1e-10 * scale)
    # blocks and diagonal are slices of the full Hessian
    blocks = hf.reference.hessian_blocks(loss, leaves)
    diags = hf.reference.hessian_diag(loss, leaves)
    lo = 0
    for k, p in params.items():
        n = p.numel()
        torch.testing.assert_close(blocks[k], H[lo:lo + n, lo:lo + n], rtol=1e-12,
                                   atol=1e-14 + 1e-12 * scale)
        torch.testing.assert_close(diags[k].reshape(-1), H.diagonal()[lo:lo + n],
                                   rtol=1e-12, atol=1e-14 + 1e-12 * scale)
        assert diags[k].shape == p.shape
        lo += n


def test_oracle_derivatives_of_x4_as_in_the_seed():
    d = hf.reference.derivatives(lambda x: x ** 4, torch.tensor(1.0, dtype=torch.float64), 4)
    assert [float(t) for t in d] == [4.0, 12.0, 24.0, 24.0]


def test_oracle_derivatives_closed_forms():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    sin_d = hf.reference.derivatives(torch.sin, x, 5)
    expected = [torch.cos(x), -torch.sin(x), -torch.cos(x), torch.sin(x), torch.cos(x)]
    for got, want in zip(sin_d, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    exp_d = hf.reference.derivatives(torch.exp, x, 3)
    for got in exp_d:
        torch.testing.assert_close(got, torch.exp(x), rtol=1e-14, atol=0)


def test_oracle_laplacian_closed_forms():
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(hf.reference.laplacian(lambda z: torch.sin(z).sum(), x),
                               -torch.sin(x).sum(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(hf.reference.laplacian(lambda z: (z ** 2).sum(), x),
                               torch.tensor(10.0, dtype=torch.float64))
    gauss = lambda z: torch.exp(-(z ** 2).sum() / 2)  # noqa: E731
    r2 = float((x ** 2).sum())
    assert math.isclose(float(hf.reference.laplacian(gauss, x)), (r2 - 5) * math.exp(-r2 / 2),
                        rel_tol=1e-12)


# ---- mutation-testing kills (docs/mutation.md, reference survivors) ----

def _cubic(a, b):
    """A smooth loss with mixed terms: sum(a^3 b) + sum(sin(a))."""
    return (a ** 3 * b).sum() + torch.sin(a).sum()


def test_oracle_gradient_matches_central_differences_and_survives_a_second_call():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = _cubic(a, b)
    first = hf.reference.gradient(loss, [a, b])
    second = hf.reference.gradient(loss, [a, b])   # the graph must survive the first call
    h = 1e-5
    with torch.no_grad():
        for p, gp in zip([a, b], first, strict=True):
            fd = torch.empty_like(p)
            for i in range(p.numel()):
                e = torch.zeros_like(p)
                e[i] = h
                p.add_(e)
                up = _cubic(a, b)
                p.sub_(2 * e)
                down = _cubic(a, b)
                p.add_(e)
                fd[i] = (up - down) / (2 * h)
            torch.testing.assert_close(gp, fd, rtol=0, atol=1e-8)
    for x, y in zip(first, second, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    exact = [3 * a.detach() ** 2 * b.detach() + torch.cos(a.detach()), a.detach() ** 3]
    for x, y in zip(first, exact, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_oracle_hvp_twice_on_the_same_loss():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = _cubic(a, b)
    H = hf.reference.hessian(loss, [a, b])
    for _ in range(2):
        v = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2)]
        hv = hf.reference.hvp(loss, [a, b], v)
        torch.testing.assert_close(torch.cat(hv), H @ torch.cat(v), rtol=0, atol=1e-10)


def test_oracle_hvp_rejects_a_vector_with_too_few_pieces():
    a = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError):
        hf.reference.hvp((a * b * a).sum(), [a, b], [torch.ones(2, dtype=torch.float64)])


def test_oracle_hessian_with_gradients_that_do_not_depend_on_every_parameter():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    eye, zero = torch.eye(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    expected = torch.cat([torch.cat([zero, eye], 1), torch.cat([eye, zero], 1)])
    torch.testing.assert_close(hf.reference.hessian((a * b).sum(), [a, b]), expected,
                               rtol=0, atol=1e-10)


def test_oracle_hessian_of_a_linear_loss_is_zero():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(hf.reference.hessian((3 * w).sum(), [w]),
                               torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=0)


def test_oracle_hessian_of_a_bare_tensor():
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(hf.reference.hessian((w ** 3).sum(), w),
                               torch.diag(6 * w.detach()), rtol=0, atol=1e-10)


def test_oracle_diag_and_blocks_accept_named_parameters_generators():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(),
                                torch.nn.Linear(2, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    loss = (model(x) ** 2).sum()
    params = dict(model.named_parameters())
    H = hf.reference.hessian(loss, list(params.values()))
    diag = hf.reference.hessian_diag(loss, model.named_parameters())
    blocks = hf.reference.hessian_blocks(loss, model.named_parameters())
    assert list(diag) == list(params) == list(blocks)
    start = 0
    for name, p in params.items():
        n = p.numel()
        block = H[start:start + n, start:start + n]
        torch.testing.assert_close(blocks[name], block, rtol=0, atol=1e-10)
        torch.testing.assert_close(diag[name], torch.diagonal(block).reshape(p.shape),
                                   rtol=0, atol=1e-10)
        start += n


def test_oracle_blocks_and_diag_where_a_parameter_drops_out_of_its_own_gradient():
    # d/da (a * b).sum() = b still requires grad but does not depend on a: the block is zero
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    loss = (a * b).sum()
    blocks = hf.reference.hessian_blocks(loss, {"a": a, "b": b})
    diag = hf.reference.hessian_diag(loss, {"a": a, "b": b})
    for k in ("a", "b"):
        torch.testing.assert_close(blocks[k], torch.zeros(2, 2, dtype=torch.float64),
                                   rtol=0, atol=0)
        torch.testing.assert_close(diag[k], torch.zeros(2, dtype=torch.float64), rtol=0, atol=0)


# ------------------------------------------------ the Gauss-Newton and Fisher oracle
# Truths: closed forms of a linear model's Jacobian and of the losses' output Hessians,
# and torch.func's dense Jacobians and Hessians (vectorised, not the oracle's loops).
def _linear_problem(seed, n=5, d=3, c=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(c, d, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, W, b


def _linear_jacobian(x, c):
    """``d (x W^T + b)_{ni} / d (W, b)`` in closed form: ``(n c, c d + c)``."""
    n, d = x.shape
    J = torch.zeros(n, c, c * d + c, dtype=x.dtype)
    for i in range(c):
        J[:, i, i * d:(i + 1) * d] = x
        J[:, i, c * d + i] = 1
    return J.reshape(n * c, -1)


def test_oracle_jacobian_of_a_linear_model_is_its_closed_form():
    x, W, b = _linear_problem(0)
    out = x @ W.T + b
    torch.testing.assert_close(hf.reference.jacobian(out, [W, b]),
                               _linear_jacobian(x, 4), rtol=0, atol=0)
    # an unused parameter's columns are zeros, not an error
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    J = hf.reference.jacobian(out, [z, W])
    assert J.shape == (20, 14) and bool((J[:, :2] == 0).all())
    torch.testing.assert_close(J[:, 2:], _linear_jacobian(x, 4)[:, :12], rtol=0, atol=0)


def test_oracle_jacobian_of_a_curved_model_equals_torch_func():
    x, W, b = _linear_problem(1)
    V = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def model(W, b, V):
        return torch.tanh(x @ W.T + b) @ V.T

    Vl = V.clone().requires_grad_(True)
    J = hf.reference.jacobian(model(W, b, Vl), [W, b, Vl])
    dense = torch.func.jacrev(model, argnums=(0, 1, 2))(W.detach(), b.detach(), V)
    want = torch.cat([t.reshape(10, -1) for t in dense], 1)
    torch.testing.assert_close(J, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("loss", ["mse", "ce", "bce", "mse_sum"])
def test_oracle_output_hessian_is_the_losses_closed_form(loss):
    g = torch.Generator().manual_seed(3)
    n, c = 4, 3
    o = torch.randn(n, c, generator=g, dtype=torch.float64)
    if loss.startswith("mse"):
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
        red = "sum" if loss == "mse_sum" else "mean"
        fn = torch.nn.MSELoss(reduction=red)
        want = torch.eye(n * c, dtype=o.dtype) * (2.0 if red == "sum" else 2.0 / (n * c))
    elif loss == "ce":
        y = torch.randint(0, c, (n,), generator=g)
        fn = torch.nn.functional.cross_entropy
        p = torch.softmax(o, 1)
        want = torch.block_diag(*[(torch.diag(p[k]) - torch.outer(p[k], p[k])) / n
                                  for k in range(n)])
    else:
        y = torch.rand(n, c, generator=g, dtype=torch.float64)
        fn = torch.nn.functional.binary_cross_entropy_with_logits
        s = torch.sigmoid(o)
        want = torch.diag((s * (1 - s)).reshape(-1)) / (n * c)
    Ho = hf.reference.output_hessian(fn, o.requires_grad_(True), y)
    torch.testing.assert_close(Ho, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_oracle_ggn_and_its_residual_against_dense_autograd(loss):
    x, W, b = _linear_problem(4)
    V = torch.randn(3, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    y = (torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
         if loss == "mse" else torch.tensor([0, 2, 1, 1, 0]))
    fn = torch.nn.functional.mse_loss if loss == "mse" else torch.nn.functional.cross_entropy

    def model(W, b, V):
        return torch.tanh(x @ W.T + b) @ V.T

    def total(W, b, V):
        return fn(model(W, b, V), y)

    params = [W, b, V]
    out = model(*params)
    G = hf.reference.ggn(out, fn, y, params)
    R = hf.reference.ggn_residual(out, fn, y, params)
    args = tuple(p.detach() for p in params)
    J = torch.cat([t.reshape(15, -1) for t in
                   torch.func.jacrev(model, argnums=(0, 1, 2))(*args)], 1)
    Ho = torch.func.hessian(lambda o: fn(o, y))(model(*args).detach()).reshape(15, 15)
    blocks = torch.func.hessian(total, argnums=(0, 1, 2))(*args)
    sizes = [p.numel() for p in params]
    H = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(3)], 1)
                   for i in range(3)])
    torch.testing.assert_close(G, J.T @ Ho @ J, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(R, H - J.T @ Ho @ J, rtol=1e-12, atol=1e-14)
    assert float((R - R.T).abs().max()) < 1e-14 and float(R.abs().max()) > 1e-3


def test_oracle_ggn_of_a_linear_model_is_its_hessian():
    x, W, b = _linear_problem(7)
    y = torch.tensor([3, 0, 1, 2, 2])
    out = x @ W.T + b
    fn = torch.nn.functional.cross_entropy
    J = _linear_jacobian(x, 4)
    p = torch.softmax(out.detach(), 1)
    Ho = torch.block_diag(*[(torch.diag(p[k]) - torch.outer(p[k], p[k])) / 5 for k in range(5)])
    G = hf.reference.ggn(out, fn, y, [W, b])
    torch.testing.assert_close(G, J.T @ Ho @ J, rtol=1e-12, atol=1e-15)
    R = hf.reference.ggn_residual(out, fn, y, [W, b])
    assert float(R.abs().max()) == 0.0


def test_oracle_empirical_fisher_of_least_squares_is_its_closed_form():
    x, W, b = _linear_problem(8, c=1)
    y = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    losses = [((x[n] @ W.T + b - y[n]) ** 2).sum() for n in range(5)]   # a graph each
    F_ = hf.reference.empirical_fisher(losses, [W, b], 0.3)
    r = (x @ W.T + b - y).detach()[:, 0]
    gs = 2 * r[:, None] * torch.cat([x, torch.ones(5, 1, dtype=x.dtype)], 1)   # (n, d + 1)
    torch.testing.assert_close(F_, 0.3 * gs.T @ gs, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical", "log-categorical",
                                        "bernoulli"])
def test_oracle_mc_fisher_is_its_definition_on_a_linear_model(likelihood):
    """The draws replayed from a copy of the generator, each sample's gradient in closed
    form: ``(dl/do) x^T`` with ``dl/do = 2 (o - t)``, ``softmax(o) - e_t`` (also for
    log-probabilities from ``log_softmax``) or ``sigmoid(o) - t``."""
    x, W, b = _linear_problem(10, c=3)
    log = likelihood == "log-categorical"

    def forward(inp):
        o = inp @ W.T + b
        return torch.log_softmax(o, 1) if log else o

    M, scale = 3, 0.7
    F_ = hf.reference.mc_fisher(forward, [W, b], x, likelihood, scale, M,
                                torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    o = (x @ W.T + b).detach()
    total = torch.zeros(12, 12, dtype=x.dtype)
    draws = []
    for _ in range(M):
        if likelihood == "gaussian":
            draws.append(o + torch.randn(o.shape, generator=g, dtype=o.dtype) * 0.5 ** 0.5)
        elif likelihood == "bernoulli":
            draws.append(torch.bernoulli(torch.sigmoid(o), generator=g))
        else:
            draws.append(torch.multinomial(torch.softmax(o, 1), 1, generator=g)[:, 0])
    for t in draws:
        if likelihood == "gaussian":
            dl = 2 * (o - t)
        elif likelihood == "bernoulli":
            dl = torch.sigmoid(o) - t
        else:
            dl = torch.softmax(o, 1) - torch.nn.functional.one_hot(t, 3).to(o.dtype)
        for n in range(5):
            gn = torch.cat([torch.outer(dl[n], x[n]).reshape(-1), dl[n]])
            total += torch.outer(gn, gn)
    torch.testing.assert_close(F_, scale / M * total, rtol=1e-12, atol=1e-14)
