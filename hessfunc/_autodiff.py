"""Shared machinery of the reverse-mode transforms.

NOTE [autograd at top level]: measured on torch 2.13 CPU (benchmarks/bench_hvp.py),
``torch.func.grad`` costs 1.2-1.8x a plain ``torch.autograd.grad`` on small
problems, and ``vjp(grad(f))`` 2.5-3.9x against 2.3-2.7x for a plain double
backward. So when no ``torch.func`` transform is active and no input already
carries an outer autograd graph, hessfunc differentiates with plain autograd on
fresh leaf copies of the inputs; under ``vmap``/``grad``/``jvp`` (or with outer
graphs) it uses ``torch.func``. Both compute the same quantity; the tests check
each path against the loop oracle and finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["in_transform", "use_autograd", "leaf_copies", "zeros_for_none", "normalize_argnums"]


def in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def use_autograd(args: Sequence[Any]) -> bool:
    """The plain-autograd fast path applies: no transform, no outer graph on the inputs."""
    if in_transform():
        return False
    return not any(isinstance(t, torch.Tensor) and t.requires_grad
                   for t in pytree.tree_leaves(list(args)))


def normalize_argnums(argnums: int | tuple[int, ...], nargs: int) -> tuple[int, ...]:
    items = argnums if isinstance(argnums, tuple) else (argnums,)
    return tuple(a % nargs for a in items)


def leaf_copies(args: Sequence[Any], argnums: tuple[int, ...]
                ) -> tuple[list[Any], list[torch.Tensor]]:
    """Copy of ``args`` whose differentiated arguments are fresh leaves requiring grad.

    Returns the new argument list and the flat list of those leaves.
    """
    new_args = list(args)
    leaves: list[torch.Tensor] = []
    for a in argnums:
        flat, spec = pytree.tree_flatten(args[a])
        fresh = [t.detach().requires_grad_(True) for t in flat]
        leaves.extend(fresh)
        new_args[a] = pytree.tree_unflatten(fresh, spec)
    return new_args, leaves


def zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
                   ) -> list[torch.Tensor]:
    """``torch.autograd.grad(..., allow_unused=True)`` gives None for unused inputs: zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]


def unflatten_like(flat: list[torch.Tensor], args: Sequence[Any], argnums: tuple[int, ...],
                   single: bool) -> Any:
    """Split a flat list of per-leaf results back into the structure of ``args[argnums]``."""
    out = []
    pos = 0
    for a in argnums:
        leaves, spec = pytree.tree_flatten(args[a])
        out.append(pytree.tree_unflatten(flat[pos:pos + len(leaves)], spec))
        pos += len(leaves)
    return out[0] if single else tuple(out)


def detach_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


Fn = Callable[..., Any]
