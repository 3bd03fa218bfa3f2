"""``check_derivatives``: derivatives of any order against finite differences.

JAX's ``check_grads`` semantics for parameter trees: along a random direction ``v`` the
forward-mode derivative ``jvp(f)(x; v)`` must equal the central difference of ``f``, and
for a random cotangent ``w`` the reverse-mode ``<vjp(f)(x; w), v>`` must equal
``<w, difference>``. For ``order = k`` the same checks run again on the derivative
functions ``x -> jvp(f)(x; v)`` and ``x -> vjp(f)(x; w)``, so order 2 checks HVPs
(forward-over-reverse, reverse-over-reverse, ...) against differences of gradients.

NOTE [finite-difference step]: the fourth-order central stencil
``(8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h`` has truncation error
``h^4 f^(5) / 30`` and rounding error about ``eps |f| / h``; both are balanced at
``h ~ eps^(1/5)``: 1e-3 in float64 (error ~1e-12 relative to the function's scale),
3e-2 in float32 (~1e-5). The direction has unit norm over the whole tree, so ``h`` is
the step's length. The tolerances (float64 rtol 1e-6, float32 2e-2) leave room for
functions whose fifth derivative is large against the first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jvp, vjp
from torch.utils import _pytree as pytree

from .._checks import check_callable, check_positive_int
from ..errors import ArgumentError
from ._compare import assert_trees_close, checked_primals

__all__ = ["check_derivatives"]

#: ``(step, rtol, atol)`` per dtype (NOTE [finite-difference step]); atol is relative to
#: the largest magnitude of the finite difference.
FD_SETTINGS = {
    torch.float64: (1e-3, 1e-6, 1e-7),
    torch.float32: (3e-2, 2e-2, 2e-3),
}

Leaves = list[torch.Tensor]


def _difference(fn: Callable[[Leaves], Any], x: Leaves, v: Leaves, h: float) -> Any:
    """Fourth-order central difference of ``fn`` at ``x`` along ``v``, leaf by leaf."""
    def at(t: float) -> list[torch.Tensor]:
        return pytree.tree_leaves(fn([a + t * b for a, b in zip(x, v, strict=True)]))

    p1, m1, p2, m2 = at(h), at(-h), at(2 * h), at(-2 * h)
    _, spec = pytree.tree_flatten(fn(x))
    return pytree.tree_unflatten([(8 * (a - b) - (c - d)) / (12 * h)
                                  for a, b, c, d in zip(p1, m1, p2, m2, strict=True)], spec)


def _unit(leaves: Leaves, g: torch.Generator) -> Leaves:
    v = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in leaves]
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in v))
    return [t / norm.to(t.dtype) for t in v]


def _dot(a: Any, b: Any) -> torch.Tensor:
    return sum((x.double() * y.double()).sum()
               for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True))


def _forward(fn: Callable[[Leaves], Any], x: Leaves, v: Leaves, label: str) -> Any:
    """``jvp(fn)(x; v)``, or None where torch's own forward rule fails (NOTE [ZeroTensor
    trap] in hessfunc/products.py: not the code under test; that check is skipped)."""
    call = "check_derivatives"
    try:
        return jvp(fn, (x,), (v,))[1]
    except RuntimeError as exc:
        if "ZeroTensors are immutable" in str(exc):
            warnings.warn(f"{call}: torch cannot take the forward-mode derivative of {label} "
                          "(its ZeroTensor bug, pytorch/pytorch#123996); that one check is "
                          "skipped.", RuntimeWarning, stacklevel=3)
            return None
        raise ArgumentError(
            f"{call}: forward mode failed at {label} ({exc}). If f uses a custom "
            "autograd.Function without a jvp staticmethod, pass modes=('rev',).") from None


def _check(fn: Callable[[Leaves], Any], x: Leaves, order: int, modes: tuple[str, ...],
           g: torch.Generator, settings: tuple[float, float, float], label: str) -> None:
    h, rtol, atol = settings
    v = _unit(x, g)
    out = fn(x)
    w = pytree.tree_unflatten(
        [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
         for t in pytree.tree_leaves(out)], pytree.tree_flatten(out)[1])
    fd = _difference(fn, x, v, h)
    call = "check_derivatives"
    derivatives: list[tuple[str, Callable[[Leaves], Any]]] = []
    tangent = _forward(fn, x, v, label or "f") if "fwd" in modes else None
    if tangent is not None:
        assert_trees_close(tangent, fd, rtol=rtol, atol=atol,
                           what=f"the forward-mode derivative of {label or 'f'} along v",
                           call=call)
        derivatives.append(("jvp", lambda z: jvp(fn, (z,), (v,))[1]))
    if "rev" in modes:
        try:
            _, pullback = vjp(fn, x)
            (cotangent,) = pullback(w)
        except RuntimeError as exc:
            raise ArgumentError(
                f"{call}: reverse mode failed at {label or 'f'} ({exc}). A custom "
                "autograd.Function needs setup_context (torch.func transforms).") from None
        got, want = _dot(cotangent, v), _dot(w, fd)
        assert_trees_close({"<vjp(w), v>": got}, {"<vjp(w), v>": want}, rtol=rtol, atol=atol,
                           what=f"the reverse-mode derivative of {label or 'f'}", call=call)

        def pulled(z: Leaves) -> Leaves:
            return vjp(fn, z)[1](w)[0]

        derivatives.append(("vjp", pulled))
    if order > 1:
        for name, derivative in derivatives:
            _check(derivative, x, order - 1, modes, g, settings,
                   f"{name}({label or 'f'})")


def check_derivatives(f: Callable[..., Any], primals: Sequence[Any], order: int = 2,
                      modes: Sequence[str] = ("fwd", "rev"), *, argnums: int = 0,
                      eps: float | None = None, rtol: float | None = None,
                      atol: float | None = None, seed: int = 0) -> None:
    """Check ``f``'s derivatives up to ``order`` in ``primals[argnums]`` by finite differences.

    Args:
        f: ``f(*primals)`` returning a tensor or a tree of tensors (any shape).
        primals: its arguments; ``primals[argnums]`` a floating tensor or a tree of them
            (float64 recommended; float32 with looser tolerances; half precision refused).
        order: how many derivatives deep to check (2: gradients and HVPs).
        modes: ``"fwd"`` (``torch.func.jvp``) and/or ``"rev"`` (``torch.func.vjp``);
            order 2 with both checks all four compositions.
        eps: the finite-difference step (default in ``FD_SETTINGS`` by dtype).
        rtol: relative tolerance (default in ``FD_SETTINGS`` by dtype).
        atol: tolerance relative to the largest finite difference (likewise).
        seed: of the random directions and cotangents.

    Raises:
        AssertionError: a derivative differs from its finite difference; the message
            names which (e.g. ``vjp(jvp(f))``), the worst leaf and index, and both values.

    Example:
        >>> check_derivatives(lambda p: torch.sin(p["w"]).prod(),
        ...                   ({"w": torch.tensor([0.3, 1.2], dtype=torch.float64)},), order=3)
    """
    call = "check_derivatives"
    check_callable(f, "f", call)
    order = check_positive_int(order, "order", call)
    modes = tuple(modes)
    if not modes or any(m not in ("fwd", "rev") for m in modes):
        raise ArgumentError(f"{call}: `modes` must be a non-empty subset of ('fwd', 'rev'), "
                            f"got {modes!r}.")
    primals = checked_primals(primals, argnums, call)
    leaves, spec = pytree.tree_flatten(primals[argnums])
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ArgumentError(f"{call}: primals[{argnums}] must be a tensor or a tree of tensors.")
    dtypes = {t.dtype for t in leaves}
    if dtypes & {torch.float16, torch.bfloat16}:
        raise ArgumentError(
            f"{call}: primals[{argnums}] is {sorted(map(str, dtypes))}; finite differences "
            "are meaningless in half precision (the rounding error swamps any step). "
            "Check in float64: convert the function and its arguments with .double().")
    if not all(d in FD_SETTINGS for d in dtypes):
        raise ArgumentError(f"{call}: primals[{argnums}] must be float64 or float32, got "
                            f"{sorted(map(str, dtypes))}.")
    dtype = torch.float32 if torch.float32 in dtypes else torch.float64
    h, r, a = FD_SETTINGS[dtype]
    settings = (eps or h, r if rtol is None else rtol, a if atol is None else atol)

    def fn(xs: Leaves) -> Any:
        args = list(primals)
        args[argnums] = pytree.tree_unflatten(xs, spec)
        return f(*args)

    _check(fn, [t.detach() for t in leaves], order, modes,
           torch.Generator().manual_seed(seed), settings, "")
