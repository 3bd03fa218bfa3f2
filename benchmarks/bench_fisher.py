"""Gauss-Newton and Fisher quantities side by side with BackPACK and curvlinops: per-sample
GGN diagonals, the Monte-Carlo Fisher diagonal, K-FAC set-up and a damped CG solve.

    nice python -m benchmarks.bench_fisher [--repeats 9] [--problems simplenet,mlp5k,...]

One thread, float32, medians of ``--repeats`` rounds timed round-robin within each
task, in milliseconds and in units of one gradient (``torch.autograd.grad`` of the loss,
forward included). Tasks and what they are beside:

* ``GGN diagonal``: ``ggn_diag(g, loss_fn)`` and BackPACK's ``DiagGGNExact``;
* ``per-sample GGN diagonal``: ``ggn_diag(g, loss_fn, per_sample=True)`` (the function
  built once, as a training loop would; its first call captures the graph) and BackPACK's
  ``BatchDiagGGNExact`` (scaled by N: BackPACK gives each sample's share of the mean);
* ``MC Fisher diagonal``: ``fisher_diag(g, loss_fn, kind="mc")`` (one draw a sample)
  and BackPACK's ``DiagGGNMC`` (one draw);
* ``K-FAC set-up``: ``KFACOperator`` with ``fisher="exact"`` and ``"mc"`` (factors
  computed), curvlinops' ``KFACLinearOperator`` (``type-2`` and ``mc``, factors computed
  by ``compute_kronecker_factors``), BackPACK's ``KFLR`` and ``KFAC`` (one backward);
* ``EKFAC set-up, exact``: ``KFACOperator(eigenvalue_correction=True)`` and curvlinops'
  ``EKFACLinearOperator`` (``type-2``; factors and eigenvalue correction computed);
* ``CG solve``: ``GGNOperator.solve(b, damping, tol=1e-6)`` with the operator built once,
  and curvlinops' ``CGInverseLinearOperator`` of ``GGNLinearOperator + damping I``
  (GPyTorch's ``linear_cg``, ``tolerance=1e-6``, its default cap of 1,000 steps), both
  on the same ``b`` (at most 3 rounds); the relative residual each reaches is measured
  with hessfunc's own products and printed.

Problems: the four of ``benchmarks/problems.py`` and ``wide_cnn`` (3-16-16 channels).
Agreement printed beside the times: the exact quantities (per-sample GGN diagonals,
exact K-FAC products) against BackPACK's and curvlinops' (max relative difference);
the Monte-Carlo ones are draws and are not compared.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import torch

import hessfunc as hf

from . import _cli
from ._timing import interleaved_medians
from .problems import PROBLEMS, Problem, loss_module, wide_cnn

ALL = {**PROBLEMS, "wide_cnn": wide_cnn}

DAMPING = 1e-1
TOL = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _backpack_cases(problem: Problem) -> dict[str, Any]:
    try:
        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR, BatchDiagGGNExact, DiagGGNExact, DiagGGNMC
    except ImportError:
        return {}
    model = extend(copy.deepcopy(problem.model))  # BackPACK's hooks stay on its own copy
    loss = extend(loss_module(problem))

    def run(ext: Any, attr: str) -> Any:
        def call() -> list[torch.Tensor]:
            model.zero_grad()
            with backpack(ext), warnings.catch_warnings():
                # BackPACK's hooks on a first layer whose input needs no gradient
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                loss(model(problem.x), problem.y).backward()
            return [getattr(p, attr) for p in model.parameters()]
        return call

    return {"GGN diagonal": ("BackPACK DiagGGNExact", run(DiagGGNExact(), "diag_ggn_exact")),
            "per-sample GGN diagonal": ("BackPACK BatchDiagGGNExact",
                                        run(BatchDiagGGNExact(), "diag_ggn_exact_batch")),
            "MC Fisher diagonal": ("BackPACK DiagGGNMC", run(DiagGGNMC(), "diag_ggn_mc")),
            "K-FAC set-up, exact": ("BackPACK KFLR", run(KFLR(), "kflr")),
            "K-FAC set-up, mc": ("BackPACK KFAC", run(KFAC(), "kfac"))}


def _curvlinops() -> Any:
    try:
        import curvlinops as cl
        from curvlinops.examples import IdentityLinearOperator
    except ImportError:
        return None
    return cl, IdentityLinearOperator


def run(keys: list[str], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        problem = ALL[key]()
        model, x, y = problem.model, problem.x, problem.y
        loss_fn = loss_module(problem)  # the Fisher needs a loss it knows the likelihood of
        n = x.shape[0]
        leaves = list(model.parameters())
        g, params = hf.functionalize(model)
        gen = torch.Generator().manual_seed(0)
        theirs = _backpack_cases(problem)
        cl = _curvlinops()
        gradient = lambda: torch.autograd.grad(loss_fn(model(x), y), leaves)  # noqa: E731
        ggn_op = hf.GGNOperator(g, loss_fn, params, (x, y))
        b = torch.randn(ggn_op.shape[0], generator=gen)
        ggn_diagonal = hf.ggn_diag(g, loss_fn)  # built once, as in a loop
        per_sample_ggn = hf.ggn_diag(g, loss_fn, per_sample=True)
        mc_fisher = hf.fisher_diag(g, loss_fn, kind="mc", generator=gen)
        tasks: dict[str, dict[str, Any]] = {
            "GGN diagonal": {"hessfunc ggn_diag": lambda: ggn_diagonal(params, x, y)},
            "per-sample GGN diagonal": {
                "hessfunc ggn_diag(per_sample=True)": lambda: per_sample_ggn(params, x, y)},
            "MC Fisher diagonal": {
                "hessfunc fisher_diag(kind='mc')": lambda: mc_fisher(params, x, y)},
            "K-FAC set-up, exact": {
                "hessfunc KFACOperator(fisher='exact')":
                    lambda: hf.KFACOperator(model, loss_fn, (x, y), fisher="exact")},
            "K-FAC set-up, mc": {
                "hessfunc KFACOperator(fisher='mc')":
                    lambda: hf.KFACOperator(model, loss_fn, (x, y), fisher="mc", seed=0)},
            "EKFAC set-up, exact": {
                "hessfunc KFACOperator(eigenvalue_correction=True)":
                    lambda: hf.KFACOperator(model, loss_fn, (x, y), fisher="exact",
                                            eigenvalue_correction=True)},
            "CG solve": {
                "hessfunc GGNOperator.solve":
                    lambda: ggn_op.solve(b, damping=DAMPING, tol=TOL)},
        }
        for task, (name, fn) in theirs.items():
            tasks[task][name] = fn
        agreement: dict[str, float] = {}
        if cl is not None:
            cl_mod, Identity = cl
            for kind, task in (("type-2", "K-FAC set-up, exact"), ("mc", "K-FAC set-up, mc")):
                def kfac(kind: str = kind) -> Any:
                    op = cl_mod.KFACLinearOperator(
                        model, loss_fn, leaves, [(x, y)], check_deterministic=False,
                        fisher_type=kind, separate_weight_and_bias=False)
                    op.compute_kronecker_factors()
                    return op
                tasks[task]["curvlinops KFACLinearOperator"] = kfac

            def ekfac() -> Any:
                op = cl_mod.EKFACLinearOperator(
                    model, loss_fn, leaves, [(x, y)], check_deterministic=False,
                    fisher_type="type-2", separate_weight_and_bias=False)
                op.compute_kronecker_factors()
                op.compute_eigenvalue_correction()
                return op
            tasks["EKFAC set-up, exact"]["curvlinops EKFACLinearOperator"] = ekfac
            ggn_cl = cl_mod.GGNLinearOperator(model, loss_fn, leaves, [(x, y)],
                                              check_deterministic=False)
            damped = ggn_cl + DAMPING * Identity([tuple(p.shape) for p in leaves],
                                                  b.device, b.dtype)
            inverse = cl_mod.CGInverseLinearOperator(damped, tolerance=TOL)  # max_iter 1000
            tasks["CG solve"]["curvlinops CGInverseLinearOperator"] = lambda: inverse @ b
            # agreement of the exact quantities
            v = torch.randn(ggn_op.shape[0], generator=gen)
            agreement["K-FAC exact products vs curvlinops"] = _rel(
                hf.KFACOperator(model, loss_fn, (x, y)) @ v, tasks["K-FAC set-up, exact"][
                    "curvlinops KFACLinearOperator"]() @ v)
            agreement["EKFAC exact products vs curvlinops"] = _rel(
                hf.KFACOperator(model, loss_fn, (x, y), eigenvalue_correction=True) @ v,
                ekfac() @ v)
        for name, solve in tasks["CG solve"].items():
            sol = solve()
            agreement[f"residual reached: {name}"] = float(
                (ggn_op @ sol + DAMPING * sol - b).norm() / b.norm())
        if "per-sample GGN diagonal" in theirs:
            ours = per_sample_ggn(params, x, y)
            bp = theirs["per-sample GGN diagonal"][1]()
            scale = n if loss_fn.reduction == "mean" else 1
            agreement["per-sample GGN diagonal vs BackPACK"] = max(
                _rel(o.reshape(n, -1), scale * t.reshape(n, -1))
                for o, t in zip(ours.values(), bp, strict=True))
        row: dict[str, Any] = {"problem": problem.name, "params": ggn_op.shape[0],
                               "agreement": agreement, "tasks": {}}
        for task, cases in tasks.items():  # the unit timed in every task's rounds
            rounds = min(repeats, 3) if task == "CG solve" else repeats  # solves are long
            times = interleaved_medians({"gradient": gradient, **cases}, repeats=rounds,
                                        warmup=1)
            unit = times.pop("gradient")
            row["tasks"][task] = {"gradient ms": unit * 1e3, **{
                name: ({"ms": t * 1e3, "gradients": t / unit} if isinstance(t, float) else t)
                for name, t in times.items()}}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    return rows


def main() -> None:
    _cli.main(__doc__, run, default="simplenet,mlp5k,mlp100k,cnn,wide_cnn", repeats=9)


if __name__ == "__main__":
    main()
