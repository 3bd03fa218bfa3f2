"""Hutchinson's stochastic estimators of the trace and the diagonal.

For a symmetric ``A`` of shape ``(n, n)`` and a random vector ``v`` with
``E[v v^T] = I``,

    E[v^T A v] = E[tr(A v v^T)] = tr(A),

so the mean of ``v_i^T A v_i`` over ``N`` independent probes is an unbiased
estimate of ``tr(A)`` (Hutchinson 1989). Its variance per probe is
``2 (||A||_F^2 - sum_i A_ii^2)`` for Rademacher probes and ``2 ||A||_F^2`` for
Gaussian ones; the estimate's standard error falls like ``1 / sqrt(N)``.

The same probes estimate the diagonal (Bekas, Kokiopoulou and Saad 2007):

    diag(A) ~ (sum_i v_i * A v_i) / (sum_i v_i * v_i)      (elementwise)

since ``E[v * A v]_j = sum_k A_jk E[v_j v_k] = A_jj``. With Rademacher probes the
denominator is exactly ``N``, and the estimate is exact for a diagonal ``A``.

References:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", Communications in Statistics -
    Simulation and Computation 18(3), 1989.

    C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a
    matrix", Applied Numerical Mathematics 57(11-12), 2007.

Example (a diagonal matrix, where Rademacher probes are exact)::

    >>> import torch
    >>> d = torch.arange(1.0, 6.0, dtype=torch.float64)
    >>> g = torch.Generator().manual_seed(0)
    >>> est = hutchinson_trace(lambda V: d[:, None] * V, 5, num_samples=8,
    ...                        generator=g, dtype=torch.float64)
    >>> est.estimate, est.std_error, est.num_matvecs
    (tensor(15., dtype=torch.float64), tensor(0., dtype=torch.float64), 8)
    >>> hutchinson_diagonal(lambda V: d[:, None] * V, 5, num_samples=3,
    ...                     generator=g, dtype=torch.float64)
    tensor([1., 2., 3., 4., 5.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from hessfunc.estimators._probes import (
    DISTRIBUTIONS,
    Matmat,
    Operator,
    check_batch_size,
    check_choice,
    check_int,
    split_columns,
)

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchinson_diagonal"]


class TraceEstimate(NamedTuple):
    """A stochastic trace estimate.

    Attributes:
        estimate: 0-dim tensor, the estimate of ``tr(A)``.
        std_error: 0-dim tensor, the standard error of the stochastic part: the
            sample standard deviation of the per-probe values over the square root
            of their number; ``nan`` when only one probe was drawn.
        num_matvecs: how many operator-vector products were spent.
    """

    estimate: torch.Tensor
    std_error: torch.Tensor
    num_matvecs: int


def hutchinson_trace(
    matmat: Matmat,
    size: int,
    *,
    num_samples: int,
    distribution: str = "rademacher",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` as the mean of ``v^T A v`` over random probes ``v``.

    Args:
        matmat: maps a ``(size, k)`` tensor ``V`` to ``A @ V`` (``A`` symmetric). The
            probes come column-major (each column contiguous): reshape ``V``, do not
            ``view`` it.
        size: the operator's side length ``n``.
        num_samples: number of probes ``N >= 1`` (= matvecs spent).
        distribution: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        batch_size: at most this many probes go through ``matmat`` at once,
            bounding memory to ``(size, batch_size)`` blocks; ``None``: all at once.
            Probes are drawn block by block, so the draws depend on it too.
        generator: source of the probes; the same state (and arguments) gives
            the same result.
        dtype: of the probes and the operator; defaults to torch's default dtype.
        device: of the probes and the operator; defaults to the generator's.

    Returns:
        :class:`TraceEstimate` with 0-dim ``estimate`` and ``std_error`` tensors.
    """
    caller = "hutchinson_trace"
    op = Operator.from_args(caller, matmat, size, dtype=dtype, device=device, generator=generator)
    samples = torch.cat(
        [
            (probes * products).sum(dim=0)
            for probes, products in _probe_products(
                op, num_samples, distribution, batch_size, generator
            )
        ]
    )
    estimate, std_error = _mean_with_error(samples)
    return TraceEstimate(estimate, std_error, samples.numel())


def hutchinson_diagonal(
    matmat: Matmat,
    size: int,
    *,
    num_samples: int,
    distribution: str = "rademacher",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Estimate ``diag(A)`` as ``sum_i v_i * A v_i / sum_i v_i * v_i`` over random probes.

    Arguments as in :func:`hutchinson_trace`. Rademacher probes (the default)
    make the denominator exactly ``num_samples`` and give the exact diagonal
    when ``A`` is diagonal; with them the error of entry ``j`` has variance
    ``sum_{k != j} A_jk^2 / num_samples``.

    Returns:
        ``(size,)`` tensor, the diagonal estimate.
    """
    caller = "hutchinson_diagonal"
    op = Operator.from_args(caller, matmat, size, dtype=dtype, device=device, generator=generator)
    numerator = torch.zeros(op.size, dtype=op.dtype, device=op.device)
    denominator = torch.zeros_like(numerator)
    for probes, products in _probe_products(op, num_samples, distribution, batch_size, generator):
        numerator = numerator + (probes * products).sum(dim=1)
        denominator = denominator + (probes * probes).sum(dim=1)
    return numerator / denominator


def _probe_products(
    op: Operator,
    num_samples: int,
    distribution: str,
    batch_size: int | None,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Check the sampling arguments, then yield ``(V, A @ V)`` blocks of probes."""
    num_samples = check_int(num_samples, "num_samples", op.caller)
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS, op.caller)
    batch_size = check_batch_size(batch_size, op.caller)
    for width in split_columns(num_samples, batch_size):
        probes = op.probes(width, distribution, generator)
        yield probes, op(probes)


def _mean_with_error(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of ``samples`` and its standard error (``nan`` for a single sample)."""
    mean = samples.mean()
    if samples.numel() == 1:
        return mean, torch.full_like(mean, float("nan"))
    return mean, samples.std() / samples.numel() ** 0.5
