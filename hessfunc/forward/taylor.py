"""Taylor mode: the coefficients of ``t -> u(x + t v)`` up to order K in one pass.

``taylor(u, x, v, order=K)`` returns ``c_0, ..., c_K`` with
``c_k = (d^k/dt^k) u(x + t v) |_(t=0) / k!``, so that
``u(x + t v) = sum_k c_k t^k + O(t^(K+1))``. Every intermediate tensor carries
its own coefficients ``z_0..z_K`` and each op maps them by a recurrence:

* linear ops map each coefficient;
* products use the Cauchy product ``(ab)_k = sum_(j=0..k) a_j b_(k-j)``;
* an elementwise ``phi`` uses Faa di Bruno,
  ``phi(z)_k = sum_(m=1..k) phi^(m)(z_0)/m! [t^k] (z_1 t + z_2 t^2 + ...)^m``,
  with ``phi^(m)`` in closed form for exp, log, sin, cos, tanh, sigmoid,
  powers, softplus, gelu, silu, erf, ... (:mod:`._derivatives`);
* any other op goes through K nested ``jvp`` in ``t`` (exact, ``2^K`` cost).

Griewank & Walther (2008), "Evaluating Derivatives", ch. 13.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ._propagate import ForwardEngine
from ._series import Jet, JetSpec

__all__ = ["taylor"]

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _engine(u: Callable[..., Tensor]) -> ForwardEngine:
    """One engine (and trace cache) per function, kept only while ``u`` lives."""
    try:
        engine = _ENGINES.get(u)
    except TypeError:  # not weak-referenceable
        return ForwardEngine(u, 0, "taylor")
    if engine is None:
        engine = ForwardEngine(u, 0, "taylor")
        _ENGINES[u] = engine
    return engine


def taylor(u: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, order: int) -> Tensor:
    """Taylor coefficients of ``t -> u(x + t v)`` at ``t = 0``, orders ``0..order``.

    Args:
        u: maps one point ``x`` to a floating tensor of any shape ``o``.
        x: the point, a floating tensor of shape ``s``.
        v: the direction, shape ``s`` (cast to ``x``'s dtype).
        order: the highest order K, an int >= 1.

    Returns:
        Tensor of shape ``(K + 1, *o)``: ``c_k = d^k u(x + t v)/dt^k / k!``.
        ``vmap`` over ``x`` and/or ``v`` for many points or directions.

    Example:
        >>> import torch
        >>> from hessfunc.forward import taylor
        >>> x = torch.tensor(0.0, dtype=torch.float64)
        >>> taylor(torch.exp, x, torch.tensor(1.0, dtype=torch.float64), order=4)
        tensor([1.0000, 1.0000, 0.5000, 0.1667, 0.0417], dtype=torch.float64)
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ArgumentError(
            f"taylor: order must be an int >= 1 (the highest Taylor coefficient), got {order!r}."
        )
    engine = _engine(u)
    x = engine.point((x,))
    if not isinstance(v, Tensor) or not v.is_floating_point():
        got = f"dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
        raise ArgumentError(
            f"taylor: direction v must be a floating tensor shaped like x, got {got}; "
            "convert it with torch.as_tensor(v, dtype=x.dtype)."
        )
    if v.shape != x.shape:
        raise ArgumentError(
            f"taylor: direction v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}."
        )
    spec = JetSpec(order, 1, collapsed=False)
    out: Any = engine.jet((x,), v.to(x.dtype).unsqueeze(0), spec, scalar=False)
    if not isinstance(out, Jet):
        return torch.stack([out] + [torch.zeros_like(out)] * order)
    value = out.value
    coeffs = [torch.zeros_like(value) if c is None else c[0] for c in out.coeffs]
    return torch.stack([value, *coeffs])
