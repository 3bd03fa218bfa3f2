"""Propagation rules: how one ATen op maps input jets to output coefficients.

A rule is called as ``rule(spec, op, args, kwargs, out)`` where ``args`` and
``kwargs`` hold :class:`~hessfunc.forward._series.Jet` objects for inputs that
depend on ``x`` and plain values otherwise, and ``out`` is the op's value
(already computed from the inputs' values). It returns the output's
coefficient list ``[y_1, ..., y_K]`` (a tuple of such lists, or ``None``
entries, for ops with several outputs), ``None`` when the output does not
depend on ``x``, or raises :class:`NotApplicable` to hand over to the exact
generic rule (:mod:`hessfunc.forward._fallback`).

The kinds of rules:

* ``constant``: outputs that do not vary with the input values (``zeros_like``,
  ``detach``, rounding, integer results).
* ``linear``: ops linear in their data arguments jointly (views, reductions,
  ``cat``, ``add``, ``where``, indexing): every coefficient goes through the
  op, with the constant data arguments replaced by zero.
* ``multilinear``: ``mul``, ``mm``, ``bmm``, ``mv``, ``einsum``, ``convolution``:
  linear when one operand is a jet, the Cauchy product when two are.
* ``affine_product``: ``addmm``-like ``beta * bias + alpha * product``.
* ``divide``: ``a / b`` is linear in ``a``; a jet ``b`` goes through ``1/b``.
* ``elementwise``: ``phi(z)`` from the derivative table (Faa di Bruno).
* ``piecewise_linear``: ``relu``-like, ``max``, ``clamp``: locally linear, so
  every coefficient is the op's jvp.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._derivatives import DERIVATIVES
from ._series import (
    Block,
    Jet,
    JetSpec,
    align,
    compose,
    map_blocks,
    mul_rows,
    product,
    vmapped_bilinear,
)

__all__ = ["NotApplicable", "lookup", "floating_outputs", "split_jets"]

aten = torch.ops.aten
Rule = Callable[[JetSpec, Any, tuple, dict, Any], Any]


class NotApplicable(Exception):
    """Raised by a rule that does not cover this call; the generic rule takes over."""


def _is_jet(a: Any) -> bool:
    return isinstance(a, Jet)


def split_jets(args: tuple, kwargs: dict) -> tuple[list[Jet], Callable[[Sequence[Any]], tuple]]:
    """The jets in ``(args, kwargs)`` and a function that puts replacements back."""
    flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    where = [i for i, a in enumerate(flat) if _is_jet(a)]
    jets = [flat[i] for i in where]

    def rebuild(values: Sequence[Any]) -> tuple:
        new = list(flat)
        for i, v in zip(where, values, strict=True):
            new[i] = v
        return torch.utils._pytree.tree_unflatten(new, spec)

    return jets, rebuild


def floating_outputs(out: Any) -> tuple[Tensor, ...]:
    """The floating-point tensors among an op's outputs, in order."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return tuple(t for t in leaves if isinstance(t, Tensor) and t.is_floating_point())


def _zero_like(a: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.zeros_like(a) if a.is_floating_point() else a
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a * 0
    return a


# --- constant ------------------------------------------------------------------------


def constant(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Any) -> None:
    return None


# --- linear --------------------------------------------------------------------------


def linear(data: Sequence[int] = (0,), zero: Sequence[int] = (), coeff_op: Any = None) -> Rule:
    """Rule for an op linear in the arguments at positions ``data`` jointly.

    Constant tensors at those positions are replaced by zeros and the scalars at
    positions ``zero`` by 0 (``add(z, 1.0)`` has coefficients ``z_k + 0``);
    ``coeff_op`` replaces the op for the coefficients (``view`` -> ``reshape``,
    since rows of a coefficient need not be laid out like the value).
    """

    def rule(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Any) -> list:
        if any(_is_jet(a) for a in torch.utils._pytree.tree_leaves(kwargs)):
            raise NotApplicable
        template = list(args)
        slots: list[tuple[int, int | None]] = []
        jets: list[Jet] = []
        for p, a in enumerate(template):
            if p in data:
                if isinstance(a, (list, tuple)):
                    items = list(a)
                    for i, e in enumerate(items):
                        if _is_jet(e):
                            slots.append((p, i))
                            jets.append(e)
                        else:
                            items[i] = _zero_like(e)
                    template[p] = items
                elif _is_jet(a):
                    slots.append((p, None))
                    jets.append(a)
                else:
                    template[p] = _zero_like(a)
            elif p in zero:
                template[p] = _zero_like(a)
            elif any(_is_jet(e) for e in torch.utils._pytree.tree_leaves(a)):
                raise NotApplicable
        fn = coeff_op or op

        def apply(*blocks: Tensor) -> Any:
            t = [list(a) if isinstance(a, list) else a for a in template]
            for (p, i), b in zip(slots, blocks, strict=True):
                if i is None:
                    t[p] = b
                else:
                    t[p][i] = b
            return fn(*t, **kwargs)

        return _per_output(out, map_blocks(spec, apply, jets))

    rule.__name__ = "linear"
    return rule


def _per_output(out: Any, per_order: list) -> Any:
    """Turn ``[order][output]`` results of a multi-output op into ``[output][order]``."""
    if isinstance(out, Tensor):
        return per_order
    n = len(out)
    return tuple([blk[o] if blk is not None else None for blk in per_order] for o in range(n))


# --- multilinear ---------------------------------------------------------------------


def _operand_slots(args: tuple, operands: Sequence[int]) -> list[tuple[int, int | None]]:
    slots = []
    for p in operands:
        if p >= len(args):
            continue
        a = args[p]
        if isinstance(a, (list, tuple)):
            slots.extend((p, i) for i, e in enumerate(a) if _is_jet(e))
        elif _is_jet(a):
            slots.append((p, None))
    return slots


def _substitute(args: tuple, slots: Sequence[tuple[int, int | None]], values: Sequence) -> list:
    t = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
    for (p, i), v in zip(slots, values, strict=True):
        if i is None:
            t[p] = v
        else:
            t[p][i] = v
    return t


def _check_only(args: tuple, kwargs: dict, slots: Sequence[tuple[int, int | None]]) -> None:
    n_jets = sum(_is_jet(a) for a in torch.utils._pytree.tree_leaves((args, kwargs)))
    if n_jets != len(slots):
        raise NotApplicable


def _multilinear_coeffs(
    spec: JetSpec, fn: Callable[..., Tensor], args: tuple, kwargs: dict, operands: Sequence[int]
) -> list[Block]:
    """Coefficients of ``fn(*args)`` for ``fn`` linear in each operand separately."""
    slots = _operand_slots(args, operands)
    _check_only(args, kwargs, slots)
    jets = [args[p] if i is None else args[p][i] for p, i in slots]
    if len(jets) == 1:

        def apply(block: Tensor) -> Tensor:
            return fn(*_substitute(args, slots, [block]), **kwargs)

        return map_blocks(spec, apply, jets)
    if len(jets) == 2:
        if fn is aten.mul.Tensor:
            return product(spec, jets[0], jets[1], mul_rows)

        def bilinear(a: Tensor, b: Tensor) -> Tensor:
            return fn(*_substitute(args, slots, [a, b]), **kwargs)

        return product(spec, jets[0], jets[1], vmapped_bilinear(bilinear))
    raise NotApplicable


def multilinear(operands: Sequence[int] = (0, 1), null: Sequence[int] = ()) -> Rule:
    """Rule for an op linear in each of ``operands``; args at ``null`` (a bias) are
    set to ``None`` for the coefficients and must not be jets."""

    def rule(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Any) -> list:
        if any(_is_jet(a) for p, a in enumerate(args) if p in null):
            raise NotApplicable
        args = tuple(None if p in null else a for p, a in enumerate(args))
        if op is aten.mul.Tensor and sum(_is_jet(a) for a in args[:2]) == 1:
            jet, other = (args[0], args[1]) if _is_jet(args[0]) else (args[1], args[0])
            if isinstance(other, Tensor):
                return [None if c is None else mul_rows(c, other, True, False) for c in jet.coeffs]
            return [None if c is None else c * other for c in jet.coeffs]
        return _multilinear_coeffs(spec, op, args, kwargs, operands)

    rule.__name__ = "multilinear"
    return rule


def _expand_rows(block: Tensor, shape: torch.Size) -> Tensor:
    """Broadcast a row-carrying block of a smaller tensor to ``(rows, *shape)``."""
    b = align(block, len(shape) + 1)
    return b.expand((b.shape[0], *shape))


def affine_product(product_op: Any) -> Rule:
    """``addmm``-like ops: ``beta * bias + alpha * product_op(m1, m2)``."""

    def rule(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Tensor) -> list:
        spec = spec._replace(adjoint=None)  # the sum below needs plain coefficients
        bias, m1, m2 = args[:3]
        beta = kwargs.get("beta", 1)
        alpha = kwargs.get("alpha", 1)
        if _is_jet(beta) or _is_jet(alpha):
            raise NotApplicable
        coeffs: list[Block] = [None] * spec.order
        if _is_jet(m1) or _is_jet(m2):
            coeffs = _multilinear_coeffs(spec, product_op, (m1, m2), {}, (0, 1))
            if alpha != 1:
                coeffs = [None if c is None else c * alpha for c in coeffs]
        if _is_jet(bias):
            for k, c in enumerate(bias.coeffs):
                if c is not None:
                    term = _expand_rows(c, out.shape) * beta
                    coeffs[k] = term if coeffs[k] is None else coeffs[k] + term
        return coeffs

    rule.__name__ = "affine_product"
    return rule


# --- division ------------------------------------------------------------------------


def _reciprocal_jet(spec: JetSpec, b: Jet) -> Jet:
    inv = torch.reciprocal(b.value)
    derivs = DERIVATIVES[aten.reciprocal.default](b.value, inv, spec.order)
    return Jet(inv, compose(spec._replace(adjoint=None), b, derivs))


def divide(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Tensor) -> list:
    """``a / b``: linear in ``a``; for a jet ``b``, ``a * (1/b)`` by the product rule."""
    if kwargs.get("rounding_mode") is not None:
        return None  # floor / trunc division: piecewise constant
    a, b = args[:2]
    if not _is_jet(b):
        if isinstance(b, Tensor):
            return [None if c is None else align(c, b.ndim + 1) / b for c in a.coeffs]
        return [None if c is None else c / b for c in a.coeffs]
    r = _reciprocal_jet(spec, b)
    if not _is_jet(a):
        if isinstance(a, Tensor):
            return [None if c is None else mul_rows(c, a, True, False) for c in r.coeffs]
        return [None if c is None else c * a for c in r.coeffs]
    # a jet over a jet: the product is the op's output, so it may contract
    return product(spec, a, r, mul_rows)


divide.__name__ = "divide"


# --- elementwise ---------------------------------------------------------------------


def elementwise(position: int = 0) -> Rule:
    """``phi(z)`` elementwise with ``phi^(m)`` from :data:`DERIVATIVES` (Faa di Bruno)."""

    def rule(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Tensor) -> list:
        z = args[position]
        others = args[:position] + args[position + 1 :]
        if not _is_jet(z) or any(
            _is_jet(a) for a in torch.utils._pytree.tree_leaves((others, kwargs))
        ):
            raise NotApplicable
        try:
            derivs = DERIVATIVES[op](z.value, out, spec.order, *others, **kwargs)
        except (NotImplementedError, ValueError) as e:
            raise NotApplicable from e
        return compose(spec, z, derivs)

    rule.__name__ = "elementwise"
    return rule


# --- piecewise linear ----------------------------------------------------------------


def piecewise_linear(spec: JetSpec, op: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """Ops that are linear on each piece: every coefficient maps through the jvp.

    Inside a piece ``y(t) = A z(t)`` with ``A`` fixed, so ``y_k = A z_k`` for all
    k (the second and higher derivatives vanish almost everywhere).
    """
    jets, rebuild = split_jets(args, kwargs)
    primals = tuple(j.value for j in jets)

    def f(*values: Tensor) -> tuple[Tensor, ...]:
        a, kw = rebuild(values)
        return floating_outputs(op(*a, **kw))

    def tangent(*blocks: Tensor) -> tuple[Tensor, ...]:
        return torch.func.jvp(f, primals, blocks)[1]

    per_order = map_blocks(spec, tangent, jets)
    return _reassemble(out, per_order)


piecewise_linear.__name__ = "piecewise_linear"


def _reassemble(out: Any, per_order: list) -> Any:
    """Map ``[order][floating output]`` back onto the op's output structure."""
    if isinstance(out, Tensor):
        return [None if blk is None else blk[0] for blk in per_order]
    result, f = [], 0
    for o in out:
        if isinstance(o, Tensor) and o.is_floating_point():
            result.append([None if blk is None else blk[f] for blk in per_order])
            f += 1
        else:
            result.append(None)
    return tuple(result)


# --- the table -----------------------------------------------------------------------

_LINEAR_1 = linear((0,))
_VIEW = linear((0,), coeff_op=aten.reshape.default)

_RULES: dict[Any, Rule] = {}


def _register(rule: Rule, *ops: Any) -> None:
    for op in ops:
        _RULES[op] = rule


_register(
    constant,
    aten.zeros_like,
    aten.ones_like,
    aten.empty_like,
    aten.full_like,
    aten.new_zeros,
    aten.new_ones,
    aten.new_empty,
    aten.new_full,
    aten.detach,
    aten.sign,
    aten.floor,
    aten.ceil,
    aten.round,
    aten.trunc,
    aten.fill,
)
_register(_VIEW, aten.view.default, aten._unsafe_view.default)
_register(
    _LINEAR_1,
    aten.reshape,
    aten.t,
    aten.transpose,
    aten.permute,
    aten.expand,
    aten.unsqueeze,
    aten.squeeze,
    aten.select,
    aten.slice,
    aten.index,
    aten.index_select,
    aten.gather,
    aten.narrow,
    aten.unbind,
    aten.split,
    aten.split_with_sizes,
    aten.chunk,
    aten.flip,
    aten.roll,
    aten.repeat,
    aten.clone,
    aten.alias,
    aten._to_copy,
    aten.sum,
    aten.mean,
    aten.cumsum,
    aten.diagonal,
    aten.diag_embed,
    aten.diag,
    aten.triu,
    aten.tril,
    aten.neg,
    aten.unfold,
    aten.trace,
    aten.reflection_pad1d,
    aten.reflection_pad2d,
    aten.replication_pad1d,
    aten.replication_pad2d,
    aten.mul.Scalar,
    aten.div.Scalar,
)
_register(linear((0, 1)), aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor, aten.copy)
_register(linear((0,), zero=(1,)), aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar)
_register(linear((0,)), aten.cat, aten.stack)
_register(linear((1, 2)), aten.where.self)
_register(linear((0, 2)), aten.index_put, aten.masked_fill.Tensor)
_register(linear((0,), zero=(2,)), aten.masked_fill.Scalar, aten.constant_pad_nd)
_register(linear((0, 3)), aten.scatter.src, aten.scatter_add, aten.index_add)
_register(linear((0, 1)), aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter)
_register(linear((0, 1)), aten.lerp.Scalar, aten.lerp.Tensor)
_register(multilinear(), aten.mul.Tensor, aten.mm, aten.bmm, aten.mv, aten.dot, aten.matmul)
_register(multilinear(operands=(1,)), aten.einsum)
_register(multilinear(null=(2,)), aten.convolution)
_register(affine_product(aten.mm.default), aten.addmm)
_register(affine_product(aten.mv.default), aten.addmv)
_register(affine_product(aten.bmm.default), aten.baddbmm)
_register(divide, aten.div.Tensor, aten.div.Tensor_mode)
_register(elementwise(), *(op for op in DERIVATIVES if op is not aten.pow.Scalar))
_register(elementwise(position=1), aten.pow.Scalar)
_register(
    piecewise_linear,
    aten.amax,
    aten.amin,
    aten.max.dim,
    aten.min.dim,
    aten.max.default,
    aten.min.default,
    aten.maximum,
    aten.minimum,
    aten.clamp,
    aten.clamp_min,
    aten.clamp_max,
    aten.hardtanh,
    aten.leaky_relu,
    aten.sort,
    aten.topk,
    aten.max_pool1d_with_indices,
    aten.max_pool2d_with_indices,
)


def lookup(op: Any) -> Rule | None:
    """The fast rule for ``op`` (an ATen overload), or ``None`` for the generic rule."""
    rule = _RULES.get(op)
    if rule is None:
        rule = _RULES.get(getattr(op, "overloadpacket", None))
    return rule
