"""``grad``: the gradient transform, torch.func semantics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func

from ._autodiff import (
    detach_tree,
    leaf_copies,
    normalize_argnums,
    reaches_other_leaves,
    unflatten_like,
    use_autograd,
    zeros_for_none,
)
from ._checks import (
    check_argnums,
    check_callable,
    check_floating,
    check_scalar_output,
    describe,
    wrap_scalar,
)
from .errors import ArgumentError
from .graph.curvature import through_checkpoints

__all__ = ["grad"]


def grad(f: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False
         ) -> Callable[..., Any]:
    """The gradient of a scalar function, as a function with ``f``'s arguments.

    ``grad(f, argnums)(*args)`` is ``d f(*args) / d args[argnums]``, with the
    structure of ``args[argnums]`` (a tuple of such when ``argnums`` is a tuple).
    Same semantics as ``torch.func.grad``; composable with ``vmap``, ``jvp`` and
    itself. At top level it runs plain autograd, which is faster (NOTE [autograd
    at top level] in ``hessfunc/_autodiff.py``).

    Args:
        f: scalar-valued function (``f(...) -> (loss, aux)`` with ``has_aux``).
        argnums: which positional argument(s) to differentiate.
        has_aux: f returns ``(scalar, aux)``; the result is then ``(grad, aux)``.

    Example:
        >>> g = grad(lambda x: (x ** 3).sum())
        >>> g(torch.tensor([1.0, 2.0]))
        tensor([ 3., 12.])
    """
    check_callable(f, "f", "hessfunc.grad")
    checked = wrap_scalar(f, "hessfunc.grad", has_aux, offers_aux=True)
    func_grad = torch.func.grad(checked, argnums=argnums, has_aux=has_aux)

    def grad_f(*args: Any, **kwargs: Any) -> Any:
        check_argnums(argnums, len(args), "hessfunc.grad")
        nums = normalize_argnums(argnums, len(args))
        for a in nums:
            check_floating(args[a], f"args[{a}]", "hessfunc.grad")
        if kwargs:
            return gradient(args, kwargs, nums)
        # f checkpoints activations: the gradient of its captured graph
        _, g = through_checkpoints(lambda fn: gradient(args, kwargs, nums) if fn is f else
                                   grad(fn, argnums, has_aux)(*args), f, args)
        return g

    def gradient(args: tuple[Any, ...], kwargs: dict[str, Any], nums: tuple[int, ...]) -> Any:
        if not use_autograd(args):
            return func_grad(*args, **kwargs)
        new_args, leaves = leaf_copies(args, nums)
        with torch.enable_grad():
            out = f(*new_args, **kwargs)
            if has_aux and not (isinstance(out, tuple) and len(out) == 2):
                raise ArgumentError(f"hessfunc.grad: with has_aux=True f must return "
                                    f"(scalar, aux), got {describe(out)}.")
            loss, aux = out if has_aux else (out, None)
            check_scalar_output(loss, "hessfunc.grad", offers_aux=True)
            if reaches_other_leaves(f, loss, leaves):  # keep the graph to captured tensors
                return func_grad(*args, **kwargs)
            if not loss.requires_grad:
                flat = [torch.zeros_like(t) for t in leaves]
            else:
                flat = zeros_for_none(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)
        g = unflatten_like(flat, args, nums, single=not isinstance(argnums, tuple))
        return (g, detach_tree(aux)) if has_aux else g

    return grad_f
