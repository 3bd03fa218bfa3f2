"""Stochastic Lanczos quadrature: the spectral density of a symmetric operator.

The spectral density of a symmetric ``A`` of shape ``(n, n)`` with eigenpairs
``(lambda_i, u_i)`` is ``phi(t) = (1/n) sum_i delta(t - lambda_i)``. For a unit
probe ``v`` with ``E[v v^T] = I / n``,

    E[v^T f(A) v] = (1/n) sum_i f(lambda_i) = integral of f against phi,

and ``v^T f(A) v = sum_i (u_i^T v)^2 f(lambda_i)`` is an integral against a
probe's own spectral measure. ``m`` Lanczos steps from ``v`` give the Gauss
quadrature rule of that measure (Golub and Meurant): the nodes ``theta_j`` are
the eigenvalues of the tridiagonal ``T_m``, the weights ``w_j = (e_1^T y_j)^2``
the squared first components of its unit eigenvectors, which sum to 1, and

    sum_j w_j theta_j^p = e_1^T T_m^p e_1 = v^T A^p v     for p <= 2m - 1.

Averaging the rules of several probes estimates ``phi``; replacing each delta by
a Gaussian of width ``sigma`` makes it a smooth density on a grid (Ubaru, Chen
and Saad 2017; Ghorbani, Krishnan and Xiao 2019, as in PyHessian):

    density(t) = (1/R) sum_r sum_j w_rj N(t; theta_rj, sigma^2).

Probes are normalised Rademacher vectors (``v^T v`` is then the same for all)
or normalised Gaussian ones; both make ``E[v v^T] = I / n``, so the averaged
quadrature moments estimate ``tr(A^p) / n`` without bias for ``p <= 2m - 1``.

NOTE [probes until the density is known]: the probes' densities ``d_r(t)`` are
independent draws of one random function, so the standard error of their mean at
``t`` is ``s(t) / sqrt(R)``, ``s`` their sample standard deviation. Its integral over
the grid, ``int s(t) dt / sqrt(R)``, is the typical error of any mass read off the
density (the share of eigenvalues in an interval), on the scale of the total mass 1:
:meth:`SpectralDensity.standard_error`. With ``tol``, probes run one batch at a time
from three (the fewest that estimate ``s``) until that error is at most ``tol`` or
``num_probes`` have run. For a Hessian of many parameters most of the mass sits in a
bulk every probe sees alike, so a few probes suffice (docs/benchmarks.md).

References:
    S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic
    Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017.

    B. Ghorbani, S. Krishnan and Y. Xiao, "An investigation into neural net
    optimization via Hessian eigenvalue density", ICML 2019.

    G. H. Golub and G. Meurant, "Matrices, Moments and Quadrature with
    Applications", Princeton University Press, 2010.

Example (eigenvalues -1, -1, 1, 1: with Rademacher probes every quadrature rule
has mean 0 and second moment 1, and the density has half its mass near each
eigenvalue)::

    >>> import torch
    >>> d = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    >>> sd = spectral_density(lambda V: d[:, None] * V, 4, num_probes=3, num_steps=2,
    ...                       generator=torch.Generator().manual_seed(0),
    ...                       dtype=torch.float64)
    >>> [round(x, 10) + 0.0 for x in sd.moments((0, 1, 2)).tolist()]
    [1.0, 0.0, 1.0]
    >>> left = sd.grid < 0
    >>> round(float(torch.trapezoid(sd.density[left], sd.grid[left])), 3)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from hessfunc.errors import ArgumentError
from hessfunc.estimators._probes import (
    DISTRIBUTIONS,
    Matmat,
    Operator,
    check_batch_size,
    check_choice,
    check_int,
    check_positive_float,
    split_columns,
)
from hessfunc.estimators.lanczos import _LanczosRun, _tridiagonal_eigh, _unit_columns

__all__ = ["SpectralDensity", "spectral_density", "quadrature_moments"]

_DEFAULT_RELATIVE_SIGMA = 0.01
_PAD_IN_SIGMAS = 6.0
#: Probes before the standard error is read (``tol``): the fewest that estimate a spread.
FEWEST_PROBES = 3


class SpectralDensity(NamedTuple):
    """A smoothed spectral density and the quadrature rules behind it.

    Attributes:
        grid: ``(num_points,)`` evaluation points, ascending.
        density: ``(num_points,)`` the density on ``grid``; it integrates to 1
            when the grid spans the nodes and its spacing is below ``sigma``.
        nodes: ``(num_probes, m)`` Ritz values of each probe's tridiagonal (and a
            last column of zeros with ``num_zeros``).
        weights: ``(num_probes, m)`` their Gauss weights, each row summing to 1.
        sigma: the absolute Gaussian width used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float

    def standard_error(self) -> float:
        """The integrated standard error of ``density`` over ``grid`` (NOTE [probes until
        the density is known]): on the scale of the total mass 1; ``nan`` for one probe."""
        return _integrated_error(self.grid, self.nodes, self.weights, self.sigma)

    def moments(self, powers: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
        """Estimates of ``tr(A^p) / size``, ``(len(powers),)``: the probe average of
        :func:`quadrature_moments`."""
        return quadrature_moments(self.nodes, self.weights, powers).mean(dim=0)


def spectral_density(
    matmat: Matmat,
    size: int,
    *,
    num_probes: int | None = None,
    num_steps: int = 64,
    num_points: int = 1024,
    grid: torch.Tensor | None = None,
    sigma: float | None = None,
    relative_sigma: float | None = None,
    distribution: str = "rademacher",
    probes: torch.Tensor | None = None,
    batch_size: int | None = None,
    num_zeros: int = 0,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Estimate the spectral density of the symmetric operator ``A`` by stochastic
    Lanczos quadrature.

    Args:
        matmat: maps a ``(size, k)`` tensor ``V`` to ``A @ V``; called with the
            probes of a batch together, one Lanczos step at a time.
        size: the operator's side length ``n``.
        num_probes: random probes ``R >= 1``; ``None``: 10 (or the columns of ``probes``).
        num_steps: Lanczos steps ``m`` per probe, capped at ``size`` (where the
            quadrature is exact); the basis takes ``(size, m)`` memory per probe.
        num_points: size of the grid made when ``grid`` is ``None``: evenly spaced
            over ``[min node - 6 sigma, max node + 6 sigma]``.
        grid: ``(num_points,)`` ascending points to evaluate the density on instead.
        sigma: absolute width of the Gaussian put on each node.
        relative_sigma: width as a fraction of the spread of the nodes
            (``max - min``; their largest magnitude, or 1, if that is 0). Give
            ``sigma`` or ``relative_sigma``, not both; neither means
            ``relative_sigma=0.01``.
        distribution: of the random probes, ``"rademacher"`` or ``"gaussian"``;
            they are normalised to unit length.
        probes: ``(size, R)`` probe vectors to use instead of random ones
            (normalised here).
        batch_size: at most this many probes run through ``matmat`` together;
            ``None``: all of them.
        num_zeros: the density wanted is that of ``A`` and ``num_zeros`` further exact
            zero eigenvalues (an operator restricted away from a known null space):
            every rule gets a node at 0 with weight ``num_zeros / (size + num_zeros)``
            and its other weights scaled by ``size / (size + num_zeros)``.
        tol: run probes one batch at a time, from three, until the density's integrated
            standard error (:meth:`SpectralDensity.standard_error`) is at most ``tol``;
            ``num_probes`` is then the most that run (NOTE [probes until the density is
            known]). ``None``: every probe runs.
        generator: source of the probes (and of restart vectors, see
            :func:`hessfunc.estimators.lanczos`); the same state gives the same result.
        dtype: of the vectors; default from ``probes``, else torch's default dtype.
        device: of the vectors; default from ``probes``, else the generator's.

    Returns:
        :class:`SpectralDensity`.
    """
    caller = "spectral_density"
    op = Operator.from_args(
        caller,
        matmat,
        size,
        dtype=dtype,
        device=device,
        generator=generator,
        like=probes,
        like_name="probes",
        like_shape="(size, num_probes)",
    )
    num_steps = min(check_int(num_steps, "num_steps", caller), op.size)
    batch_size = check_batch_size(batch_size, caller)
    num_zeros = check_int(num_zeros, "num_zeros", caller, minimum=0)
    if sigma is not None and relative_sigma is not None:
        raise ArgumentError(
            f"{caller}(): got both sigma={sigma!r} and relative_sigma={relative_sigma!r}. "
            f"Pass only one: sigma is absolute, relative_sigma a fraction of the spread."
        )
    if sigma is not None:
        sigma = check_positive_float(sigma, "sigma", caller)
    if relative_sigma is not None:
        relative_sigma = check_positive_float(relative_sigma, "relative_sigma", caller)
    if tol is not None:
        tol = check_positive_float(tol, "tol", caller)
    if grid is None:
        num_points = check_int(num_points, "num_points", caller, minimum=2)
    else:
        grid = _check_grid(grid, op, caller)

    if probes is None:
        num_probes = 10 if num_probes is None else check_int(num_probes, "num_probes", caller)
        distribution = check_choice(distribution, "distribution", DISTRIBUTIONS, caller)
        probes = op.probes(num_probes, distribution, generator)
    elif num_probes is not None and num_probes != probes.shape[-1]:
        raise ArgumentError(
            f"{caller}(): num_probes={num_probes!r} disagrees with the {probes.shape[-1]} "
            f"columns of probes. Drop num_probes when passing probes."
        )
    probes = _unit_columns(probes, (op.size, probes.shape[-1]), "probes", caller)

    def density_of(nodes: torch.Tensor, weights: torch.Tensor) -> SpectralDensity:
        if num_zeros:
            share = num_zeros / (op.size + num_zeros)
            nodes = torch.cat([nodes, nodes.new_zeros(nodes.shape[0], 1)], dim=1)
            weights = torch.cat([weights * (1 - share),
                                 weights.new_full((weights.shape[0], 1), share)], dim=1)
        width = sigma or _relative_width(nodes, relative_sigma or _DEFAULT_RELATIVE_SIGMA)
        points = grid
        if points is None:
            pad = _PAD_IN_SIGMAS * width
            lower, upper = float(nodes.min()) - pad, float(nodes.max()) + pad
            points = torch.linspace(lower, upper, num_points, dtype=op.dtype, device=op.device)
        return SpectralDensity(points, _gaussian_mixture(points, nodes, weights, width),
                               nodes, weights, width)

    if tol is None:
        return density_of(*_gauss_quadrature(op, probes, num_steps, batch_size, generator))
    rules: list[tuple[torch.Tensor, torch.Tensor]] = []
    done = 0
    while True:  # NOTE [probes until the density is known]
        step = max(FEWEST_PROBES - done, 1) if batch_size is None else batch_size
        block = probes[:, done:done + step]
        rules.append(_gauss_quadrature(op, block, num_steps, batch_size, generator))
        done += block.shape[1]
        found = density_of(torch.cat([n for n, _ in rules]), torch.cat([w for _, w in rules]))
        if done >= probes.shape[1] or (done >= FEWEST_PROBES and found.standard_error() <= tol):
            return found


def quadrature_moments(
    nodes: torch.Tensor, weights: torch.Tensor, powers: Sequence[int] = (0, 1, 2)
) -> torch.Tensor:
    """Moments ``sum_j w_j theta_j^p`` of quadrature rules.

    Args:
        nodes: ``(..., m)`` Ritz values, e.g. :attr:`SpectralDensity.nodes`.
        weights: ``(..., m)`` quadrature weights, e.g. :attr:`SpectralDensity.weights`.
        powers: non-negative integer powers ``p``.

    Returns:
        ``(..., len(powers))``. For the rule of a unit probe ``v`` after ``m``
        Lanczos steps, entry ``p`` equals ``v^T A^p v`` for ``p <= 2m - 1``; the
        mean over random probes estimates ``tr(A^p) / size``.
    """
    caller = "quadrature_moments"
    if nodes.shape != weights.shape:
        raise ArgumentError(
            f"{caller}(): expected nodes and weights of one shape, got {tuple(nodes.shape)} "
            f"and {tuple(weights.shape)}. Pass the pair from one SpectralDensity."
        )
    powers = [check_int(p, "powers", caller, minimum=0) for p in powers]
    return torch.stack([(weights * nodes**p).sum(dim=-1) for p in powers], dim=-1)


def _gauss_quadrature(
    op: Operator,
    probes: torch.Tensor,
    num_steps: int,
    batch_size: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights ``(R, m)`` of the Gauss rule of each probe's spectral measure."""
    nodes, weights = [], []
    for block in probes.split(split_columns(probes.shape[1], batch_size), dim=1):
        run = _LanczosRun(
            op,
            block,
            reorthogonalize="semi",  # NOTE [semi-orthogonality]
            keep_basis=False,
            generator=generator,
            capacity=num_steps,
        )
        for _ in range(num_steps):
            run.step()
        alphas, offdiag, _ = run.coefficients()
        theta, vectors = _tridiagonal_eigh(alphas.T, offdiag.T)
        nodes.append(theta)
        weights.append(vectors[..., 0, :] ** 2)
    return torch.cat(nodes).to(op.dtype), torch.cat(weights).to(op.dtype)


def _integrated_error(grid: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor,
                      sigma: float) -> float:
    """``int s(t) dt / sqrt(R)`` over ``grid``, ``s`` the sample standard deviation of
    the ``R`` probes' densities (NOTE [probes until the density is known])."""
    R = nodes.shape[0]
    if R < 2:
        return math.nan
    each = torch.stack([_gaussian_mixture(grid, nodes[r:r + 1], weights[r:r + 1], sigma)
                        for r in range(R)])
    return float(torch.trapezoid(each.std(dim=0) / math.sqrt(R), grid))


def _relative_width(nodes: torch.Tensor, fraction: float) -> float:
    """``fraction`` of the spread of the nodes (their magnitude, or 1, if they coincide)."""
    spread = float(nodes.max() - nodes.min())
    if spread == 0.0:
        spread = float(nodes.abs().max()) or 1.0
    return fraction * spread


def _gaussian_mixture(
    grid: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``(1/R) sum_r sum_j w_rj N(grid; theta_rj, sigma^2)``, one probe at a time."""
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    density = torch.zeros_like(grid)
    for theta, w in zip(nodes, weights, strict=True):
        z = (grid[:, None] - theta[None, :]) / sigma
        density = density + torch.exp(-0.5 * z * z) @ w
    return density * (norm / nodes.shape[0])


def _check_grid(grid: object, op: Operator, caller: str) -> torch.Tensor:
    """``grid`` as an ascending 1-D tensor of the operator's dtype and device."""
    if not isinstance(grid, torch.Tensor) or grid.ndim != 1 or grid.numel() < 2:
        got = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise ArgumentError(
            f"{caller}(): expected grid to be a 1-D tensor of at least 2 points, got {got}. "
            f"Pass e.g. grid=torch.linspace(-1, 1, 512), or grid=None with num_points."
        )
    grid = grid.to(dtype=op.dtype, device=op.device)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ArgumentError(
            f"{caller}(): expected grid to be strictly ascending. Sort it, e.g. grid.sort()."
        )
    return grid
