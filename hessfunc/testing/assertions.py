"""Assertions: a user's curvature code against hessfunc's loop-based oracle.

Each ``assert_*_close`` calls the implementation under test, computes the same quantity
with :mod:`hessfunc.reference` (double backward, one backward per Hessian row or
element: slow, plain ``torch.autograd``), and raises an ``AssertionError`` that names
the worst parameter, its index, both values and the tolerance when they differ.
The oracle runs in float64. Tolerances come from :data:`TOLERANCES` by the result's dtype
(float64: to rounding; float32: within float32 rounding of the float64 truth), or from
``rtol``/``atol``; a result below float64 is also allowed ten times what the oracle itself
loses in that precision (the problem's own conditioning).

Example:
    A correct HVP passes (a Gauss-Newton product in its place would not):

    >>> f = lambda p, x: torch.sin(x @ p["w"]).sum()
    >>> p, x = {"w": torch.randn(3, dtype=torch.float64)}, torch.randn(4, 3, dtype=torch.float64)
    >>> assert_hvp_close(lambda f, primals, v: hf.hvp(f, primals, v), f, (p, x))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import reference
from .._checks import check_callable, check_floating
from ..errors import ArgumentError
from ._compare import assert_trees_close, check_structure, checked_primals, tolerances

__all__ = ["assert_hvp_close", "assert_hessian_close", "assert_diag_close",
           "assert_laplacian_close"]


def _primals(primals: Any, argnums: int, call: str) -> tuple[Any, ...]:
    primals = checked_primals(primals, argnums, call)
    check_floating(primals[argnums], f"primals[{argnums}]", call)
    return primals


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    """``tree`` with its floating tensors in ``dtype`` (other leaves unchanged)."""
    return pytree.tree_map(
        lambda t: t.detach().to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _at(f: Callable[..., Any], primals: tuple[Any, ...], argnums: int, call: str
        ) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
    """``f`` at fresh leaves for ``primals[argnums]``: the loss, the leaves and their spec."""
    leaves, spec = pytree.tree_flatten(primals[argnums])
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    args = list(primals)
    args[argnums] = pytree.tree_unflatten(leaves, spec)
    loss = f(*args)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ArgumentError(f"{call}: `f` must return a scalar tensor, got "
                            f"{getattr(loss, 'shape', type(loss).__name__)}.")
    return loss, leaves, spec


def _oracle(quantity: Callable[[Any], Any], args: Any, result_dtype: torch.dtype
            ) -> tuple[Any, float]:
    """``quantity(args)`` in float64, the truth, and the rounding to allow a result in
    ``result_dtype``.

    For a result below float64, the allowance is ten times the largest distance of the
    loop oracle run in ``result_dtype`` from the float64 truth: what the problem itself
    costs in that precision. A well-conditioned problem gets next to nothing; a logit of
    13 in float32, where ``1 - sigmoid`` keeps a digit and the oracle itself is 1e-3
    off, gets what any method needs there; a wrong term is off by far more. A float64
    result gets no allowance (the table covers float64 rounding). When ``quantity``
    cannot run in float64 (``f`` closes over float32 tensors, such as a model's buffers)
    the oracle runs in the arguments' own dtype, with no allowance.
    """
    try:
        truth = quantity(_cast(args, torch.float64))
    except (RuntimeError, TypeError, ValueError):
        return quantity(args), 0.0
    if result_dtype == torch.float64 or not result_dtype.is_floating_point:
        return truth, 0.0
    try:
        rough = quantity(_cast(args, result_dtype))
    except (RuntimeError, TypeError, ValueError):
        return truth, 0.0
    gaps = [(r.detach().double() - t.detach().double()).abs()
            for r, t in zip(pytree.tree_leaves(rough), pytree.tree_leaves(truth), strict=True)]
    gap = max((float(g[torch.isfinite(g)].max()) for g in gaps if torch.isfinite(g).any()),
              default=0.0)
    return truth, 10 * gap


def _draw_tangents(primal: Any, num: int, generator: torch.Generator | None) -> list[Any]:
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    leaves, spec = pytree.tree_flatten(primal)
    return [pytree.tree_unflatten(
        [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in leaves], spec)
        for _ in range(num)]


def _dot(a: Any, b: Any) -> torch.Tensor:
    return sum((x.double() * y.double()).sum()
               for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True))


def assert_hvp_close(hvp_impl: Callable[[Callable[..., Any], tuple[Any, ...], Any], Any],
                     f: Callable[..., Any], primals: Sequence[Any], tangents: Any = None, *,
                     argnums: int = 0, num_tangents: int = 2,
                     generator: torch.Generator | None = None, rtol: float | None = None,
                     atol: float | None = None, check_symmetry: bool = True) -> None:
    """Assert ``hvp_impl(f, primals, v) = H v``, ``H`` the Hessian of ``f`` in
    ``primals[argnums]``, against the oracle's double backward.

    Args:
        hvp_impl: the implementation under test, ``hvp_impl(f, primals, v) -> Hv``
            shaped like ``primals[argnums]`` (a tensor or a tree of tensors).
        f: a scalar function ``f(*primals)``.
        primals: its arguments, e.g. ``(params, x, y)``.
        tangents: one tangent like ``primals[argnums]``, or a list of them; by default
            ``num_tangents`` standard normal ones drawn from ``generator`` (seed 0).
        check_symmetry: also assert ``<u, H v> = <H u, v>`` for the first two tangents
            (a Hessian is symmetric; an HVP that is not has a transposed term).

    Raises:
        AssertionError: naming the worst parameter, index, both values and tolerance.
    """
    call = "assert_hvp_close"
    check_callable(hvp_impl, "hvp_impl", call)
    check_callable(f, "f", call)
    primals = _primals(primals, argnums, call)
    if tangents is None:
        vs = _draw_tangents(primals[argnums], num_tangents, generator)
    else:
        vs = list(tangents) if isinstance(tangents, list) else [tangents]
        for i, v in enumerate(vs):
            try:
                check_structure(v, primals[argnums], f"tangents[{i}]", call)
            except AssertionError as exc:
                raise ArgumentError(f"{exc} Tangents must be shaped like primals[{argnums}].") \
                    from None
    def oracle_hvp(args: tuple[Any, tuple[Any, ...]]) -> Any:
        v, primals = args
        loss, leaves, spec = _at(f, primals, argnums, call)
        return pytree.tree_unflatten(reference.hvp(loss, leaves, pytree.tree_leaves(v)), spec)

    results = []
    for i, v in enumerate(vs):
        actual = hvp_impl(f, primals, v)
        dtype = pytree.tree_leaves(actual)[0].dtype
        expected, rounding = _oracle(oracle_hvp, (v, primals), dtype)
        check_structure(actual, expected, f"hvp_impl's result for tangents[{i}]", call)
        r, a = tolerances(dtype, rtol, atol, call)
        assert_trees_close(actual, expected, rtol=r, atol=a, rounding=rounding,
                           what=f"H v (tangents[{i}])", call=call)
        results.append((actual, expected))
    if check_symmetry and len(vs) >= 2:
        # exact products are symmetric to rounding, whatever tolerance the values got;
        # the oracle's own asymmetry measures that rounding where products cancel
        (Hu, Hu_ref), (Hv, Hv_ref) = results[:2]
        uHv, Huv = _dot(vs[0], Hv), _dot(Hu, vs[1])
        norms = (float(_dot(vs[0], vs[0]) * _dot(Hv, Hv)) ** 0.5
                 + float(_dot(vs[1], vs[1]) * _dot(Hu, Hu)) ** 0.5)
        rounding = abs(float(_dot(vs[0], Hv_ref) - _dot(Hu_ref, vs[1])))
        bound = torch.finfo(dtype).eps ** 0.5 * norms + 10 * rounding
        if abs(float(uHv - Huv)) > bound:
            raise AssertionError(f"{call}: hvp_impl is not symmetric: <u, H v> = "
                                 f"{float(uHv)!r} but <H u, v> = {float(Huv)!r}.")


def _flat_hessian(actual: Any, primal: Any, call: str) -> torch.Tensor:
    """A flat ``(P, P)`` matrix from a flat result or nested blocks ``H[a][b]``."""
    leaves, spec = pytree.tree_flatten(primal)
    n = sum(t.numel() for t in leaves)
    if isinstance(actual, torch.Tensor) and actual.shape == (n, n):
        return actual
    if isinstance(primal, torch.Tensor):
        if isinstance(actual, torch.Tensor) and actual.shape == primal.shape * 2:
            return actual.reshape(n, n)
        raise AssertionError(f"{call}: hessian_impl returned {getattr(actual, 'shape', actual)}"
                             f", expected shape {tuple(primal.shape) * 2} or ({n}, {n}).")
    if not isinstance(primal, dict) or not isinstance(actual, dict):
        raise AssertionError(f"{call}: hessian_impl must return a ({n}, {n}) tensor or nested "
                             f"blocks H[a][b] like the parameters, got {type(actual).__name__}.")
    rows = []
    for a, pa in primal.items():
        if a not in actual or not isinstance(actual[a], dict):
            raise AssertionError(f"{call}: hessian_impl's result has no row of blocks {a!r}.")
        row = []
        for b, pb in primal.items():
            block = actual[a].get(b)
            if not isinstance(block, torch.Tensor) or block.shape != pa.shape + pb.shape:
                raise AssertionError(f"{call}: block H[{a!r}][{b!r}] should have shape "
                                     f"{tuple(pa.shape + pb.shape)}, got "
                                     f"{getattr(block, 'shape', type(block).__name__)}.")
            row.append(block.reshape(pa.numel(), pb.numel()))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def assert_hessian_close(hessian_impl: Callable[[Callable[..., Any], tuple[Any, ...]], Any],
                         f: Callable[..., Any], primals: Sequence[Any], *, argnums: int = 0,
                         rtol: float | None = None, atol: float | None = None) -> None:
    """Assert ``hessian_impl(f, primals)`` is the Hessian of ``f`` in ``primals[argnums]``.

    The result may be the flat ``(P, P)`` matrix (leaves in tree order, each flattened
    row-major), nested blocks ``H[a][b]`` of shape ``a.shape + b.shape`` for a dict of
    parameters, or ``x.shape + x.shape`` for a tensor argument. The oracle builds the
    Hessian one backward per row. A transposed off-diagonal block fails here.
    """
    call = "assert_hessian_close"
    check_callable(hessian_impl, "hessian_impl", call)
    primals = _primals(primals, argnums, call)
    actual = _flat_hessian(hessian_impl(f, primals), primals[argnums], call)
    expected, rounding = _oracle(lambda p: reference.hessian(*_at(f, p, argnums, call)[:2]),
                                 primals, actual.dtype)
    r, a = tolerances(actual.dtype, rtol, atol, call)
    assert_trees_close({"H": actual}, {"H": expected}, rtol=r, atol=a, rounding=rounding,
                       what="the flat Hessian (row, column)", call=call)


def assert_diag_close(diag_impl: Callable[[Callable[..., Any], tuple[Any, ...]], Any],
                      f: Callable[..., Any], primals: Sequence[Any], *, argnums: int = 0,
                      rtol: float | None = None, atol: float | None = None) -> None:
    """Assert ``diag_impl(f, primals)`` is the exact Hessian diagonal of ``f`` in
    ``primals[argnums]``, shaped like it (the oracle: one backward per element)."""
    call = "assert_diag_close"
    check_callable(diag_impl, "diag_impl", call)
    primals = _primals(primals, argnums, call)
    def oracle_diag(primals: tuple[Any, ...]) -> Any:
        loss, leaves, spec = _at(f, primals, argnums, call)
        names = [str(i) for i in range(len(leaves))]
        diag = reference.hessian_diag(loss, dict(zip(names, leaves, strict=True)))
        return pytree.tree_unflatten([diag[n] for n in names], spec)

    actual = diag_impl(f, primals)
    dtype = pytree.tree_leaves(actual)[0].dtype
    expected, rounding = _oracle(oracle_diag, primals, dtype)
    check_structure(actual, expected, "diag_impl's result", call)
    r, a = tolerances(dtype, rtol, atol, call)
    assert_trees_close(actual, expected, rtol=r, atol=a, rounding=rounding,
                       what="the Hessian diagonal", call=call)


def assert_laplacian_close(laplacian_impl: Callable[[Callable[..., Any], torch.Tensor], Any],
                           u: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                           batched: bool = False, rtol: float | None = None,
                           atol: float | None = None) -> None:
    """Assert ``laplacian_impl(u, x) = tr(d^2 u / dx^2)`` at ``x`` (scalar ``u``).

    With ``batched=True``, ``x`` is ``(N, *point)`` and the result ``(N,)``: one
    Laplacian per point, ``u`` taking one point.
    """
    call = "assert_laplacian_close"
    check_callable(laplacian_impl, "laplacian_impl", call)
    check_callable(u, "u", call)
    check_floating(x, "x", call)
    points = x if batched else x[None]
    actual = laplacian_impl(u, x)
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{call}: laplacian_impl returned {type(actual).__name__}, "
                             "expected a tensor.")
    expected, rounding = _oracle(
        lambda z: torch.stack([reference.laplacian(u, p) for p in z]), points, actual.dtype)
    if actual.numel() != expected.numel():
        raise AssertionError(f"{call}: laplacian_impl returned shape {tuple(actual.shape)}, "
                             f"expected {'(N,)' if batched else 'a scalar'} "
                             f"({expected.numel()} value(s)).")
    actual = actual.reshape(expected.shape)
    check_structure(actual, expected, "laplacian_impl's result", call)
    r, a = tolerances(actual.dtype, rtol, atol, call)
    assert_trees_close({"laplacian": actual}, {"laplacian": expected}, rtol=r, atol=a,
                       rounding=rounding, what="the Laplacian (per point)", call=call)
