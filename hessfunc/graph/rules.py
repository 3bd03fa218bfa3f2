"""Per-op rules of the frontier propagation (NOTE [frontier propagation]), one object per
op family, looked up in one table.

A rule gives, for a per-sample op ``v = op(u_1..u_m)`` at its primal values,

* ``pull_rows(B)``: ``J_i^T B`` for a per-sample block ``B`` ``(N, w_v, w_r)`` (the
  ``w_r`` columns are the k-tangent axis, always carried), one ``(N, w_ui, w_r)`` per
  operand;
* ``sandwich(H)``: ``J_i^T H J_j + sum_k g_k d^2 v_k / du_i du_j`` for every pair of
  operands, ``{(u_i, u_j): (N, w_ui, w_uj)}``;
* ``sandwich_diagonal(H)``: only the diagonal of that block (one operand), where
  nothing below reads more.

Families: ``Elementwise`` (one operand, same shape: the Jacobian is a diagonal,
``phi'(u)``, and so is the curvature, ``g phi''(u)``, both from one double backward),
``RowAffine`` (``mm``/``addmm`` acting on the rows of a per-sample operand: ``J^T c =
c W^T``), ``Convolution`` (its input gradient on all columns at once), ``Reorder``
(reshapes that keep each sample's elements in order, and sums of equal-shaped operands:
the identity), ``Selection`` (views, transposes, ``expand``, slices, padding, pieces,
``cat``: every output element one input element or a constant, the same way in every
sample: ``J^T`` a scatter-add of rows), ``Broadcast`` (elementwise ops of several
operands or of one broadcast within a sample: a selection scaled by the derivatives),
``BatchedProduct`` (``bmm`` of two per-sample values: ``G B^T``, ``A^T G`` and a closed-form
cross term), and ``Generic`` (any other op: ``vmap`` of
torch's VJP over the columns, curvature from ``w`` batched second VJPs).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .samples import pointwise

if TYPE_CHECKING:
    from .curvature import GraphPlan

__all__ = ["rule_for", "Rule"]

aten = torch.ops.aten

_REORDER = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
            aten.clone.default, aten.alias.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}


class Rule:
    """The generic rule: torch's VJP, ``vmap``-ed over the columns."""

    def __init__(self, plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> None:
        self.plan, self.node, self.inputs = plan, node, inputs

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        """``J_i^T B`` for a per-sample block ``B`` ``(N, w_v, w_r)``: ``[(N, w_ui, w_r)]``."""
        return [p.permute(1, 2, 0) for p in self.pullback(block.permute(2, 0, 1))]

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        """``J_i^T H J_j`` plus the curvature term for every pair of operands:
        ``{(u_i, u_j): (N, w_ui, w_uj)}`` (``hvv`` None: no curvature from above)."""
        out = self.curvature()
        if hvv is None:
            return out
        halves = self.pullback(hvv.permute(2, 0, 1))  # (w_v, N, w_ui)
        for u, half in zip(self.inputs, halves, strict=True):
            rows = half.permute(2, 1, 0)  # rows of J_i^T H: (w_ui, N, w_v)
            for x, full in zip(self.inputs, self.pullback(rows), strict=True):
                block = full.permute(1, 0, 2)
                out[(u, x)] = out[(u, x)] + block if (u, x) in out else block
        return out

    def pullback(self, columns: Tensor) -> list[Tensor]:
        plan, node, inputs = self.plan, self.node, self.inputs
        _, vjp = torch.func.vjp(plan.op(node, inputs), *[plan.env[u] for u in inputs])
        width = sum(plan.width(u) for u in inputs) + plan.width(node)
        parts: list[list[Tensor]] = [[] for _ in inputs]
        for sl in plan.chunks(columns.shape[0], plan.n * width):
            out = torch.func.vmap(vjp)(plan.unflat(node, columns[sl]))
            for i, (u, o) in enumerate(zip(inputs, out, strict=True)):
                parts[i].append(plan.flat(u, o, 1))
        return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]

    def curvature(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        plan, node, inputs = self.plan, self.node, self.inputs
        g = plan.grads.get(node)
        if g is None or plan.linear(node, inputs) or node in plan.linearised:
            return {}
        fn = plan.op(node, inputs)

        def gradient(*values: Tensor) -> tuple[Tensor, ...]:
            return torch.func.vjp(fn, *values)[1](g)

        _, second = torch.func.vjp(gradient, *[plan.env[u] for u in inputs])
        blocks: dict[tuple[fx.Node, fx.Node], list[Tensor]] = {}
        for u in inputs:
            w = plan.width(u)
            basis = torch.eye(w, dtype=g.dtype, device=g.device)[:, None, :].expand(w, plan.n, w)
            for sl in plan.chunks(w, plan.n * sum(plan.width(x) for x in inputs)):
                tangents = tuple(plan.unflat(x, basis[sl]) if x is u else
                                 torch.zeros(sl.stop - sl.start, *plan.env[x].shape,
                                             dtype=g.dtype, device=g.device) for x in inputs)
                for x, o in zip(inputs, torch.func.vmap(second)(tangents), strict=True):
                    blocks.setdefault((x, u), []).append(plan.flat(x, o, 1).permute(1, 2, 0))
        return {k: v[0] if len(v) == 1 else torch.cat(v, dim=2) for k, v in blocks.items()}

    def sandwich_diagonal(self, hvv: Tensor) -> Tensor:
        """The diagonal ``(N, w_u)`` of the one operand's new block, when nothing below
        needs more (``hvv`` may itself be held as its diagonal ``(N, w_v)``)."""
        if hvv.dim() == 2:
            hvv = torch.diag_embed(hvv)
        (u,) = self.inputs
        return torch.diagonal(self.sandwich(hvv)[(u, u)], dim1=1, dim2=2)


class Elementwise(Rule):
    """``v = phi(u)`` elementwise: ``J = diag(phi'(u))``, curvature ``diag(g phi''(u))``."""

    def __init__(self, plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> None:
        super().__init__(plan, node, inputs)
        (u,) = inputs
        x = plan.env[u].detach().requires_grad_()
        g = plan.grads.get(node)
        with torch.enable_grad():
            y = plan.op(node, inputs)(x)
            (d,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=g is not None)
            c = None
            if g is not None and d.requires_grad and node not in plan.linearised:
                (c,) = torch.autograd.grad(d, x, g, allow_unused=True)
        self.derivative = plan.flat(u, d.detach())
        self.second = None if c is None else plan.flat(u, c)

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        return [self.derivative[:, :, None] * block]

    def sandwich_diagonal(self, hvv: Tensor) -> Tensor:
        d = self.derivative
        diag = hvv if hvv.dim() == 2 else torch.diagonal(hvv, dim1=1, dim2=2)
        return diag * d * d + (0.0 if self.second is None else self.second)

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        (u,) = self.inputs
        d = self.derivative
        if hvv is None:
            return self.curvature()
        block = hvv * (d[:, :, None] * d[:, None, :])
        if self.second is not None:
            block.diagonal(dim1=1, dim2=2).add_(self.second)
        return {(u, u): block}

    def curvature(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        if self.second is None:
            return {}
        (u,) = self.inputs
        return {(u, u): torch.diag_embed(self.second)}


class RowAffine(Rule):
    """``v = x W (+ b)`` on the rows of a per-sample ``x`` (``W``, ``b`` not per-sample):
    ``J^T c = c W^T`` on every row of every sample."""

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        weight = self.plan.env[self.node.args[-1]]  # (in, out)
        n, _, w_r = block.shape
        rows = block.reshape(n, -1, weight.shape[1], w_r).transpose(2, 3)  # (n, r, w_r, out)
        pulled = rows.reshape(-1, weight.shape[1]) @ weight.T  # one 2-D product
        return [pulled.reshape(n, -1, w_r, weight.shape[0]).transpose(2, 3).reshape(n, -1, w_r)]

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        if hvv is None:
            return {}
        (u,) = self.inputs
        weight = self.plan.env[self.node.args[-1]]  # (in, out)
        (n, w), (d_in, d_out) = hvv.shape[:2], weight.shape
        r = w // d_out  # rows per sample
        left = torch.matmul(weight, hvv.reshape(n, r, d_out, w))  # (n, r, in, w)
        full = torch.matmul(left.reshape(n, -1, d_out), weight.T)
        return {(u, u): full.reshape(n, r * d_in, r * d_in)}

    def sandwich_diagonal(self, hvv: Tensor) -> Tensor:
        weight = self.plan.env[self.node.args[-1]]
        if hvv.dim() == 3 and hvv.shape[1] == weight.shape[1]:  # one row per sample
            return (torch.matmul(weight, hvv) * weight).sum(-1)
        return super().sandwich_diagonal(hvv)


class Convolution(Rule):
    """``v = conv(x, W) (+ b)`` on a per-sample ``x``: the same linear map for every
    sample. Its Jacobian ``J`` ``(w_v, w_x)``, built on first use from the input gradient
    of the ``w_v`` unit outputs, makes ``J^T H J`` two matrix products where it fits
    ``_DENSE_BYTES``. Columns (``pullback``) go back by the input gradient on all ``K x N``
    columns as one batch: a product with ``J`` costs ``w_x / (C_in k)`` times that
    convolution's work, besides the ``w_v`` input gradients that build ``J`` (``vmap`` of
    torch's VJP runs 6-8x slower than either)."""

    # the input gradient as a transposed convolution: on torch 2.13's CPU 1.6x faster than
    # convolution_backward's input part at 16 channels, as fast at 4
    _TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    _DENSE_BYTES = 2**26

    def __init__(self, plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> None:
        super().__init__(plan, node, inputs)
        self._size = plan.width(node) * plan.width(inputs[0])
        self._jacobian_t: Tensor | None = None

    @property
    def jacobian_t(self) -> Tensor | None:
        """``J^T`` ``(w_v, w_x)``, or None where it would not fit ``_DENSE_BYTES``."""
        out = self.plan.env[self.node]
        if self._jacobian_t is None and self._size * out.element_size() <= self._DENSE_BYTES:
            w_v = self.plan.width(self.node)
            eye = torch.eye(w_v, dtype=out.dtype, device=out.device)
            self._jacobian_t = self._input_grad(eye.reshape(w_v, *out.shape[1:])).reshape(
                w_v, -1)
        return self._jacobian_t

    def _input_grad(self, grads: Tensor) -> Tensor:
        node, plan = self.node, self.plan
        x, weight = plan.env[node.args[0]], plan.env[node.args[1]]
        stride, padding, dilation, _, _, groups = node.args[3:9]
        # the input rows a stride skipped past the last window come back as output padding
        extra = [size - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for size, o, s, p, d, k in
                 zip(x.shape[2:], grads.shape[2:], stride, padding, dilation, weight.shape[2:],
                     strict=True)]
        return self._TRANSPOSED[weight.dim() - 2](
            grads, weight, stride=stride, padding=padding, output_padding=extra, groups=groups,
            dilation=dilation)

    def pullback(self, columns: Tensor) -> list[Tensor]:
        k, n = columns.shape[:2]
        grads = columns.reshape(k * n, *self.plan.env[self.node].shape[1:])
        return [self._input_grad(grads).reshape(k, n, -1)]

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        if hvv is None:
            return {}
        if self.jacobian_t is None:
            return super().sandwich(hvv)
        jt = self.jacobian_t
        return {(self.inputs[0], self.inputs[0]): torch.matmul(jt.T, torch.matmul(hvv, jt))}


class Reorder(Rule):
    """Reshapes keeping every sample's elements in order, and ``a + b`` / ``a - b`` of
    operands shaped like the output: the Jacobian is ``I`` (``-I`` for ``b`` of ``a - b``)."""

    def pullback(self, columns: Tensor) -> list[Tensor]:
        node = self.node
        if node.target is aten.sub.Tensor:
            return [columns if u is node.args[0] else -columns for u in self.inputs]
        return [columns for _ in self.inputs]

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        return self.pullback(block)

    def sandwich_diagonal(self, hvv: Tensor) -> Tensor:
        return hvv if hvv.dim() == 2 else torch.diagonal(hvv, dim1=1, dim2=2)

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        if hvv is None:
            return {}
        signs = [-1.0 if self.node.target is aten.sub.Tensor and u is not self.node.args[0]
                 else 1.0 for u in self.inputs]
        return {(u, x): hvv if su * sx > 0 else -hvv
                for u, su in zip(self.inputs, signs, strict=True)
                for x, sx in zip(self.inputs, signs, strict=True)}

    def curvature(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        return {}


class Selection(Rule):
    """Ops whose every output element is one input element or a constant, the same way
    for every sample (views, transposes, ``expand``, selections, slices, padding, pieces
    of a split, ``cat``/``stack``): ``J`` is a 0/1 matrix, ``J^T`` a scatter-add of rows.
    Where the index map is not the same for every sample (``gather`` by a per-sample
    index), it is None and the generic rule applies."""

    def __init__(self, plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> None:
        super().__init__(plan, node, inputs)
        self.index = _selection_index(plan, node, inputs)
        self.widths = [plan.width(u) for u in inputs]

    def _scatter(self, block: Tensor, dim: int) -> Tensor:
        return _scatter(block, dim, self.index, sum(self.widths))

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        return list(self._scatter(block, 1).split(self.widths, dim=1))

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        if hvv is None:
            return {}
        full = self._scatter(self._scatter(hvv, 1), 2)
        rows = full.split(self.widths, dim=1)
        return {(u, x): block for u, row in zip(self.inputs, rows, strict=True)
                for x, block in zip(self.inputs, row.split(self.widths, dim=2), strict=True)}

    def curvature(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        return {}


class Broadcast(Rule):
    """An elementwise op of several operands, or of one broadcast within each sample
    (``x - x.amax(-1, keepdim=True)``, ``e / e.sum(-1, keepdim=True)``, ``x * mask``):
    ``v_j = phi(u_1[s_1(j)], u_2[s_2(j)], ...)`` with ``s_i`` the broadcast's selection
    of operand ``i``, the same in every sample. ``J_i = diag(d_i) S_i`` and the curvature
    ``sum_j g_j d^2 phi / du_i du_k`` sits at ``(s_i(j), s_k(j))``, with ``d_i``, ``g_j d^2
    phi`` elementwise from one double backward on the broadcast operands."""

    def __init__(self, plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> None:
        super().__init__(plan, node, inputs)
        self.index = [_selection_index(plan, node, [u], broadcast=True) for u in inputs]
        self.widths = [plan.width(u) for u in inputs]
        if any(i is None for i in self.index):
            return
        shape = plan.env[node].shape
        xs = [plan.env[u].expand(shape).clone().requires_grad_() for u in inputs]
        g = plan.grads.get(node)
        curved = g is not None and node not in plan.linearised
        with torch.enable_grad():
            out = plan.op(node, inputs)(*xs)
            firsts = torch.autograd.grad(out, xs, torch.ones_like(out), create_graph=curved,
                                         allow_unused=True, materialize_grads=True)
            self.derivative = [plan.flat(node, d.detach()) for d in firsts]
            self.second: dict[tuple[int, int], Tensor] = {}
            if curved:
                for i, d in enumerate(firsts):
                    if not d.requires_grad:
                        continue
                    seconds = torch.autograd.grad(d, xs, g, retain_graph=True,
                                                  allow_unused=True)
                    for k, c in enumerate(seconds):
                        if c is not None:
                            self.second[(i, k)] = plan.flat(node, c)

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        return [_scatter(d[:, :, None] * block, 1, index, w) for d, index, w in
                zip(self.derivative, self.index, self.widths, strict=True)]

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        out = self.curvature()
        if hvv is None:
            return out
        for i, u in enumerate(self.inputs):
            rows = _scatter(self.derivative[i][:, :, None] * hvv, 1, self.index[i],
                            self.widths[i])
            for k, x in enumerate(self.inputs):
                block = _scatter(rows * self.derivative[k][:, None, :], 2, self.index[k],
                                 self.widths[k])
                out[(u, x)] = out[(u, x)] + block if (u, x) in out else block
        return out

    def curvature(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        out = {}
        for (i, k), c in self.second.items():
            w_i, w_k = self.widths[i], self.widths[k]
            at = self.index[i] * w_k + self.index[k]
            block = c.new_zeros(c.shape[0], w_i * w_k).index_add_(1, at, c)
            out[(self.inputs[i], self.inputs[k])] = block.reshape(-1, w_i, w_k)
        return out


class BatchedProduct(Rule):
    """``v = bmm(A, B)`` of two per-sample operands with the samples on the batch axis
    (attention's ``q k^T`` and ``a v``): per sample ``P`` products ``(I, J) (J, K)``.
    ``J_A^T G = G B^T`` and ``J_B^T G = A^T G`` on every column at once, and the
    curvature ``d^2 (g . v) / dA[p, i, j] dB[p, j, k] = g[p, i, k]`` in closed form."""

    def __init__(self, plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> None:
        super().__init__(plan, node, inputs)
        a, b = (plan.env[u] for u in node.args[:2])
        n = plan.n
        self.a = plan.flat(node.args[0], a).reshape(n, -1, *a.shape[1:])  # (N, P, I, J)
        self.b = plan.flat(node.args[1], b).reshape(n, -1, *b.shape[1:])  # (N, P, J, K)

    def pull_rows(self, block: Tensor) -> list[Tensor]:
        n, _, w_r = block.shape
        p, i, _ = self.a.shape[1:]
        g = block.reshape(n, p, i, -1, w_r)  # (N, P, I, K, w_r)
        da = torch.einsum("npikr,npjk->npijr", g, self.b).reshape(n, -1, w_r)
        db = torch.einsum("npij,npikr->npjkr", self.a, g).reshape(n, -1, w_r)
        return [da, db]

    def sandwich(self, hvv: Tensor | None) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        out = self.curvature()
        if hvv is None:
            return out
        halves = self.pull_rows(hvv)  # J_u^T H: (N, w_u, w_v)
        for u, half in zip(self.inputs, halves, strict=True):
            for x, full in zip(self.inputs, self.pull_rows(half.transpose(1, 2)), strict=True):
                block = full.transpose(1, 2)  # J_u^T H J_x
                out[(u, x)] = out[(u, x)] + block if (u, x) in out else block
        return out

    def curvature(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        plan, node = self.plan, self.node
        g = plan.grads.get(node)
        if g is None or node in plan.linearised:
            return {}
        n, p, i, j = self.a.shape
        k = self.b.shape[-1]
        g = plan.flat(node, g).reshape(n, p, i, k)
        eye_p = torch.eye(p, dtype=g.dtype, device=g.device)
        eye_j = torch.eye(j, dtype=g.dtype, device=g.device)
        cross = torch.einsum("npik,pq,jl->npijqlk", g, eye_p, eye_j).reshape(
            n, p * i * j, p * j * k)
        a, b = self.inputs
        return {(a, b): cross, (b, a): cross.transpose(1, 2)}


def _scatter(block: Tensor, dim: int, index: Tensor, width: int) -> Tensor:
    """``S^T`` along ``dim`` of ``block`` for a selection ``S`` (output element ``j`` is
    element ``index[j]`` of a ``width``-wide operand, or a constant where it is -1)."""
    inverse = _inverse(index, width)
    if inverse is not None:
        identity = torch.equal(inverse, torch.arange(width, device=inverse.device))
        return block if identity else _take(block, dim, inverse)
    kept = (index >= 0).nonzero().squeeze(1)
    shape = list(block.shape)
    shape[dim] = width
    return block.new_zeros(shape).index_add_(dim, index[kept], _take(block, dim, kept))


def _selection_index(plan: GraphPlan, node: fx.Node, inputs: list[fx.Node],
                     broadcast: bool = False) -> Tensor | None:
    """Per output element of one sample, the element of the operands (flattened per
    sample and laid end to end) it copies, -1 for a constant; None where the op moves
    elements differently for different samples. Found by running the op on the
    positions themselves (exact integers in float64), less its value on zeros."""
    op = plan.op(node, inputs)
    offset, numbered = 1, []
    for u in inputs:
        w, value = plan.width(u), plan.env[u]
        count = torch.arange(offset, offset + w, dtype=torch.float64, device=value.device)
        # contiguous, which every view of the operand's shape accepts
        numbered.append(plan.unflat(u, count.expand(1, plan.n, w))[0].contiguous())
        offset += w
    if broadcast:  # the elements of the one operand that an elementwise op reads
        found = numbered[0].expand(plan.env[node].shape)
    else:
        found = op(*numbered) - op(*[torch.zeros_like(t) for t in numbered])
    found = plan.flat(node, found)
    if not torch.equal(found, found[:1].expand_as(found)):
        return None
    return found[0].round().long() - 1


def _take(block: Tensor, dim: int, index: Tensor) -> Tensor:
    """``block.index_select(dim, index)``; along the last dim as a ``gather``, which
    torch 2.13's CPU kernels run 8x faster there."""
    if dim != block.dim() - 1:
        return block.index_select(dim, index)
    return block.gather(dim, index.expand(*block.shape[:-1], index.numel()))


def _inverse(index: Tensor, width: int) -> Tensor | None:
    """For an index map that is a permutation of ``width`` elements, its inverse."""
    if index.numel() != width:
        return None
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(width, device=index.device)):
        return None
    return order


#: Ops that :class:`Selection` takes (each output element one input element or constant).
_SELECTIONS = _REORDER | {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.expand.default,
    aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.index_select.default,
    aten.gather.default, aten.constant_pad_nd.default, aten.cat.default, aten.stack.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
}


def _same(plan: GraphPlan, a: fx.Node, b: fx.Node) -> bool:
    """Same shape, dtype and label: the per-sample flattenings coincide element by element."""
    va, vb = plan.env[a], plan.env[b]
    la, lb = plan.label(a), plan.label(b)
    return va.shape == vb.shape and va.dtype == vb.dtype and la.axis == lb.axis and \
        la.layout == lb.layout


def _in_order(plan: GraphPlan, a: fx.Node, b: fx.Node) -> bool:
    """Both have the batch axis first and whole samples as runs: per-sample flattening
    is row-major order, which a reshape keeps."""
    la, lb = plan.label(a), plan.label(b)
    return la.axis == 0 == lb.axis and la.layout[0] == 1 == lb.layout[0] and \
        plan.env[a].dtype == plan.env[b].dtype


def rule_for(plan: GraphPlan, node: fx.Node, inputs: list[fx.Node]) -> Rule:
    """The rule of ``node`` (with per-sample operands ``inputs``) from the table."""
    target = node.target
    if len(inputs) == 1:
        (u,) = inputs
        if pointwise(target) and _same(plan, u, node):
            return Elementwise(plan, node, inputs)
        if target in _REORDER and _in_order(plan, u, node):
            return Reorder(plan, node, inputs)
        if target in (aten.mm.default, aten.addmm.default) and u is node.args[-2] and \
                _in_order(plan, u, node) and plan.env[u].dim() == 2:
            return RowAffine(plan, node, inputs)
    if target is aten.convolution.default and len(inputs) == 1 and inputs[0] is node.args[0] \
            and not node.args[6] and _in_order(plan, inputs[0], node) and \
            plan.label(node).layout == (1, 1) and plan.env[node.args[1]].dim() in (3, 4, 5):
        return Convolution(plan, node, inputs)
    source = node.args[0] if target is operator.getitem else node
    if source.target in _SELECTIONS and all(
            plan.env[u].dtype == plan.env[node].dtype for u in inputs):
        rule = Selection(plan, node, inputs)
        if rule.index is not None:
            return rule
    if target is aten.bmm.default and list(node.args[:2]) == inputs and \
            inputs[0] is not inputs[1] and \
            plan.label(inputs[0]).axis == 0 == plan.label(inputs[1]).axis == plan.label(
                node).axis and plan.env[node].dtype == plan.env[inputs[0]].dtype:
        return BatchedProduct(plan, node, inputs)
    if target in (aten.add.Tensor, aten.sub.Tensor) and len(node.args) == 2 and \
            node.args[0] is not node.args[1] and node.kwargs.get("alpha", 1) == 1 and \
            all(isinstance(a, fx.Node) and a in inputs and _same(plan, a, node)
                for a in node.args):
        return Reorder(plan, node, inputs)
    if pointwise(target) and isinstance(plan.env[node], Tensor) and all(
            plan.env[u].dtype == plan.env[node].dtype for u in inputs):
        rule = Broadcast(plan, node, inputs)
        if all(i is not None for i in rule.index):
            return rule
    return Rule(plan, node, inputs)

