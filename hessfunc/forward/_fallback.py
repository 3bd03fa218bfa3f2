"""The exact generic rule: Taylor coefficients of any op from nested ``jvp``.

For an op ``y = g(z)`` (any number of jet inputs) and one direction ``i``,
``t -> g(z_0 + z_1[i] t + ... + z_K[i] t^K)`` is a scalar-parameter curve; its
Taylor coefficients ``y_k[i] = (d^k/dt^k) g(...) |_(t=0) / k!`` come from K
nested :func:`torch.func.jvp` calls in ``t`` and are vectorised over the
directions with :func:`torch.func.vmap`. For K = 2 this is

    y_1 = Dg(z_0)[z_1],   y_2 = Dg(z_0)[z_2] + 1/2 D^2 g(z_0)[z_1, z_1].

With a collapsed top the curve leaves ``z_K`` out (it enters linearly), the
per-direction ``y_K`` are summed with the weights, and ``Dg(z_0)[z_K]`` is
added once with a single jvp. Cost: ``2^K`` evaluations of ``g`` per
direction, so the fast rules in :mod:`._rules` cover the common ops; this rule
keeps every other op (and the whole ``u`` when tracing is impossible) exact
for every function ``torch.func`` can differentiate.
"""

from __future__ import annotations

from collections.abc import Callable
from math import factorial
from typing import Any

import torch
from torch import Tensor

from ._rules import _reassemble, floating_outputs, split_jets
from ._series import JetSpec, collapse

__all__ = ["generic"]


def _derivatives_upto(f: Callable[[Tensor], Any], t: Tensor, order: int) -> list:
    """``[f(t), f'(t), ..., f^(order)(t)]`` by nested forward mode in the scalar ``t``."""
    if order == 0:
        return [f(t)]

    def lower(s: Tensor) -> list:
        return _derivatives_upto(f, s, order - 1)

    primal, tangent = torch.func.jvp(lower, (t,), (torch.ones_like(t),))
    return list(primal) + [tangent[-1]]


def generic(
    spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Any, *, vectorize: bool = True
) -> Any:
    """Coefficients of ``op(*args, **kwargs)``, exact for any differentiable op.

    ``vectorize=False`` loops over the directions instead of ``vmap``-ing over
    them (for a whole ``u`` with data-dependent control flow, which ``vmap``
    refuses but ``jvp`` follows).
    """
    jets, rebuild = split_jets(args, kwargs)
    order = spec.order
    n_in = order - 1 if spec.collapsed else order
    primals = tuple(j.value for j in jets)

    def f(*values: Tensor) -> tuple[Tensor, ...]:
        a, kw = rebuild(values)
        return floating_outputs(op(*a, **kw))

    blocks = [jet.coeffs[j - 1] for jet in jets for j in range(1, n_in + 1)]
    in_dims = tuple(None if b is None else 0 for b in blocks)
    per_order: list[Any] = [None] * order
    if any(d == 0 for d in in_dims):
        t0 = torch.zeros((), dtype=primals[0].dtype, device=primals[0].device)

        def per_direction(*row: Tensor | None) -> tuple:
            def curve(t: Tensor) -> tuple[Tensor, ...]:
                values = []
                for i, z0 in enumerate(primals):
                    v = z0
                    for j in range(1, n_in + 1):
                        b = row[i * n_in + j - 1]
                        if b is not None:
                            v = v + t**j * b
                    values.append(v)
                return f(*values)

            derivs = _derivatives_upto(curve, t0, order)
            return tuple(tuple(d / factorial(k) for d in derivs[k]) for k in range(1, order + 1))

        if vectorize:
            per_order = list(torch.func.vmap(per_direction, in_dims=in_dims)(*blocks))
        else:
            rows = [
                per_direction(*[None if b is None else b[i] for b in blocks])
                for i in range(spec.num_directions)
            ]
            per_order = [
                tuple(torch.stack([r[k][o] for r in rows]) for o in range(len(rows[0][k])))
                for k in range(order)
            ]
        if spec.collapsed:
            per_order[-1] = tuple(collapse(spec, r) for r in per_order[-1])
    if spec.collapsed:
        tops = [jet.coeffs[order - 1] for jet in jets]
        if any(c is not None for c in tops):
            tangents = tuple(
                torch.zeros_like(z0) if c is None else c[0]
                for z0, c in zip(primals, tops, strict=True)
            )
            lin = tuple(t.unsqueeze(0) for t in torch.func.jvp(f, primals, tangents)[1])
            top = per_order[-1]
            per_order[-1] = (
                lin if top is None else tuple(a + b for a, b in zip(top, lin, strict=True))
            )
    return _reassemble(out, per_order)


generic.__name__ = "generic"
