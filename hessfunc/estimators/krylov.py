"""Inverse products: conjugate gradients and MINRES on a symmetric operator.

Both solve ``(A + damping I) x = b`` for a symmetric ``A`` of shape ``(size, size)``
seen only through ``matvec`` (``v -> A v``), starting from ``x_0 = 0`` and
building ``x_m`` in the Krylov space ``span{b, A b, ..., A^(m-1) b}``, one product
per step:

* conjugate gradients (CG) minimises the energy norm ``||x - x*||_(A + damping I)``
  over that space; it needs ``A + damping I`` positive definite. Each step
  measures the curvature ``p^T (A + damping I) p`` of its search direction ``p``;
  a value ``<= 0`` proves the operator is not positive definite, and CG stops with
  an :class:`~hessfunc.ArgumentError` (use MINRES, or a larger ``damping``);
* MINRES (Paige and Saunders) minimises the residual norm ``||b - (A + damping I) x||``
  over the same space and needs only symmetry: it solves indefinite systems, such
  as a Hessian away from a minimum.

Convergence test: ``||b - (A + damping I) x|| <= tol ||b||``. Both methods track the
residual by recurrence; when the recurrence says converged, the true residual is
computed with one more product and, if it is not yet below ``tol ||b||`` (rounding
drift), the method restarts from ``x`` on the true residual. The returned
``residual_norm`` is always the true one.

References:
    M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving
    linear systems", J. Res. Nat. Bur. Standards 49, 1952.

    C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of
    linear equations", SIAM J. Numer. Anal. 12, 1975.

Example (``diag(1, 2, 4) x = 1`` has ``x = (1, 1/2, 1/4)``)::

    >>> import torch
    >>> d = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> res = conjugate_gradient(lambda v: d * v, torch.ones(3, dtype=torch.float64))
    >>> res.solution.tolist(), res.converged
    ([1.0, 0.5, 0.25], True)
    >>> [round(x, 12) for x in minres(lambda v: -d * v, torch.ones(3, dtype=torch.float64)
    ...                               ).solution.tolist()]
    [-1.0, -0.5, -0.25]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from hessfunc.errors import ArgumentError

__all__ = ["SolveResult", "conjugate_gradient", "minres", "default_tol"]

Matvec = Callable[[torch.Tensor], torch.Tensor]


class SolveResult(NamedTuple):
    """The outcome of a Krylov solve of ``(A + damping I) x = b``.

    Attributes:
        solution: ``(size,)``, the approximate ``x``.
        residual_norm: 0-dim, the true ``||b - (A + damping I) x||``.
        relative_residual: 0-dim, ``residual_norm / ||b||`` (0 for ``b = 0``).
        num_matvecs: products with ``A`` spent.
        converged: whether ``relative_residual <= tol``.
    """

    solution: torch.Tensor
    residual_norm: torch.Tensor
    relative_residual: torch.Tensor
    num_matvecs: int
    converged: bool


def default_tol(dtype: torch.dtype) -> float:
    """The default relative residual: ``1e-10`` in float64, ``1e-5`` otherwise."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _check(b: object, damping: object, tol: object, max_steps: object, caller: str
           ) -> tuple[float, float, int]:
    if not isinstance(b, torch.Tensor) or b.dim() != 1 or not b.is_floating_point():
        raise ArgumentError(f"{caller}(): expected `b` to be a floating (size,) tensor, got "
                            f"{type(b).__name__ if not isinstance(b, torch.Tensor) else b.shape}. "
                            "Pass the right-hand side as one flat vector.")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) \
            or not math.isfinite(damping):
        raise ArgumentError(f"{caller}(): expected `damping` to be a finite number, got "
                            f"{damping!r}.")
    tol = default_tol(b.dtype) if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ArgumentError(f"{caller}(): expected `tol` to be a number in (0, 1), got {tol!r}; "
                            "it bounds ||residual|| / ||b||.")
    size = b.shape[0]
    max_steps = 10 * size + 10 if max_steps is None else max_steps
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ArgumentError(f"{caller}(): expected `max_steps` to be an int >= 1, got "
                            f"{max_steps!r}.")
    return float(damping), float(tol), max_steps


def _apply(matvec: Matvec, v: torch.Tensor, damping: float, caller: str) -> torch.Tensor:
    out = matvec(v)
    if not isinstance(out, torch.Tensor) or out.shape != v.shape:
        raise ArgumentError(f"{caller}(): `matvec` must map a {tuple(v.shape)} tensor to one of "
                            f"the same shape, got "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else out!r}.")
    return out + damping * v if damping else out


def _solve(step: Callable[[torch.Tensor, float, int], tuple[torch.Tensor, int]],
           matvec: Matvec, b: torch.Tensor, damping: float, tol: float, max_steps: int,
           caller: str) -> SolveResult:
    """Outer loop: ``step(r, target, budget)`` solves ``A d = r`` down to ``||r - A d|| <=
    target`` by recurrence; the true residual decides, restarting on it when rounding drifted."""
    bnorm = torch.linalg.vector_norm(b)
    x = torch.zeros_like(b)
    if bnorm == 0:
        zero = bnorm.clone()
        return SolveResult(x, zero, zero, 0, True)
    target = tol * float(bnorm)
    r, spent, rnorm = b, 0, bnorm
    for _ in range(5):  # restarts on the true residual (rounding drift only)
        d, used = step(r, target, max_steps - spent)
        x = x + d
        spent += used
        r = b - _apply(matvec, x, damping, caller)
        spent += 1
        rnorm = torch.linalg.vector_norm(r)
        if float(rnorm) <= target or spent >= max_steps:
            break
    return SolveResult(x, rnorm, rnorm / bnorm, spent, bool(float(rnorm) <= target))


def conjugate_gradient(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0,
                       tol: float | None = None, max_steps: int | None = None) -> SolveResult:
    """Solve ``(A + damping I) x = b`` by conjugate gradients, ``A`` symmetric positive
    definite (after damping), seen through ``matvec``.

    Args:
        matvec: ``v -> A v`` for ``v`` of shape ``(size,)``.
        b: ``(size,)`` right-hand side.
        damping: ``>= 0``, added to the diagonal (Tikhonov / Levenberg-Marquardt).
        tol: relative residual ``||b - (A + damping I) x|| / ||b||`` to reach
            (:func:`default_tol` of ``b``'s dtype when None).
        max_steps: cap on products (default ``10 size + 10``).

    Returns:
        A :class:`SolveResult`; ``converged`` is False when ``max_steps`` ran out.

    Raises:
        ArgumentError: ``damping < 0``, or a direction with ``p^T (A + damping I) p <= 0``
            (the operator is not positive definite).

    Example (``[[2, 1], [1, 2]] x = (3, 3)`` has ``x = (1, 1)``)::

        >>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> conjugate_gradient(lambda v: A @ v, torch.full((2,), 3.0, dtype=torch.float64)
        ...                    ).solution.tolist()
        [1.0, 1.0]
    """
    caller = "conjugate_gradient"
    damping, tol, max_steps = _check(b, damping, tol, max_steps, caller)
    if damping < 0:
        raise ArgumentError(f"{caller}(): `damping` must be >= 0 for conjugate gradients, got "
                            f"{damping}; a negative shift can make the operator indefinite. "
                            "Use method='minres' for a negative shift.")

    def step(r0: torch.Tensor, target: float, budget: int) -> tuple[torch.Tensor, int]:
        x = torch.zeros_like(r0)
        r, p = r0.clone(), r0.clone()
        rs = torch.dot(r, r)
        used = 0
        while used < budget and math.sqrt(float(rs)) > target:
            Ap = _apply(matvec, p, damping, caller)
            used += 1
            curvature = torch.dot(p, Ap)
            if not float(curvature) > 0:
                raise ArgumentError(
                    f"{caller}(): found a direction p with curvature p^T (A + damping I) p = "
                    f"{float(curvature):.3e} <= 0 at step {used}: the operator is not positive "
                    f"definite (damping={damping}). Use method='minres' for an indefinite "
                    "operator (e.g. a Hessian away from a minimum), or add damping larger than "
                    "minus its smallest eigenvalue."
                )
            alpha = rs / curvature
            x.add_(alpha * p)
            r.sub_(alpha * Ap)
            rs_new = torch.dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        return x, used

    return _solve(step, matvec, b, damping, tol, max_steps, caller)


def minres(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, tol: float | None = None,
           max_steps: int | None = None) -> SolveResult:
    """Solve ``(A + damping I) x = b`` by MINRES, ``A`` symmetric (indefinite allowed).

    The Lanczos recurrence on ``A + damping I`` from ``b``, with Givens rotations
    that keep the tridiagonal least-squares problem triangular; ``x_m`` minimises
    the residual over the Krylov space. Arguments and result as in
    :func:`conjugate_gradient`; ``damping`` may be negative. For a singular
    consistent system it gives a solution; for an inconsistent one the residual
    stalls above ``tol`` and ``converged`` is False.

    Example (an indefinite ``diag(1, -2)``)::

        >>> A = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
        >>> x = minres(lambda v: A @ v, torch.tensor([1.0, 1.0], dtype=torch.float64)).solution
        >>> [round(v, 12) for v in x.tolist()]
        [1.0, -0.5]
    """
    caller = "minres"
    damping, tol, max_steps = _check(b, damping, tol, max_steps, caller)
    eps = torch.finfo(b.dtype).eps

    def step(r0: torch.Tensor, target: float, budget: int) -> tuple[torch.Tensor, int]:
        # Paige and Saunders' recurrence, unpreconditioned (as in scipy.sparse.linalg.minres)
        x = torch.zeros_like(r0)
        beta1 = float(torch.linalg.vector_norm(r0))
        r1, r2, y = r0, r0, r0
        oldb, beta, dbar, epsln, phibar = 0.0, beta1, 0.0, 0.0, beta1
        cs, sn = -1.0, 0.0
        w = torch.zeros_like(r0)
        w2 = torch.zeros_like(r0)
        used = 0
        while used < budget and phibar > target and beta > 0:
            v = y / beta
            y = _apply(matvec, v, damping, caller)
            used += 1
            if used >= 2:
                y = y - (beta / oldb) * r1
            alfa = float(torch.dot(v, y))
            y = y - (alfa / beta) * r2
            r1, r2 = r2, y
            oldb, beta = beta, float(torch.linalg.vector_norm(y))
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = max(math.hypot(gbar, beta), eps)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w1, w2 = w2, w
            w = (v - oldeps * w1 - delta * w2) / gamma
            x = x + phi * w
        return x, used

    return _solve(step, matvec, b, damping, tol, max_steps, caller)
