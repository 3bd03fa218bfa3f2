"""Tests of hessfunc.estimators against closed forms and dense float64 linear algebra.

Test matrices are built with a known spectrum, ``Q diag(l) Q^T`` with ``Q`` from
the QR factorisation of a seeded Gaussian matrix. Stochastic estimators are
checked for convergence and for honest standard errors over fixed generators.
"""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hessfunc.errors import ArgumentError
from hessfunc.estimators import (
    EigenResult,
    LanczosResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_eigenvalues,
    quadrature_moments,
    spectral_density,
)
from hessfunc.estimators._probes import Operator

F64 = torch.float64


# ---------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(eigenvalues, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a seeded random orthogonal ``Q``, in float64."""
    values = torch.as_tensor(eigenvalues, dtype=F64)
    n = values.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(1000 + seed), dtype=F64))
    a = (q * values) @ q.T
    return (a + a.T) / 2


def _uniform(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=_gen(2000 + seed), dtype=F64)


def _clustered(n: int = 150) -> torch.Tensor:
    top = torch.tensor([0.656, 0.641, 0.634, 0.6305, 0.6301], dtype=F64)
    return torch.cat([top, _uniform(n - 5, 0.0, 0.6, seed=1)])


def _indefinite(n: int = 120) -> torch.Tensor:
    ends = torch.tensor([-2.0, -1.98, -1.97, 1.5, 1.49, 1.485], dtype=F64)
    return torch.cat([ends, _uniform(n - 6, -1.0, 1.0, seed=2)])


def _low_rank_plus_noise(n: int = 300) -> torch.Tensor:
    return torch.cat([_uniform(10, 20.0, 50.0, seed=3), _uniform(n - 10, 0.0, 0.05, seed=4)])


def _wanted(eigenvalues: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """The k extreme eigenvalues in the order lanczos_eigenvalues returns them."""
    if which == "largest":
        return eigenvalues.sort(descending=True).values[:k]
    if which == "smallest":
        return eigenvalues.sort().values[:k]
    return eigenvalues[eigenvalues.abs().argsort(descending=True)][:k]


class _Counting:
    """A matmat that records the width of each block it is called on."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a
        self.widths: list[int] = []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.widths.append(v.shape[1])
        return self.a @ v


def test_symmetric_helper_has_the_requested_spectrum():
    values = _indefinite(40)
    a = _symmetric(values, seed=5)
    assert_close(a, a.T, rtol=0, atol=0)
    assert_close(torch.linalg.eigvalsh(a), values.sort().values, rtol=0, atol=1e-12)
    assert not torch.allclose(a, torch.diag(torch.diagonal(a)))


def test_wanted_helper_orders_like_the_contract():
    values = torch.tensor([3.0, -5.0, 1.0, -2.0], dtype=F64)
    assert _wanted(values, 2, "largest").tolist() == [3.0, 1.0]
    assert _wanted(values, 2, "smallest").tolist() == [-5.0, -2.0]
    assert _wanted(values, 3, "magnitude").tolist() == [-5.0, 3.0, -2.0]


@pytest.mark.parametrize("module", ["hutchinson", "hutchpp", "lanczos", "slq"])
def test_docstring_examples(module):
    # importlib: the attribute hessfunc.estimators.lanczos is the function of that name
    mod = importlib.import_module(f"hessfunc.estimators.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------------------
# Lanczos eigenvalues


@pytest.mark.parametrize("which", ["largest", "magnitude", "smallest"])
@pytest.mark.parametrize("spectrum", [_clustered, _indefinite], ids=["clustered", "indefinite"])
def test_lanczos_eigenvalues_match_eigvalsh(spectrum, which):
    values = spectrum()
    a = _symmetric(values, seed=6)
    k = 4
    result = lanczos_eigenvalues(
        lambda v: a @ v,
        a.shape[0],
        k=k,
        which=which,
        return_vectors=True,
        generator=_gen(0),
        dtype=F64,
    )
    assert isinstance(result, EigenResult)
    assert result.converged
    assert result.num_matvecs <= a.shape[0]
    expected = _wanted(torch.linalg.eigvalsh(a), k, which)
    assert_close(result.eigenvalues, expected, rtol=1e-8, atol=0)

    vectors = result.eigenvectors
    assert vectors.shape == (a.shape[0], k)
    assert_close(vectors.T @ vectors, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    residual = torch.linalg.vector_norm(a @ vectors - vectors * result.eigenvalues, dim=0)
    assert (residual <= 2e-8 * result.eigenvalues.abs()).all(), residual


@pytest.mark.parametrize("tol", [1e-6, 1e-9])
@pytest.mark.parametrize("which", ["largest", "magnitude", "smallest"])
@pytest.mark.parametrize("spectrum", [_clustered, _indefinite], ids=["clustered", "indefinite"])
def test_lanczos_eigenvalues_meet_tol_with_and_without_vectors(spectrum, which, tol):
    """Eigenvalue-only runs (semi-orthogonal) are as accurate as runs with vectors."""
    values = spectrum()
    a = _symmetric(values, seed=6)
    expected = _wanted(torch.linalg.eigvalsh(a), 4, which)
    for vectors in (False, True):
        result = lanczos_eigenvalues(lambda v: a @ v, a.shape[0], k=4, which=which, tol=tol,
                                     return_vectors=vectors, generator=_gen(0), dtype=F64)
        assert result.converged
        error = (result.eigenvalues - expected).abs() / expected.abs()
        assert (error <= tol).all(), (error, tol)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("which", ["largest", "magnitude", "smallest"])
@pytest.mark.parametrize("spectrum", ["clustered", "indefinite", "uniform"])
def test_one_eigenvalue_by_the_plain_recurrence(spectrum, which, dtype, monkeypatch):
    """NOTE [one eigenvalue]: k = 1 without its vector keeps no basis and never
    reorthogonalises, and meets the tolerance (above the rounding floor of NOTE
    [convergence test]) as the run that keeps one (with the vector) does."""
    values = {"clustered": _clustered(300), "indefinite": _indefinite(300),
              "uniform": _uniform(300, 0.0, 1.0, seed=9)}[spectrum]
    a = _symmetric(values, seed=7).to(dtype)
    module = importlib.import_module("hessfunc.estimators.lanczos")
    kept = []
    run_class = module._LanczosRun
    monkeypatch.setattr(module, "_LanczosRun", lambda *a, **kw: kept.append(kw) or
                        run_class(*a, **kw))
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    expected = _wanted(values, 1, which)
    for vectors in (False, True):
        result = lanczos_eigenvalues(lambda v: a @ v, 300, k=1, which=which, tol=tol,
                                     max_steps=299, return_vectors=vectors, generator=_gen(3),
                                     dtype=dtype)
        assert result.converged
        error = float((result.eigenvalues.double() - expected).abs())
        floor = 300**0.5 * torch.finfo(dtype).eps * float(values.abs().max())
        assert error <= tol * float(expected.abs()) + floor, (vectors, error)
    assert [(kw["reorthogonalize"], kw["keep_basis"]) for kw in kept] == [(False, False),
                                                                          (True, True)]


@pytest.mark.parametrize("gap", [1e-3, 1e-5, 1e-6])
def test_an_unresolved_neighbour_does_not_pass_for_convergence(gap):
    """NOTE [convergence test]: two top eigenvalues ``gap`` apart: until Lanczos tells them
    apart its Ritz value mixes them with a large residual, so a converged answer is right
    (a gap estimated from the other Ritz values once stopped at 1e3 x tol here)."""
    for seed in range(5):
        bulk = 0.9 * torch.rand(998, generator=_gen(50 + seed), dtype=F64)
        d = torch.cat([torch.tensor([1.0, 1.0 - gap], dtype=F64), bulk])
        result = lanczos_eigenvalues(lambda v: d[:, None] * v, 1000, k=1, generator=_gen(seed),
                                     dtype=F64)
        assert result.converged
        assert abs(float(result.eigenvalues[0]) - 1.0) <= 1e-8


def test_lanczos_on_a_zero_operator_stops_at_once():
    for vectors in (False, True):
        result = lanczos_eigenvalues(lambda v: torch.zeros_like(v), 300, k=2, dtype=F64,
                                     return_vectors=vectors, generator=_gen(0))
        assert result.converged and result.num_matvecs <= 2
        assert torch.equal(result.eigenvalues, torch.zeros(2, dtype=F64))


def test_lanczos_eigenvalues_stop_early_on_a_gapped_spectrum():
    values = torch.cat([torch.tensor([10.0, 9.0, 8.0], dtype=F64), _uniform(397, 0, 1, 7)])
    a = _symmetric(values, seed=7)
    result = lanczos_eigenvalues(lambda v: a @ v, 400, k=3, generator=_gen(1), dtype=F64)
    assert result.converged
    assert result.num_matvecs < 60
    assert_close(result.eigenvalues, torch.tensor([10.0, 9.0, 8.0], dtype=F64), rtol=1e-8, atol=0)


@pytest.mark.parametrize("which", ["largest", "magnitude", "smallest"])
def test_lanczos_eigenvalues_with_k_near_size(which):
    values = _uniform(12, -3.0, 2.0, seed=8)
    a = _symmetric(values, seed=8)
    result = lanczos_eigenvalues(
        lambda v: a @ v, 12, k=11, which=which, generator=_gen(2), dtype=F64
    )
    assert result.converged
    assert_close(result.eigenvalues, _wanted(values, 11, which), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("largest", [5.0, 5.0, 3.0, 3.0]),
        ("magnitude", [5.0, 5.0, 3.0, 3.0]),
        ("smallest", [1.0] * 4),
    ],
)
def test_lanczos_eigenvalues_through_invariant_subspaces(which, expected):
    # three distinct eigenvalues: the first Krylov space is invariant after 3 steps,
    # and the extra copies live only in its complement
    a = _symmetric([5.0, 5.0, 3.0, 3.0, 3.0] + [1.0] * 25, seed=9)
    result = lanczos_eigenvalues(
        lambda v: a @ v, 30, k=4, which=which, generator=_gen(3), dtype=F64
    )
    assert result.converged
    assert_close(result.eigenvalues, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_lanczos_eigenvalues_find_the_copies_of_a_tight_cluster(k):
    # ten eigenvalues 0.01 apart, three copies each: the first Krylov space sees one
    # copy of each and is exhausted after 10 steps; a fresh block starts slowly, so
    # the second copy of 1.0 only shows if the restarted block is run to convergence
    values = torch.linspace(0.91, 1.0, 10, dtype=F64).repeat(3)
    a = _symmetric(values, seed=41)
    result = lanczos_eigenvalues(lambda v: a @ v, 30, k=k, generator=_gen(5), dtype=F64)
    assert result.converged
    assert_close(result.eigenvalues, torch.ones(k, dtype=F64), rtol=1e-10, atol=0)
    if k == 2:  # the second block ends invariant with 1.0 as its top: nothing left to find
        assert result.num_matvecs <= 20


@pytest.mark.parametrize(("which", "expected"), [("largest", [4.0, 2.0, 1.0, 0.0, 0.0])])
def test_lanczos_eigenvalues_of_a_low_rank_matrix(which, expected):
    a = _symmetric([4.0, 2.0, 1.0] + [0.0] * 37, seed=10)
    result = lanczos_eigenvalues(
        lambda v: a @ v, 40, k=5, which=which, generator=_gen(4), dtype=F64
    )
    assert result.converged
    assert result.num_matvecs < 40
    assert_close(result.eigenvalues, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-12)


def test_lanczos_eigenvalues_report_non_convergence_when_capped():
    a = _symmetric(_clustered(), seed=6)
    result = lanczos_eigenvalues(
        lambda v: a @ v, 150, k=4, max_steps=10, generator=_gen(0), dtype=F64
    )
    assert result.num_matvecs == 10
    assert not result.converged


# ---------------------------------------------------------------------------
# the Lanczos process itself


def test_lanczos_relation_and_orthonormal_basis():
    a = _symmetric(_indefinite(50), seed=11)
    m = 12
    result = lanczos(
        lambda v: a @ v, 50, num_steps=m, return_basis=True, generator=_gen(5), dtype=F64
    )
    assert isinstance(result, LanczosResult)
    assert result.alphas.shape == (m,)
    assert result.betas.shape == (m - 1,)
    basis, tri = result.basis, result.tridiagonal()
    eye = torch.eye(m, dtype=F64)
    assert_close(basis.T @ basis, eye, rtol=0, atol=1e-13)
    assert_close(basis.T @ a @ basis, tri, rtol=0, atol=1e-13)
    gap = a @ basis - basis @ tri  # = residual_norm q_(m+1) e_m^T
    assert_close(gap[:, :-1], torch.zeros_like(gap[:, :-1]), rtol=0, atol=1e-13)
    assert_close(torch.linalg.vector_norm(gap[:, -1]), result.residual_norm, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "values",
    [
        torch.logspace(-8, 3, 200, dtype=F64),
        torch.cat([torch.logspace(0, 4, 20, dtype=F64), torch.zeros(180, dtype=F64)]),
    ],
    ids=["wide", "low-rank"],
)
def test_lanczos_basis_stays_orthonormal_over_a_long_run(values):
    # converged Ritz values (and, for the low-rank matrix, restarts from fresh vectors
    # in the null space) make one Gram-Schmidt pass lose orthogonality; two keep it
    a = _symmetric(values, seed=40)
    result = lanczos(
        lambda v: a @ v, 200, num_steps=199, return_basis=True, generator=_gen(0), dtype=F64
    )
    basis = result.basis
    assert_close(basis.T @ basis, torch.eye(199, dtype=F64), rtol=0, atol=5e-15)


@pytest.mark.parametrize("values", [_clustered(200), _low_rank_plus_noise(200)],
                         ids=["clustered", "low-rank"])
def test_semi_orthogonal_runs_stay_within_sqrt_eps(values):
    """NOTE [semi-orthogonality]: reorthogonalising only when Simon's estimate asks keeps
    |Q^T Q - I| <= sqrt(eps) and T the projection of A to that level; the Ritz values
    stay exact."""
    a = _symmetric(values, seed=40)
    op = Operator.from_args("test", lambda v: a @ v, 200, dtype=F64, device=None, generator=None)
    start = torch.randn(200, 1, generator=_gen(0), dtype=F64)
    run_class = importlib.import_module("hessfunc.estimators.lanczos")._LanczosRun
    run = run_class(op, start / start.norm(), reorthogonalize="semi", keep_basis=True,
                    generator=_gen(0), capacity=150)
    for _ in range(150):
        run.step()
    Q = run.basis()[0].T
    loss = float((Q.T @ Q - torch.eye(150, dtype=F64)).abs().max())
    assert 1e-15 < loss <= torch.finfo(F64).eps ** 0.5, loss   # subtractions were skipped
    alphas, offdiag, _ = run.coefficients()
    T = torch.diag(alphas[:, 0]) + torch.diag(offdiag[:, 0], 1) + torch.diag(offdiag[:, 0], -1)
    assert float((Q.T @ a @ Q - T).abs().max()) <= 1e-7 * float(values.abs().max())
    top = torch.linalg.eigvalsh(T)[-3:]
    assert_close(top, values.sort().values[-3:], rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("spectrum", ["uniform", "geometric", "clustered", "indefinite"])
def test_orthogonality_estimate_keeps_the_basis_semi_orthogonal(spectrum, dtype, monkeypatch):
    """NOTE [semi-orthogonality]: on diagonal operators (the basis is then cheap to measure)
    Simon's estimate keeps every measured |q_i^T q_j| within sqrt(eps), is not below the
    measured level by more than a small factor, and reorthogonalises rarely. The
    geometric spectrum drives beta to rounding level, where one step can lose all
    orthogonality and the estimate reorthogonalises (nearly) every step (one that
    restarted at eps after a reorthogonalisation let the basis collapse there)."""
    n, steps = 2000, 250
    g = _gen(1)
    d = {"uniform": torch.rand(n, generator=g, dtype=F64),
         "geometric": 0.9 ** torch.arange(n, dtype=F64),
         "clustered": torch.cat([torch.tensor([1.0, 0.99, 0.985], dtype=F64),
                                 0.5 * torch.rand(n - 3, generator=g, dtype=F64)]),
         "indefinite": torch.randn(n, generator=g, dtype=F64)}[spectrum].to(dtype)
    module = importlib.import_module("hessfunc.estimators.lanczos")
    reorthogonalised = []
    project_out = module._project_out
    monkeypatch.setattr(module, "_project_out",
                        lambda *a, **kw: reorthogonalised.append(1) or project_out(*a, **kw))
    op = Operator.from_args("test", lambda v: d[:, None] * v, n, dtype=dtype, device=None,
                            generator=None)
    start = torch.randn(n, 1, generator=_gen(0), dtype=dtype)
    run = module._LanczosRun(op, start / start.norm(), reorthogonalize="semi", keep_basis=True,
                             generator=_gen(0), capacity=steps)
    eps = torch.finfo(dtype).eps
    for j in range(steps):
        # (after a restart the run measures instead: no estimate)
        estimate = (run._estimate._current[0, 1:j].copy()
                    if j > 1 and run._estimate is not None else None)
        run.step()
        if estimate is not None and run._estimate is not None:  # q_j's row, a step ago
            Q = run.basis()[0].double()
            measured = (Q[: j - 1] @ Q[j]).abs().max().item()
            assert measured <= max(5 * abs(estimate).max(), 1e3 * eps), (j, measured)
    Q = run.basis()[0].double()
    loss = float((Q @ Q.T - torch.eye(steps, dtype=F64)).abs().max())
    assert loss <= eps**0.5, loss
    if spectrum != "geometric":   # there beta sinks to rounding level: every step must
        assert len(reorthogonalised) < steps / 2, len(reorthogonalised)


@pytest.mark.parametrize("mode", [True, "semi"])
def test_a_restart_draw_inside_the_basis_span_is_drawn_again(mode):
    """NOTE [invariant subspaces]: the restart vector is drawn from the run's generator; a
    draw inside the span of the basis (here: the same seed as the start vector) projects
    to rounding noise, which must not become the next basis vector."""
    d = torch.arange(1.0, 11.0, dtype=F64).repeat(200)   # 10 distinct eigenvalues
    op = Operator.from_args("test", lambda v: d[:, None] * v, 2000, dtype=F64, device=None,
                            generator=None)
    start = torch.randn(2000, 1, generator=_gen(0), dtype=F64)
    run_class = importlib.import_module("hessfunc.estimators.lanczos")._LanczosRun
    run = run_class(op, start / start.norm(), reorthogonalize=mode, keep_basis=True,
                    generator=_gen(0), capacity=14)
    for _ in range(14):
        run.step()
    _, offdiag, _ = run.coefficients()
    assert offdiag[9, 0] == 0   # the start's Krylov space became invariant at step 10
    Q = run.basis()[0]
    assert_close(Q @ Q.T, torch.eye(14, dtype=F64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("mode", [True, "semi"])
def test_lanczos_storage_grows_without_changing_the_run(mode):
    """NOTE [basis allocation]: the basis, the coefficients and the orthogonality estimate
    start small and double; two processes at once, 40 steps from room for 1 or for 40."""
    a = _symmetric(_clustered(100), seed=8)
    op = Operator.from_args("test", lambda v: a @ v, 100, dtype=F64, device=None,
                            generator=None)
    start = torch.randn(100, 2, generator=_gen(1), dtype=F64)
    module = importlib.import_module("hessfunc.estimators.lanczos")
    runs = []
    for capacity in (1, 40):
        run = module._LanczosRun(op, start / start.norm(dim=0), reorthogonalize=mode,
                                 keep_basis=True, generator=_gen(2), capacity=capacity)
        for _ in range(40):
            run.step()
        runs.append(run)
    small, large = runs
    for got, expected in zip(small.coefficients(), large.coefficients(), strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(small.basis(), large.basis())


@pytest.mark.parametrize("m", [1, 2, 10, 32, 33, 80])
def test_host_tridiagonal_eigh_matches_a_dense_eigh(m):
    """The convergence checks' eigen-decomposition of T (numpy below 33 rows, torch above)."""
    module = importlib.import_module("hessfunc.estimators.lanczos")
    g = _gen(m)
    alphas, offdiag = torch.randn(m, generator=g, dtype=F64), torch.rand(m - 1, generator=g,
                                                                         dtype=F64)
    T = torch.diag(alphas) + torch.diag(offdiag, 1) + torch.diag(offdiag, -1)
    theta, vectors = module._host_tridiagonal_eigh(alphas.numpy(), offdiag.numpy())
    assert_close(torch.from_numpy(theta), torch.linalg.eigvalsh(T))
    vectors = torch.from_numpy(vectors)
    assert_close(T @ vectors, vectors * torch.from_numpy(theta))
    assert_close(vectors.T @ vectors, torch.eye(m, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_runs_after_a_restart_stay_inside_the_spectrum(dtype):
    """NOTE [semi-orthogonality]: after an invariant subspace ends a block, the new block
    loses orthogonality against the old one faster than Simon's estimate follows, so the
    run measures it (found in review: Gauss nodes and eigenvalues far outside the
    spectrum, some reported as converged)."""
    d = torch.repeat_interleave(torch.arange(-6.0, 6.0, dtype=dtype),
                                torch.tensor([1, 0, 1, 6, 4, 8, 4, 12, 7, 4, 1, 2]))
    few = torch.randn(20, generator=_gen(0), dtype=F64).mul(3).to(dtype)
    spread = few[torch.randint(0, 20, (1000,), generator=_gen(1))]
    for seed in range(10):
        for values, steps in ((d, 40), (spread, 150)):
            density = spectral_density(lambda v, values=values: values[:, None] * v,
                                       values.numel(), num_probes=2, num_steps=steps,
                                       generator=_gen(seed), dtype=dtype)
            margin = 1e-4 * float(values.abs().max())
            assert float(density.nodes.min()) >= float(values.min()) - margin, seed
            assert float(density.nodes.max()) <= float(values.max()) + margin, seed
        result = lanczos_eigenvalues(lambda v: d[:, None] * v, d.numel(), k=2,
                                     which="smallest", tol=1e-4, generator=_gen(seed),
                                     dtype=dtype)
        assert_close(result.eigenvalues.double(), torch.tensor([-6.0, -4.0], dtype=F64),
                     rtol=1e-4, atol=0)


def test_lanczos_without_reorthogonalization_for_a_few_steps():
    a = _symmetric(_uniform(60, 1.0, 2.0, seed=12), seed=12)
    start = torch.randn(60, generator=_gen(6), dtype=F64)
    result = lanczos(
        lambda v: a @ v, 60, num_steps=5, start=start, reorthogonalize=False, return_basis=True
    )
    basis = result.basis
    assert_close(basis[:, 0], start / start.norm(), rtol=0, atol=1e-15)
    assert_close(basis.T @ basis, torch.eye(5, dtype=F64), rtol=0, atol=1e-10)
    assert_close(basis.T @ a @ basis, result.tridiagonal(), rtol=0, atol=1e-10)


def test_lanczos_restarts_after_an_invariant_subspace():
    values = torch.tensor([4.0] * 5 + [2.0] * 5 + [-1.0] * 5, dtype=F64)
    a = _symmetric(values, seed=13)
    result = lanczos(
        lambda v: a @ v, 15, num_steps=6, return_basis=True, generator=_gen(7), dtype=F64
    )
    assert result.betas[2] == 0  # three distinct eigenvalues: invariant after 3 steps
    assert (result.betas[:2] > 0.1).all()
    basis = result.basis
    assert_close(basis.T @ basis, torch.eye(6, dtype=F64), rtol=0, atol=1e-13)
    # the complement holds each eigenvalue 4 more times: invariant again after 3 steps
    assert result.betas[4] > 0.1
    assert result.residual_norm < 1e-12
    ritz = torch.linalg.eigvalsh(result.tridiagonal())
    expected = torch.tensor([-1.0, -1.0, 2.0, 2.0, 4.0, 4.0], dtype=F64)
    assert_close(ritz, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# Hutchinson and Hutch++


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    d = torch.linspace(-2.0, 5.0, 9, dtype=F64)
    est = hutchinson_trace(lambda v: d[:, None] * v, 9, num_samples=5, generator=_gen(0), dtype=F64)
    assert isinstance(est, TraceEstimate)
    assert_close(est.estimate, d.sum(), rtol=1e-14, atol=1e-14)
    assert_close(est.std_error, torch.zeros((), dtype=F64), rtol=0, atol=1e-14)
    diag = hutchinson_diagonal(
        lambda v: d[:, None] * v, 9, num_samples=2, generator=_gen(1), dtype=F64
    )
    assert_close(diag, d, rtol=1e-14, atol=0)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_converges(distribution):
    a = _symmetric(_uniform(50, -1.0, 3.0, seed=14), seed=14)
    exact = torch.trace(a)

    def mean_error(num_samples: int) -> float:
        errors = [
            (
                hutchinson_trace(
                    lambda v: a @ v,
                    50,
                    num_samples=num_samples,
                    distribution=distribution,
                    generator=_gen(seed),
                    dtype=F64,
                ).estimate
                - exact
            ).abs()
            for seed in range(5)
        ]
        return float(torch.stack(errors).mean())

    assert mean_error(1000) < 0.25 * mean_error(10)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_std_error_matches_the_actual_error(distribution):
    a = _symmetric(_uniform(40, -1.0, 3.0, seed=15), seed=15)
    exact = torch.trace(a)
    z = []
    for seed in range(40):
        est = hutchinson_trace(
            lambda v: a @ v,
            40,
            num_samples=50,
            distribution=distribution,
            generator=_gen(seed),
            dtype=F64,
        )
        z.append((est.estimate - exact) / est.std_error)
    mean_square = float(torch.stack(z).square().mean())
    assert 0.5 < mean_square < 1.7, mean_square


def test_hutchinson_single_sample_has_nan_std_error():
    a = _symmetric(_uniform(10, 0.0, 1.0, seed=16), seed=16)
    est = hutchinson_trace(lambda v: a @ v, 10, num_samples=1, generator=_gen(0), dtype=F64)
    assert est.num_matvecs == 1
    assert torch.isnan(est.std_error)
    assert torch.isfinite(est.estimate)


def test_hutchinson_batches_the_probes():
    a = _symmetric(_uniform(20, 0.0, 1.0, seed=17), seed=17)
    matmat = _Counting(a)
    est = hutchinson_trace(matmat, 20, num_samples=23, batch_size=5, generator=_gen(0), dtype=F64)
    assert matmat.widths == [5, 5, 5, 5, 3]
    assert est.num_matvecs == 23
    matmat = _Counting(a)
    hutchinson_diagonal(matmat, 20, num_samples=7, batch_size=4, generator=_gen(0), dtype=F64)
    assert matmat.widths == [4, 3]


def test_hutchinson_diagonal_converges():
    a = _symmetric(_uniform(30, -1.0, 2.0, seed=18), seed=18)
    exact = torch.diagonal(a)
    off_diagonal = (a.square().sum(dim=1) - exact.square()).sqrt()  # std of one probe

    def error(num_samples: int, seed: int) -> torch.Tensor:
        est = hutchinson_diagonal(
            lambda v: a @ v, 30, num_samples=num_samples, generator=_gen(seed), dtype=F64
        )
        assert est.shape == (30,)
        return est - exact

    large = error(4000, 0)
    assert (large.abs() <= 4.5 * off_diagonal / math.sqrt(4000)).all()
    small_mean = torch.stack([error(40, s).abs().mean() for s in range(3)]).mean()
    large_mean = torch.stack([error(4000, s).abs().mean() for s in range(3)]).mean()
    assert large_mean < 0.2 * small_mean


def test_hutchpp_is_exact_with_a_full_sketch():
    a = _symmetric(_indefinite(20), seed=19)
    est = hutchpp_trace(lambda v: a @ v, 20, num_matvecs=60, generator=_gen(0), dtype=F64)
    assert_close(est.estimate, torch.trace(a), rtol=1e-12, atol=1e-12)


def test_hutchpp_spends_exactly_its_budget():
    a = _symmetric(_uniform(40, 0.0, 1.0, seed=20), seed=20)
    matmat = _Counting(a)
    est = hutchpp_trace(matmat, 40, num_matvecs=11, batch_size=2, generator=_gen(0), dtype=F64)
    assert est.num_matvecs == 11
    assert sum(matmat.widths) == 11
    assert max(matmat.widths) == 2


def test_hutchpp_converges():
    a = _symmetric(1.0 / torch.arange(1, 301, dtype=F64), seed=21)
    exact = torch.trace(a)

    def mean_error(budget: int) -> float:
        errors = [
            (
                hutchpp_trace(
                    lambda v: a @ v, 300, num_matvecs=budget, generator=_gen(s), dtype=F64
                ).estimate
                - exact
            ).abs()
            for s in range(5)
        ]
        return float(torch.stack(errors).mean())

    assert mean_error(600) < 0.1 * mean_error(12)


def test_hutchpp_beats_hutchinson_on_a_low_rank_plus_noise_spectrum():
    a = _symmetric(_low_rank_plus_noise(), seed=22)
    exact = torch.trace(a)
    budget = 60
    hutch, hutchpp = [], []
    for seed in range(8):
        hutch.append(
            hutchinson_trace(
                lambda v: a @ v, 300, num_samples=budget, generator=_gen(seed), dtype=F64
            )
        )
        hutchpp.append(
            hutchpp_trace(lambda v: a @ v, 300, num_matvecs=budget, generator=_gen(seed), dtype=F64)
        )
    error_h = torch.stack([(e.estimate - exact).abs() for e in hutch]).mean()
    error_pp = torch.stack([(e.estimate - exact).abs() for e in hutchpp]).mean()
    assert error_pp < 0.1 * error_h


def test_hutchpp_std_error_matches_the_actual_error():
    a = _symmetric(_uniform(100, 0.0, 1.0, seed=23), seed=23)
    exact = torch.trace(a)
    z = []
    for seed in range(40):
        est = hutchpp_trace(lambda v: a @ v, 100, num_matvecs=60, generator=_gen(seed), dtype=F64)
        z.append((est.estimate - exact) / est.std_error)
    mean_square = float(torch.stack(z).square().mean())
    assert 0.5 < mean_square < 1.7, mean_square


# ---------------------------------------------------------------------------
# stochastic Lanczos quadrature


def test_quadrature_is_exact_up_to_degree_2m_minus_1():
    a = _symmetric(_indefinite(60) / 2, seed=24)
    probes = torch.randn(60, 4, generator=_gen(8), dtype=F64)
    m = 6
    sd = spectral_density(lambda v: a @ v, 60, num_steps=m, probes=probes)
    assert sd.nodes.shape == sd.weights.shape == (4, m)
    assert_close(sd.weights.sum(dim=1), torch.ones(4, dtype=F64), rtol=0, atol=1e-13)

    powers = range(2 * m + 1)
    unit = probes / probes.norm(dim=0)
    exact = torch.stack(
        [(unit * (torch.linalg.matrix_power(a, p) @ unit)).sum(dim=0) for p in powers], dim=1
    )
    moments = quadrature_moments(sd.nodes, sd.weights, powers)
    assert moments.shape == (4, 2 * m + 1)
    assert_close(moments[:, : 2 * m], exact[:, : 2 * m], rtol=1e-10, atol=1e-12)
    # degree 2m is past the Gauss rule: this test can tell the degrees apart
    assert ((moments[:, 2 * m] - exact[:, 2 * m]).abs() > 1e-8).all()


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_spectral_density_integrates_to_one_and_has_the_right_moments(distribution):
    values = _indefinite(100)
    a = _symmetric(values, seed=25)
    sd = spectral_density(
        lambda v: a @ v,
        100,
        num_probes=60,
        num_steps=10,
        distribution=distribution,
        generator=_gen(9),
        dtype=F64,
    )
    assert isinstance(sd, SpectralDensity)
    assert sd.grid.shape == sd.density.shape == (1024,)
    assert (sd.density >= 0).all()
    assert_close(
        torch.trapezoid(sd.density, sd.grid), torch.tensor(1.0, dtype=F64), rtol=1e-6, atol=0
    )
    assert sd.grid[0] < values.min() and sd.grid[-1] > values.max()

    per_probe = quadrature_moments(sd.nodes, sd.weights, (0, 1, 2))
    exact = torch.stack([values.pow(p).mean() for p in (0, 1, 2)])
    assert_close(sd.moments((0, 1, 2)), per_probe.mean(dim=0), rtol=0, atol=0)
    assert_close(per_probe[:, 0], torch.ones(60, dtype=F64), rtol=0, atol=1e-13)
    # p = 1, 2: unbiased, within 4 standard errors of the probe average
    std_error = per_probe.std(dim=0) / math.sqrt(60)
    assert ((per_probe.mean(dim=0) - exact).abs()[1:] <= 4 * std_error[1:]).all()
    assert (std_error[1:] < 0.05 * exact[2]).all()


def test_spectral_density_puts_the_mass_where_the_eigenvalues_are():
    values = torch.cat([_uniform(50, -2.0, -1.5, seed=26), _uniform(50, 1.0, 2.0, seed=27)])
    a = _symmetric(values, seed=26)
    sd = spectral_density(
        lambda v: a @ v, 100, num_probes=20, num_steps=12, generator=_gen(10), dtype=F64
    )
    left = sd.grid < 0
    mass_left = torch.trapezoid(sd.density[left], sd.grid[left])
    assert abs(float(mass_left) - 0.5) < 0.05
    middle = (sd.grid > -1.2) & (sd.grid < 0.7)
    assert sd.density[middle].max() < 1e-3 * sd.density.max()


def test_spectral_density_of_a_multiple_of_the_identity():
    # every probe's Krylov space is invariant after one step: restarts get zero weight
    sd = spectral_density(
        lambda v: 3.0 * v, 8, num_probes=2, num_steps=4, generator=_gen(11), dtype=F64
    )
    assert_close(sd.nodes, torch.full((2, 4), 3.0, dtype=F64), rtol=1e-14, atol=0)
    assert_close(sd.moments((0, 1, 2)), torch.tensor([1.0, 3.0, 9.0], dtype=F64))
    assert_close(sd.grid[sd.density.argmax()], torch.tensor(3.0, dtype=F64), rtol=0, atol=0.01)


def test_spectral_density_sigma_and_grid_options():
    a = _symmetric(_uniform(30, 0.0, 4.0, seed=28), seed=28)
    kwargs = {"num_probes": 3, "num_steps": 8, "dtype": F64}
    sd = spectral_density(lambda v: a @ v, 30, sigma=0.05, generator=_gen(0), **kwargs)
    assert sd.sigma == 0.05
    assert_close(sd.grid[0], sd.nodes.min() - 0.3, rtol=0, atol=1e-12)
    sd = spectral_density(lambda v: a @ v, 30, relative_sigma=0.1, generator=_gen(0), **kwargs)
    assert sd.sigma == pytest.approx(0.1 * float(sd.nodes.max() - sd.nodes.min()))
    grid = torch.linspace(-3.0, 7.0, 501, dtype=F64)
    on_grid = spectral_density(
        lambda v: a @ v, 30, grid=grid, relative_sigma=0.1, generator=_gen(0), **kwargs
    )
    assert torch.equal(on_grid.grid, grid)
    assert torch.equal(on_grid.nodes, sd.nodes)
    assert_close(torch.trapezoid(on_grid.density, grid), torch.tensor(1.0, dtype=F64))


def test_spectral_density_batches_the_probes():
    a = _symmetric(_uniform(30, 0.0, 4.0, seed=29), seed=29)
    matmat = _Counting(a)
    probes = torch.randn(30, 5, generator=_gen(12), dtype=F64)
    batched = spectral_density(matmat, 30, num_steps=4, probes=probes, batch_size=2)
    assert matmat.widths == [2] * 4 + [2] * 4 + [1] * 4
    whole = spectral_density(lambda v: a @ v, 30, num_steps=4, probes=probes)
    assert_close(batched.nodes, whole.nodes, rtol=1e-12, atol=1e-12)
    assert_close(batched.weights, whole.weights, rtol=1e-10, atol=1e-12)


def test_spectral_density_standard_error_is_the_spread_of_the_probes():
    """The integrated standard error, from each probe's Gaussian mixture written out
    here: int std_r(d_r(t)) dt / sqrt(R); one probe has none."""
    a = _symmetric(_uniform(30, 0.0, 4.0, seed=30), seed=30)
    sd = spectral_density(lambda v: a @ v, 30, num_probes=4, num_steps=6, generator=_gen(13),
                          dtype=F64)
    z = (sd.grid[None, :, None] - sd.nodes[:, None, :]) / sd.sigma       # (R, points, m)
    each = (torch.exp(-z * z / 2) * sd.weights[:, None, :]).sum(-1) / (
        sd.sigma * math.sqrt(2 * math.pi))
    assert_close(each.mean(0), sd.density)
    spread = each.std(0, correction=1) / 2.0
    assert sd.standard_error() == pytest.approx(float(torch.trapezoid(spread, sd.grid)),
                                                rel=1e-12)
    one = spectral_density(lambda v: a @ v, 30, num_probes=1, num_steps=6, generator=_gen(13),
                           dtype=F64)
    assert math.isnan(one.standard_error())
    two = spectral_density(lambda v: a @ v, 30, num_probes=2, num_steps=6, generator=_gen(13),
                           dtype=F64)
    assert 0 < two.standard_error() < math.inf  # two probes have a spread


def test_spectral_density_runs_probes_until_its_standard_error_is_below_tol():
    """With ``tol``: three probes, then one at a time, stopping at the first count whose
    standard error is at most ``tol`` (the same draws as a fixed count); ``num_probes``
    caps it; a ``tol`` met at once still takes three."""
    values = torch.cat([_uniform(56, 0.0, 1.0, seed=31), torch.tensor([3.0, 5.0, 8.0, 9.0],
                                                                       dtype=F64)])
    a = _symmetric(values, seed=31)
    errors = []
    for r in range(2, 11):
        fixed = spectral_density(lambda v: a @ v, 60, num_probes=r, num_steps=8,
                                 generator=_gen(14), dtype=F64, batch_size=1)
        errors.append(fixed.standard_error())
    by_count = dict(zip(range(2, 11), errors, strict=True))
    # the first count past three with a new smallest error, and a tol between it and the
    # smallest before it (clear of rounding)
    want = next(r for r in range(4, 11) if by_count[r] < min(by_count[q] for q in range(3, r)))
    tol = (by_count[want] + min(by_count[q] for q in range(3, want))) / 2
    matmat = _Counting(a)
    sd = spectral_density(matmat, 60, num_probes=10, num_steps=8, generator=_gen(14),
                          dtype=F64, tol=tol)
    assert sd.nodes.shape[0] == want and sd.standard_error() <= tol
    assert matmat.widths == [3] * 8 + [1] * 8 * (want - 3)
    fixed = spectral_density(lambda v: a @ v, 60, num_probes=10, num_steps=8,
                             generator=_gen(14), dtype=F64)
    assert_close(sd.nodes, fixed.nodes[:want], rtol=1e-10, atol=1e-12)
    capped = spectral_density(lambda v: a @ v, 60, num_probes=5, num_steps=8,
                              generator=_gen(14), dtype=F64, tol=1e-12)
    assert capped.nodes.shape[0] == 5
    easy = spectral_density(lambda v: a @ v, 60, num_probes=10, num_steps=8,
                            generator=_gen(14), dtype=F64, tol=10.0)
    assert easy.nodes.shape[0] == 3
    three = spectral_density(lambda v: a @ v, 60, num_probes=3, num_steps=8,
                             generator=_gen(14), dtype=F64)
    at = spectral_density(lambda v: a @ v, 60, num_probes=10, num_steps=8,
                          generator=_gen(14), dtype=F64, tol=three.standard_error())
    assert at.nodes.shape[0] == 3  # "at most tol": met exactly
    matmat = _Counting(a)
    paired = spectral_density(matmat, 60, num_probes=10, num_steps=8, generator=_gen(14),
                              dtype=F64, tol=tol, batch_size=2)
    assert matmat.widths[::8] == [2] * (paired.nodes.shape[0] // 2)  # batches of batch_size
    with pytest.raises(ArgumentError, match=r"^spectral_density\(\): expected tol to be"):
        spectral_density(lambda v: a @ v, 60, tol=0.0)


def test_spectral_density_standard_error_predicts_its_error():
    """With as many steps as the size, each probe's quadrature is exact, so the mean of
    many probes is the smoothed spectrum ``(1/n) sum_i N(t; lambda_i, sigma^2)``. Over 200
    runs of 4 probes the integrated error from it averages 0.5-1.5 times the reported
    standard error (Gaussian errors: E|X| = 0.8 sigma)."""
    values = torch.cat([_uniform(36, 0.0, 1.0, seed=32), torch.tensor([2.0, 3.0, 4.0, 6.0],
                                                                       dtype=F64)])
    a = _symmetric(values, seed=32)
    grid = torch.linspace(-1.0, 7.0, 801, dtype=F64)
    sigma = 0.1
    z = (grid[:, None] - values[None, :]) / sigma
    truth = torch.exp(-z * z / 2).mean(1) / (sigma * math.sqrt(2 * math.pi))
    gen = _gen(15)
    errors, reported = [], []
    for _ in range(200):
        sd = spectral_density(lambda v: a @ v, 40, num_probes=4, num_steps=40, grid=grid,
                              sigma=sigma, generator=gen, dtype=F64)
        errors.append(float(torch.trapezoid((sd.density - truth).abs(), grid)))
        reported.append(sd.standard_error())
    ratio = sum(errors) / sum(reported)
    assert 0.5 < ratio < 1.5, ratio


# ---------------------------------------------------------------------------
# reproducibility and dtypes


def _run_all(a: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    n = a.shape[0]

    def matmat(v):
        return a @ v

    kw = {"dtype": a.dtype}
    return {
        "hutchinson": hutchinson_trace(matmat, n, num_samples=7, generator=_gen(seed), **kw)[0],
        "diagonal": hutchinson_diagonal(matmat, n, num_samples=7, generator=_gen(seed), **kw),
        "hutchpp": hutchpp_trace(matmat, n, num_matvecs=9, generator=_gen(seed), **kw)[0],
        "lanczos": lanczos(matmat, n, num_steps=5, generator=_gen(seed), **kw).alphas,
        "eigen": lanczos_eigenvalues(
            matmat, n, k=2, return_vectors=True, generator=_gen(seed), **kw
        ).eigenvectors,
        "slq": spectral_density(
            matmat, n, num_probes=3, num_steps=5, generator=_gen(seed), **kw
        ).density,
    }


def test_same_generator_seed_gives_identical_results():
    a = _symmetric(_indefinite(25), seed=30)
    first, second = _run_all(a, seed=3), _run_all(a, seed=3)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_different_seeds_give_different_results():
    a = _symmetric(_indefinite(25), seed=30)
    first, second = _run_all(a, seed=3), _run_all(a, seed=4)
    for name in first:
        assert not torch.equal(first[name], second[name]), name


def test_results_keep_the_operator_dtype():
    a = _symmetric(_indefinite(25), seed=31).to(torch.float32)
    for name, value in _run_all(a, seed=0).items():
        assert value.dtype == torch.float32, name
    result = lanczos_eigenvalues(
        lambda v: a @ v, 25, k=2, tol=1e-5, generator=_gen(0), dtype=torch.float32
    )
    expected = _wanted(torch.linalg.eigvalsh(a.double()), 2, "largest")
    assert result.eigenvalues.dtype == torch.float32
    assert_close(result.eigenvalues.double(), expected, rtol=1e-5, atol=0)


def test_default_dtype_and_device_follow_the_start_vector():
    a = _symmetric(_indefinite(10), seed=32)
    start = torch.ones(10, dtype=F64)
    result = lanczos(lambda v: a @ v, 10, num_steps=3, start=start)
    assert result.alphas.dtype == F64
    assert_close(result.alphas[0], start @ a @ start / 10)


# ---------------------------------------------------------------------------
# bad input


def _identity(v: torch.Tensor) -> torch.Tensor:
    return v


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hutchinson_trace(_identity, 5, num_samples=0), r"num_samples.*got 0"),
        (lambda: hutchinson_trace(_identity, 5, num_samples=2.5), r"num_samples.*got 2\.5"),
        (lambda: hutchinson_diagonal(_identity, 5, num_samples=0), r"num_samples"),
        (lambda: hutchinson_trace(_identity, 5, num_samples=3, batch_size=0), r"batch_size"),
        (
            lambda: hutchinson_trace(_identity, 5, num_samples=3, distribution="normal"),
            r"distribution.*'rademacher', 'gaussian'.*got 'normal'",
        ),
        (lambda: hutchpp_trace(_identity, 5, num_matvecs=2), r"num_matvecs.*>= 3.*got 2"),
        (lambda: lanczos_eigenvalues(_identity, 5, k=0), r"\bk\b.*\[1, 4\].*got 0"),
        (lambda: lanczos_eigenvalues(_identity, 5, k=5), r"\bk\b.*\[1, 4\].*got 5"),
        (lambda: lanczos_eigenvalues(_identity, 5, which="biggest"), r"expected which to be"),
        (lambda: lanczos_eigenvalues(_identity, 5, tol=0.0), r"expected tol to be"),
        (lambda: lanczos_eigenvalues(_identity, 5, k=3, max_steps=2), r"max_steps"),
        (lambda: lanczos(_identity, 5, num_steps=0), r"num_steps.*\[1, 5\]"),
        (lambda: lanczos(_identity, 5, num_steps=6), r"num_steps.*\[1, 5\]"),
        (lambda: lanczos(_identity, 5, num_steps=2, start=torch.ones(4)), r"start.*\(5,\)"),
        (lambda: lanczos(_identity, 5, num_steps=2, start=torch.zeros(5)), r"start.*non-zero"),
        (
            lambda: lanczos(_identity, 5, num_steps=2, start=torch.ones(5), dtype=F64),
            r"disagree with start",
        ),
        (
            lambda: spectral_density(_identity, 5, probes=torch.ones(5, 2), device="meta"),
            r"disagree with probes",
        ),
        (lambda: hutchinson_trace(_identity, 0, num_samples=3), r"size.*got 0"),
        (
            lambda: hutchinson_trace(_identity, 5, num_samples=3, dtype=torch.int64),
            r"dtype",
        ),
        (
            lambda: hutchinson_trace(_identity, 5, num_samples=3, generator=0),
            r"generator",
        ),
        (lambda: spectral_density(_identity, 5, sigma=0.1, relative_sigma=0.1), r"sigma"),
        (lambda: spectral_density(_identity, 5, sigma=-1.0), r"sigma.*> 0"),
        (lambda: spectral_density(_identity, 5, grid=torch.zeros(3, 3)), r"grid"),
        (lambda: spectral_density(_identity, 5, grid=torch.zeros(4)), r"grid.*ascending"),
        (
            lambda: spectral_density(_identity, 5, num_probes=3, probes=torch.ones(5, 2)),
            r"num_probes",
        ),
        (lambda: quadrature_moments(torch.ones(2, 3), torch.ones(3)), r"nodes and weights"),
        (lambda: quadrature_moments(torch.ones(3), torch.ones(3), (-1,)), r"powers"),
    ],
)
def test_bad_arguments_raise_argument_error(call, match):
    """The message names the function called (the first name the call reads) first."""
    with pytest.raises(ArgumentError, match=match) as raised:
        call()
    assert str(raised.value).startswith(f"{call.__code__.co_names[0]}(): "), raised.value


_ESTIMATORS = [
    lambda m: hutchinson_trace(m, 5, num_samples=3),
    lambda m: hutchinson_diagonal(m, 5, num_samples=3),
    lambda m: hutchpp_trace(m, 5, num_matvecs=6),
    lambda m: lanczos(m, 5, num_steps=2),
    lambda m: lanczos_eigenvalues(m, 5, k=1),
    lambda m: spectral_density(m, 5, num_steps=2),
]


@pytest.mark.parametrize("estimator", _ESTIMATORS)
@pytest.mark.parametrize(
    "matmat",
    [
        "not callable",
        lambda v: v[:, 0],
        lambda v: v[:-1],
        lambda v: v.tolist(),
        lambda v: v.to(torch.float16),
    ],
    ids=["not-callable", "drops-columns", "wrong-rows", "not-a-tensor", "wrong-dtype"],
)
def test_bad_matmat_raises_argument_error_naming_it(estimator, matmat):
    with pytest.raises(ArgumentError, match=r"matmat"):
        estimator(matmat)


def test_argument_error_is_a_value_error():
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(_identity, 5, num_samples=-1)


def test_example_vectors_must_be_tensors():
    with pytest.raises(ArgumentError, match=r"expected start to be a \(4,\) tensor or None"):
        lanczos(lambda V: V, 4, num_steps=2, start=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ArgumentError, match="expected probes to be a .* tensor or None"):
        spectral_density(lambda V: V, 4, probes=[[1.0]])


def test_spectral_density_num_zeros_adds_an_exact_null_space():
    """The density of A (+) 0_z: identity probes make every average exact."""
    d = torch.tensor([3.0, -1.0, 2.0, 0.5, 4.0], dtype=F64)
    a = _symmetric(d, seed=11)
    sd = spectral_density(lambda v: a @ v, 5, num_steps=5, probes=torch.eye(5, dtype=F64),
                          num_zeros=7)
    full = torch.cat([d, torch.zeros(7, dtype=F64)])
    for p in range(4):
        assert_close(sd.moments([p])[0], (full**p).mean(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ArgumentError, match="num_zeros"):
        spectral_density(lambda v: a @ v, 5, num_zeros=-1)


_CALLERS = {
    "hutchinson_trace": lambda **kw: hutchinson_trace(**{"num_samples": 3, **kw}),
    "hutchinson_diagonal": lambda **kw: hutchinson_diagonal(**{"num_samples": 3, **kw}),
    "hutchpp_trace": lambda **kw: hutchpp_trace(**{"num_matvecs": 6, **kw}),
    "spectral_density": lambda **kw: spectral_density(**{"num_steps": 3, **kw}),
}


@pytest.mark.parametrize("caller", list(_CALLERS))
def test_estimator_errors_name_the_caller_and_the_argument(caller):
    """Each stochastic estimator names itself, the argument and what it got."""
    call = _CALLERS[caller]
    ok = {"matmat": _identity, "size": 5}
    cases = [
        ({"size": 0}, r"size .*got 0"),
        ({"distribution": "normal"}, r"distribution .*got 'normal'"),
        ({"batch_size": 0}, r"batch_size .*got 0"),
        ({"matmat": "a"}, r"matmat .*got str"),
        ({"generator": 0}, r"generator .*got int"),
    ]
    cases.append({"hutchpp_trace": ({"num_matvecs": 2}, r"num_matvecs .*got 2"),
                  "spectral_density": ({"num_probes": 0}, r"num_probes .*got 0")}.get(
                      caller, ({"num_samples": 0}, r"num_samples .*got 0")))
    for bad, match in cases:
        with pytest.raises(ArgumentError, match=rf"^{caller}\(\): expected {match}"):
            call(**{**ok, **bad})
    for bad, got in ((lambda v: v.tolist(), "list"), (lambda v: v[:-1], r"\(4, \d+\)")):
        with pytest.raises(ArgumentError, match=rf"^{caller}\(\): matmat must map .*got {got}"):
            call(**{**ok, "matmat": bad})


def test_positive_floats_refuse_infinity_and_bools():
    for bad in (float("inf"), True):
        with pytest.raises(ArgumentError, match=rf"tol to be a finite number > 0, got {bad!r}"):
            lanczos_eigenvalues(_identity, 5, tol=bad)


def test_gaussian_hutchinson_diagonal_of_a_diagonal_matrix_is_exact():
    """Bekas et al.'s normalisation: sum_k z_k * (A z_k) / sum_k z_k * z_k is exactly
    diag(A) for a diagonal A with any probes, Gaussian ones too (the plain average of
    z * A z would not be), and it stays in float64 throughout."""
    d = torch.linspace(-2.0, 5.0, 9, dtype=F64) * (1 + 1e-9)
    est = hutchinson_diagonal(lambda v: d[:, None] * v, 9, num_samples=3,
                              distribution="gaussian", generator=_gen(2), dtype=F64)
    assert est.dtype == F64
    assert_close(est, d, rtol=1e-15, atol=0)


def test_hutchinson_std_error_of_two_samples_is_finite():
    a = _symmetric(_uniform(6, -1.0, 3.0, seed=3), seed=3)
    est = hutchinson_trace(lambda v: a @ v, 6, num_samples=2, generator=_gen(0), dtype=F64)
    assert torch.isfinite(est.std_error) and est.std_error > 0


def test_hutchpp_draws_its_sketch_from_the_distribution_asked_for():
    seen = []

    def matmat(v):
        seen.append(v.clone())
        return v

    hutchpp_trace(matmat, 8, num_matvecs=6, distribution="rademacher", generator=_gen(0),
                  dtype=F64)
    assert torch.equal(seen[0].abs(), torch.ones_like(seen[0]))  # the sketch is +-1
    seen.clear()
    hutchpp_trace(matmat, 8, num_matvecs=6, distribution="gaussian", generator=_gen(0),
                  dtype=F64)
    assert not torch.equal(seen[0].abs(), torch.ones_like(seen[0]))


def test_lanczos_errors_name_the_caller_the_argument_and_what_it_got():
    cases = [
        (lambda: lanczos_eigenvalues(_identity, 5, k=0),
         r"^lanczos_eigenvalues\(\): expected k to be an int in \[1, 4\], got 0"),
        (lambda: lanczos_eigenvalues(_identity, 5, which="x"),
         r"^lanczos_eigenvalues\(\): expected which to be one of .*got 'x'"),
        (lambda: lanczos_eigenvalues(_identity, 5, tol=0.0),
         r"^lanczos_eigenvalues\(\): expected tol to be a finite number > 0, got 0\.0"),
        (lambda: lanczos_eigenvalues(_identity, 5, k=3, max_steps=2),
         r"^lanczos_eigenvalues\(\): expected max_steps to be an int >= 3, got 2"),
        (lambda: lanczos(_identity, 5, num_steps=0),
         r"^lanczos\(\): expected num_steps to be an int in \[1, 5\], got 0"),
        (lambda: lanczos(_identity, 5, num_steps=2, start=torch.ones(4)),
         r"^lanczos\(\): expected start of shape \(5,\), got \(4,\)"),
        (lambda: lanczos("a", 5, num_steps=2), r"^lanczos\(\): expected matmat .*got str"),
    ]
    for call, match in cases:
        with pytest.raises(ArgumentError, match=match):
            call()


def test_lanczos_defaults_one_eigenvalue_no_vectors_no_basis():
    d = torch.arange(1.0, 7.0, dtype=F64)
    result = lanczos_eigenvalues(lambda v: d[:, None] * v, 6, generator=_gen(0), dtype=F64)
    assert result.eigenvalues.shape == (1,) and result.eigenvectors is None
    assert_close(result.eigenvalues, torch.tensor([6.0], dtype=F64), rtol=1e-8, atol=0)
    assert lanczos(lambda v: d[:, None] * v, 6, num_steps=3, generator=_gen(0),
                   dtype=F64).basis is None


def test_spectral_density_errors_name_the_caller_the_argument_and_what_it_got():
    ok = {"matmat": _identity, "size": 5}
    cases = [
        ({"num_steps": 0}, r"num_steps .*got 0"),
        ({"num_zeros": -1}, r"num_zeros .*got -1"),
        ({"num_points": 1}, r"num_points to be an int >= 2, got 1"),
        ({"sigma": -1.0}, r"sigma .*got -1\.0"),
        ({"relative_sigma": 0.0}, r"relative_sigma .*got 0\.0"),
        ({"grid": torch.zeros(3, 3)}, r"grid .*got \(3, 3\)"),
        ({"grid": torch.zeros(1)}, r"grid .*at least 2 points, got \(1,\)"),
        ({"grid": [0.0, 1.0]}, r"grid .*got list"),
        ({"grid": torch.tensor([0.0, 2.0, 1.0])}, r"grid to be strictly ascending"),
        ({"probes": torch.ones(4, 2)}, r"probes of shape \(5, 2\), got \(4, 2\)"),
        ({"probes": [[1.0]]}, r"probes to be a \(size, num_probes\) tensor or None, got list"),
    ]
    for bad, match in cases:
        with pytest.raises(ArgumentError, match=rf"^spectral_density\(\): expected {match}"):
            spectral_density(**{**ok, **bad})
    with pytest.raises(ArgumentError, match=r"^quadrature_moments\(\): expected powers .*-1"):
        quadrature_moments(torch.ones(3), torch.ones(3), (-1,))
    probes = torch.ones(5, 2)  # num_probes is checked against the columns, not the size
    with pytest.raises(ArgumentError, match=r"num_probes=5 disagrees with the 2 columns"):
        spectral_density(_identity, 5, num_probes=5, probes=probes)
    assert spectral_density(_identity, 5, num_probes=2, probes=probes,
                            num_steps=2).nodes.shape == (2, 2)


def test_spectral_density_defaults_and_dtypes():
    """Ten probes, 64 steps (capped at the size), a grid of 1,024 points: num_points
    2 is enough, and a float32 grid is evaluated in the operator's float64."""
    d = torch.linspace(-1.0, 2.0, 100, dtype=F64)
    sd = spectral_density(lambda v: d[:, None] * v, 100, generator=_gen(0), dtype=F64)
    assert sd.nodes.shape == sd.weights.shape == (10, 64)
    assert sd.grid.shape == sd.density.shape == (1024,)
    assert spectral_density(lambda v: d[:, None] * v, 100, num_steps=3, num_points=2,
                            generator=_gen(0), dtype=F64).grid.shape == (2,)
    on_grid = spectral_density(lambda v: d[:, None] * v, 100, num_steps=3, generator=_gen(0),
                               dtype=F64, grid=torch.tensor([0.0, 1.0]))
    assert on_grid.grid.dtype == on_grid.density.dtype == F64


@pytest.mark.parametrize(("values", "sigma"), [([3.0] * 4, 0.03), ([0.0] * 4, 0.01),
                                               ([1.0, 2.0, 1.0, 2.0], 0.01)])
def test_spectral_density_default_width_is_a_hundredth_of_the_spread(values, sigma):
    """Nodes spread over [1, 2]: sigma 0.01; all at 3 (no spread): 0.01 of their size;
    all at 0: 0.01."""
    d = torch.tensor(values, dtype=F64)
    sd = spectral_density(lambda v: d[:, None] * v, 4, probes=torch.eye(4, dtype=F64),
                          num_steps=1)  # one node per probe: e_i^T A e_i, exactly
    assert sd.sigma == pytest.approx(sigma, rel=1e-12)


def test_spectral_density_num_zeros_with_fewer_probes_than_steps():
    d = torch.tensor([3.0, -1.0, 2.0, 0.5, 4.0], dtype=F64)
    sd = spectral_density(lambda v: d[:, None] * v, 5, num_steps=4, num_zeros=2,
                          probes=torch.ones(5, 2, dtype=F64))
    assert sd.nodes.shape == sd.weights.shape == (2, 5)
    assert_close(sd.weights.sum(1), torch.ones(2, dtype=F64), rtol=1e-12, atol=0)
    assert_close(sd.weights[:, -1], torch.full((2,), 2 / 7, dtype=F64), rtol=1e-12, atol=0)


def test_quadrature_moments_keep_leading_axes():
    nodes = torch.rand(2, 3, 4, generator=_gen(0), dtype=F64)
    weights = torch.rand(2, 3, 4, generator=_gen(1), dtype=F64)
    moments = quadrature_moments(nodes, weights, (0, 1, 2, 3))
    assert moments.shape == (2, 3, 4)
    assert_close(moments[1, 0, 3], (weights[1, 0] * nodes[1, 0] ** 3).sum(), rtol=1e-14,
                 atol=0)


def test_spectral_density_has_no_lanczos_ghosts():
    """80 steps on eigenvalues 100 and 50 above 198 in [0, 1]: plain Lanczos loses
    orthogonality and repeats the outliers (11 and 9 nodes there); the semi-orthogonal
    run keeps one node at each."""
    d = torch.cat([torch.tensor([100.0, 50.0], dtype=F64), torch.linspace(0, 1, 198,
                                                                         dtype=F64)])
    sd = spectral_density(lambda v: d[:, None] * v, 200, num_steps=80,
                          probes=torch.ones(200, 1, dtype=F64))
    assert int((sd.nodes > 99).sum()) == 1
    assert int(((sd.nodes > 49) & (sd.nodes < 51)).sum()) == 1


def test_spectral_density_restarts_from_its_generator():
    """A probe in a 3-dimensional Krylov space: Lanczos breaks down and restarts from a
    random vector of ``generator``, so the same generator state gives the same nodes
    whatever torch's global seed."""
    d = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0], dtype=F64)
    probe = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=F64).T
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(spectral_density(lambda v: d[:, None] * v, 6, num_steps=5, probes=probe,
                                     generator=_gen(7)).nodes)
    assert torch.equal(runs[0], runs[1])


def test_lanczos_starts_from_the_generators_gaussian_draw():
    """Without a start vector, the first Lanczos vector is the generator's Gaussian draw,
    normalised, in ``lanczos`` and ``lanczos_eigenvalues`` alike; torch's global random
    state is left as it was, and the same seed repeats the run bit for bit."""
    n = 30
    A = torch.diag(torch.linspace(-1.0, 2.0, n, dtype=torch.float64))
    draw = torch.randn((1, n), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = draw[0] / draw[0].norm()
    state = torch.get_rng_state()
    run = lanczos(lambda V: A @ V, n, num_steps=4, generator=torch.Generator().manual_seed(3),
                  return_basis=True, dtype=torch.float64)
    again = lanczos(lambda V: A @ V, n, num_steps=4, generator=torch.Generator().manual_seed(3),
                    return_basis=True, dtype=torch.float64)
    assert_close(run.basis[:, 0], expected, rtol=1e-14, atol=1e-15)
    assert torch.equal(run.alphas, again.alphas) and torch.equal(run.basis, again.basis)
    seen = []

    def matmat(V):
        seen.append(V.clone())
        return A @ V

    lanczos_eigenvalues(matmat, n, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    assert_close(seen[0][:, 0], expected, rtol=1e-14, atol=1e-15)
    # three distinct eigenvalues: the Krylov space is invariant after three steps, and
    # the run restarts from vectors the generator draws too (NOTE [invariant subspaces])
    B = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).repeat(4))
    runs = [lanczos(lambda V: B @ V, 12, num_steps=7, return_basis=True, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert (runs[0].betas == 0).any()
    assert torch.equal(runs[0].basis, runs[1].basis)
    found = [lanczos_eigenvalues(lambda V: B @ V, 12, k=3, return_vectors=True,
                                 dtype=torch.float64, generator=torch.Generator().manual_seed(5))
             for _ in range(2)]
    assert_close(found[0].eigenvalues, torch.full((3,), 3.0, dtype=torch.float64))  # 4 times
    assert torch.equal(found[0].eigenvectors, found[1].eigenvectors)
    assert torch.equal(torch.get_rng_state(), state)


def test_lanczos_check_schedule():
    """NOTE [check schedule]: without a rate (no earlier check, no decrease, a ratio of
    zero) the next check is ``max(1, m // 4)`` steps ahead; with one, where the line
    through the last two checks' ``log ratio`` reaches 0, at least one step ahead and
    at most that cap."""
    steps = importlib.import_module("hessfunc.estimators.lanczos")._steps_to_next_check
    assert [steps(m, 5.0, None) for m in (1, 3, 4, 40, 43)] == [1, 1, 1, 10, 10]
    assert steps(40, 50.0, (30, 50.0)) == 10     # no decrease
    assert steps(40, 60.0, (30, 50.0)) == 10     # an increase
    assert steps(40, 0.0, (30, 50.0)) == 10      # converged to the last digit: no rate
    assert steps(40, 5.0, (30, math.inf)) == 10  # no earlier bound
    # log ratio falls by log(10) in 10 steps: log(5) / (log(10) / 10) = 6.99 steps left
    assert steps(40, 5.0, (30, 50.0)) == 7
    assert steps(40, 5.0, (38, 50.0)) == 2       # 1.4 steps left at a faster rate
    assert steps(40, 5.0, (0, 5.5)) == 10        # 675 steps left: the cap
    assert steps(40, 0.5, (30, 50.0)) == 1       # already below 1: the next step
    assert steps(3, 1e3, (2, 1e6)) == 1          # the cap of a short run


def test_lanczos_basis_allocation():
    """NOTE [basis allocation]: the basis starts at the most rows within 16 MiB, at
    least the first check's, at most the step limit and at least one; an integer."""
    capacity = importlib.import_module("hessfunc.estimators.lanczos")._initial_capacity
    cases = [((10**6, 1, 1000, torch.float64), 2097),   # 16 MiB // (1000 * 8 bytes)
             ((10**6, 1, 1000, torch.float32), 4194),
             ((10**6, 3000, 1000, torch.float64), 3000),  # the first check's rows
             ((500, 1, 1000, torch.float64), 500),        # the step limit
             ((10**6, 1, 2**24, torch.float64), 1),       # one row is over 16 MiB
             ((1, 1, 10, torch.float64), 1)]
    for args, rows in cases:
        got = capacity(*args)
        assert type(got) is int and got == rows, (args, got)


@pytest.mark.parametrize(("k", "first_check"), [(1, 7), (3, 9), (8, 16)])
def test_lanczos_eigenvalues_checks_first_after_max_2k_k_plus_6_steps(k, first_check):
    """NOTE [check schedule]: the first convergence check comes after ``max(2k, k + 6)``
    steps. The ``k`` wanted eigenvalues ``1e4 * 2^-i`` stand far above the other 192, in
    ``[0, 1]``, so they meet ``tol`` by then (for every seed tried) and the run stops at
    that first check."""
    values = torch.cat([1e4 * 2.0 ** -torch.arange(k), torch.linspace(0, 1, 200 - k)]).double()
    A = torch.diag(values)
    for seed in range(3):
        found = lanczos_eigenvalues(lambda V: A @ V, 200, k=k, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(seed))
        assert found.converged and found.num_matvecs == first_check
        assert_close(found.eigenvalues, values[:k], rtol=1e-8, atol=0)


def test_semi_orthogonal_lanczos_follows_simons_estimate():
    """NOTE [semi-orthogonality]: on a spectrum where the plain recurrence loses
    orthogonality within 120 steps, Simon's estimate stays at or above the measured
    ``|q_(j+1)^T q_k|`` (within the factor 5 the NOTE states), the basis stays within
    ``sqrt(eps)`` of orthonormal, and only a few steps reorthogonalise. The spectrum is
    shifted off zero so that the recurrence's ``alpha_k - alpha_j`` matters."""
    lz = importlib.import_module("hessfunc.estimators.lanczos")
    n, steps, eps = 400, 120, torch.finfo(torch.float64).eps
    A = torch.diag(5 * torch.linspace(-1, 1, n, dtype=torch.float64) ** 3 + 6)
    op = Operator.from_args("test", lambda V: A @ V, n, dtype=torch.float64, device=None,
                            generator=None)
    start = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = start / start.norm()

    def basis(reorthogonalize, spy=None):
        run = lz._LanczosRun(op, start, reorthogonalize=reorthogonalize, keep_basis=True,
                             generator=None, capacity=steps)
        if spy is not None:
            real = run._estimate.advance

            def advance(*args):
                lost = real(*args)
                done = run._estimate._steps   # rows 1..done of w: k = 0..done - 2 read
                spy.append((lost, float(np.abs(run._estimate._current[0, 1:done]).max())
                            if done > 1 else 0.0))
                return lost

            run._estimate.advance = advance
        for _ in range(steps):
            run.step()
        Q = run.basis()[0]
        return Q @ Q.T - torch.eye(steps, dtype=torch.float64)

    assert basis(False).abs().max() > 1e-3           # the plain recurrence loses it
    estimates = []
    W = basis("semi", estimates)
    assert W.abs().max() <= eps ** 0.5
    assert 1 <= sum(lost for lost, _ in estimates) <= 7  # 6 here: an estimate too high
    # would ask for more (twice as many after a slip in the recurrence's coefficients)
    for j in range(2, steps):
        measured = W[j, : j - 1].abs().max().item()
        assert estimates[j - 1][1] >= measured / 5, (j, estimates[j - 1][1], measured)
