"""Hutch++: Hutchinson's trace estimator with the dominant subspace deflated.

Hutchinson's estimator has variance of order ``||A||_F^2``, which the few
largest eigenvalues dominate when the spectrum decays. Hutch++ (Meyer, Musco,
Musco and Woodruff 2021) splits a budget of ``m`` operator-vector products in
three:

1. sketch: ``Q = orth(A S)`` for a random ``S`` of shape ``(n, m/3)``; ``Q``
   captures the top eigenvectors of ``A`` (randomised range finder);
2. exact part: ``tr(Q^T A Q)``, with ``m/3`` products ``A Q``;
3. remainder: Hutchinson on the deflated operator ``(I - Q Q^T) A (I - Q Q^T)``
   with the last ``m/3`` probes ``G``.

Since ``tr(A) = tr(Q^T A Q) + tr((I - Q Q^T) A (I - Q Q^T))`` for orthonormal
``Q``, and ``G`` is independent of ``Q``, the sum is unbiased. For a positive
semi-definite ``A`` its relative error falls like ``1/m`` instead of Hutchinson's
``1/sqrt(m)``. When ``m/3`` exceeds the size the sketch is capped at ``size``
columns, ``Q`` spans everything and the estimate is the exact trace.

Reference:
    R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: Optimal
    Stochastic Trace Estimation", Symposium on Simplicity in Algorithms (SOSA),
    2021.

Example (a rank-2 matrix: a sketch of 3 columns captures its range, so the
estimate is its trace 3 + 1 up to rounding)::

    >>> import torch
    >>> d = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    >>> est = hutchpp_trace(lambda V: d[:, None] * V, 6, num_matvecs=9,
    ...                     generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> round(float(est.estimate), 10), est.num_matvecs
    (4.0, 9)
"""

from __future__ import annotations

import torch

from hessfunc.estimators._probes import (
    DISTRIBUTIONS,
    Matmat,
    Operator,
    check_batch_size,
    check_choice,
    check_int,
)
from hessfunc.estimators.hutchinson import TraceEstimate, _mean_with_error

__all__ = ["hutchpp_trace"]


def hutchpp_trace(
    matmat: Matmat,
    size: int,
    *,
    num_matvecs: int,
    distribution: str = "rademacher",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with Hutch++ on a budget of ``num_matvecs`` products.

    Args:
        matmat: maps a ``(size, k)`` tensor ``V`` to ``A @ V`` (``A`` symmetric). The
            probes come column-major (each column contiguous): reshape ``V``, do not
            ``view`` it.
        size: the operator's side length ``n``.
        num_matvecs: the budget ``m >= 3``; the sketch gets
            ``s = min(m // 3, size)`` columns, the exact part ``s`` products and
            the Hutchinson remainder the other ``m - 2 s`` probes.
        distribution: of the sketch and the probes, ``"rademacher"`` or
            ``"gaussian"``.
        batch_size: at most this many columns go through ``matmat`` at once
            (``None``: all at once). The sketch itself is ``(size, s)``.
        generator: source of the random numbers; the same state gives the same result.
        dtype: as in :func:`hessfunc.estimators.hutchinson_trace`.
        device: as in :func:`hessfunc.estimators.hutchinson_trace`.

    Returns:
        :class:`TraceEstimate`; ``std_error`` is the standard error of the
        Hutchinson part (the exact part has none), ``nan`` if it had one probe.
    """
    caller = "hutchpp_trace"
    op = Operator.from_args(caller, matmat, size, dtype=dtype, device=device, generator=generator)
    num_matvecs = check_int(num_matvecs, "num_matvecs", caller, minimum=3)
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS, caller)
    batch_size = check_batch_size(batch_size, caller)

    sketch_size = min(num_matvecs // 3, op.size)
    num_probes = num_matvecs - 2 * sketch_size
    sketch = op.probes(sketch_size, distribution, generator)
    probes = op.probes(num_probes, distribution, generator)

    basis, _ = torch.linalg.qr(op.apply_blocked(sketch, batch_size))
    exact_part = (basis * op.apply_blocked(basis, batch_size)).sum()
    deflated = probes - basis @ (basis.T @ probes)
    samples = (deflated * op.apply_blocked(deflated, batch_size)).sum(dim=0)
    remainder, std_error = _mean_with_error(samples)
    return TraceEstimate(exact_part + remainder, std_error, num_matvecs)
