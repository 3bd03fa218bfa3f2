"""Argument validation shared by every public entry point.

Each check raises :class:`hessfunc.errors.ArgumentError` with the call, the
argument, what was expected, what was got, and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import ArgumentError

#: Dtypes refused for differentiation (NOTE in check_floating's message).
HALF_DTYPES = (torch.float16, torch.bfloat16)

__all__ = [
    "HALF_DTYPES",
    "check_callable",
    "check_primals",
    "check_argnums",
    "check_floating",
    "check_positive_int",
    "check_chunk_size",
    "check_scalar_output",
    "check_like",
    "describe",
]


def describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, dict):
        return f"dict with keys {list(x)[:6]}{'...' if len(x) > 6 else ''}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def check_callable(f: Any, name: str, call: str) -> None:
    if not callable(f):
        raise ArgumentError(f"{call}: `{name}` must be a callable, got {describe(f)}.")


def check_primals(primals: Any, call: str) -> tuple[Any, ...]:
    if not isinstance(primals, tuple):
        raise ArgumentError(
            f"{call}: `primals` must be a tuple of f's arguments, got {describe(primals)}; "
            "wrap them, e.g. (params, x, y) or (x,)."
        )
    return primals


def check_argnums(argnums: Any, nargs: int, call: str, *, allow_tuple: bool = True) -> None:
    """``argnums`` must index f's positional arguments (an int, or a tuple of ints)."""
    items = argnums if (allow_tuple and isinstance(argnums, tuple)) else (argnums,)
    expected = "an int or a tuple of ints" if allow_tuple else "an int"
    if not items or not all(isinstance(a, int) and not isinstance(a, bool) for a in items):
        raise ArgumentError(f"{call}: `argnums` must be {expected}, got {argnums!r}.")
    for a in items:
        if not -nargs <= a < nargs:
            raise ArgumentError(
                f"{call}: `argnums`={argnums!r} is out of range for a function called with "
                f"{nargs} positional argument(s); use 0..{nargs - 1}."
            )
    if len(set(a % nargs for a in items)) != len(items):
        raise ArgumentError(f"{call}: `argnums`={argnums!r} repeats an argument.")


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(where, leaf)`` pairs; a flat dict or a tensor (the common cases) without pytree."""
    if isinstance(tree, torch.Tensor):
        return [("", tree)]
    if isinstance(tree, dict) and all(isinstance(t, torch.Tensor) for t in tree.values()):
        return [(f"[{k!r}]", t) for k, t in tree.items()]
    return [(pytree.keystr(path) if path else "", leaf)
            for path, leaf in pytree.tree_flatten_with_path(tree)[0]]


def check_floating(tree: Any, name: str, call: str) -> None:
    """Every tensor in ``tree`` must be floating point (we differentiate it)."""
    named = _named_leaves(tree)
    if not named:
        raise ArgumentError(f"{call}: `{name}` holds no tensors; expected floating tensors "
                            "to differentiate.")
    for where, leaf in named:
        if not isinstance(leaf, torch.Tensor):
            raise ArgumentError(
                f"{call}: `{name}{where}` must be a torch.Tensor, got {describe(leaf)}."
            )
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise ArgumentError(
                f"{call}: `{name}{where}` has dtype {leaf.dtype}; derivatives need a floating "
                f"dtype. Convert it, e.g. `.to(torch.float64)`, or point `argnums` elsewhere."
            )
        if leaf.dtype in HALF_DTYPES:
            raise ArgumentError(
                f"{call}: `{name}{where}` has dtype {leaf.dtype}; hessfunc refuses half "
                "precision for second derivatives (rounding swamps curvature, and a silent "
                "upcast would change the result's dtype). Convert explicitly with `.float()` "
                "(and the model with `model.float()`)."
            )


def check_samples_first(batch: Any, call: str) -> int:
    """``N``, the samples along the first axis of every tensor of ``batch`` (the inputs
    and targets that ``per_sample=True`` splits), or a clear error where they differ."""
    sizes = [int(t.shape[0]) if t.dim() else None for t in pytree.tree_leaves(batch)
             if isinstance(t, torch.Tensor)]
    if not sizes or None in sizes or len(set(sizes)) != 1:
        raise ArgumentError(
            f"{call}: per_sample=True splits the inputs and targets into samples along their "
            f"first axis, but their first axes have sizes {sizes}"
            f"{' (None: a 0-d tensor)' if None in sizes else ''}. Give every input and "
            "target one row per sample (a sequence model's (N, T) targets as they are, "
            "flattened inside the loss), or leave per_sample off.")
    return sizes[0]


def check_positive_int(value: Any, name: str, call: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{call}: `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_chunk_size(chunk_size: Any, call: str) -> int | None:
    if chunk_size is None:
        return None
    return check_positive_int(chunk_size, "chunk_size", call)


def check_scalar_output(out: Any, call: str, offers_aux: bool = False) -> None:
    """The differentiated function must return one scalar (a 0-d floating tensor);
    ``offers_aux``: the call takes ``has_aux`` (the hint then names it)."""
    if not isinstance(out, torch.Tensor):
        hint = ("if f returns (loss, aux) pass has_aux=True" if offers_aux else
                "if f returns (loss, aux), differentiate `lambda *a: f(*a)[0]`")
        raise ArgumentError(f"{call}: f must return a scalar tensor, got {describe(out)}; "
                            f"{hint}.")
    if out.dim() != 0:
        raise ArgumentError(
            f"{call}: f must return a scalar (0-d) tensor, got shape {tuple(out.shape)}; "
            "reduce it, e.g. `.sum()` or `.mean()` (a loss with reduction='none' is per sample)."
        )
    if not out.is_floating_point():
        raise ArgumentError(f"{call}: f returned dtype {out.dtype}; expected a floating scalar.")


def check_loss_output(value: Any, call: str) -> None:
    """``loss_fn(outputs, targets)`` of the Gauss-Newton and Fisher calls must be one
    number (a tensor of one element)."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ArgumentError(f"{call}: `loss_fn(outputs, targets)` must return a scalar, got "
                            f"{describe(value)}.")


def check_like(tangent: Any, primal: Any, name: str, call: str) -> None:
    """``tangent`` must have the tree structure, shapes and dtype of ``primal``."""
    if isinstance(primal, dict) and isinstance(tangent, dict) and list(tangent) == list(primal):
        t_leaves, p_leaves = list(tangent.values()), list(primal.values())
        same_structure = all(isinstance(t, torch.Tensor) for t in p_leaves)
    else:
        same_structure = False
    if not same_structure:
        t_leaves, t_spec = pytree.tree_flatten(tangent)
        p_leaves, p_spec = pytree.tree_flatten(primal)
        same_structure = t_spec == p_spec
    if not same_structure:
        raise ArgumentError(
            f"{call}: `{name}` must have the structure of the differentiated argument "
            f"({describe(primal)}), got {describe(tangent)}."
        )
    for i, (t, p) in enumerate(zip(t_leaves, p_leaves, strict=True)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{call}: `{name}` leaf {i} is {describe(t)}, expected a tensor.")
        if t.shape != p.shape:
            raise ArgumentError(
                f"{call}: `{name}` leaf {i} has shape {tuple(t.shape)}, expected "
                f"{tuple(p.shape)} (the shape of the differentiated argument)."
            )
        if t.dtype != p.dtype:
            raise ArgumentError(
                f"{call}: `{name}` leaf {i} has dtype {t.dtype}, expected {p.dtype}; "
                f"convert it with `.to({p.dtype})`."
            )


def wrap_scalar(f: Callable[..., Any], call: str, has_aux: bool = False,
                offers_aux: bool = False) -> Callable[..., Any]:
    """``f`` with its output checked to be a scalar (or ``(scalar, aux)`` with ``has_aux``;
    ``offers_aux``: the call takes ``has_aux``)."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        out = f(*args, **kwargs)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ArgumentError(
                    f"{call}: with has_aux=True f must return (scalar, aux), got {describe(out)}."
                )
            check_scalar_output(out[0], call, offers_aux=True)
        else:
            check_scalar_output(out, call, offers_aux=offers_aux)
        return out

    return checked
