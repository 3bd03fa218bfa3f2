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

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import ArgumentError

__all__ = ["in_transform", "use_autograd", "leaf_copies", "zeros_for_none", "normalize_argnums",
           "dense_embedding_gradients",
           "reaches_other_leaves", "batched_vjp",
           "second_order_kernels", "forward_ad_gap", "warn_forward_gap_once",
           "missing_derivative", "explain_missing_derivative"]


def in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def use_autograd(args: Sequence[Any]) -> bool:
    """The plain-autograd fast path applies: no transform, no outer graph on the inputs."""
    if in_transform():
        return False
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.requires_grad:
                return False
        elif isinstance(arg, dict) and all(isinstance(t, torch.Tensor) for t in arg.values()):
            if any(t.requires_grad for t in arg.values()):
                return False
        elif any(isinstance(t, torch.Tensor) and t.requires_grad
                 for t in pytree.tree_leaves(arg)):
            return False
    return True


def reaches_other_leaves(f: Any, out: Any, leaves: Sequence[torch.Tensor]) -> bool:
    """Whether ``out``'s graph reaches tensors requiring grad other than ``leaves``.

    Such tensors are captured by ``f`` (e.g. a model's parameters in a closure); the
    plain-autograd fast path would cut the graph to them, while ``torch.func`` keeps
    it, so the caller must take the ``torch.func`` path instead (NOTE [autograd at
    top level]). Functions marked ``pure`` (those made by ``functionalize``, whose
    private model copy holds no tensor requiring grad) skip the walk.
    """
    if getattr(f, "pure", False) or not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return False
    own = {id(t) for t in leaves}
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:  # an AccumulateGrad node: a leaf
            if id(variable) not in own:
                return True
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def batched_vjp(outputs: torch.Tensor, inputs: Sequence[torch.Tensor], columns: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
    """``(k, *input.shape)`` per input: the vector-Jacobian products of ``outputs`` with each
    of the ``k`` rows of ``columns`` ``(k, *outputs.shape)``, in one batched backward pass
    (or one pass per row where an op has no batching rule). The graph is kept; inputs
    that ``outputs`` does not reach get zeros."""
    if columns.shape[0] == 1:  # no vmap for one row
        return tuple(r[None] for r in torch.autograd.grad(
            outputs, list(inputs), columns[0], retain_graph=True, allow_unused=True,
            materialize_grads=True))
    try:
        found = torch.autograd.grad(outputs, list(inputs), columns, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        # materialize_grads would give an unreached input zeros without the row axis
        return tuple(x.new_zeros(columns.shape[0], *x.shape) if r is None else r
                     for x, r in zip(inputs, found, strict=True))
    except RuntimeError:  # an op without a batching rule
        rows = [torch.autograd.grad(outputs, list(inputs), c, retain_graph=True,
                                    allow_unused=True, materialize_grads=True) for c in columns]
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))


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
        arg = args[a]
        if isinstance(arg, dict) and all(isinstance(t, torch.Tensor) for t in arg.values()):
            fresh_dict = {k: t.detach().requires_grad_(True) for k, t in arg.items()}
            leaves.extend(fresh_dict.values())
            new_args[a] = fresh_dict
            continue
        flat, spec = pytree.tree_flatten(arg)
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



# NOTE [attention kernels]: on torch 2.13 CPU the fused scaled-dot-product
# attention kernel (used by nn.MultiheadAttention and F.scaled_dot_product_attention)
# has neither a forward-mode rule nor a double-backward rule, so every
# second-order quantity through attention fails inside torch. The "math" backend
# computes the same attention from plain ops, which are twice differentiable in
# both modes. Every second-order entry point therefore evaluates ``f`` under
# ``sdpa_kernel(SDPBackend.MATH)``; this changes only which attention kernel runs
# (same function, exact to rounding) and nothing else. For the same reason it turns off
# the fused "fast path" of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``
# (``torch.backends.mha``), which torch takes in eval mode where no input requires grad
# (as under ``torch.func.jvp``) and which has no forward-mode rule; and it computes weight
# normalisation (``parametrizations.weight_norm``) from its definition, since torch's fused
# kernel for it has a wrong double backward.
try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend as _SDPBackend
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    _sdpa_kernel = None
    _SDPBackend = None


class _CompositeWeightNorm(torch.overrides.TorchFunctionMode):
    """``torch._weight_norm(v, g, dim)`` as its definition ``v g / ||v||`` (the norm over
    every axis but ``dim``): torch 2.13's fused ``_weight_norm_interface`` has a wrong
    double backward (a Hessian off by 0.35 of its size against finite differences, and not
    symmetric) and no forward-mode rule (NOTE [attention kernels])."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g = args[0], args[1]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


@contextlib.contextmanager
def second_order_kernels() -> Iterator[None]:
    """Evaluate under kernels that have second-order rules (NOTE [attention kernels])."""
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if fastpath:
        mha.set_fastpath_enabled(False)
    try:
        with _CompositeWeightNorm():
            if _sdpa_kernel is None:
                yield
            else:
                with _sdpa_kernel(_SDPBackend.MATH):
                    yield
    finally:
        if fastpath:
            mha.set_fastpath_enabled(True)


class dense_embedding_gradients(torch.overrides.TorchFunctionMode):  # noqa: N801
    """Evaluate ``f`` with every embedding lookup's ``sparse`` flag off.

    NOTE [sparse embedding gradients]: ``nn.Embedding(sparse=True)`` makes torch give its
    weight a sparse gradient. That is the same derivative in another layout, but torch has
    no batched backward through it, and sparse results are not laid out like ``params``:
    products, operators and dense Hessians built on that gradient fail inside torch. A
    gradient graph built with the flag off holds the same numbers, densely. The products
    build their graph again under this mode where the first one holds a sparse gradient
    (so no other ``f`` pays for the mode)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        place = {torch.nn.functional.embedding: 6, torch.embedding: 4}.get(func)
        if place is not None:
            if len(args) > place:
                args = (*args[:place], False, *args[place + 1:])
            if "sparse" in kwargs:
                kwargs["sparse"] = False
        return func(*args, **kwargs)


_WARNED_FORWARD_GAPS: set[str] = set()


def forward_ad_gap(exc: BaseException) -> str | None:
    """The op named by a 'no forward-mode rule' error, or None for any other error."""
    msg = str(exc)
    marker = "Trying to use forward AD with "
    if marker in msg:
        return msg.split(marker, 1)[1].split(" ", 1)[0]
    if "implement the jvp function for custom autograd.Function" in msg:
        return "a custom autograd.Function without a jvp"
    lowered = msg.lower()
    if ("forward ad" in lowered or "forward-mode" in lowered) and "not implemented" in lowered:
        return "an operation"
    return None


def warn_forward_gap_once(op: str) -> None:
    if op in _WARNED_FORWARD_GAPS:
        return
    _WARNED_FORWARD_GAPS.add(op)
    warnings.warn(
        f"hessfunc.hvp: {op} has no forward-mode rule in this torch; computing the same "
        "Hessian-vector product by reverse-over-reverse instead (pass "
        "mode='reverse-over-reverse' to skip the attempt).",
        RuntimeWarning,
        stacklevel=3,
    )


# NOTE [ops differentiable once]: some aten backward functions have no derivative of
# their own (torch 2.13: ``hardsigmoid_backward``, the backward of nn.Hardsigmoid), so
# the second backward pass through them raises torch's bare "derivative for
# aten::X is not implemented". The second-order entry points turn that into an
# ArgumentError naming the op, the module it comes from and the fix.
_MISSING_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")
#: aten ops without a derivative -> (what uses them, a twice-differentiable replacement)
_ONCE_DIFFERENTIABLE = {
    "hardsigmoid_backward": ("nn.Hardsigmoid / F.hardsigmoid",
                             "F.hardtanh(x / 6 + 0.5, 0.0, 1.0) (the same function, with a "
                             "second-derivative rule) or a smooth activation such as "
                             "nn.Sigmoid"),
}


def missing_derivative(exc: BaseException) -> str | None:
    """The op named by torch's "derivative for OP is not implemented", or None."""
    if not isinstance(exc, (RuntimeError, NotImplementedError)):
        return None
    match = _MISSING_DERIVATIVE.search(str(exc))
    return match.group(1) if match else None


def missing_derivative_message(op: str, call: str) -> str:
    name = op.split("::")[-1]
    source, fix = _ONCE_DIFFERENTIABLE.get(
        name, ("an operation of f", "a twice-differentiable equivalent of that operation"))
    return (f"{call}: torch has no derivative for {op} (used by {source}), so second "
            "derivatives cannot pass through it; expected f to be twice differentiable by "
            f"autograd. Replace it with {fix}.")


@contextlib.contextmanager
def explain_missing_derivative(call: str, message: Callable[[str, str], str] | None = None
                               ) -> Iterator[None]:
    """Re-raise torch's "derivative for OP is not implemented" from a second-order pass as
    an :class:`ArgumentError` naming the op and the fix (NOTE [ops differentiable once]);
    ``message(op, call)`` words it where the pass is another one."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        op = missing_derivative(exc)
        if op is None:
            raise
        raise ArgumentError((message or missing_derivative_message)(op, call)) from None
