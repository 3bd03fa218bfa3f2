"""``laplacian``: the trace of the Hessian of a scalar function w.r.t. one argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from .diagonal import hessian_diag
from .errors import ArgumentError

__all__ = ["laplacian", "LAPLACIAN_METHODS"]

LAPLACIAN_METHODS = ("auto", "hessian")


def laplacian(u: Callable[..., Any], argnums: int = 0, *,
              method: Literal["auto", "hessian"] = "auto") -> Callable[..., torch.Tensor]:
    """``Delta u = sum_i d^2 u / dx_i^2`` with ``x = args[argnums]``, as a function.

    ``u`` maps one point to a scalar; batch with ``torch.func.vmap``:
    ``vmap(laplacian(u))(X)`` gives one Laplacian per row of ``X``.

    Args:
        u: scalar-valued function.
        argnums: the argument ``x``.
        method: ``"hessian"`` sums the exact Hessian diagonal (``hessian_diag``).

    Example:
        >>> u = lambda x: (x ** 2).sum()                   # Delta u = 2 d
        >>> laplacian(u)(torch.ones(3))
        tensor(6.)
    """
    call = "hessfunc.laplacian"
    if method not in LAPLACIAN_METHODS:
        raise ArgumentError(f"{call}: `method` must be one of {LAPLACIAN_METHODS}, "
                            f"got {method!r}.")
    diag = hessian_diag(u, argnums, method="generic")

    def laplacian_u(*args: Any) -> torch.Tensor:
        return sum(d.sum() for d in pytree.tree_leaves(diag(*args)))

    return laplacian_u
