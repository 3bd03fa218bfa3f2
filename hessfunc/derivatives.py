"""``derivative``: nth derivatives of elementwise scalar functions by nested forward mode."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.func

from ._checks import check_callable, check_floating, check_positive_int
from .errors import ArgumentError

__all__ = ["derivative"]


def derivative(f: Callable[[torch.Tensor], torch.Tensor], order: int = 1
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``order``-th derivative of an elementwise function, as a function.

    For ``f`` acting elementwise (``f(x)_i`` depends on ``x_i`` only, e.g.
    ``torch.sin`` or ``lambda x: x ** 4``), ``derivative(f, n)(x)_i = f^(n)(x_i)``,
    for a 0-d ``x`` or a batch of any shape. Computed by ``n`` nested forward-mode
    products with the all-ones tangent (exact: the Jacobian of an elementwise
    function is diagonal); no Python loop over elements. Composable with ``vmap``.

    Example (the seed's ``x ** 4`` at 1):
        >>> x = torch.tensor(1.0)
        >>> [float(derivative(lambda t: t ** 4, n)(x)) for n in (1, 2, 3, 4, 5)]
        [4.0, 12.0, 24.0, 24.0, 0.0]
    """
    call = "hessfunc.derivative"
    check_callable(f, "f", call)
    check_positive_int(order, "order", call)

    def nth(g: Callable[[torch.Tensor], torch.Tensor], n: int
            ) -> Callable[[torch.Tensor], torch.Tensor]:
        if n == 0:
            return g
        inner = nth(g, n - 1)

        def d(x: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(inner, (x,), (torch.ones_like(x),))[1]

        return d

    dn = nth(f, order)

    def derivative_f(x: torch.Tensor) -> torch.Tensor:
        check_floating(x, "x", call)
        y = f(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ArgumentError(
                f"{call}: f must be elementwise (output shaped like x = {tuple(x.shape)}), "
                f"got {got}; for a scalar function of a vector use hessian or laplacian."
            )
        return dn(x)

    return derivative_f
