"""The benchmark tasks, their float64 references and how a result is checked.

Every implementation's answer is compared with hessfunc's exact float64 answer,
computed once per problem on a float64 copy of the same model and data
(:class:`Reference`, lazily: only what the selected tasks need).

Error measures (all relative, so one tolerance table serves every problem):

* tensors (gradient, H v, diagonals, blocks, Hessians): ``max|a - b| / max|b|``;
* eigenvalues: ``max_i |a_i - b_i| / |b_i|``;
* scalars (trace): ``|a - b| / |b|``;
* stochastic diagonal: ``||a - b|| / ||b||``;
* spectral density: the relative error of its first moment (the mean eigenvalue
  ``tr(H) / P``) and, where the method returns its quadrature nodes and weights
  and the dense Hessian is available, of its second moment ``tr(H^2) / P``.

Exact quantities pass below :data:`TOLERANCE` for the dtype. A stochastic estimate
passes when its error is below ``Z`` standard deviations of that estimator with
the probes it used (``Z = 5``; the standard deviations follow from ``H`` in closed
form, see :meth:`Reference.trace_sigma`), so a wrong estimator fails while an
unlucky draw does not.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import vmap

import hessfunc as hf

from .problems import Problem

#: Dense float64 references (full Hessian, eigvalsh) are formed up to this many parameters;
#: above it the Hessian is checked on :data:`CHECK_COLUMNS` random columns and eigenvalues
#: against hessfunc's Lanczos at tol 1e-10.
DENSE_LIMIT = 3000
CHECK_COLUMNS = 48
#: Per-sample diagonals are checked on the first this-many samples.
CHECK_SAMPLES = 16
#: Allowed error of exact results, by dtype (eigenvalues: iterative, see EIGEN_TOLERANCE).
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8}
EIGEN_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
#: Stochastic estimates: allowed error in standard deviations of the estimator.
Z = 5.0


@dataclass(frozen=True)
class Task:
    key: str
    title: str
    what: str
    inputs: bool = False   # an input-derivative task (runs on INPUT_PROBLEMS)


TASKS: dict[str, Task] = {t.key: t for t in [
    Task("gradient", "gradient (the unit)",
         "d loss / d params (input problems: d sum_n u(x_n) / d X)"),
    Task("hvp", "one Hessian-vector product", "H v for one fixed v, from scratch"),
    Task("diag", "exact Hessian diagonal", "diag(H), exact"),
    Task("diag_hutchinson", "stochastic Hessian diagonal", "Hutchinson's estimate of diag(H)"),
    Task("per_sample_diag", "per-sample Hessian diagonals",
         "diag of each sample's own loss Hessian, (N, P)"),
    Task("blocks", "per-parameter Hessian blocks", "H restricted to each parameter tensor"),
    Task("hessian", "full Hessian", "the dense (P, P) Hessian"),
    Task("eig1", "top-1 eigenvalue", "largest eigenvalue of H"),
    Task("eig5", "top-5 eigenvalues", "5 largest eigenvalues of H"),
    Task("trace", "trace", "tr(H), exact or stochastic"),
    Task("density", "spectral density", "eigenvalue density of H (stochastic Lanczos quadrature)"),
    Task("input_diag", "per-sample input-Hessian diagonal",
         "diag(d^2 u / dx^2) at every point", inputs=True),
    Task("laplacian", "per-sample Laplacian", "sum_i d^2 u / dx_i^2 at every point",
         inputs=True),
]}


@dataclass
class Estimate:
    """A stochastic result with the number of probes (matvecs) it used."""

    value: Any
    probes: int


@dataclass
class Eigenvalues:
    """Eigenvalues found by a method that targets ``which`` ("largest" algebraic or
    "magnitude": power iteration converges to the largest ``|lambda|``)."""

    values: Any
    which: str = "largest"


@dataclass
class Density:
    """A spectral density: quadrature ``nodes``/``weights`` (R, m) or a ``grid``/``density``."""

    nodes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    density: torch.Tensor | None = None
    probes: int = 1


@dataclass
class Check:
    error: float
    tolerance: float
    measure: str = ""
    stochastic: bool = False


def flat(tree: Any) -> torch.Tensor:
    """A dict / list / tuple of tensors (or a tensor) as one flat float64 CPU vector."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().reshape(-1).double().cpu()
    leaves = tree.values() if isinstance(tree, dict) else tree
    return torch.cat([flat(t) for t in leaves])


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"result has shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


class Reference:
    """hessfunc's float64 answers on a float64 copy of ``problem`` (same values, same point)."""

    def __init__(self, problem: Problem, *, inputs: bool = False):
        self.problem = problem
        model = copy.deepcopy(problem.model).double()
        self.x = problem.x.double() if problem.x.is_floating_point() else problem.x
        self.y = problem.y.double() if problem.y.is_floating_point() else problem.y
        if inputs:
            g, self.params = hf.functionalize(model)

            def u(p: Any, x: torch.Tensor) -> torch.Tensor:
                return g(p, x[None]).reshape(())

            self.u = u
        else:
            self.f, self.params = hf.functionalize(model, problem.loss_fn)
        self.P = sum(t.numel() for t in self.params.values())
        self._cache: dict[Any, Any] = {}
        self.notes: list[str] = []

    def _memo(self, key: Any, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def op(self) -> hf.HessianOperator:
        return self._memo("op", lambda: hf.HessianOperator(self.f, self.params, (self.x, self.y)))

    # ---------------------------------------------------------------- exact
    def gradient(self) -> torch.Tensor:
        return self._memo("grad", lambda: flat(hf.grad(self.f)(self.params, self.x, self.y)))

    def input_gradient(self) -> torch.Tensor:
        return self._memo("igrad", lambda: flat(
            vmap(torch.func.grad(self.u, argnums=1), in_dims=(None, 0))(self.params, self.x)))

    def hvp(self, v: Any) -> torch.Tensor:
        v64 = {k: t.detach().double() for k, t in v.items()}
        return self._memo("hvp", lambda: flat(hf.hvp(self.f, (self.params, self.x, self.y), v64)))

    def diag(self) -> torch.Tensor:
        return self._memo("diag", lambda: flat(hf.hessian_diag(self.f)(self.params, self.x,
                                                                         self.y)))

    def per_sample_diag(self) -> torch.Tensor:
        """``(CHECK_SAMPLES, P)``: each of the first samples' own loss Hessian diagonal."""
        def make() -> torch.Tensor:
            d = hf.hessian_diag(self.f)
            n = min(CHECK_SAMPLES, self.x.shape[0])
            return torch.stack([flat(d(self.params, self.x[i:i + 1], self.y[i:i + 1]))
                                for i in range(n)])
        return self._memo("psd", make)

    def blocks(self) -> torch.Tensor:
        return self._memo("blocks", lambda: flat(hf.hessian_blocks(self.f)(self.params, self.x,
                                                                           self.y)))

    def dense(self) -> torch.Tensor | None:
        if self.P > DENSE_LIMIT:
            return None
        return self._memo("dense", lambda: hf.hessian(self.f, flat=True)(
            self.params, self.x, self.y).detach().cpu())

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J, H[:, J])`` for :data:`CHECK_COLUMNS` random columns ``J`` (fixed seed)."""
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(0)
            J = torch.randperm(self.P, generator=g)[:CHECK_COLUMNS].sort().values
            E = torch.zeros(self.P, len(J), dtype=torch.float64, device=self.x.device)
            E[J.to(E.device), torch.arange(len(J), device=E.device)] = 1
            return J, self.op.matmat(E).cpu()
        return self._memo("cols", make)

    def eigenvalues(self, k: int, which: str = "largest") -> torch.Tensor:
        """The ``k <= 5`` largest (algebraic, or in magnitude) eigenvalues, in that order."""
        def make() -> torch.Tensor:
            H = self.dense()
            if H is not None:
                ev = torch.linalg.eigvalsh(H)
                if which == "magnitude":
                    return ev[ev.abs().argsort(descending=True)][:5]
                return ev.flip(0)[:5]
            self.notes.append("eigenvalues checked against hessfunc Lanczos (tol 1e-10, "
                              "float64): P too large for eigvalsh")
            return self.op.eigenvalues(5, which=which, tol=1e-10, seed=0).cpu()
        return self._memo(("eig", which), make)[:k]

    def trace(self) -> float:
        return float(self.diag().sum())

    def fro2(self) -> float:
        """``||H||_F^2`` (exact from the dense H, else a 64-probe estimate of ``tr(H^2)``)."""
        def make() -> float:
            H = self.dense()
            if H is not None:
                return float((H ** 2).sum())
            g = torch.Generator(device=self.x.device).manual_seed(1)
            V = torch.randint(0, 2, (self.P, 64), generator=g, device=self.x.device)
            HV = self.op.matmat(V.double() * 2 - 1)
            self.notes.append("stochastic tolerances use ||H||_F^2 estimated from 64 probes")
            return float((HV ** 2).sum(0).mean())
        return self._memo("fro2", make)

    # ------------------------------------------------------ stochastic spreads
    def trace_sigma(self, probes: int) -> float:
        """Standard deviation of Hutchinson's trace estimate with ``probes`` probes.

        Rademacher: ``Var(v^T H v) = 2 (||H||_F^2 - sum_i H_ii^2)``; Gaussian or
        normalised probes: ``2 ||H||_F^2``; the larger is used.
        """
        return math.sqrt(2 * self.fro2() / max(probes, 1))

    def diag_expected_error(self, probes: int) -> float:
        """Expected ``||d_est - d|| / ||d||`` of Hutchinson's diagonal with Rademacher probes:
        ``E||d_est - d||^2 = (||H||_F^2 - ||d||^2) / probes``."""
        d2 = float((self.diag() ** 2).sum())
        return math.sqrt(max(self.fro2() - d2, 0.0) / max(probes, 1) / d2)

    def second_moment(self) -> tuple[float, float] | None:
        """``(tr(H^2) / P, std of one normalised probe's estimate of it)`` when H is dense."""
        H = self.dense()
        if H is None:
            return None
        def make() -> tuple[float, float]:
            H2 = H @ H
            return float(torch.trace(H2)) / self.P, math.sqrt(2 * float((H2 ** 2).sum())) / self.P
        return self._memo("m2", make)

    # --------------------------------------------------------------- inputs
    def input_diag(self) -> torch.Tensor:
        return self._memo("idiag", lambda: vmap(
            hf.hessian_diag(self.u, argnums=1), in_dims=(None, 0))(self.params, self.x)
            .detach().cpu())

    def laplacian(self) -> torch.Tensor:
        return self.input_diag().sum(-1)


@dataclass
class Context:
    """What the implementations of one problem share (built once per problem)."""

    key: str
    problem: Problem
    dtype: torch.dtype
    device: torch.device
    quick: bool
    inputs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def P(self) -> int:
        return self.problem.num_params

    @property
    def N(self) -> int:
        return int(self.problem.x.shape[0])


def check(task: str, out: Any, ref: Reference, ctx: Context) -> Check:
    """Compare an implementation's (converted) output with the float64 reference."""
    tol = TOLERANCE[ctx.dtype]
    if task == "gradient":
        want = ref.input_gradient() if ctx.inputs else ref.gradient()
        return Check(rel_max(flat(out), want), tol, "max-rel")
    if task == "hvp":
        return Check(rel_max(flat(out), ref.hvp(ctx.extra["v"])), tol, "max-rel")
    if task == "diag":
        return Check(rel_max(flat(out), ref.diag()), tol, "max-rel")
    if task == "blocks":
        return Check(rel_max(flat(out), ref.blocks()), tol, "max-rel")
    if task == "per_sample_diag":
        want = ref.per_sample_diag()
        got = out.detach().double().cpu().reshape(ctx.N, -1)[: want.shape[0]]
        return Check(rel_max(got, want), tol, f"max-rel, first {want.shape[0]} samples")
    if task == "hessian":
        got = out.detach().double().cpu()
        H = ref.dense()
        if H is not None:
            return Check(rel_max(got, H), tol, "max-rel")
        J, cols = ref.columns()
        return Check(rel_max(got[:, J], cols), tol, f"max-rel, {len(J)} random columns")
    if task in ("eig1", "eig5"):
        k = 1 if task == "eig1" else 5
        which = out.which if isinstance(out, Eigenvalues) else "largest"
        got = out.values if isinstance(out, Eigenvalues) else out
        got = torch.as_tensor(got).detach().double().cpu().reshape(-1)
        key = got.abs() if which == "magnitude" else got
        got = got[key.argsort(descending=True)][:k]
        want = ref.eigenvalues(k, which)
        if got.numel() < k:
            return Check(math.inf, EIGEN_TOLERANCE[ctx.dtype], "rel per eigenvalue")
        err = ((got - want).abs() / want.abs()).max().item()
        measure = "rel per eigenvalue" + (", vs the largest abs(lambda)" if which == "magnitude"
                                          else "")
        return Check(err, EIGEN_TOLERANCE[ctx.dtype], measure)
    if task == "trace":
        exact = ref.trace()
        if isinstance(out, Estimate):
            got = float(torch.as_tensor(out.value).double().mean())
            tol_s = Z * ref.trace_sigma(out.probes) / abs(exact)
            return Check(abs(got - exact) / abs(exact), tol_s,
                         f"rel; tol = {Z:g} sd of {out.probes} probes", True)
        return Check(abs(float(out) - exact) / abs(exact), tol, "rel")
    if task == "diag_hutchinson":
        d = ref.diag()
        got = flat(out.value)
        err = (torch.linalg.vector_norm(got - d) / torch.linalg.vector_norm(d)).item()
        expected = ref.diag_expected_error(out.probes)
        return Check(err, 2 * expected + tol,
                     f"norm-rel; tol = 2x expected ({expected:.2g}) for {out.probes} probes", True)
    if task == "density":
        return _check_density(out, ref, ctx)
    if task == "input_diag":
        return Check(rel_max(out.detach().reshape(ctx.N, -1), ref.input_diag()), tol,
                     "max-rel")
    if task == "laplacian":
        return Check(rel_max(out.detach().reshape(-1), ref.laplacian()), tol, "max-rel")
    raise KeyError(task)


def _check_density(out: Density, ref: Reference, ctx: Context) -> Check:
    P = ref.P
    m1 = ref.trace() / P
    sd1 = ref.trace_sigma(out.probes) / P
    errs, tols = [], []
    if out.nodes is not None:
        nodes = out.nodes.detach().double().cpu()
        weights = out.weights.detach().double().cpu()
        keep = torch.isfinite(nodes)
        nodes, weights = torch.where(keep, nodes, 0), torch.where(keep, weights, 0)
        weights = weights / weights.sum(-1, keepdim=True)
        est1 = float((weights * nodes).sum(-1).mean())
        errs.append(abs(est1 - m1) / abs(m1))
        tols.append(Z * sd1 / abs(m1))
        second = ref.second_moment()
        if second is not None:
            m2, sd2 = second
            est2 = float((weights * nodes ** 2).sum(-1).mean())
            errs.append(abs(est2 - m2) / m2)
            tols.append(Z * sd2 / math.sqrt(out.probes) / m2)
        measure = "rel error of moments 1-2" if len(errs) == 2 else "rel error of mean eigenvalue"
    else:
        grid = out.grid.detach().double().cpu()
        dens = out.density.detach().double().cpu()
        est1 = float(torch.trapezoid(grid * dens, grid) / torch.trapezoid(dens, grid))
        errs.append(abs(est1 - m1) / abs(m1))
        # a smoothed density on a finite grid: allow 1% of the spectrum's width as well
        spread = float(grid.max() - grid.min())
        tols.append((Z * sd1 + 0.01 * spread) / abs(m1))
        measure = "rel error of mean eigenvalue (from grid)"
    worst = max(range(len(errs)), key=lambda i: errs[i] / tols[i])
    return Check(errs[worst], tols[worst] + TOLERANCE[ctx.dtype], measure, True)
