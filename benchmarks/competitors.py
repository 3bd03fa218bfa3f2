"""Adapters: every implementation of every task, hessfunc's and the tools users would pick.

Each adapter returns, for a task and a problem :class:`~benchmarks.tasks.Context`,
a list of :class:`Case`: a zero-argument callable that computes the quantity from
scratch (the forward pass included), a converter to the canonical form that
:func:`benchmarks.tasks.check` compares, the settings of stochastic methods, and
for loops an estimate of one call's seconds from a partial run.

Competitors are optional imports: a missing one gives a ``"not installed"`` case,
never an ImportError. One-time set-up that a user does once per model (BackPACK's
``extend``, copying the model) happens outside the timed callable; building a
curvature operator (hessfunc, curvlinops, PyHessian, hessian-eigenthings) happens
inside it, since each result is computed once per operator.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import hessfunc as hf

from .problems import mse
from .tasks import Context, Density, Eigenvalues, Estimate, flat

#: Stochastic settings shared by every implementation (``quick`` in brackets):
#: Hutchinson probes for trace and diagonal, and stochastic Lanczos quadrature.
SETTINGS = {
    False: {"probes": 100, "slq_probes": 5, "slq_steps": 32},
    True: {"probes": 20, "slq_probes": 2, "slq_steps": 12},
}
#: Vectorised recipes (torch.func.hessian, one-hot vmaps) refused above this estimate.
MEMORY_LIMIT = 4 * 2 ** 30

HESSFUNC = "hessfunc"
LIBRARIES = ["hessfunc", "seed loops", "torch.autograd.functional", "torch.func", "BackPACK",
             "PyHessian", "curvlinops", "hessian-eigenthings"]
#: import name and distribution name of each optional competitor
OPTIONAL = {
    "BackPACK": ("backpack", "backpack-for-pytorch"),
    "PyHessian": ("pyhessian", "pyhessian"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
}
#: which tasks each optional competitor offers (listed as "not installed" when missing)
OFFERS = {
    "BackPACK": {"diag", "per_sample_diag", "blocks", "trace"},
    "PyHessian": {"eig1", "eig5", "trace", "density"},
    "curvlinops": {"hvp", "diag_hutchinson", "eig1", "eig5", "trace", "density"},
    "hessian-eigenthings": {"hvp", "eig1", "eig5", "trace", "density"},
}


@dataclass
class Case:
    name: str
    library: str
    run: Callable[[], Any] | None = None
    convert: Callable[[Any], Any] = lambda out: out
    settings: str = ""
    estimate: Callable[[], float] | None = None
    status: str = ""          # preset: "not installed", "skipped", "fails"
    reason: str = ""
    note: str = ""

    @property
    def is_hessfunc(self) -> bool:
        return self.library == HESSFUNC


def _import(library: str) -> Any:
    """The competitor's module, or None when it is not installed (or does not import)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(OPTIONAL[library][0])
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return None


def versions() -> dict[str, str]:
    """Installed versions of torch and the competitors ("not installed" otherwise)."""
    out = {"torch": torch.__version__, "hessfunc": hf.__version__}
    for lib, (_, dist) in OPTIONAL.items():
        try:
            out[lib] = metadata.version(dist) if _import(lib) is not None else "not installed"
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    try:
        import scipy

        out["scipy"] = scipy.__version__
    except ImportError:
        out["scipy"] = "not installed"
    return out


# ------------------------------------------------------------------ helpers
def loss_module(ctx: Context) -> nn.Module | None:
    """The ``nn`` loss module equal to the problem's functional loss (BackPACK, curvlinops)."""
    if ctx.problem.loss_fn is mse:
        return nn.MSELoss()
    if ctx.problem.loss_fn is F.cross_entropy:
        return nn.CrossEntropyLoss()
    return None


def _model_copy(ctx: Context) -> nn.Module:
    return copy.deepcopy(ctx.problem.model)


def _named_flat(ctx: Context) -> tuple[list[str], list[torch.Size]]:
    params = ctx.extra["params"]
    return list(params), [t.shape for t in params.values()]


def _unflatten(ctx: Context, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    names, shapes = _named_flat(ctx)
    out, i = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        n = math.prod(shape)
        out[name] = vec[..., i:i + n].reshape(*vec.shape[:-1], *shape)
        i += n
    return out


def _batched_flat(tree: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    return torch.cat([t.reshape(batch, -1) for t in tree.values()], dim=1)


def activation_numel(ctx: Context) -> int:
    """Elements of all module outputs in one forward pass (sizes vectorised recipes)."""
    if "act" not in ctx.extra:
        total = [0]
        hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0]
                                                                          + o.numel()))
                 for m in ctx.problem.model.modules() if not list(m.children())]
        with torch.no_grad():
            ctx.problem.model(ctx.problem.x)
        for h in hooks:
            h.remove()
        ctx.extra["act"] = total[0]
    return ctx.extra["act"]


def _vectorised_bytes(ctx: Context, tangents: int) -> int:
    """Rough peak of a vmap over ``tangents`` columns through forward and backward."""
    return 6 * tangents * activation_numel(ctx) * ctx.problem.x.element_size()


def _too_big(ctx: Context, nbytes: int) -> str:
    return f"needs ~{nbytes / 2 ** 30:.1f} GiB (limit {MEMORY_LIMIT / 2 ** 30:.0f} GiB)"


def _chunk(ctx: Context, budget: int = 2 ** 30) -> int:
    """One-hot tangents per vmap chunk keeping the recipe near ``budget`` bytes."""
    return max(1, min(ctx.P, budget // max(_vectorised_bytes(ctx, 1), 1)))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fmt_settings(**kw: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())


# ---------------------------------------------------- seed-loop estimators
def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, create_graph=True)
    return torch.cat([g.reshape(-1) for g in gs])


def estimate_element_loops(model: nn.Module, loss_of: Callable[[], torch.Tensor], *,
                           per_tensor: bool, rows: int = 6) -> float:
    """Seconds of the seed's element-by-element loops, from ``rows`` rows per tensor.

    ``per_tensor``: one gradient graph per parameter tensor and one backward per
    element against that tensor (diagonal, blocks); else one graph and one
    backward per row against all parameters (full Hessian).
    """
    params = list(model.parameters())
    groups = [[p] for p in params] if per_tensor else [params]
    total = 0.0
    for group in groups:
        t0 = time.perf_counter()
        g = _flat_grad(loss_of(), group)
        build = time.perf_counter() - t0
        k = min(rows, g.numel())
        t0 = time.perf_counter()
        for i in range(k):
            torch.autograd.grad(g[i], group, retain_graph=True)
        total += build + (time.perf_counter() - t0) / k * g.numel()
    return total


def _estimate_points(fn: Callable[[int], Any], n_total: int, n_try: int = 8) -> float:
    """Seconds of a loop over ``n_total`` points from the first ``n_try``."""
    n = min(n_try, n_total)
    return _timed(lambda: [fn(i) for i in range(n)]) / n * n_total


# ======================================================================== hessfunc
def hessfunc_cases(task: str, ctx: Context) -> list[Case]:
    c = lambda name, run, **kw: Case(name, HESSFUNC, run, **kw)  # noqa: E731
    if ctx.inputs:
        u = ctx.extra["u"]
        X = ctx.problem.x
        cases = []
        if task == "gradient":
            cases.append(c("vmap(hessfunc.grad(u))", lambda: vmap(hf.grad(u))(X)))
        if task == "input_diag":
            cases.append(c("vmap(hessfunc.hessian_diag(u))",
                           lambda: vmap(hf.hessian_diag(u))(X)))
        if task == "laplacian":
            cases.append(c("vmap(hessfunc.laplacian(u))", lambda: vmap(hf.laplacian(u))(X)))
        fwd = _hessfunc_forward()
        if fwd is not None and task == "input_diag":
            cases.append(c("vmap(hessfunc.forward.input_hessian_diag(u))",
                           lambda: vmap(fwd.input_hessian_diag(u))(X)))
        if fwd is not None and task == "laplacian":
            cases.append(c("vmap(hessfunc.forward.forward_laplacian(u))",
                           lambda: vmap(fwd.forward_laplacian(u))(X)))
        return cases
    f, params, x, y = ctx.extra["f"], ctx.extra["params"], ctx.problem.x, ctx.problem.y
    S = SETTINGS[ctx.quick]
    op = lambda: hf.HessianOperator(f, params, (x, y))  # noqa: E731
    v = ctx.extra["v"]
    if task == "gradient":
        return [c("hessfunc.grad", lambda: hf.grad(f)(params, x, y), convert=flat)]
    if task == "hvp":
        cached = hf.hvp_fn(f, (params, x, y))
        return [
            c("hessfunc.hvp", lambda: hf.hvp(f, (params, x, y), v), convert=flat),
            c("hessfunc.hvp forward-over-reverse",
              lambda: hf.hvp(f, (params, x, y), v, mode="forward-over-reverse"), convert=flat),
            c("hessfunc.hvp_fn, per product", lambda: cached(v), convert=flat,
              note="set up once (structured products on chains, else the gradient graph)"),
        ]
    if task == "diag":
        return [c("hessfunc.hessian_diag", lambda: hf.hessian_diag(f)(params, x, y),
                  convert=flat)]
    if task == "diag_hutchinson":
        return [c("HessianOperator.diagonal('hutchinson')",
                  lambda: op().diagonal("hutchinson", num_samples=S["probes"], seed=0),
                  convert=lambda d: Estimate(d, S["probes"]),
                  settings=_fmt_settings(num_samples=S["probes"]))]
    if task == "per_sample_diag":
        per = vmap(hf.hessian_diag(f), in_dims=(None, 0, 0))
        N = ctx.N

        def est_per_sample() -> float:  # cheap when the structured route applies
            try:
                hf.hessian_diag(f, method="structured", per_sample=True)(params, x[:2], y[:2])
            except hf.ArgumentError:
                return _estimate_vmap_diag(ctx)
            return 0.0

        return [
            c("hessfunc.hessian_diag(per_sample=True)",
              lambda: hf.hessian_diag(f, per_sample=True)(params, x, y),
              convert=lambda d: _batched_flat(d, N), estimate=est_per_sample,
              note="structured per-sample route for Linear/activation chains, else the "
                   "vmap recipe"),
            c("vmap(hessfunc.hessian_diag)", lambda: per(params, x[:, None], y[:, None]),
              convert=lambda d: _batched_flat(d, N),
              estimate=lambda: _estimate_vmap_diag(ctx),
              note="the recipe by hand; generic one-hot route under vmap"),
        ]
    if task == "blocks":
        return [c("hessfunc.hessian_blocks", lambda: hf.hessian_blocks(f)(params, x, y),
                  convert=flat)]
    if task == "hessian":
        return [c("hessfunc.hessian(flat=True)",
                  lambda: hf.hessian(f, flat=True)(params, x, y))]
    if task in ("eig1", "eig5"):
        k = 1 if task == "eig1" else 5
        how = "Lanczos, " + ("plain recurrence" if k == 1 else "semi-orthogonal") + ", data span"
        return [c("HessianOperator.eigenvalues(tol=1e-6)",
                  lambda: op().eigenvalues(k, tol=1e-6, seed=0),
                  settings=f"{how}, tol=1e-6 (the issue's accuracy)"),
                c("HessianOperator.eigenvalues", lambda: op().eigenvalues(k, seed=0),
                  settings=f"{how}, tol=1e-8 (default)"),
                c("HessianOperator.eigenvalues(tol=1e-3)",
                  lambda: op().eigenvalues(k, tol=1e-3, seed=0),
                  settings=f"{how}, tol=1e-3 (PyHessian's)")]
    if task == "trace":
        n = S["probes"]
        return [
            c("HessianOperator.trace() exact", lambda: op().trace(), convert=float,
              settings="sum of the exact diagonal"),
            c("HessianOperator.trace('hutchinson')",
              lambda: op().trace("hutchinson", num_samples=n, seed=0),
              convert=lambda r: Estimate(r.estimate, r.num_matvecs),
              settings=_fmt_settings(num_samples=n)),
            c("HessianOperator.trace('hutch++')",
              lambda: op().trace("hutch++", num_samples=n, seed=0),
              convert=lambda r: Estimate(r.estimate, r.num_matvecs),
              settings=_fmt_settings(num_matvecs=n)),
        ]
    if task == "density":
        R, m = S["slq_probes"], S["slq_steps"]
        return [c("HessianOperator.spectral_density",
                  lambda: op().spectral_density(num_probes=R, num_steps=m, seed=0),
                  convert=lambda d: Density(nodes=d.nodes, weights=d.weights, probes=R),
                  settings=_fmt_settings(num_probes=R, num_steps=m))]
    return []


def _hessfunc_forward() -> Any:
    try:
        return importlib.import_module("hessfunc.forward")
    except Exception:  # noqa: BLE001 - optional: another helper's module
        return None


def _estimate_vmap_diag(ctx: Context) -> float:
    """Partial run of vmap(hessian_diag), scaled by samples (and by parameters: the
    generic route costs one one-hot column per entry): 2 samples of all parameters up to
    20k of them, else of the smallest tensors holding >= 64 entries."""
    f, params, x, y = ctx.extra["f"], ctx.extra["params"], ctx.problem.x, ctx.problem.y
    if ctx.P * ctx.N <= 50_000:
        return 0.0  # small enough to just run
    names = sorted(params, key=lambda k: params[k].numel())
    sub, count = [], 0
    for name in names:
        sub.append(name)
        count += params[name].numel()
        if count >= 64 and ctx.P > 20_000:
            break

    def f_sub(p_sub: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> Any:
        return f({**params, **p_sub}, xb, yb)

    per = vmap(hf.hessian_diag(f_sub), in_dims=(None, 0, 0))
    sub_params = {k: params[k] for k in sub}
    n = min(2, ctx.N)
    per(sub_params, x[:n, None], y[:n, None])  # warm-up
    t = _timed(lambda: per(sub_params, x[:n, None], y[:n, None]))
    return t * (ctx.N / n) * (ctx.P / count)


# ===================================================================== seed loops
def seed_cases(task: str, ctx: Context) -> list[Case]:
    R = hf.reference
    lib = "seed loops"
    if ctx.inputs:
        u, X = ctx.extra["u"], ctx.problem.x
        if task == "input_diag":
            one = lambda i: R.input_hessian_diag(u, X[i])  # noqa: E731
            return [Case("reference.input_hessian_diag, per point", lib,
                         lambda: torch.stack([one(i) for i in range(ctx.N)]),
                         estimate=lambda: _estimate_points(one, ctx.N))]
        if task == "laplacian":
            one = lambda i: R.laplacian(u, X[i])  # noqa: E731
            return [Case("reference.laplacian, per point", lib,
                         lambda: torch.stack([one(i) for i in range(ctx.N)]),
                         estimate=lambda: _estimate_points(one, ctx.N))]
        return []
    model = _model_copy(ctx)
    x, y, loss_fn = ctx.problem.x, ctx.problem.y, ctx.problem.loss_fn
    params = list(model.parameters())
    loss_of = lambda: loss_fn(model(x), y)  # noqa: E731
    v = list(ctx.extra["v"].values())
    if task == "hvp":
        return [Case("reference.hvp (double backward)", lib,
                     lambda: R.hvp(loss_of(), params, v), convert=flat)]
    if task == "diag":
        return [Case("reference.hessian_diag", lib,
                     lambda: R.hessian_diag(loss_of(), model.named_parameters()), convert=flat,
                     estimate=lambda: estimate_element_loops(model, loss_of, per_tensor=True))]
    if task == "blocks":
        return [Case("reference.hessian_blocks", lib,
                     lambda: R.hessian_blocks(loss_of(), model.named_parameters()), convert=flat,
                     estimate=lambda: estimate_element_loops(model, loss_of, per_tensor=True))]
    if task == "hessian":
        return [Case("reference.hessian", lib, lambda: R.hessian(loss_of(), params),
                     estimate=lambda: estimate_element_loops(model, loss_of, per_tensor=False))]
    if task == "per_sample_diag":
        def one(i: int) -> torch.Tensor:
            return flat(R.hessian_diag(loss_fn(model(x[i:i + 1]), y[i:i + 1]),
                                       model.named_parameters()))

        def est() -> float:
            first = lambda: loss_fn(model(x[:1]), y[:1])  # noqa: E731
            return ctx.N * estimate_element_loops(model, first, per_tensor=True)

        return [Case("reference.hessian_diag, per sample", lib,
                     lambda: torch.stack([one(i) for i in range(ctx.N)]), estimate=est)]
    return []


# ======================================================= torch.autograd.functional
def autograd_functional_cases(task: str, ctx: Context) -> list[Case]:
    AF = torch.autograd.functional
    lib = "torch.autograd.functional"
    if ctx.inputs:
        u, X = ctx.extra["u"], ctx.problem.x
        if task in ("input_diag", "laplacian"):
            one = lambda i: AF.hessian(u, X[i]).diagonal()  # noqa: E731
            out = (lambda d: d) if task == "input_diag" else (lambda d: d.sum(-1))
            return [Case("autograd.functional.hessian, per point", lib,
                         lambda: out(torch.stack([one(i) for i in range(ctx.N)])),
                         estimate=lambda: _estimate_points(one, ctx.N))]
        return []
    f, params, x, y = ctx.extra["f"], ctx.extra["params"], ctx.problem.x, ctx.problem.y
    names = list(params)
    tensors = tuple(params.values())

    def func(*ps: torch.Tensor) -> torch.Tensor:
        return f(dict(zip(names, ps, strict=True)), x, y)

    model = _model_copy(ctx)
    rows = lambda: estimate_element_loops(  # noqa: E731
        model, lambda: ctx.problem.loss_fn(model(x), y), per_tensor=False)

    def dense() -> torch.Tensor:
        H = AF.hessian(func, tensors)
        return torch.cat([torch.cat([H[i][j].reshape(tensors[i].numel(), tensors[j].numel())
                                     for j in range(len(tensors))], 1)
                          for i in range(len(tensors))], 0)

    if task == "hvp":
        v = tuple(ctx.extra["v"].values())
        return [Case("autograd.functional.hvp", lib, lambda: AF.hvp(func, tensors, v)[1],
                     convert=flat)]
    if task in ("diag", "hessian"):
        nbytes = ctx.P ** 2 * ctx.problem.x.element_size()
        if nbytes > MEMORY_LIMIT:
            return [Case("autograd.functional.hessian", lib, status="skipped",
                         reason=f"dense H {_too_big(ctx, nbytes)}")]
        if task == "diag":
            return [Case("autograd.functional.hessian -> diagonal", lib,
                         lambda: dense().diagonal(), estimate=rows,
                         note="forms the dense H")]
        return [Case("autograd.functional.hessian", lib, dense, estimate=rows)]
    if task == "blocks":
        def blocks() -> list[torch.Tensor]:
            out = []
            for i, t in enumerate(tensors):
                def fi(p: torch.Tensor, i: int = i) -> torch.Tensor:
                    return func(*tensors[:i], p, *tensors[i + 1:])
                out.append(AF.hessian(fi, t).reshape(t.numel(), t.numel()))
            return out

        return [Case("autograd.functional.hessian per tensor", lib, blocks, convert=flat,
                     estimate=lambda: estimate_element_loops(
                         model, lambda: ctx.problem.loss_fn(model(x), y), per_tensor=True))]
    return []


# ======================================================================= torch.func
def torch_func_cases(task: str, ctx: Context) -> list[Case]:
    lib = "torch.func"
    TF = torch.func
    if ctx.inputs:
        u, X = ctx.extra["u"], ctx.problem.x
        if task == "gradient":
            return [Case("vmap(torch.func.grad(u))", lib, lambda: vmap(TF.grad(u))(X))]
        if task in ("input_diag", "laplacian"):
            hes = vmap(TF.hessian(u))
            if task == "input_diag":
                return [Case("vmap(torch.func.hessian(u)).diagonal", lib,
                             lambda: hes(X).diagonal(dim1=-2, dim2=-1))]
            return [Case("vmap(torch.func.hessian(u)).trace", lib,
                         lambda: hes(X).diagonal(dim1=-2, dim2=-1).sum(-1))]
        return []
    f, params, x, y = ctx.extra["f"], ctx.extra["params"], ctx.problem.x, ctx.problem.y
    P, N = ctx.P, ctx.N
    grad_f = TF.grad(f)

    def hvp_of(xb: torch.Tensor, yb: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        g = lambda p: grad_f(p, xb, yb)  # noqa: E731

        def hvp_flat(vec: torch.Tensor) -> torch.Tensor:
            # vjp(grad): jvp(grad) trips over ZeroTensors with F.mse_loss (see the hvp rows)
            out = TF.vjp(g, params)[1](_unflatten(ctx, vec))[0]
            return torch.cat([t.reshape(-1) for t in out.values()])
        return hvp_flat

    eye = lambda: torch.eye(P, dtype=x.dtype, device=x.device)  # noqa: E731
    chunk = _chunk(ctx)
    if task == "gradient":
        return [Case("torch.func.grad", lib, lambda: grad_f(params, x, y), convert=flat)]
    if task == "hvp":
        v = ctx.extra["v"]
        return [
            Case("torch.func jvp(grad) (fwd-over-rev)", lib,
                 lambda: TF.jvp(lambda p: grad_f(p, x, y), (params,), (v,))[1], convert=flat),
            Case("torch.func vjp(grad) (rev-over-rev)", lib,
                 lambda: TF.vjp(lambda p: grad_f(p, x, y), params)[1](v)[0], convert=flat),
        ]
    if task == "diag":
        nbytes = P * P * x.element_size()
        name = "vmap(one-hot vjp(grad)) -> diagonal"
        if nbytes > MEMORY_LIMIT:
            return [Case(name, lib, status="skipped",
                         reason=f"(P, P) rows {_too_big(ctx, nbytes)}")]
        hv = hvp_of(x, y)

        def est() -> float:  # one chunk of the one-hot columns, scaled to all P
            cols = min(chunk, P)
            part = lambda: vmap(hv)(eye()[:cols])  # noqa: E731
            part()
            return _timed(part) * P / cols

        return [Case(name, lib, lambda: vmap(hv, chunk_size=chunk)(eye()).diagonal(),
                     settings=f"chunk_size={chunk}", estimate=est)]
    if task == "per_sample_diag":
        name = "vmap over samples of vmap(one-hot vjp(grad))"
        nbytes = P * P * x.element_size() * max(1, min(N, 8))
        if nbytes > MEMORY_LIMIT:
            return [Case(name, lib, status="skipped",
                         reason=f"(P, P) rows {_too_big(ctx, nbytes)}")]

        def one_sample(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return vmap(hvp_of(xi[None], yi[None]))(eye()).diagonal()

        per = vmap(one_sample, chunk_size=max(1, min(N, MEMORY_LIMIT // max(nbytes // 8, 1))))

        def est() -> float:
            n = min(2, N)
            per(x[:n], y[:n])
            return _timed(lambda: per(x[:n], y[:n])) * N / n

        return [Case(name, lib, lambda: per(x, y), estimate=est)]
    if task == "blocks":
        def blocks() -> list[torch.Tensor]:
            out = []
            for name, t in params.items():
                def fn(p: torch.Tensor, name: str = name) -> torch.Tensor:
                    return f({**params, name: p}, x, y)
                out.append(TF.hessian(fn)(t).reshape(t.numel(), t.numel()))
            return out

        biggest = max(t.numel() for t in params.values())
        nbytes = _vectorised_bytes(ctx, biggest) + biggest ** 2 * x.element_size()
        if nbytes > MEMORY_LIMIT:
            return [Case("torch.func.hessian per tensor", lib, status="skipped",
                         reason=_too_big(ctx, nbytes))]
        return [Case("torch.func.hessian per tensor", lib, blocks, convert=flat)]
    if task == "hessian":
        nbytes = _vectorised_bytes(ctx, P) + P * P * x.element_size()
        if nbytes > MEMORY_LIMIT:
            return [Case("torch.func.hessian", lib, status="skipped", reason=_too_big(ctx, nbytes))]

        def dense() -> torch.Tensor:
            H = TF.hessian(f)(params, x, y)
            return torch.cat([torch.cat([H[a][b].reshape(params[a].numel(), params[b].numel())
                                         for b in params], 1) for a in params], 0)

        return [Case("torch.func.hessian", lib, dense)]
    return []


# ========================================================================= BackPACK
def backpack_cases(task: str, ctx: Context) -> list[Case]:
    lib = "BackPACK"
    if ctx.inputs or task not in OFFERS[lib]:
        return []
    bp = _import(lib)
    if bp is None:
        return [Case("BackPACK", lib, status="not installed")]
    lossm = loss_module(ctx)
    if lossm is None:
        return [Case("BackPACK", lib, status="skipped", reason="loss is not an nn loss module")]
    from backpack.extensions import HMP, BatchDiagHessian, DiagHessian

    model = bp.extend(_model_copy(ctx))
    lossm = bp.extend(lossm)
    x, y, N = ctx.problem.x, ctx.problem.y, ctx.N

    def backward(ext: Any) -> list[torch.Tensor]:
        for p in model.parameters():
            p.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full-backward-hook notices on the first module
            loss = lossm(model(x), y)
            with bp.backpack(ext):
                loss.backward()
        return list(model.parameters())

    if task in ("diag", "trace"):
        def diag() -> torch.Tensor:
            return torch.cat([p.diag_h.reshape(-1) for p in backward(DiagHessian())])
        if task == "diag":
            return [Case("DiagHessian", lib, diag, note="also computes the gradient")]
        return [Case("DiagHessian -> sum", lib, lambda: diag().sum(), convert=float,
                     settings="exact")]
    if task == "per_sample_diag":
        return [Case("BatchDiagHessian", lib, lambda: torch.cat(
            [p.diag_h_batch.reshape(N, -1) for p in backward(BatchDiagHessian())], 1),
            convert=lambda d: d * N, note="x N: BackPACK gives each sample's share of the mean")]
    if task == "blocks":
        def blocks() -> list[torch.Tensor]:
            out = []
            for p in backward(HMP()):
                n = p.numel()
                eye = torch.eye(n, dtype=p.dtype, device=p.device).reshape(n, *p.shape)
                out.append(p.hmp(eye).reshape(n, n))
            return out
        return [Case("HMP @ identity per tensor", lib, blocks, convert=flat,
                     note="HMP multiplies with the block-diagonal H")]
    return []


# ======================================================================== PyHessian
def pyhessian_cases(task: str, ctx: Context) -> list[Case]:
    lib = "PyHessian"
    if ctx.inputs or task not in OFFERS[lib]:
        return []
    mod = _import(lib)
    if mod is None:
        return [Case("PyHessian", lib, status="not installed")]
    from pyhessian import hessian as PyH

    model = _model_copy(ctx)
    cuda = ctx.device.type == "cuda"

    def make() -> Any:
        for p in model.parameters():
            p.grad = None  # its constructor accumulates a create_graph gradient into .grad
        torch.manual_seed(0)  # its probes come from the global generator
        return PyH(model, ctx.problem.loss_fn, data=(ctx.problem.x, ctx.problem.y), cuda=cuda)

    if task in ("eig1", "eig5"):
        k = 1 if task == "eig1" else 5
        return [Case("hessian.eigenvalues", lib, lambda: make().eigenvalues(top_n=k)[0],
                     convert=lambda ev: Eigenvalues(torch.tensor(ev), "magnitude"),
                     settings="power iteration with deflation, maxIter=100, tol=1e-3 "
                     "(defaults); finds the largest abs(lambda), checked against those")]
    if task == "trace":
        return [Case("hessian.trace", lib, lambda: make().trace(),
                     convert=lambda vals: Estimate(torch.tensor(vals), len(vals)),
                     settings="Hutchinson, maxIter=100, tol=1e-3 (defaults; stops early)")]
    if task == "density":
        R, m = SETTINGS[ctx.quick]["slq_probes"], SETTINGS[ctx.quick]["slq_steps"]
        return [Case("hessian.density", lib, lambda: make().density(iter=m, n_v=R),
                     convert=lambda r: Density(nodes=torch.tensor(r[0]),
                                               weights=torch.tensor(r[1]), probes=R),
                     settings=_fmt_settings(iter=m, n_v=R))]
    return []


# ======================================================================= curvlinops
def curvlinops_cases(task: str, ctx: Context) -> list[Case]:
    lib = "curvlinops"
    if ctx.inputs or task not in OFFERS[lib]:
        return []
    cl = _import(lib)
    if cl is None:
        return [Case("curvlinops", lib, status="not installed")]
    lossm = loss_module(ctx)
    if lossm is None:
        return [Case("curvlinops", lib, status="skipped", reason="loss is not an nn loss module")]
    model = _model_copy(ctx)
    data = [(ctx.problem.x, ctx.problem.y)]
    S = SETTINGS[ctx.quick]

    def op() -> Any:
        return cl.HessianLinearOperator(model, lossm, list(model.parameters()), data,
                                        check_deterministic=False)

    if task == "hvp":
        v = torch.cat([t.reshape(-1) for t in ctx.extra["v"].values()])
        return [Case("HessianLinearOperator @ v", lib, lambda: op() @ v,
                     note="check_deterministic=False")]
    if task in ("eig1", "eig5"):
        from scipy.sparse.linalg import eigsh

        k = 1 if task == "eig1" else 5
        return [Case("scipy eigsh(H.to_scipy())", lib,
                     lambda: eigsh(op().to_scipy(), k=k, which="LA", return_eigenvectors=False),
                     convert=lambda ev: torch.as_tensor(ev.copy()),
                     settings="ARPACK, which='LA', tol=0 (default)")]
    n = S["probes"]
    if task in ("trace", "diag_hutchinson") and n >= ctx.P:
        return [Case("curvlinops hutchinson", lib, status="skipped",
                     reason=f"needs num_matvecs < P={ctx.P}")]
    if task == "trace":
        def tr() -> Any:
            torch.manual_seed(0)
            return cl.hutchinson_trace(op(), num_matvecs=n)
        return [Case("hutchinson_trace", lib, tr, convert=lambda t: Estimate(t, n),
                     settings=_fmt_settings(num_matvecs=n))]
    if task == "diag_hutchinson":
        def dg() -> Any:
            torch.manual_seed(0)
            return cl.hutchinson_diag(op(), num_matvecs=n)
        return [Case("hutchinson_diag", lib, dg, convert=lambda d: Estimate(d, n),
                     settings=_fmt_settings(num_matvecs=n))]
    if task == "density":
        R, m = S["slq_probes"], S["slq_steps"]

        def dens() -> Any:
            torch.manual_seed(0)
            return cl.lanczos_approximate_spectrum(op(), ncv=m, num_repeats=R)

        return [Case("lanczos_approximate_spectrum", lib, dens,
                     convert=lambda gd: Density(grid=gd[0], density=gd[1], probes=R),
                     settings=_fmt_settings(ncv=m, num_repeats=R) + "; eigsh boundaries")]
    return []


# ============================================================== hessian-eigenthings
def eigenthings_cases(task: str, ctx: Context) -> list[Case]:
    lib = "hessian-eigenthings"
    if ctx.inputs or task not in OFFERS[lib]:
        return []
    he = _import(lib)
    if he is None:
        return [Case("hessian-eigenthings", lib, status="not installed")]
    model = _model_copy(ctx)
    data = [(ctx.problem.x, ctx.problem.y)]
    S = SETTINGS[ctx.quick]

    def op() -> Any:
        return he.HessianOperator(model, data, he.supervised_loss(ctx.problem.loss_fn))

    if task == "hvp":
        v = torch.cat([t.reshape(-1) for t in ctx.extra["v"].values()])
        return [Case("HessianOperator.matvec", lib, lambda: op().matvec(v))]
    if task in ("eig1", "eig5"):
        k = 1 if task == "eig1" else 5
        return [Case("lanczos", lib, lambda: he.lanczos(op(), k=k, which="LA", seed=0),
                     convert=lambda r: r.eigenvalues,
                     settings="which='LA', defaults (max_iter=2k, tol=1e-4)")]
    if task == "trace":
        n = S["probes"]
        return [Case("hutchinson", lib, lambda: he.hutchinson(op(), num_samples=n, seed=0),
                     convert=lambda r: Estimate(r.estimate, n),
                     settings=_fmt_settings(num_samples=n))]
    if task == "density":
        R, m = S["slq_probes"], S["slq_steps"]
        return [Case("spectral_density", lib,
                     lambda: he.spectral_density(op(), num_runs=R, lanczos_steps=m, seed=0),
                     convert=lambda r: Density(nodes=r.raw_eigenvalues, weights=r.raw_weights,
                                               probes=R),
                     settings=_fmt_settings(num_runs=R, lanczos_steps=m))]
    return []


ADAPTERS = [hessfunc_cases, seed_cases, autograd_functional_cases, torch_func_cases,
            backpack_cases, pyhessian_cases, curvlinops_cases, eigenthings_cases]


def all_cases(task: str, ctx: Context) -> list[Case]:
    """Every implementation of ``task`` on this problem, hessfunc's first."""
    out: list[Case] = []
    for adapter in ADAPTERS:
        try:
            out.extend(adapter(task, ctx))
        except Exception as exc:  # noqa: BLE001 - an adapter that cannot even set up
            lib = LIBRARIES[ADAPTERS.index(adapter)]
            out.append(Case(lib, lib, status="fails", reason=short_reason(exc)))
    return out


def short_reason(exc: BaseException, width: int = 80) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


def setup_context(ctx: Context) -> None:
    """Functionalise the model once and fix the HVP direction ``v`` (seed 0)."""
    if ctx.inputs:
        g, params = hf.functionalize(ctx.problem.model)
        ctx.extra["params"] = params

        def u(x: torch.Tensor) -> torch.Tensor:
            return g(params, x[None]).reshape(())

        ctx.extra["u"] = u
        return
    f, params = hf.functionalize(ctx.problem.model, ctx.problem.loss_fn)
    gen = torch.Generator().manual_seed(0)
    ctx.extra.update(f=f, params=params, v={
        k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
        for k, t in params.items()})


__all__ = ["Case", "all_cases", "setup_context", "versions", "SETTINGS"]
