"""The report's figures (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .report import CurvatureReport, format_table, report_rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fit(path: Path, x: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor) -> None:
    """Target function vs the network's prediction."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = x.detach().cpu().reshape(-1).numpy()
    ax.plot(xs, target.detach().cpu().reshape(-1).numpy(), label="target", color="tab:blue")
    ax.plot(xs, prediction.detach().cpu().reshape(-1).numpy(), label="prediction",
            color="tab:red")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("2x + 3 + 3 sin(x) sqrt|x| + cos(x + 3): target vs fit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_spectrum(path: Path, rep: CurvatureReport) -> None:
    """Eigenvalue density (stochastic Lanczos quadrature) with the top eigenvalues marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    floor = max(rep.density) * 1e-6
    ax.semilogy(rep.density_grid, [max(d, floor) for d in rep.density], color="tab:blue",
                label="density (SLQ, Gaussian broadening)")
    ax.set_ylim(bottom=floor * 2)
    for i, lam in enumerate(rep.eigenvalues):
        ax.axvline(lam, color="tab:red", linestyle="--", linewidth=0.8,
                   label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("Hessian spectrum")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, rep: CurvatureReport, log: Any,
                  fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> dict[str, Path]:
    """Write the figures and ``report.json`` to ``out``, print the table and the paths.

    ``fit`` is ``(x, target, prediction)`` for 1-D regression problems (``fit.png``).
    """
    paths = {"spectrum": out / "spectrum.png", "diagonal": out / "diagonal.png",
             "report": out / "report.json"}
    if fit is not None:
        paths = {"fit": out / "fit.png", **paths}
        plot_fit(paths["fit"], *fit)
    plot_spectrum(paths["spectrum"], rep)
    plot_diagonal(paths["diagonal"], rep)
    rep.to_json(paths["report"])
    log(format_table(report_rows(rep)))
    log("Wrote:")
    for p in paths.values():
        log(f"  {p}")
    return paths


def plot_diagonal(path: Path, rep: CurvatureReport) -> None:
    """The Hessian diagonal, one panel entry per parameter tensor (layer)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    offset = 0
    for name, d in rep.diagonal.items():
        vals = d.detach().cpu().double().reshape(-1).numpy()
        idx = range(offset, offset + vals.size)
        ax.scatter(list(idx), vals, s=6, label=name)
        offset += vals.size
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("parameter index (named_parameters order)")
    ax.set_ylabel("d2 L / d p_i^2")
    ax.set_title("Exact Hessian diagonal per layer")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
