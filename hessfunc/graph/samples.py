"""Which values of a captured ``p -> f(p, *batch)`` graph are per-sample, proved op by op.

NOTE [per-sample structure]
    Label every value of the graph. *Live* values depend on the parameters; the
    others are constants (data, targets, literals), whatever they compute. A live
    value is
      * per-sample, with a batch axis ``a`` of size ``N``: its slice ``n`` along
        ``a`` depends on the parameters and on slice ``n`` of its per-sample
        operands only;
      * an aggregate: it has no batch axis and is a *linear* function of
        per-sample values (sums or means over the batch axis, then sums,
        differences and scaling by constants);
      * parameter-only: it depends on no per-sample value.
    Each op has a rule (below) saying where its output's batch axis is and
    whether it keeps slices apart; an op without a rule, or one that mixes
    slices (a contraction or a non-linear reduction over the batch axis, a
    per-sample value combined with an aggregate: BatchNorm's batch statistics
    in training mode), ends the proof with the op and its place in the user's
    code. When the output is an aggregate or parameter-only, the loss is
    ``L = sum_n c_n l_n(a_n) + R(p)``: its Hessian with respect to every
    per-sample value is block-diagonal over samples. Nothing is probed
    numerically, so a loss that couples samples by 1e-6 is refused, not
    approximated.

    Constants may mix samples freely (``y - y.mean(0)``) without changing that
    Hessian, but such a value is *pooled*: sample ``n``'s slice of it, and of
    everything computed from it, depends on other samples' data. The batch's
    Hessian does not care; a part of the batch, or one sample alone, computes
    other numbers, so those routes refuse pooled values.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from .capture import argument, operand_uses, where

__all__ = ["Value", "SampleStructure", "analyze_samples", "where", "pointwise", "SHAPE_ONLY"]

aten = torch.ops.aten

#: Views and copies that keep every element (the batch axis is tracked through them).
_VIEWS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.clone.default, aten.alias.default,
    aten._to_copy.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.detach.default,
    aten.lift_fresh_copy.default,
}
#: Reductions: linear ones may cross the batch axis (into an aggregate), the others not.
_LINEAR_REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default}
_REDUCTIONS = _LINEAR_REDUCTIONS | {
    aten.amax.default, aten.amin.default, aten.var.correction, aten.std.correction,
    aten.var.dim, aten.std.dim, aten.var.default, aten.std.default,
    aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.logsumexp.default,
    aten.var_mean.correction,
}
#: Ops that cut a tensor into pieces along one dim (``chunk`` decomposes to ``split``).
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}
#: Ops whose output depends on the shape of their operand only.
_FACTORIES = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
              aten.full_like.default}
_NEW = {aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
        aten.new_full.default}
#: Ops whose value depends on their operand's shape only.
SHAPE_ONLY = _FACTORIES | _NEW
#: Elementwise ops that torch does not tag pointwise.
_UNTAGGED_POINTWISE = {aten.hardswish.default}


def pointwise(target: Any) -> bool:
    """Whether an op is elementwise in its broadcast operands (torch's pointwise tag, or
    one of the few elementwise ops left untagged)."""
    return torch.Tag.pointwise in getattr(target, "tags", ()) or target in _UNTAGGED_POINTWISE


#: Ops linear in each operand when only one operand is live (and it is not a divisor).
_SCALINGS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
#: Ops that keep an aggregate linear in the per-sample values.
_AGGREGATE_OPS = _VIEWS | _LINEAR_REDUCTIONS | _SCALINGS | {
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.add.Scalar, aten.sub.Scalar,
}


@dataclass(frozen=True)
class Value:
    """What the proof knows of one value: ``live`` (depends on the parameters),
    ``axis`` (its batch axis, or None), ``aggregate`` (live, linear in per-sample
    values, no batch axis) and ``layout = (outer, inner)``: the batch axis may
    hold other positions too, as ``outer`` blocks of ``N`` runs of ``inner``
    (``(N, T, d) -> (N * T, d)`` before a Linear on sequences has ``(1, T)``;
    sequence-first ``(T, N, d) -> (T * N, d)`` has ``(T, 1)``)."""

    live: bool
    axis: int | None = None
    aggregate: bool = False
    layout: tuple[int, int] = (1, 1)
    pooled: bool = False  # computed from the data of several samples at once

    def size(self, n: int) -> int:
        """The length of the batch axis for ``n`` samples."""
        return self.layout[0] * n * self.layout[1]
    @property
    def per_sample(self) -> bool:
        return self.live and self.axis is not None


CONST = Value(False)
PARAM = Value(True)


@dataclass
class SampleStructure:
    """The labels of every node, the batch size, and why the proof failed (or None)."""

    values: dict[fx.Node, Value | tuple[Value, ...]]
    num_samples: int
    reason: str | None


class _Unproved(Exception):
    """The op's rule does not prove the per-sample structure (the message says why)."""


def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _norm(dim: int, ndim: int) -> int:
    return dim % ndim  # of a value with a batch axis: ndim >= 1


def _view_axis(src: tuple[int, ...], dst: tuple[int, ...], value: Value, n: int
               ) -> tuple[int, tuple[int, int]] | None:
    """The batch axis and layout after a row-major reshape. Within each leading index
    the input holds ``blocks`` runs of ``N * run`` elements, sample ``n`` the ``n``-th
    ``run`` of each; find the output axis that splits the elements the same way."""
    a = value.axis
    outer, inner = value.layout
    run = inner * math.prod(src[a + 1:])
    blocks = math.prod(src[:a]) * outer
    for b, size in enumerate(dst):
        after = math.prod(dst[b + 1:])
        if run % after or size % (n * (run // after)):
            continue
        new_inner = run // after
        new_outer = size // (n * new_inner)
        if math.prod(dst[:b]) * new_outer == blocks:
            return b, (new_outer, new_inner)
    return None


def _view_rule(node: fx.Node, value: Value, n: int) -> tuple[int, tuple[int, int]] | None:
    target, args, a = node.target, node.args, value.axis
    src, dst = _shape(args[0]), _shape(node)
    if target is aten.t.default:
        return (1 - a if len(src) == 2 else a), value.layout
    if target is aten.transpose.int:
        d0, d1 = _norm(args[1], len(src)), _norm(args[2], len(src))
        return (d1 if a == d0 else d0 if a == d1 else a), value.layout
    if target is aten.permute.default:
        return [_norm(d, len(src)) for d in args[1]].index(a), value.layout
    if target is aten.expand.default:
        b = a + len(dst) - len(src)
        return (b, value.layout) if dst[b] == src[a] else None
    return _view_axis(src, dst, value, n)


def _reduction_dims(node: fx.Node, ndim: int) -> tuple[list[int], bool]:
    """The reduced dims and keepdim of a reduction node (every dim when none given)."""
    dim = argument(node, "dim")
    keep = bool(argument(node, "keepdim"))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(ndim)), keep
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [_norm(d, ndim) for d in dims], keep


def _pointwise_axis(node: fx.Node, operands: list[tuple[fx.Node, Value]], n: int
                    ) -> tuple[int, int] | None:
    """The output axis (and inner) every batch-bearing operand aligns to under
    broadcasting."""
    out = _shape(node)
    if out is None:  # several outputs (frexp): no rule says where each one's samples are
        raise _Unproved
    axes = set()
    for arg, value in operands:
        shape = _shape(arg)
        if value.axis is None or shape is None:
            continue
        b = value.axis + len(out) - len(shape)
        if out[b] != value.size(n):
            raise _Unproved
        if shape[value.axis] != value.size(n):  # a size-1 axis broadcast over samples
            if value.live:
                raise _Unproved
            continue
        axes.add((b, value.layout))
    if len(axes) > 1:
        raise _Unproved
    return axes.pop() if axes else None


def _rule(node: fx.Node, operands: list[tuple[fx.Node, Value]], n: int) -> Value:
    """The label of a call node from its operands' labels (raises :class:`_Unproved`)."""
    target = node.target
    live = any(v.live for _, v in operands)
    samples = [(arg, v) for arg, v in operands if v.per_sample]
    aggregates = [v for _, v in operands if v.aggregate]
    if aggregates:
        if samples:
            raise _Unproved("combines a sum over samples with per-sample values, so "
                            "samples interact (e.g. BatchNorm's batch statistics in training)")
        if target not in _AGGREGATE_OPS:
            raise _Unproved("is applied to a sum over samples non-linearly, so the loss is "
                            "not a sum of per-sample terms")
        if target in _SCALINGS:  # linear only with one live factor, not as a divisor
            vals = dict(operands)
            lives = [arg for arg in operand_uses(node) if vals[arg].live]
            if len(lives) != 1 or (target in (aten.div.Tensor, aten.div.Scalar)
                                   and lives[0] is not node.args[0]):
                raise _Unproved("multiplies or divides a sum over samples by a value that "
                                "depends on the parameters")
        return Value(True, None, True)
    if not samples and all(v.axis is None for _, v in operands):
        return Value(live)  # parameters and constants only: no batch axis to follow
    if target in _NEW:  # a fresh constant of a given shape
        return CONST
    if target in _FACTORIES:  # values not used, only the shape
        found = _pointwise_axis(node, [(a, Value(False, v.axis, layout=v.layout))
                                       for a, v in operands], n)
        return Value(False, found[0], layout=found[1]) if found else CONST
    if target in _VIEWS:
        value = operands[0][1]
        moved = _view_rule(node, value, n)
        if moved is None:
            raise _Unproved
        return Value(live, moved[0], layout=moved[1])
    if target in _REDUCTIONS:
        x = operands[0][1]
        a = x.axis
        if a is None:
            return Value(live)
        dims, keep = _reduction_dims(node, len(_shape(node.args[0])))
        if a in dims:
            if x.live and target not in _LINEAR_REDUCTIONS:
                raise _Unproved("reduces over the batch axis non-linearly, so samples "
                                "interact")
            return Value(live, None, live)
        return Value(live, a if keep else a - sum(d < a for d in dims), layout=x.layout)
    if pointwise(target):
        found = _pointwise_axis(node, operands, n)
        return Value(live, found[0], layout=found[1]) if found else Value(live)
    if target in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        lhs, rhs = (node.args[1], node.args[2]) if target is aten.addmm.default else node.args[:2]
        vals = dict(operands)
        left, right = vals.get(lhs, CONST), vals.get(rhs, CONST)
        la, ra = left.axis, right.axis
        nd = len(_shape(lhs))
        if la is not None and ra is None and la < nd - 1:
            a, layout = la, left.layout
        elif ra is not None and la is None and ra == nd - 1:
            a, layout = ra, right.layout
        elif target is aten.bmm.default and ra == 0 and (
                la is None or (la == 0 and left.layout == right.layout)):
            a, layout = 0, right.layout  # one matrix product per position of axis 0
        else:
            raise _Unproved
        if target is aten.addmm.default and node.args[0] in vals:
            bias = vals[node.args[0]]
            if bias.axis is not None and _pointwise_axis(
                    node, [(node.args[0], bias)], n) != (a, layout):
                raise _Unproved
        return Value(live, a, layout=layout)
    if target is aten.convolution.default:
        vals = dict(operands)
        x = vals.get(node.args[0], CONST)
        if x.axis != 0 or any(vals.get(w, CONST).axis is not None for w in node.args[1:3]):
            raise _Unproved
        return Value(live, 0, layout=x.layout)
    if target is aten.embedding.default:
        vals = dict(operands)
        if vals.get(node.args[0], CONST).axis is not None:
            raise _Unproved
        indices = vals.get(node.args[1], CONST)
        return Value(live, indices.axis, layout=indices.layout)
    if target in (aten.select.int, aten.slice.Tensor, aten.narrow.default,
                  aten.index_select.default, aten.gather.default, aten.constant_pad_nd.default):
        x = operands[0][1] if operands and operands[0][0] is node.args[0] else CONST
        a = x.axis
        if a is None:
            if any(v.per_sample for _, v in operands):
                raise _Unproved
            index = dict(operands).get(node.args[2], CONST) \
                if target is aten.gather.default else CONST
            if not live and index.axis is not None:  # a shared table read by each sample's
                return Value(False, index.axis, layout=index.layout)  # index: its shape
            return Value(live)
        ndim = len(_shape(node.args[0]))
        if target is aten.constant_pad_nd.default:
            if len(node.args[1]) // 2 > ndim - 1 - a:
                raise _Unproved
            return Value(live, a, layout=x.layout)
        dim = _norm(node.args[1], ndim)
        if dim == a:
            if x.live:
                raise _Unproved("selects along the batch axis")
            return Value(live)
        # gather's index (a constant) may vary by sample freely; only its extent along
        # the batch axis must be the input's, and where it has a batch axis, its rows
        # must be the input's rows (the other ops' operands: none with a batch axis)
        rows = [v for arg, v in operands if arg is not node.args[0] and v.axis is not None]
        if target is aten.gather.default:
            if _shape(node.args[2])[a] != x.size(n) or \
                    any((v.axis, v.layout) != (a, x.layout) for v in rows):
                raise _Unproved
        elif rows:
            raise _Unproved
        return Value(live, a - 1 if target is aten.select.int and dim < a else a,
                     layout=x.layout)
    if target in _SPLITS:  # every piece keeps the input's batch axis (one less for unbind)
        x = operands[0][1]
        if x.axis is None:
            return Value(live)
        ndim = len(_shape(node.args[0]))
        dim = _norm(argument(node, "dim") or 0, ndim)
        if dim == x.axis:
            raise _Unproved("splits along the batch axis")
        shift = target is aten.unbind.int and dim < x.axis
        return Value(live, x.axis - shift, layout=x.layout)
    if target in (aten.cat.default, aten.stack.default):
        tensors = node.args[0]
        ndim = len(_shape(tensors[0]))
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        vals = dict(operands)
        axes = {(vals[t].axis, vals[t].layout) for t in tensors
                if t in vals and vals[t].axis is not None}
        if len(axes) > 1:
            raise _Unproved
        if not axes:
            return Value(live)
        a, layout = axes.pop()
        if target is aten.stack.default:
            dim = _norm(dim, ndim + 1)
            return Value(live, a + 1 if dim <= a else a, layout=layout)
        if _norm(dim, ndim) == a:
            raise _Unproved("concatenates along the batch axis")
        return Value(live, a, layout=layout)
    if not live:
        return CONST
    raise _Unproved


def _pools(node: fx.Node, operands: list[tuple[fx.Node, Value]], value: Value) -> bool:
    """Whether ``node``'s value is pooled: an operand is, or the op gathers the values of
    several samples (an operand with a batch axis) into one without: a statistic of the
    data (live values can only become the loss's aggregate, a sum over samples by design).
    Shape-only ops read no values."""
    if any(v.pooled for _, v in operands):
        return True
    return value.axis is None and not value.aggregate and node.target not in SHAPE_ONLY \
        and any(v.axis is not None for _, v in operands)


def _operands(node: fx.Node, values: dict) -> list[tuple[fx.Node, Value]]:
    found: list[tuple[fx.Node, Value]] = []
    seen: set[fx.Node] = set()

    def visit(arg: fx.Node) -> fx.Node:
        if arg not in seen:
            seen.add(arg)
            found.append((arg, values[arg]))
        return arg

    fx.node.map_arg((node.args, node.kwargs), visit)
    return found


def analyze_samples(gm: fx.GraphModule, params: set[int], batch: dict[int, int],
                    n: int, layouts: dict[int, tuple[int, int]] | None = None
                    ) -> SampleStructure:
    """Label the nodes of ``gm`` (NOTE [per-sample structure]).

    ``params``: indices of the placeholders that are parameters; ``batch``: index of
    each data placeholder -> its batch axis; ``n``: the batch size; ``layouts``: the
    layout of a data placeholder's batch axis where it is not ``(1, 1)``.
    """
    values: dict[fx.Node, Value | tuple[Value, ...]] = {}
    placeholders = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
    index = {nd: i for i, nd in enumerate(placeholders)}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            i = index[node]
            values[node] = PARAM if i in params else Value(
                False, batch.get(i), layout=(layouts or {}).get(i, (1, 1)))
            continue
        if node.op == "get_attr":
            values[node] = CONST
            continue
        if node.op == "output":
            (out,) = node.args
            value = values.get(out) if isinstance(out, fx.Node) else CONST
            if not isinstance(value, Value) or value.per_sample:
                return SampleStructure(values, n, "f does not return a scalar loss")
            continue
        if node.target is operator.getitem:
            source, i = node.args
            value = values[source]
            values[node] = value[i] if isinstance(value, tuple) else value
            continue
        operands = _operands(node, values)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            # no derivative flows through integer or boolean values: constants
            operands = [(a, v if isinstance(v, tuple) else
                         Value(False, v.axis, layout=v.layout, pooled=v.pooled))
                        for a, v in operands]
        if any(isinstance(v, tuple) for _, v in operands):
            return SampleStructure(values, n, f"no batch-axis rule for {where(node)}")
        try:
            value = _rule(node, operands, n)
        except _Unproved as e:
            if not any(v.live for _, v in operands):
                value = CONST  # constants may mix samples freely
            else:
                why = str(e) or "has no batch-axis rule for these operands (or mixes samples)"
                return SampleStructure(values, n, f"{where(node)} {why}")
        if _pools(node, operands, value):
            value = replace(value, pooled=True)
        if isinstance(val, (tuple, list)):  # var_mean: each tensor output takes the label
            values[node] = tuple(value if isinstance(v, torch.Tensor) else CONST for v in val)
        else:
            values[node] = value
    return SampleStructure(values, n, None)
