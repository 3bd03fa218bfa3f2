"""``laplacian``: the trace of the Hessian of a scalar function w.r.t. one argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from .diagonal import hessian_diag
from .errors import ArgumentError
from .forward import forward_laplacian

__all__ = ["laplacian", "LAPLACIAN_METHODS"]

LAPLACIAN_METHODS = ("auto", "forward", "hessian")


def laplacian(u: Callable[..., Any], argnums: int = 0, *,
              method: Literal["auto", "forward", "hessian"] = "auto",
              chunk_size: int | None = None) -> Callable[..., torch.Tensor]:
    """``Delta u = sum_i d^2 u / dx_i^2`` with ``x = args[argnums]``, as a function.

    ``u`` maps one point to a scalar; batch with ``torch.func.vmap``:
    ``vmap(laplacian(u))(X)`` gives one Laplacian per row of ``X``.

    Args:
        u: scalar-valued function.
        argnums: the argument ``x``.
        method: ``"forward"`` propagates (value, Jacobian, Laplacian) forward through
            the traced computation (the forward Laplacian, Li et al. 2023; see
            :func:`hessfunc.forward.forward_laplacian`); ``"hessian"`` sums the exact
            Hessian diagonal (``hessian_diag``, one HVP row per coordinate);
            ``"auto"`` (default) is ``"forward"``, measured 2.8x faster with 2.7x
            less peak memory than ``vmap(hessian)`` + trace on a 5-layer tanh MLP
            (docs/input-derivatives.md). Both are exact.
        chunk_size: directions (forward) or tangents (hessian) per pass.

    Example:
        >>> u = lambda x: (x ** 2).sum()                   # Delta u = 2 d
        >>> laplacian(u)(torch.ones(3))
        tensor(6.)
        >>> laplacian(u, method="hessian")(torch.ones(3))
        tensor(6.)
    """
    call = "hessfunc.laplacian"
    if method not in LAPLACIAN_METHODS:
        raise ArgumentError(f"{call}: `method` must be one of {LAPLACIAN_METHODS}, "
                            f"got {method!r}.")
    if method in ("auto", "forward"):
        return forward_laplacian(u, argnums, chunk_size=chunk_size)
    diag = hessian_diag(u, argnums, method="generic", chunk_size=chunk_size)

    def laplacian_u(*args: Any) -> torch.Tensor:
        return sum(d.sum() for d in pytree.tree_leaves(diag(*args)))

    return laplacian_u
