"""Tolerances and the comparison that says where and by how much two results differ."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._checks import check_argnums, check_primals
from ..errors import ArgumentError

#: ``(rtol, atol)`` per dtype against a float64 oracle. ``atol`` is relative to the
#: largest magnitude of the expected result (but see ``SCALE_FLOOR``): float64
#: results agree to rounding, float32 ones within float32's accumulated rounding.
#: Entries far below the largest one carry the rounding of the large terms they cancel:
#: a saturated softmax, or a saturated tanh whose derivative ``1 - tanh^2 = 1e-8`` keeps
#: only 8 digits. Drawn inputs at 1e3 into a two-class cross-entropy measured up to
#: 3.6e-9 of the largest entry between the float64 loop oracle (and
#: ``torch.func.hessian``) and the 50-digit truth (mpmath), which hessfunc's diagonal
#: matched to 16 digits. 1e-8 of it covers that and still fails any wrong term, and a
#: float32 intermediate on a float64 route (1e-7 of it).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-4, 1e-5),
}

#: The smallest "largest magnitude" atol is taken relative to: a result whose entries are
#: all below it (a saturated network: O(1) terms cancelling to 1e-12) is compared to
#: ``atol * SCALE_FLOOR`` absolutely, the rounding of those O(1) terms.
SCALE_FLOOR = 1e-4


def tolerances(dtype: torch.dtype, rtol: float | None, atol: float | None, call: str
               ) -> tuple[float, float]:
    """The table's ``(rtol, atol)`` for ``dtype``, overridden by what the caller gave."""
    if dtype not in TOLERANCES and (rtol is None or atol is None):
        raise ArgumentError(
            f"{call}: no default tolerance for {dtype}; results must be float64 or float32 "
            "(compute in float64 to compare to rounding), or pass both `rtol` and `atol`.")
    default = TOLERANCES.get(dtype, (0.0, 0.0))
    return (default[0] if rtol is None else rtol), (default[1] if atol is None else atol)


def leaf_names(tree: Any) -> list[str]:
    """``'w'``, ``'layer.bias'``, ``'[0]'``... one per tensor leaf of ``tree``."""
    def part(key: Any) -> str:
        for attr in ("key", "name"):
            if hasattr(key, attr):
                return f".{getattr(key, attr)}"
        return f"[{key.idx}]" if hasattr(key, "idx") else str(key)

    paths, _ = pytree.tree_flatten_with_path(tree)
    return ["".join(part(k) for k in path).lstrip(".") or "value" for path, _ in paths]


def check_structure(actual: Any, expected: Any, what: str, call: str) -> None:
    """Fail (AssertionError) when ``actual`` is not a tree of tensors shaped like ``expected``."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if a_spec != e_spec:
        raise AssertionError(f"{call}: {what} has the wrong structure: expected {e_spec}, "
                             f"got {a_spec}.")
    for name, a, e in zip(leaf_names(expected), a_leaves, e_leaves, strict=True):
        if not isinstance(a, torch.Tensor):
            raise AssertionError(f"{call}: {what}[{name}] is a {type(a).__name__}, "
                                 "expected a tensor.")
        if a.shape != e.shape:
            raise AssertionError(f"{call}: {what}[{name}] has shape {tuple(a.shape)}, "
                                 f"expected {tuple(e.shape)}.")


def assert_trees_close(actual: Any, expected: Any, *, rtol: float, atol: float, what: str,
                       call: str, rounding: float = 0.0) -> None:
    """Element-wise ``|a - e| <= atol * max|e| + rounding + rtol * |e|`` over all leaves,
    else an AssertionError naming the worst leaf, its index, both values and the errors.
    ``rounding`` is an absolute allowance for the problem's own conditioning (see
    ``hessfunc.testing.assertions``)."""
    check_structure(actual, expected, what, call)
    names = leaf_names(expected)
    a_leaves = pytree.tree_leaves(actual)
    e_leaves = [e.detach() for e in pytree.tree_leaves(expected)]
    scale = max((float(e.abs().max()) for e in e_leaves if e.numel()), default=0.0)
    abs_tol = atol * max(scale, SCALE_FLOOR) + rounding
    worst: tuple[float, str, tuple[int, ...], float, float] | None = None
    for name, a, e in zip(names, a_leaves, e_leaves, strict=True):
        if not e.numel():
            continue
        a = a.detach().to(device=e.device, dtype=torch.float64)
        e = e.to(torch.float64)
        err = (a - e).abs()
        excess = err - (abs_tol + rtol * e.abs())
        excess = torch.where(torch.isnan(a) | torch.isnan(e), torch.inf, excess)
        i = int(excess.argmax())
        if float(excess.reshape(-1)[i]) > 0 and (worst is None
                                                 or float(excess.reshape(-1)[i]) > worst[0]):
            index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), e.shape))
            worst = (float(excess.reshape(-1)[i]), name, index, float(a.reshape(-1)[i]),
                     float(e.reshape(-1)[i]))
    if worst is not None:
        _, name, index, a, e = worst
        raise AssertionError(
            f"{call}: {what} differs from the oracle at {name}{list(index)}: got {a!r}, "
            f"expected {e!r} (error {abs(a - e):.3g}, "
            f"relative {abs(a - e) / max(abs(e), 1e-300):.3g}"
            f"; allowed {abs_tol + rtol * abs(e):.3g} = atol {atol:g} x max|expected| "
            f"{max(scale, SCALE_FLOOR):.3g} + rtol {rtol:g} x |expected|"
            + (f" + the problem's rounding {rounding:.3g}" if rounding else "") + ").")


def checked_primals(primals: Any, argnums: Any, call: str) -> tuple[Any, ...]:
    """``primals`` as a tuple (a list is accepted) that ``argnums``, one int, indexes."""
    primals = check_primals(tuple(primals) if isinstance(primals, list) else primals, call)
    check_argnums(argnums, len(primals), call, allow_tuple=False)
    return primals
