"""The forward Laplacian: ``sum_i d^2u/dx_i^2`` of a scalar field in one forward pass.

Li et al. (2023), "Forward Laplacian: a new computational framework for neural
network-based variational Monte Carlo"; Dangel et al. (2025), "Collapsing
Taylor mode automatic differentiation". Instead of materialising the ``d x d``
input Hessian of every point (``vmap(hessian(u))`` then the trace), the value,
the Jacobian ``J`` (one row per direction) and the Laplacian ``L`` of every
intermediate tensor are pushed forward together:

* linear ops:            ``J' = A J``, ``L' = A L``;
* elementwise ``phi``:   ``J' = phi'(z) J``, ``L' = phi'(z) L + phi''(z) sum_i J_i^2``;
* products ``a b``:      ``L' = a L_b + b L_a + 2 sum_i J_a,i J_b,i``;
* any other op ``g``:    ``L' = Dg(z)[L] + sum_i D^2 g(z)[J_i, J_i]`` (nested jvp).

In the engine's Taylor normalisation this is the order-2 jet with a collapsed
top coefficient, ``L = 2 y_2`` (see :mod:`hessfunc.forward._series`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._directions import (
    Basis,
    check_chunk_size,
    check_coordinates,
    check_size,
    chunks,
    make_basis,
)
from ._propagate import ForwardEngine
from ._series import Jet, JetSpec

__all__ = ["forward_laplacian"]


def collapsed_second(out: Any) -> Tensor:
    """``2 y_2`` of a collapsed output jet: the weighted sum of second derivatives."""
    if isinstance(out, Jet):
        if out.coeffs[1] is not None:
            return 2 * out.coeffs[1][0]
        out = out.value
    return torch.zeros_like(out)


class SecondOrderOperator:
    """``x -> sum_i w_i v_i^T (d^2u/dx^2) v_i`` over a fixed basis of directions."""

    def __init__(
        self,
        u: Callable[..., Tensor],
        argnums: int,
        basis: Basis,
        chunk_size: int | None,
        caller: str,
    ) -> None:
        self.engine = ForwardEngine(u, argnums, caller)
        self.basis = basis
        self.chunk_size = check_chunk_size(chunk_size, caller)
        self.caller = caller

    @property
    def _guard_targets(self) -> tuple:
        b = self.basis
        return (self.engine, b.coordinates, b.rows, b.weights)

    def __call__(self, *args: Any) -> Tensor:
        x = self.engine.point(args)
        k = self.basis.size(check_size(self.basis, x, self.caller))
        total: Tensor | None = None
        for lo, hi in chunks(k, self.chunk_size):
            weights = self.basis.weight_chunk(x, lo, hi)
            spec = JetSpec(2, hi - lo, collapsed=True, weights=weights)
            out = self.engine.jet(args, self.basis.directions(x, lo, hi), spec)
            part = collapsed_second(out)
            total = part if total is None else total + part
        assert total is not None
        return total

    def __repr__(self) -> str:
        return f"{self.caller}({self.engine.u!r}, argnums={self.engine.argnums})"


def forward_laplacian(
    u: Callable[..., Tensor],
    argnums: int = 0,
    *,
    coefficients: Tensor | None = None,
    coordinates: Any = None,
    chunk_size: int | None = None,
) -> Callable[..., Tensor]:
    """The Laplacian of ``u`` with respect to argument ``argnums``, by forward propagation.

    Args:
        u: maps one point ``x`` (a floating tensor, shape ``s``, usually ``(d,)``)
            and any further arguments to a scalar (0-d tensor).
        argnums: position of ``x`` among ``u``'s arguments.
        coefficients: optional ``(m, m)`` matrix ``C``; the result is then
            ``sum_ij C_ij d^2u/dx_i dx_j`` (``m = x.numel()``, or the number of
            ``coordinates``). Any square ``C`` is exact: its symmetric part is
            eigendecomposed and the operator becomes a weighted sum of second
            directional derivatives along the eigenvectors.
        coordinates: optional distinct flat indices into ``x.flatten()``; the
            Laplacian (or ``C``-weighted operator) over those coordinates only.
        chunk_size: propagate at most this many directions at once (bounds
            memory to ``chunk_size`` rows per intermediate tensor).

    Returns:
        A function with ``u``'s signature returning ``Delta u(x)``, a 0-d tensor.
        Batch it with ``torch.func.vmap``: ``vmap(forward_laplacian(u))(X)``,
        ``X`` of shape ``(N, *s)``, gives shape ``(N,)``. It also composes with
        ``grad``/``jacrev`` (over ``x`` or over tensors passed as arguments) and
        with plain autograd through parameters captured by closure.

    ``u`` is traced once per input signature at the ATen level; when it cannot
    be traced (data-dependent control flow, ...) the exact generic path is used.

    Example:
        >>> import torch
        >>> from hessfunc.forward import forward_laplacian
        >>> u = lambda x: (x**2).sum()
        >>> forward_laplacian(u)(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        tensor(6., dtype=torch.float64)
        >>> X = torch.randn(4, 3, dtype=torch.float64)
        >>> lap = torch.func.vmap(forward_laplacian(lambda x: x.sin().sum()))(X)
        >>> torch.allclose(lap, -X.sin().sum(1))
        True
    """
    caller = "forward_laplacian"
    coords = check_coordinates(coordinates, caller)
    basis = make_basis(coefficients, coords, caller)
    return SecondOrderOperator(u, argnums, basis, chunk_size, caller)
