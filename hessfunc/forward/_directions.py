"""Seed directions and weights of second-order operators, and their argument checks.

A weighted second-order operator ``sum_ij C_ij d^2u/dx_i dx_j`` only sees the
symmetric part of ``C``. NOTE [coefficients by eigendecomposition]: with
``(C + C^T)/2 = Q diag(lambda) Q^T``,

    sum_ij C_ij H_ij = tr(Q diag(lambda) Q^T H) = sum_i lambda_i q_i^T H q_i,

so the operator is a weighted collapse over the directions ``q_i`` with
weights ``lambda_i`` (negative for an indefinite ``C``). This is exact for any
square ``C`` (non-symmetric and indefinite included); a diagonal ``C`` skips
the eigendecomposition and weights the coordinate axes directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError

__all__ = [
    "Basis",
    "check_chunk_size",
    "check_coordinates",
    "check_size",
    "chunks",
    "make_basis",
]


class Basis:
    """Directions (rows, in the selected coordinates) and weights, kept in float64.

    ``rows`` is ``None`` for the coordinate axes themselves; ``weights`` is
    ``None`` for unit weights.
    """

    def __init__(
        self, coordinates: Tensor | None, rows: Tensor | None, weights: Tensor | None
    ) -> None:
        self.coordinates = coordinates
        self.rows = rows
        self.weights = weights

    def size(self, n: int) -> int:
        """Number of directions for a point with ``n`` coordinates."""
        if self.weights is not None:
            return self.weights.numel()
        return n if self.coordinates is None else self.coordinates.numel()

    def directions(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Directions ``lo:hi`` as a ``(hi - lo, *x.shape)`` tensor like ``x``."""
        n = x.numel()
        opts = {"dtype": x.dtype, "device": x.device}
        if self.rows is None:  # rows lo:hi of the identity, without forming all of it
            if self.coordinates is None:
                idx = torch.arange(lo, hi, device=x.device)
            else:
                idx = self.coordinates[lo:hi].to(x.device)
            d = torch.zeros((hi - lo, n), **opts).scatter(1, idx[:, None], 1.0)
        else:
            block = self.rows[lo:hi].to(**opts)
            if self.coordinates is None:
                d = block
            else:
                d = torch.zeros((hi - lo, n), **opts)
                d[:, self.coordinates.to(x.device)] = block
        return d.reshape((hi - lo, *x.shape))

    def weight_chunk(self, x: Tensor, lo: int, hi: int) -> Tensor | None:
        if self.weights is None:
            return None
        return self.weights[lo:hi].to(dtype=x.dtype, device=x.device)


def check_coordinates(coordinates: Any, caller: str) -> Tensor | None:
    """``coordinates`` as a 1-D int64 tensor of distinct non-negative flat indices."""
    if coordinates is None:
        return None
    try:
        idx = torch.as_tensor(coordinates)
    except (TypeError, ValueError, RuntimeError):
        idx = None
    if (
        idx is None
        or idx.dtype in (torch.bool,)
        or idx.is_floating_point()
        or idx.is_complex()
        or idx.dim() > 1
    ):
        raise ArgumentError(
            f"{caller}: coordinates must be a sequence of integer indices into x.flatten(), "
            f"got {coordinates!r}; pass e.g. coordinates=[0, 2]."
        )
    idx = idx.reshape(-1).to(torch.int64)
    if idx.numel() == 0:
        raise ArgumentError(f"{caller}: coordinates is empty; pass at least one index.")
    if bool((idx < 0).any()):
        raise ArgumentError(
            f"{caller}: coordinates must be non-negative indices into x.flatten(), "
            f"got {idx.tolist()}; write n - 1 instead of -1."
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ArgumentError(
            f"{caller}: coordinates must be distinct, got {idx.tolist()}; "
            "use coefficients to weight a coordinate twice."
        )
    return idx


def make_basis(coefficients: Any, coordinates: Tensor | None, caller: str) -> Basis:
    """Directions and weights for the operator (see the module NOTE)."""
    if coefficients is None:
        return Basis(coordinates, None, None)
    if not isinstance(coefficients, Tensor) or not (
        coefficients.is_floating_point() and coefficients.dim() == 2
    ):
        got = (
            f"shape {tuple(coefficients.shape)}, dtype {coefficients.dtype}"
            if isinstance(coefficients, Tensor)
            else type(coefficients).__name__
        )
        raise ArgumentError(
            f"{caller}: coefficients must be a floating (m, m) tensor C, got {got}; "
            "pass torch.as_tensor(C, dtype=torch.float64)."
        )
    m = coefficients.shape[0]
    if coefficients.shape[1] != m or (coordinates is not None and m != coordinates.numel()):
        m_sel = None if coordinates is None else coordinates.numel()
        want = "square" if m_sel is None else f"({m_sel}, {m_sel})"
        raise ArgumentError(
            f"{caller}: coefficients must be {want} (one row and column per "
            f"{'coordinate of x' if coordinates is None else 'selected coordinate'}), "
            f"got shape {tuple(coefficients.shape)}."
        )
    c = coefficients.detach().to(torch.float64)
    sym = (c + c.T) / 2
    diag = torch.diagonal(sym)
    if torch.equal(sym, torch.diag(diag)):
        return Basis(coordinates, None, diag)
    lam, q = torch.linalg.eigh(sym)
    return Basis(coordinates, q.T.contiguous(), lam)


def check_size(basis: Basis, x: Tensor, caller: str) -> int:
    """Validate the basis against ``x`` and return ``n = x.numel()``."""
    n = x.numel()
    if basis.coordinates is not None:
        top = int(basis.coordinates.max())
        if top >= n:
            raise ArgumentError(
                f"{caller}: coordinates must lie in [0, {n}) for x of shape "
                f"{tuple(x.shape)}, got index {top}."
            )
    elif basis.weights is not None:
        m = basis.size(n)
        if m != n:
            raise ArgumentError(
                f"{caller}: coefficients must be ({n}, {n}) for x of shape "
                f"{tuple(x.shape)} (numel {n}), got ({m}, {m})."
            )
    return n


def check_chunk_size(chunk_size: Any, caller: str) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ArgumentError(
            f"{caller}: chunk_size must be a positive int (directions per pass) or None, "
            f"got {chunk_size!r}."
        )
    return chunk_size


def chunks(k: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` ranges of at most ``chunk_size`` directions covering ``0..k``."""
    step = k if chunk_size is None else chunk_size
    for lo in range(0, k, max(step, 1)):
        yield lo, min(lo + step, k)
