"""The biharmonic operator ``Delta^2 u = sum_ij d^4u / dx_i^2 dx_j^2``, by nesting.

``Delta^2 u = Delta (Delta u)``: the inner forward Laplacian is itself a graph
of plain torch ops, so the outer forward Laplacian traces it like any other
function and propagates (value, Jacobian, Laplacian) through it. Both levels
are exact, so the result is exact; the cost grows like ``d^2`` forward passes
(as for any exact biharmonic), without ever forming a ``d x d x d x d`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._directions import Basis
from .laplacian import SecondOrderOperator

__all__ = ["biharmonic"]


def biharmonic(
    u: Callable[..., Tensor], argnums: int = 0, *, chunk_size: int | None = None
) -> Callable[..., Tensor]:
    """The biharmonic ``Delta^2 u`` of a scalar ``u`` with respect to argument ``argnums``.

    Args:
        u: maps one point ``x`` (floating, shape ``s``) to a scalar (0-d tensor).
        argnums: position of ``x`` among ``u``'s arguments.
        chunk_size: at most this many outer directions per pass.

    Returns:
        A function with ``u``'s signature returning ``Delta^2 u(x)`` (0-d);
        ``vmap`` it over points.

    Example:
        >>> import torch
        >>> from hessfunc.forward import biharmonic
        >>> u = lambda x: (x**2).sum() ** 2  # |x|^4 has Delta^2 = 8 d (d + 2)
        >>> biharmonic(u)(torch.ones(3, dtype=torch.float64))
        tensor(120., dtype=torch.float64)
    """
    inner = SecondOrderOperator(u, argnums, Basis(None, None, None), None, "biharmonic")
    return SecondOrderOperator(inner, argnums, Basis(None, None, None), chunk_size, "biharmonic")
