"""The benchmark tasks, their float64 references and how a result is checked.

Every implementation's answer is compared with a float64 "truth" computed once per
problem on a float64 copy of the same model and data (:class:`Reference`, lazily:
only what the selected tasks need), and never by hessfunc's own routes: the truths
come from the loop oracle ``hessfunc.reference`` (double backward, one backward per
Hessian row or entry) on a plain autograd graph, from
``torch.autograd.functional.hessian`` + ``torch.linalg.eigvalsh``, or, on problems too
large for those, from a cheaper float64 computation that is checked against the oracle
on a subsample (:meth:`Reference.source` names each; the tables print it).

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

from hessfunc import reference

from .problems import Problem

#: Dense float64 references (full Hessian, eigvalsh) are formed up to this many parameters;
#: above it the Hessian is checked on :data:`CHECK_COLUMNS` random columns (oracle H e_j)
#: and eigenvalues against scipy's eigsh on double-backward products.
DENSE_LIMIT = 3000
CHECK_COLUMNS = 48
#: The oracle's loops (one backward per entry) give whole diagonals up to this many
#: parameters; above it the diagonal comes from :func:`linear_chain_diag`, checked against
#: the oracle at :data:`CHECK_ENTRIES` random entries. Per-sample diagonals (one oracle
#: diagonal per checked sample) are checked at those entries above :data:`DENSE_LIMIT`.
ORACLE_LIMIT = 10_000
CHECK_ENTRIES = 200
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
    """Independent float64 answers on a float64 copy of ``problem`` (same values, same point).

    Nothing here calls hessfunc's own routes (its structured or graph products, its
    diagonals, its Lanczos): every answer comes from the loop oracle
    ``hessfunc.reference`` on a plain autograd graph of the float64 model, from
    ``torch.autograd.functional.hessian`` with ``torch.linalg.eigvalsh``, or, where
    those are out of reach, from a cheaper float64 computation that is itself checked
    against the oracle on a subsample (see :meth:`source`, printed under each table).
    """

    def __init__(self, problem: Problem, *, inputs: bool = False):
        self.problem = problem
        self.inputs = inputs
        self.model = copy.deepcopy(problem.model).double()
        self.x = problem.x.double() if problem.x.is_floating_point() else problem.x
        self.y = problem.y.double() if problem.y.is_floating_point() else problem.y
        self.named = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        self.P = sum(t.numel() for t in self.named.values())
        self._cache: dict[Any, Any] = {}
        self.notes: list[str] = []

    def _memo(self, key: Any, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ------------------------------------------------------------ plumbing
    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.named.values())

    def loss(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """A fresh autograd graph of the float64 loss (of the whole batch by default)."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        return self.problem.loss_fn(self.model(x), y)

    def _split(self, flat_v: torch.Tensor) -> list[torch.Tensor]:
        return [t.reshape(p.shape) for t, p in
                zip(torch.split(flat_v, [p.numel() for p in self.params]), self.params,
                    strict=True)]

    def oracle_columns(self, J: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
        """``H[:, J]`` (``= H[J, :]^T``), one ``hessfunc.reference.hvp`` per one-hot vector."""
        loss = self.loss() if loss is None else loss
        cols = []
        for j in J.tolist():
            e = torch.zeros(self.P, dtype=torch.float64, device=self.x.device)
            e[j] = 1
            cols.append(flat(reference.hvp(loss, self.params, self._split(e))))
        return torch.stack(cols, dim=1)

    def sample_indices(self) -> torch.Tensor:
        """:data:`CHECK_ENTRIES` random flat parameter indices (fixed seed), sorted."""
        g = torch.Generator().manual_seed(0)
        return torch.randperm(self.P, generator=g)[:CHECK_ENTRIES].sort().values

    def hvp_operator(self) -> Any:
        """``v -> H v`` by double backward through one retained float64 gradient graph."""
        def make() -> Any:
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
                self.loss(), self.params, create_graph=True)])

            def matvec(v: torch.Tensor) -> torch.Tensor:
                return flat(torch.autograd.grad(g, self.params, v, retain_graph=True))
            return matvec
        return self._memo("hvp_op", make)

    # ---------------------------------------------------------------- exact
    def gradient(self) -> torch.Tensor:
        return self._memo("grad", lambda: flat(reference.gradient(self.loss(), self.params)))

    def input_gradient(self) -> torch.Tensor:
        """``d u(x_n) / d x_n`` for every point: autograd of ``sum_n u(x_n)`` (points are
        independent in these models)."""
        def make() -> torch.Tensor:
            x = self.x.detach().requires_grad_(True)
            return flat(torch.autograd.grad(self.model(x).sum(), x)[0])
        return self._memo("igrad", make)

    def hvp(self, v: Any) -> torch.Tensor:
        v64 = [v[k].detach().double() for k in self.named]
        return self._memo("hvp", lambda: flat(reference.hvp(self.loss(), self.params, v64)))

    def diag(self) -> torch.Tensor:
        """The exact diagonal: the oracle's loops up to :data:`ORACLE_LIMIT` parameters,
        else :func:`linear_chain_diag`, checked against the oracle at sampled entries."""
        def make() -> torch.Tensor:
            if self.P <= ORACLE_LIMIT:
                return flat(reference.hessian_diag(self.loss(), self.named))
            parts = linear_chain_diag(self.model, self.problem.loss_fn, self.x, self.y)
            d = flat({k: parts[k] for k in self.named})
            J = self.sample_indices()
            want = self.oracle_columns(J)[J, torch.arange(len(J))]
            err = rel_max(d[J], want)
            if not err < 1e-10:
                raise RuntimeError(f"reference diagonal disagrees with the oracle at {len(J)} "
                                   f"entries: {err:.1e}")
            self.notes.append(f"diagonal (and trace) truth: per-layer float64 formula, equal to "
                              f"hessfunc.reference at {len(J)} random entries (max-rel "
                              f"{err:.0e})")
            return d
        return self._memo("diag", make)

    def per_sample_diag(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(J, D)``: the first :data:`CHECK_SAMPLES` samples' own loss-Hessian diagonals
        by the oracle, at every entry (``J`` None) or, above :data:`DENSE_LIMIT` (that is
        16 P backward passes), at the sampled entries ``J``."""
        def make() -> tuple[torch.Tensor | None, torch.Tensor]:
            n = min(CHECK_SAMPLES, self.x.shape[0])
            rows, J = [], None
            if self.P > DENSE_LIMIT:
                J = self.sample_indices()
            for i in range(n):
                loss = self.loss(self.x[i:i + 1], self.y[i:i + 1])
                if J is None:
                    rows.append(flat(reference.hessian_diag(loss, self.named)))
                else:
                    rows.append(self.oracle_columns(J, loss)[J, torch.arange(len(J))])
            return J, torch.stack(rows)
        return self._memo("psd", make)

    def blocks(self) -> torch.Tensor:
        return self._memo("blocks", lambda: flat(reference.hessian_blocks(self.loss(),
                                                                          self.named)))

    def oracle_hessian(self) -> torch.Tensor | None:
        """The oracle's full Hessian (one backward per row) when P <= :data:`DENSE_LIMIT`."""
        if self.P > DENSE_LIMIT:
            return None
        return self._memo("oracle_dense", lambda: reference.hessian(self.loss(), self.params)
                          .cpu())

    def dense(self) -> torch.Tensor | None:
        """``torch.autograd.functional.hessian`` of the loss of the flat parameter vector
        when P <= :data:`DENSE_LIMIT` (for eigenvalues, trace and moments)."""
        if self.P > DENSE_LIMIT:
            return None

        def make() -> torch.Tensor:
            names = list(self.named)
            w0 = flat(self.params).to(self.x.device)

            def loss_of(w: torch.Tensor) -> torch.Tensor:
                ps = dict(zip(names, self._split(w), strict=True))
                out = torch.func.functional_call(self.model, ps, (self.x,))
                return self.problem.loss_fn(out, self.y)
            return torch.autograd.functional.hessian(loss_of, w0).detach().cpu()
        return self._memo("dense", make)

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J, H[:, J])`` for :data:`CHECK_COLUMNS` random columns ``J`` (fixed seed), by
        the oracle's ``hvp`` with one-hot vectors."""
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(0)
            J = torch.randperm(self.P, generator=g)[:CHECK_COLUMNS].sort().values
            return J, self.oracle_columns(J).cpu()
        return self._memo("cols", make)

    def eigenvalues(self, k: int, which: str = "largest") -> torch.Tensor:
        """The ``k <= 5`` largest (algebraic, or in magnitude) eigenvalues, in that order:
        ``eigvalsh`` of :meth:`dense`, or above :data:`DENSE_LIMIT` scipy's ``eigsh``
        (ARPACK, tol 1e-12) on double-backward products, each Ritz pair's residual
        checked with ``hessfunc.reference.hvp``."""
        def make() -> torch.Tensor:
            H = self.dense()
            if H is not None:
                ev = torch.linalg.eigvalsh(H)
                if which == "magnitude":
                    return ev[ev.abs().argsort(descending=True)][:5]
                return ev.flip(0)[:5]
            return self._eigsh(which)
        return self._memo(("eig", which), make)[:k]

    def _eigsh(self, which: str) -> torch.Tensor:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        matvec = self.hvp_operator()
        device = self.x.device

        def mv(v: Any) -> Any:
            t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64, device=device)
            return matvec(t).numpy()

        op = LinearOperator((self.P, self.P), matvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(self.P)
        vals, vecs = eigsh(op, k=5, which="LM" if which == "magnitude" else "LA", tol=1e-12,
                           v0=v0, ncv=min(self.P, 40))
        order = np.argsort(-np.abs(vals) if which == "magnitude" else -vals)
        vals, vecs = torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy())
        loss = self.loss()
        res = max(float(torch.linalg.vector_norm(
            flat(reference.hvp(loss, self.params, self._split(vecs[:, i].to(device))))
            - vals[i] * vecs[:, i]) / abs(vals[i])) for i in range(len(vals)))
        if not res < 1e-7:
            raise RuntimeError(f"reference eigenpairs not converged: residual {res:.1e}")
        self.notes.append(f"eigenvalue truth ({which}): scipy eigsh on double-backward H v, "
                          f"residuals |H u - lambda u| / |lambda| <= {res:.0e} by "
                          f"hessfunc.reference.hvp")
        return vals

    def trace(self) -> float:
        H = self.dense()
        return float(H.trace()) if H is not None else float(self.diag().sum())

    def fro2(self) -> float:
        """``||H||_F^2`` (exact from the dense H, else a 64-probe estimate of ``tr(H^2)``
        with double-backward products)."""
        def make() -> float:
            H = self.dense()
            if H is not None:
                return float((H ** 2).sum())
            g = torch.Generator(device=self.x.device).manual_seed(1)
            matvec = self.hvp_operator()
            total = 0.0
            for _ in range(64):
                v = torch.randint(0, 2, (self.P,), generator=g, device=self.x.device)
                total += float((matvec(v.double() * 2 - 1) ** 2).sum())
            self.notes.append("stochastic tolerances use ||H||_F^2 estimated from 64 probes "
                              "(double-backward H v)")
            return total / 64
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
        """``diag(d^2 u / dx^2)`` at every point: ``hessfunc.reference.input_hessian_diag``,
        one point at a time."""
        def u(x: torch.Tensor) -> torch.Tensor:
            return self.model(x[None]).reshape(())
        return self._memo("idiag", lambda: torch.stack(
            [reference.input_hessian_diag(u, xi) for xi in self.x]).cpu())

    def laplacian(self) -> torch.Tensor:
        return self.input_diag().sum(-1)

    # -------------------------------------------------------------- sources
    def source(self, task: str) -> str:
        """Where the float64 truth of ``task`` comes from (printed under the table)."""
        dense, oracle = self.P <= DENSE_LIMIT, self.P <= ORACLE_LIMIT
        fd = "torch.autograd.functional.hessian"
        sub = f"{CHECK_ENTRIES} random entries"
        return {
            "gradient": "torch.autograd.grad of sum_n u(x_n) w.r.t. X" if self.inputs
            else "hessfunc.reference.gradient (plain autograd)",
            "hvp": "hessfunc.reference.hvp (double backward)",
            "diag": "hessfunc.reference.hessian_diag (one backward per entry)" if oracle
            else f"per-layer formula (Linear layers: sum_n a_nj^2 d2L/dz_ni^2 by backward "
                 f"loops), checked against hessfunc.reference at {sub}",
            "diag_hutchinson": "norm error against the diag truth; tolerance from ||H||_F "
                               + (f"({fd})" if dense else "(64 double-backward probes)"),
            "per_sample_diag": f"hessfunc.reference.hessian_diag per sample, first "
                               f"{CHECK_SAMPLES} samples" if dense else
                               f"hessfunc.reference.hvp one-hot rows per sample, first "
                               f"{CHECK_SAMPLES} samples at {sub}",
            "blocks": "hessfunc.reference.hessian_blocks (one backward per row)",
            "hessian": "hessfunc.reference.hessian (one backward per row)" if dense
            else f"{CHECK_COLUMNS} random columns by hessfunc.reference.hvp (one-hot)",
            "eig1": f"{fd} + torch.linalg.eigvalsh" if dense
            else "scipy eigsh (ARPACK, tol 1e-12) on double-backward H v, residuals "
                 "checked with hessfunc.reference.hvp",
            "trace": f"trace of {fd}" if dense else "sum of the diag truth",
            "density": f"moments tr(H)/P, tr(H^2)/P of {fd}" if dense
            else "mean eigenvalue from the diag truth; tolerance from 64 double-backward probes",
            "input_diag": "hessfunc.reference.input_hessian_diag, point by point",
            "laplacian": "hessfunc.reference.input_hessian_diag summed, point by point",
        }["eig1" if task == "eig5" else task]


def linear_chain_diag(model: torch.nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Exact Hessian diagonal of ``loss_fn(model(x), y)`` for an ``nn.Sequential`` of
    ``nn.Linear`` layers and parameter-free elementwise modules, in O(width) backward
    passes instead of O(P) (used only above :data:`ORACLE_LIMIT`, and checked there).

    A layer ``z = a W^T + b`` is linear in ``W``, so ``d2L/dW_ij^2 = sum_n a_nj^2
    d2L/dz_ni^2`` and ``d2L/db_i^2 = sum_n d2L/dz_ni^2``. The loss is a sum of
    per-sample terms, so ``d2L/dZ^2`` is block diagonal over samples and its diagonal
    is read off one backward per feature ``i`` of ``sum_n dL/dz_ni``.
    """
    if not isinstance(model, torch.nn.Sequential):
        raise TypeError("linear_chain_diag needs an nn.Sequential")
    layers = list(model)
    out: dict[str, torch.Tensor] = {}
    a = x
    for idx, layer in enumerate(layers):
        own = dict(layer.named_parameters())
        if own and not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"linear_chain_diag: layer {idx} ({type(layer).__name__}) has "
                            "parameters and is not nn.Linear")
        if not own:
            a = layer(a).detach()
            continue
        z = layer(a).detach().requires_grad_(True)
        rest = z
        for later in layers[idx + 1:]:
            rest = later(rest)
        (gz,) = torch.autograd.grad(loss_fn(rest, y), z, create_graph=True)
        D = torch.stack([torch.autograd.grad(gz[:, i].sum(), z, retain_graph=True)[0][:, i]
                         for i in range(z.shape[1])], dim=1)            # (N, width)
        name = str(idx)
        if layer.weight.requires_grad:
            out[f"{name}.weight"] = (D.T @ a.detach() ** 2).detach()
        if layer.bias is not None and layer.bias.requires_grad:
            out[f"{name}.bias"] = D.sum(0).detach()
        a = layer(a).detach()
    return out


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
        J, want = ref.per_sample_diag()
        got = out.detach().double().cpu().reshape(ctx.N, -1)[: want.shape[0]]
        where = "" if J is None else f" at {len(J)} random entries"
        return Check(rel_max(got if J is None else got[:, J], want), tol,
                     f"max-rel, first {want.shape[0]} samples{where}")
    if task == "hessian":
        got = out.detach().double().cpu()
        H = ref.oracle_hessian()
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
