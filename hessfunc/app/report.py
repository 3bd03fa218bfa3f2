"""A curvature report of a loss at a point: the numbers both commands print and save."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import reference
from ..dense import hessian_blocks
from ..diagonal import hessian_diag
from ..estimators.slq import FEWEST_PROBES
from ..graph.curvature import plan_diagonal
from ..operators import HessianOperator

#: The spectral density's probes when not given: from slq.FEWEST_PROBES until its
#: integrated standard error is at most DENSITY_TOL (2 % of the mass), at most
#: DENSITY_MAX_PROBES (NOTE [probes until the density is known]).
DENSITY_TOL = 0.02
DENSITY_MAX_PROBES = 10
#: The loop oracle is run for comparison only up to this many parameters.
ORACLE_MAX_PARAMS = 20_000
#: Per-parameter blocks are computed up to this many entries in all.
BLOCKS_MAX_ENTRIES = 4_000_000
#: The generic exact diagonal (one HVP per parameter) is used up to this size.
GENERIC_DIAG_MAX_PARAMS = 5_000


def _timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    """Result and median wall time (seconds) of ``fn`` over ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


@dataclass
class CurvatureReport:
    """Everything the report prints, as plain numbers (``to_json``) plus tensors for plots."""

    numbers: dict[str, Any] = field(default_factory=dict)
    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)
    eigenvalues: list[float] = field(default_factory=list)
    density_grid: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)

    def to_json(self, path: Path) -> None:
        payload = dict(self.numbers)
        payload["top_eigenvalues"] = self.eigenvalues
        payload["spectral_density"] = {"grid": self.density_grid, "density": self.density}
        payload["diagonal"] = {k: v.detach().cpu().double().reshape(-1).tolist()
                               for k, v in self.diagonal.items()}
        path.write_text(json.dumps(payload, indent=2))


def _structured_diagonal(f: Any, params: dict[str, torch.Tensor], batch: Any) -> bool:
    """Whether the exact diagonal of ``f`` over ``batch`` takes a structured route for
    every parameter (the captured graph)."""
    plan, _ = plan_diagonal(f, (params, *batch))
    return plan is not None and not plan.products


def _remembering(matmat: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``matmat`` that keeps its first product and returns it again for the same probes."""
    first: list[torch.Tensor] = []

    def remembered(V: torch.Tensor) -> torch.Tensor:
        if first and first[0].shape == V.shape and torch.equal(first[0], V):
            return first[1]
        out = matmat(V)
        if not first:
            first[:] = [V.clone(), out]
        return out

    return remembered


class _Stages:
    """One progress line per stage of the whole report, with an estimate of the time
    left: each stage's cost in gradient passes (a product counts two), scaled by the
    measured time of a gradient pass and by how far the finished stages were off."""

    def __init__(self, costs: dict[str, float], enabled: bool) -> None:
        self.costs, self.enabled = costs, enabled
        self.start = time.perf_counter()
        self.unit: float | None = None  # seconds per gradient pass
        self.done: list[str] = []

    def begin(self, name: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = ""
        if self.unit is not None:
            spent = sum(self.costs[s] for s in self.done) * self.unit
            scale = elapsed / spent if spent > 0 else 1.0
            rest = sum(c for s, c in self.costs.items() if s not in self.done)
            left = f", about {format_duration(rest * self.unit * scale)} left"
        step = len(self.done) + 1
        print(f"[{step}/{len(self.costs)}] {name} ({format_duration(elapsed)} elapsed{left})",
              file=sys.stderr, flush=True)

    def end(self, name: str, unit: float | None = None) -> None:
        self.done.append(name)
        if unit is not None:
            self.unit = unit


def curvature_report(f: Any, params: dict[str, torch.Tensor], data: Any, *, top_k: int = 5,
                     hutchinson_samples: int = 100, density_probes: int | None = None,
                     density_steps: int = 40, density_tol: float = DENSITY_TOL,
                     eigen_max_steps: int | None = None,
                     seed: int = 0, compare_oracle: bool = True,
                     progress: bool = False, process_group: Any = None) -> CurvatureReport:
    """Compute the report of ``f`` at ``params`` over ``data`` (batches of ``(x, y)``).

    ``hutchinson_samples`` probes for the stochastic trace (and the diagonal where it is
    estimated), ``density_probes`` x ``density_steps`` Lanczos steps for the spectral
    density (``None``: from 3 probes up to ``DENSITY_MAX_PROBES`` until the density's
    integrated standard error is at most ``density_tol``, NOTE [probes until the density
    is known]), at most ``eigen_max_steps`` for the top eigenvalues. With ``progress``, a
    line per stage with the time left for the whole report, and a bar per data pass.

    With ``process_group``, ``data`` is this rank's shard and every number is of the
    whole data set, the same on every rank (``HessianOperator``'s NOTE [sharded data]);
    the oracle comparison and the per-parameter blocks, which need the data as one
    batch, are left out.
    """
    rep = CurvatureReport()
    num = rep.numbers
    op = HessianOperator(f, params, data, progress=progress, process_group=process_group)
    P = op.shape[0]
    num["num_params"] = P
    num["num_samples"] = op.num_samples
    num["world_size"] = op.world_size
    num["dtype"] = str(op.dtype).replace("torch.", "")
    num.update(hutchinson_samples=hutchinson_samples, density_probes=density_probes,
               density_steps=min(density_steps, P), eigen_max_steps=eigen_max_steps)
    k = max(1, min(top_k, P - 1))
    stages = _Stages({"gradient": 1.0, "diagonal": 2.0 * hutchinson_samples,
                      "eigenvalues": 2.0 * (eigen_max_steps or 20 + 10 * k),
                      "trace": 2.0 * hutchinson_samples,
                      "density": 2.0 * (density_probes or FEWEST_PROBES)
                      * min(density_steps, P)},
                     progress and op._group.rank == 0)
    stages.begin("gradient")
    t0 = time.perf_counter()
    batches = list(op._passes("batches")) if op.num_batches == 1 else None
    g, loss = op.grad_and_value()
    stages.end("gradient", time.perf_counter() - t0)
    stages.begin("diagonal")
    num["loss"] = float(loss)
    num["grad_norm"] = float(g.norm())
    # exact diagonal: structured or generic route, or Hutchinson's estimate for large P
    one_batch = batches[0][2] if batches else None
    if op.world_size == 1:
        structured = one_batch is not None and _structured_diagonal(f, params, one_batch)
    else:  # every rank must take the same branch: decided from every rank's first batch
        first = next(iter(op._batches))
        structured = all(op._group.exchange(
            "diagonal route", lambda: _structured_diagonal(f, params, first)))
    if structured or P <= GENERIC_DIAG_MAX_PARAMS:
        if one_batch is not None:
            diag, t_fast = _timed(lambda: hessian_diag(f)(params, *one_batch))
            diag_flat = _flat(diag)
        else:
            diag_flat, t_fast = _timed(op.diagonal, repeats=1)
            diag = op.flat_to_params(diag_flat)
        num["diagonal_method"] = "exact (structured)" if structured else "exact (generic)"
        num["diagonal_time_s"] = t_fast
    else:
        # the trace below draws the same probes (same seed and count): one pass serves both
        op.matmat = _remembering(op.matmat)  # type: ignore[method-assign]
        stages.costs["trace"] = 0.0
        diag_flat, t_fast = _timed(lambda: op.diagonal("hutchinson", num_samples=hutchinson_samples,
                                                       seed=seed), repeats=1)
        diag = op.flat_to_params(diag_flat)
        num["diagonal_method"] = f"Hutchinson estimate ({hutchinson_samples} samples)"
        num["diagonal_time_s"] = t_fast
    rep.diagonal = {name: v.detach() for name, v in diag.items()}
    if compare_oracle and one_batch is not None and P <= ORACLE_MAX_PARAMS:
        def oracle() -> dict[str, torch.Tensor]:
            leaves = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
            return reference.hessian_diag(f(leaves, *one_batch), leaves)

        ref, t_ref = _timed(oracle, repeats=1)
        ref_flat = _flat(ref)
        num["oracle_diagonal_time_s"] = t_ref
        num["diagonal_speedup"] = t_ref / t_fast if t_fast > 0 else math.inf
        denom = float(ref_flat.abs().max()) or 1.0
        num["diagonal_max_rel_error"] = float((diag_flat - ref_flat).abs().max()) / denom
    # per-parameter blocks
    if one_batch is not None and sum(t.numel() ** 2 for t in params.values()) <= BLOCKS_MAX_ENTRIES:
        blocks = hessian_blocks(f)(params, *one_batch)
        num["blocks"] = {k: {"shape": list(b.shape), "frobenius_norm": float(b.norm()),
                             "diag_norm": float(b.diagonal().norm())} for k, b in blocks.items()}
    stages.end("diagonal")
    # spectrum
    stages.begin("eigenvalues")
    eig, t_eig = _timed(lambda: op.eigen(k, seed=seed, max_steps=eigen_max_steps), repeats=1)
    stages.end("eigenvalues")
    rep.eigenvalues = [float(v) for v in eig.eigenvalues]
    num["eigen_time_s"] = t_eig
    num["eigen_matvecs"] = eig.num_matvecs
    num["eigen_converged"] = bool(eig.converged)
    num["trace_exact"] = float(diag_flat.sum()) if "exact" in num["diagonal_method"] else None
    stages.begin("trace")
    est = op.trace("hutchinson", num_samples=hutchinson_samples, seed=seed)
    stages.end("trace")
    stages.begin("density")
    num["trace_hutchinson"] = float(est.estimate)
    num["trace_hutchinson_std_error"] = float(est.std_error)
    sd = op.spectral_density(num_probes=density_probes or DENSITY_MAX_PROBES,
                             num_steps=min(density_steps, P), seed=seed,
                             tol=None if density_probes else density_tol)
    rep.density_grid = [float(t) for t in sd.grid]
    rep.density = [float(t) for t in sd.density]
    num["density_integral"] = float(torch.trapezoid(sd.density, sd.grid))
    num["density_probes_run"] = int(sd.nodes.shape[0])
    num["density_standard_error"] = sd.standard_error()
    stages.end("density")
    return rep


def format_table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table, wide enough for every value (nothing is cut)."""
    width = max(len(k) for k, _ in rows)
    values = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (values + 2) + "+"
    out = [line]
    for k, v in rows:
        out.append(f"| {k.ljust(width)} | {v.ljust(values)} |")
    out.append(line)
    return "\n".join(out)


def format_duration(seconds: float) -> str:
    """A time in the unit a person reads: ``850 us``, ``12.3 ms``, ``4.56 s``, ``3 min 42 s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 60.0:
        return f"{seconds:.3g} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def report_rows(rep: CurvatureReport) -> list[tuple[str, str]]:
    n = rep.numbers
    rows = [("parameters", f"{n['num_params']:,}"), ("samples", f"{n['num_samples']:,}"),
            ("processes (world size)", f"{n.get('world_size', 1)}"),
            ("loss", f"{n['loss']:.6g}"), ("gradient norm", f"{n['grad_norm']:.6g}"),
            ("diagonal", n["diagonal_method"]),
            ("diagonal time", format_duration(n["diagonal_time_s"]))]
    if "oracle_diagonal_time_s" in n:
        rows += [("oracle loop time", format_duration(n["oracle_diagonal_time_s"])),
                 ("speed-up vs oracle", f"{n['diagonal_speedup']:.1f}x"),
                 ("max rel. difference", f"{n['diagonal_max_rel_error']:.2e}")]
    for name, b in n.get("blocks", {}).items():
        rows.append((f"block {name}", f"{b['shape'][0]}x{b['shape'][1]}, "
                                      f"||.||_F={b['frobenius_norm']:.4g}"))
    rows += [("top eigenvalues", ", ".join(f"{v:.5g}" for v in rep.eigenvalues)),
             ("Lanczos matvecs", f"{n['eigen_matvecs']} ({format_duration(n['eigen_time_s'])})")]
    if n["trace_exact"] is not None:
        rows.append(("trace (exact)", f"{n['trace_exact']:.6g}"))
    rows += [("trace (Hutchinson)", f"{n['trace_hutchinson']:.6g} "
                                    f"+- {n['trace_hutchinson_std_error']:.2g}"),
             ("density integral", f"{n['density_integral']:.4f}"),
             ("density probes", f"{n['density_probes_run']}, integrated standard error "
                                f"{n['density_standard_error']:.2g}")]
    return rows
