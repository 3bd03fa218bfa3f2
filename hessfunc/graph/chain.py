"""Chains of affine layers and elementwise maps, read off the captured graph of ``f``.

NOTE [chains from the graph]: the R-operator products of
:class:`hessfunc.graph.chain_products.ChainProducts` (NOTE [structured products]) need the
model as a chain ``x -> layer -> ... -> o`` followed by a loss of ``o``: Linear layers
(``addmm``/``mm`` with a transposed weight), convolutions (``groups=1``, no transposed
convolution), scales (``a * w + b`` with ``w``, ``b`` broadcast against one sample, after
constant shifts and factors of ``a``: BatchNorm in eval mode decomposes into exactly
that), linear maps that keep samples apart (means and sums over other axes than the
batch, average pools, views and permutations that keep the batch axis first),
elementwise maps and maps of several values without a rule (NOTE [maps without a
rule]), or a DAG of them (NOTE [skip connections]). This module finds that chain in the
ATen graph of ``p -> f(p, x, y)`` by its ops,
so a function written with ``functional_call`` and ``torch.nn.functional`` takes the same
route as a :func:`hessfunc.functionalize` model. An elementwise map is any run of
pointwise ops of one per-sample operand (and constants), however many ops it
decomposes into (GELU: ``x * (1 + erf(x / sqrt 2)) / 2``): its ``phi'`` and ``phi''``
come from two backward passes through that run. The loss is whatever follows ``o``;
its Hessian is applied through its own gradient graph, exact whether or not it couples
samples; where the graph is proved a sum over samples (NOTE [per-sample structure]),
its per-sample blocks are kept instead. Every parameter enters the model exactly once,
as a layer's weight or bias; anything else (a tied weight, a parameter inside an
activation) is not a chain.

NOTE [skip connections]: the walk goes over the graph in topological order; a value
may be read by several steps (fan-out), and two values of one shape may be joined by
``add`` (a residual block's ``h + F(h)``): the model is then a DAG of the same steps,
``sources[i]`` naming the values step ``i`` reads. The R-operator (NOTE [structured
products]) runs over it with each step's rules unchanged: ``R{a + b} = R{a} + R{b}``
forward, and backward a value read by several steps sums the gradients and tangent
adjoints they send it (an ``add`` sends its own to both operands). The walk ends at the
first op that starts no step; exactly one value may then be read outside the steps,
the model's output, and every value must reach it. Other joins (``cat``, a product of
two branches) are maps without a rule; a loss that reads an inner activation is
refused, naming the op. The full Hessian's per-sample backpropagation (NOTE [full Hessian])
stays with chains; a DAG's full Hessian takes rows of products.

NOTE [parameter terms]: a loss ``L = l(o) + R(p)`` with terms of the parameters alone
(weight decay, a norm penalty, terms coupling several parameters, a parameter only ``R``
reads) has ``H = H_chain + H_R``: no second derivative mixes ``o`` and ``p`` when ``R``
joins the loss by a sum and everything after that sum is linear (sums, differences,
scaling by constants, reductions, views). The graph is checked for exactly that: each
op of the loss that reads a value of the parameters alone is an ``add`` or ``sub``,
and each op below it is linear; otherwise the chain is refused with the op. ``H_R v``
is one backward pass through ``R``'s ops alone (its gradient's graph on fresh parameter
leaves, built once per point), parameter-sized; where ``R`` is separable (each op
elementwise in one parameter up to a full sum, as weight decay is), ``H_R`` is diagonal,
found once as ``d/dp_j sum_i dR/dp_i``, and a product is ``h * v``.
The full Hessian (NOTE [full Hessian]) adds ``H_R`` from unit tangents through the
same graph. The data-span restriction (NOTE [data span]) is not offered for a weight
``R`` reads: ``R`` sees the whole weight, not its product with the inputs.

NOTE [a loss the trace cannot take]: ``F.gaussian_nll_loss`` checks its variance with
``torch.any(var < 0)``, which no trace can follow, and a user's loss may branch on a
value. For a :func:`hessfunc.functionalize` model with such a loss, the chain is read
off the model's own graph, and the loss runs as it is on the output: its gradient in
``o`` with its graph, exact whether or not it couples samples (its per-sample blocks
are not kept: nothing proves it a sum over samples).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, fx

from .._autodiff import use_autograd
from .._memory import CHUNK_BUDGET_BYTES
from ..errors import ArgumentError
from ..functional import FunctionalModel, _report_non_finite
from .capture import RandomOpError, argument, operand_uses, replay, run_nodes, where
from .chain_plan import (
    ChainPlan,
    ParameterTerms,
    _Add,
    _Conv,
    _Elementwise,
    _Embedding,
    _Flatten,
    _Linear,
    _LinearMap,
    _Map,
    _Product,
    _Scale,
    _ShapeMap,
    _ShapeOp,
    _Softmax,
    _Standardise,
    elementwise_derivatives,
    output_blocks,
    trainable,
)
from .curvature import (
    _FULL_SUMS,
    _LINEAR,
    _MULTILINEAR,
    _PERMUTATIONS,
    _cache,
    model_output,
    sample_routes,
)
from .samples import SHAPE_ONLY, pointwise

__all__ = ["RANDOM_MODEL", "chain_from_graph", "graph_chain", "model_chain"]

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
#: ops that may keep a value's shape, as ``matmul`` records them around ``bmm``
_SAME_SHAPE = _VIEWS | {aten.expand.default}
_COPIES = {aten.clone.default, aten.alias.default}
#: views that keep the element order, through which a weight may reach its layer
_RESHAPES = _VIEWS | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                      aten.squeeze.default}
#: ops that only move or repeat the entries of their one input (NOTE [shape maps])
_SHAPE_OPS = _RESHAPES | {aten.t.default, aten.transpose.int, aten.permute.default,
                          aten.expand.default, aten.select.int, aten.slice.Tensor,
                          aten.clone.default, aten.alias.default}
#: constant shifts and factors, which a step of parameters broadcast over the batch takes
_AFFINE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
#: average pools, by the rank of a batched input
_POOLS = {aten.avg_pool1d.default: 3, aten.avg_pool2d.default: 4, aten.avg_pool3d.default: 5,
          aten._adaptive_avg_pool2d.default: 4, aten._adaptive_avg_pool3d.default: 5}
_SUMS = (aten.add.Tensor, aten.sub.Tensor)  # how a term of the parameters alone joins the loss


def _tanh(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    phi1 = 1 - t * t
    return phi1, -2 * t * phi1


def _sigmoid(z: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    phi1 = s * (1 - s)
    return phi1, phi1 * (1 - 2 * s)


def _relu(z: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    return (z > 0).to(z.dtype), torch.zeros_like(z)  # autograd's step, 0 at z = 0


#: ``(phi'(z), phi''(z))`` from ``z`` and ``phi(z)`` for single-op elementwise maps
_CLOSED_FORMS = {aten.tanh.default: _tanh, aten.sigmoid.default: _sigmoid,
                 aten.relu.default: _relu}


def _is_transpose(node: fx.Node) -> bool:
    """``W.t()`` of a matrix, by ``t``, ``transpose(0, 1)`` or ``permute([1, 0])``."""
    value = node.meta.get("val")
    if value is None or value.dim() != 2:
        return False
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    return node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]


def _values(gm: fx.GraphModule, placeholders: list[Tensor]) -> dict[fx.Node, Any]:
    """Every node's value at the point, without autograd (the layers' inputs that a plan
    keeps carry no graph: graph_chain refuses inputs that require grad), constants
    detached: a frozen parameter of the user's model is one, and products through it
    would otherwise carry a graph that misses its other paths into them."""
    with torch.no_grad():
        env = run_nodes(gm, placeholders)
    return {n: v.detach() if isinstance(v, Tensor) else v for n, v in env.items()}


class _Walk:
    """The chain's steps from the input placeholder, one link at a time."""

    def __init__(self, gm: fx.GraphModule, env: dict[fx.Node, Any],
                 names: dict[fx.Node, str], values: bool) -> None:
        self.gm, self.env, self.names, self.values = gm, env, names, values
        # what each node depends on, in one pass in graph order (no recursion: graphs
        # of real models are thousands of ops deep)
        self._variable: set[fx.Node] = set()  # on a placeholder (parameters or data)
        self._data: set[fx.Node] = set()      # on the batch (placeholders after the params)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self._variable.add(node)
                if node not in names:
                    self._data.add(node)
            elif node.target not in SHAPE_ONLY:
                inputs = node.all_input_nodes
                if any(a in self._variable for a in inputs):
                    self._variable.add(node)
                if any(a in self._data for a in inputs):
                    self._data.add(node)
        #: the nodes the steps read their weights and biases through, and the steps' ops
        self.operands: set[fx.Node] = set()
        self.layers: set[fx.Node] = set()
        self._feeds: set[fx.Node] | None = None

    def feeds_layer(self, node: fx.Node) -> bool:
        """Whether ``node``'s value reaches a layer: an op of the batch that reads a
        parameter as it is or through views and transposes (not the loss, nor a term of
        the parameters alone that the loss adds, such as weight decay)."""
        if self._feeds is None:
            self._feeds = set()
            for n in reversed(self.gm.graph.nodes):  # one pass, users before their inputs
                if any(u in self._feeds for u in n.users) or (
                        self.data(n) and any(self._parameter(a) for a in n.all_input_nodes)):
                    self._feeds.add(n)
        return node in self._feeds

    def _parameter(self, node: fx.Node) -> bool:
        """Whether ``node`` is a parameter placeholder, or one seen through views and
        transposes."""
        while node not in self.names and node.op == "call_function" and \
                (node.target in _PERMUTATIONS or node.target is aten.expand.default):
            node = node.args[0]
        return node in self.names

    def variable(self, node: Any) -> bool:
        """Whether ``node`` depends on a placeholder (parameters or data)."""
        return isinstance(node, fx.Node) and node in self._variable

    def data(self, node: Any) -> bool:
        """Whether ``node`` depends on the batch (a placeholder after the parameters)."""
        return isinstance(node, fx.Node) and node in self._data

    def operand(self, node: Any, transposed: bool = False, reshaped: bool = False
                ) -> tuple[Tensor, str | None] | None:
        """A layer's weight or bias: a parameter placeholder or a constant; ``transposed``:
        reached through ``t``/``permute`` of a matrix (the value returned is the matrix);
        ``reshaped``: through views that keep its element order (``unsqueeze``, ``view``;
        the value returned is the one the layer reads). The layer is the parameter's one
        reader that depends on the batch; its other readers are terms of the parameters
        alone (NOTE [parameter terms])."""
        if not isinstance(node, fx.Node):
            return None
        path, value = [node], self.env[node]
        if transposed:
            if not _is_transpose(node) or len(node.users) != 1:
                return None
            node = node.args[0]  # W of ``x W^T``
            value = self.env[node]
            path.append(node)
        while reshaped and node.target in _RESHAPES and len(node.users) == 1:
            node = node.args[0]
            path.append(node)
        if node in self.names:
            if sum(self.data(u) for u in node.users) != (1 if len(path) == 1 else 0):
                return None
            self.operands.update(path)
            return value, self.names[node]
        if self.variable(node):
            return None
        return value, None

    def _same_shape_views(self, node: fx.Node, cur: fx.Node) -> tuple[list[fx.Node], fx.Node]:
        """The ``expand``/``view`` ops from ``node`` on that read ``cur`` (or the one before)
        alone and keep its shape (what ``matmul`` records around ``bmm``), and the op
        after them."""
        path: list[fx.Node] = []
        while node.target in _SAME_SHAPE and node.args[0] is (path[-1] if path else cur) and \
                self.env[node].shape == self.env[cur].shape and len(node.users) == 1:
            path.append(node)
            node = next(iter(node.users))
        return path, node

    def _broadcast_weight(self, node: Any) -> tuple[Tensor, str | None] | None:
        """``W^T`` broadcast over the leading axis of a ``bmm`` (``t(W)`` expanded to
        ``(T, in, out)``, then viewed as such): ``W``, as :meth:`operand` returns it."""
        while isinstance(node, fx.Node) and len(node.users) == 1 and (
                node.target in _VIEWS and self.env[node].shape == self.env[node.args[0]].shape
                or node.target is aten.expand.default and self.env[node].dim() == 3 and
                self.env[node.args[0]].dim() == 2):
            node = node.args[0]
        return self.operand(node, transposed=True)

    def linear(self, node: fx.Node, cur: fx.Node
               ) -> tuple[_Linear, list[fx.Node], fx.Node] | None:
        """``x W^T + b`` as ``addmm``, as ``mm`` and then ``add`` of a vector, or as ``bmm``
        with ``W^T`` broadcast over ``x``'s leading axis ``(T, N, in)`` (``matmul`` of a
        3-d input), then an ``add`` of a vector: the step, its ops and its output."""
        end = node
        views, mm = self._same_shape_views(node, cur)
        if mm.target is aten.bmm.default and mm.args[0] is (views[-1] if views else cur) and \
                self.env[cur].dim() == 3:
            weight = self._broadcast_weight(mm.args[1])
            if weight is None:
                return None
            after, end = self._same_shape_views(next(iter(mm.users)), mm) \
                if len(mm.users) == 1 else ([], mm)
            bias = None
            if end.target is aten.add.Tensor and end.args[0] is (after[-1] if after else mm) \
                    and not end.kwargs and isinstance(end.args[1], fx.Node) and \
                    self.env[end.args[1]].shape == self.env[mm].shape[-1:]:
                bias = self.operand(end.args[1])
            if bias is None:
                end = after[-1] if after else mm
                after = after[:-1]
            self.layers.update((mm, end))
            return _Linear(weight[0], self.env[cur], weight[1], None if bias is None else
                           bias[1]), [*views, mm, *after, *([end] if end is not mm else [])], end
        if node.target is aten.addmm.default and len(node.args) == 3 and node.args[1] is cur \
                and not node.kwargs:
            bias_node, weight_node = node.args[0], node.args[2]
        elif node.target is aten.mm.default and node.args[0] is cur:
            bias_node, weight_node = None, node.args[1]
            (add,) = node.users if len(node.users) == 1 else (None,)
            if add is not None and add.target is aten.add.Tensor and add.args[0] is node and \
                    not add.kwargs and isinstance(add.args[1], fx.Node) and \
                    self.env[add.args[1]].shape == self.env[node].shape[1:]:
                bias_node, end = add.args[1], add
        else:
            return None
        if self.env[cur].dim() != 2:
            return None
        weight = self.operand(weight_node, transposed=True)
        bias = None if bias_node is None else self.operand(bias_node, transposed=False)
        if weight is None or (bias_node is not None and (bias is None or bias[0].dim() != 1)):
            return None
        self.layers.update((node, end))
        return _Linear(weight[0], self.env[cur], weight[1], None if bias is None else bias[1]), \
            [node, end] if end is not node else [node], end

    def embedding(self, node: fx.Node, cur: fx.Node) -> _Embedding | None:
        """A lookup of the rows of a weight by the integer inputs ``cur``, without the
        options that change its gradient (``padding_idx``, ``scale_grad_by_freq``) or
        its layout (``sparse``)."""
        if node.target is not aten.embedding.default or node.args[1] is not cur or \
                argument(node, "padding_idx") != -1 or argument(node, "scale_grad_by_freq") \
                or argument(node, "sparse"):
            return None
        weight = self.operand(node.args[0])
        if weight is None or weight[0].dim() != 2:
            return None
        self.layers.add(node)
        return _Embedding(weight[0], self.env[cur], weight[1])

    def conv(self, node: fx.Node, cur: fx.Node) -> _Conv | None:
        if node.target is not aten.convolution.default or node.args[0] is not cur:
            return None
        _, weight_node, bias_node, stride, padding, dilation, transposed, _, groups = node.args
        if transposed or groups != 1 or self.env[cur].dim() not in (3, 4):
            return None
        weight = self.operand(weight_node, transposed=False)
        bias = None if bias_node is None else self.operand(bias_node, transposed=False)
        if weight is None or (bias_node is not None and bias is None):
            return None
        self.layers.add(node)
        return _Conv(weight[0], self.env[cur], weight[1], None if bias is None else bias[1],
                     tuple(stride), tuple(padding), tuple(dilation))

    def scale(self, node: fx.Node, cur: fx.Node
              ) -> tuple[_Scale, list[fx.Node], fx.Node] | None:
        """``a * w + b``, ``a * w`` or ``a + b`` with ``w``, ``b`` parameters or constants
        broadcast against ``a`` over the batch, at least one of them a parameter (a
        constant alone is an elementwise map), after constant shifts and factors of
        ``cur`` (``a = (cur - m) * s``, BatchNorm's normalisation): the step, its ops and
        the node of its output."""
        nodes, lhs, pre = [], cur, None
        while node.target in _AFFINE and len(node.users) == 1:
            constant = self._broadcast_operand(node, lhs)
            if constant is None or constant[1] is not None or (
                    node.target in (aten.sub.Tensor, aten.div.Tensor) and node.args[0] is not lhs):
                break
            if node.target in (aten.mul.Tensor, aten.div.Tensor) and self.values:
                factor = constant[0] if node.target is aten.mul.Tensor else 1 / constant[0]
                pre = factor if pre is None else pre * factor
            nodes.append(node)
            lhs, (node,) = node, node.users
        mul = add = None
        if node.target is aten.mul.Tensor:
            mul = node
            (add,) = node.users if len(node.users) == 1 else (None,)
            if add is not None and add.target is not aten.add.Tensor:
                add = None
        elif node.target is aten.add.Tensor:
            add = node
        weight, end = None, node
        if mul is not None:
            weight = self._broadcast_operand(mul, lhs)
            if weight is None:
                return None
        bias = None if add is None else self._broadcast_operand(add, mul or lhs)
        if bias is not None:
            end = add
        elif mul is None:
            return None
        if not ((weight and weight[1]) or (bias and bias[1])):
            return None  # constants only
        nodes += [node] if end is node else [node, end]
        self.layers.update(nodes)
        w = None if weight is None else weight[0]
        gain = w if pre is None else pre if w is None else pre * w
        return _Scale(w, None if bias is None else bias[0], self.env[lhs],
                      None if weight is None else weight[1], None if bias is None else bias[1],
                      pre, gain), nodes, end

    def _broadcast_operand(self, node: fx.Node, cur: fx.Node) -> tuple[Tensor, str | None] | None:
        """The operand of the binary ``node`` (``mul``/``add``) other than ``cur``, when
        it is a parameter or constant that broadcasts against ``cur`` without widening it
        or reaching the batch axis: viewed to ``cur.dim() - 1`` axes, with its name."""
        if node.kwargs or len(node.args) != 2 or cur not in node.args or \
                node.args[0] is node.args[1]:
            return None
        other = node.args[1] if node.args[0] is cur else node.args[0]
        a = self.env[cur]
        value = self.env[other] if isinstance(other, fx.Node) else None
        if not isinstance(value, Tensor) or value.dtype != a.dtype or value.dim() > a.dim() or \
                (value.dim() == a.dim() and value.shape[0] != 1) or \
                tuple(torch.broadcast_shapes(value.shape, a.shape)) != tuple(a.shape):
            return None
        found = self.operand(other, reshaped=True)
        if found is None:
            return None
        per_sample = value.shape[1:] if value.dim() == a.dim() else value.shape
        shape = (1,) * (a.dim() - 1 - len(per_sample)) + tuple(per_sample)
        return found[0].reshape(shape), found[1]

    def linear_map(self, node: fx.Node, cur: fx.Node) -> _LinearMap | None:
        """A linear op of ``cur`` alone that keeps samples apart (NOTE [chains from the
        graph]): a mean or sum over other axes than the batch, or average pooling (views
        and permutations are shape maps, :meth:`shape_map`, which the walk tries first)."""
        a, out = self.env[cur], self.env[node]
        if node.args[0] is not cur or not isinstance(out, Tensor) or a.dim() < 2 or \
                out.dim() < 1 or out.shape[0] != a.shape[0] or out.dtype != a.dtype or \
                any(isinstance(v, fx.Node) for v in (*node.args[1:], *node.kwargs.values())):
            return None
        target, args = node.target, node.args[1:]
        if target in (aten.mean.dim, aten.sum.dim_IntList):
            if not args or args[0] is None or 0 in {d % a.dim() for d in args[0]} or \
                    node.kwargs.get("dtype") is not None:
                return None
        elif _POOLS.get(target) != a.dim():
            return None  # not a linear map, or a pool of an unbatched input

        def apply(t: Tensor) -> Tensor:
            return target(t, *args, **node.kwargs)

        return _LinearMap(apply, tuple(a.shape[1:]))

    def shape_map(self, node: fx.Node, cur: fx.Node
                  ) -> tuple[_ShapeMap, list[fx.Node], fx.Node] | None:
        """The ops from ``node`` on that move or repeat the entries of ``cur`` (each of
        the one before, :data:`_SHAPE_OPS`), up to a value read twice: the step, its ops
        and its output."""
        nodes: list[fx.Node] = []
        ops: list[_ShapeOp] = []
        while node.target in _SHAPE_OPS and node.args and node.args[0] is cur and \
                (not node.kwargs or node.target in _COPIES) and \
                not any(isinstance(a, fx.Node) for a in node.args[1:]):  # a copy's layout
            nodes.append(node)
            shapes = tuple(self.env[cur].shape), tuple(self.env[node].shape)
            if shapes[0] != shapes[1] or node.target not in _SAME_SHAPE | _COPIES:
                ops.append(_ShapeOp(node.target, tuple(node.args[1:]), *shapes))
            if len(node.users) != 1:
                break
            cur, node = node, next(iter(node.users))
        if not nodes:
            return None
        return _ShapeMap(tuple(ops)), nodes, nodes[-1]

    def map_region(self, node: fx.Node, values: Collection[fx.Node], taken: Collection[fx.Node]
                   ) -> tuple[list[fx.Node], list[fx.Node], fx.Node] | None:
        """A map without a rule (NOTE [maps without a rule] in ``chain_products.py``): the
        ops from ``node`` on that read its region and otherwise only the model's
        ``values`` and constants (no parameter, no other value of the batch), up to the
        first op after which one tensor of the region is read outside it, which must
        reach a layer (so the loss is never a map): ``(ops in graph order, the values
        they read, their output)``, or None. The region is the smallest that closes, so
        that the steps after it (an activation, a sum) keep their own rules."""
        inside: set[fx.Node] = set()
        region: list[fx.Node] = []
        reads: list[fx.Node] = []
        outputs: list[fx.Node] = []
        for n in self.gm.graph.nodes:  # topological order, from node on
            if n is not node and (not region or n.op != "call_function" or n in taken or
                                  not any(a in inside for a in n.all_input_nodes)):
                continue
            others = [a for a in n.all_input_nodes if a not in inside]
            if any(a not in values and self.variable(a) for a in others):
                if n is node:
                    return None
                continue  # a layer or the loss reads the region: not one of its ops
            region.append(n)
            inside.add(n)
            reads += [a for a in others if a in values and a not in reads]
            outputs = [m for m in region if any(u not in inside for u in m.users)]
            if len(outputs) == 1 and isinstance(self.env[outputs[0]], Tensor):
                break  # closed: one value leaves the region
        if len(outputs) != 1:
            return None
        (out,) = outputs
        value = self.env[out]
        if not isinstance(value, Tensor) or not value.is_floating_point() or \
                not self.feeds_layer(out):
            return None
        return region, reads, out

    def pointwise_run(self, cur: fx.Node, taken: Collection[fx.Node]
                      ) -> tuple[list[fx.Node], fx.Node] | None:
        """The longest run of pointwise ops of ``cur`` (and constants, ``zeros_like(cur)``
        among them), of its shape, with one value leaving it, of ``cur``'s dtype:
        ``(run in graph order, its output)``. Ops in ``taken`` (other steps) and other
        readers of ``cur`` alone (other branches) are passed over; an op that reads the
        run and cannot join it ends the run."""
        shape = self.env[cur].shape
        run: list[fx.Node] = []
        inside = {cur}
        for node in self.gm.graph.nodes:  # topological order
            if node.op != "call_function" or node in taken or \
                    not any(a in inside for a in node.all_input_nodes):
                continue
            if node.target in SHAPE_ONLY:
                continue
            # a cast (``_to_copy``) inside a map is elementwise too
            elementwise = pointwise(node.target) or node.target is aten._to_copy.default
            if not elementwise or not isinstance(self.env[node], Tensor) or \
                    self.env[node].shape != shape or \
                    any(a not in inside and self.variable(a) for a in node.all_input_nodes):
                if any(a in inside and a is not cur for a in node.all_input_nodes):
                    break
                continue
            run.append(node)
            inside.add(node)
        while run:  # trim to a run whose only value read outside is its last
            out = run[-1]
            leaks = [n for n in run[:-1]
                     if any(u not in inside and u.target not in SHAPE_ONLY for u in n.users)]
            if not leaks and self.env[out].dtype == self.env[cur].dtype:
                return run, out
            inside.discard(run.pop())
        return None

    def elementwise(self, run: list[fx.Node], cur: fx.Node) -> _Elementwise | str:
        """``phi'`` and ``phi''`` of the run as a function of ``cur``: closed forms for a
        run of one tanh, sigmoid or relu (from its output ``t = phi(z)``), else two
        backward passes through the run."""
        if len(run) == 1 and run[0].target in _CLOSED_FORMS:
            return _Elementwise(*_CLOSED_FORMS[run[0].target](self.env[cur], self.env[run[0]]))

        def phi(z: Tensor) -> Tensor:
            return replay(run, self.env, {cur: z})[run[-1]]

        found = elementwise_derivatives(phi, self.env[cur])
        if isinstance(found, str):
            return f"an elementwise op has no second derivative in torch ({found})"
        return _Elementwise(*found)


def _loss_nodes(gm: fx.GraphModule, o: fx.Node) -> list[fx.Node]:
    """The call nodes that read ``o``, directly or not, in graph order: the loss."""
    reads, nodes = {o}, []
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(a in reads for a in node.all_input_nodes):
            reads.add(node)
            nodes.append(node)
    return nodes


def _entering(walk: _Walk, loss: Collection[fx.Node]) -> set[fx.Node]:
    """The values of the parameters alone that an op of the batch reads other than as a
    sum or difference in the loss (directly, or through other values of the parameters):
    those that are not terms added to the loss. One pass in reverse graph order."""
    entering: set[fx.Node] = set()
    for node in reversed(walk.gm.graph.nodes):
        if not walk.data(node) and walk.variable(node) and any(
                _enters_at(walk, u, loss, entering) for u in node.users):
            entering.add(node)
    return entering


def _enters_at(walk: _Walk, reader: fx.Node, loss: Collection[fx.Node],
               entering: set[fx.Node]) -> bool:
    """Whether a value of the parameters alone enters the model at ``reader``: an op of
    the batch other than a sum or difference in the loss, or a value of the parameters
    alone in ``entering``."""
    if walk.data(reader):
        return reader not in loss or reader.target not in _SUMS
    return reader in entering


def _step_at(walk: _Walk, node: fx.Node, live: list[fx.Node], taken: set[fx.Node],
             values: Collection[fx.Node]
             ) -> tuple[Any, list[fx.Node], fx.Node, list[fx.Node]] | None:
    """The step that starts at ``node``, an op reading the model's values ``live``
    (``values``: all of them so far): ``(step, the nodes it takes, its output, the values
    it reads)``, or None where ``node`` is no step's first op. An elementwise map or a
    map without a rule is None in a walk on shapes (their derivatives need values)."""
    env = walk.env
    if len(live) == 2 and node.target is aten.add.Tensor and not node.kwargs and \
            all(a in live for a in node.args) and \
            env[live[0]].shape == env[live[1]].shape == env[node].shape and \
            env[live[0]].dtype == env[live[1]].dtype:
        return _Add(), [node], node, live
    if len(live) == 1:
        found = _form_step(walk, node, live[0], taken)
        if found == "loss":
            return None
        found = found or _one_value_step(walk, node, live[0], taken)
        if found is not None:
            return (*found, live)
    region = walk.map_region(node, values, taken)  # NOTE [maps without a rule]
    if region is None:
        return None
    ops, reads, out = region
    if not walk.values:
        return None, ops, out, reads

    def apply(*inputs: Tensor) -> Tensor:
        return replay(ops, env, dict(zip(reads, inputs, strict=True)))[out]

    variable = set(ops) | set(reads)
    found = _map_form(walk, out, reads[0]) if len(reads) == 1 else None
    form = found[0] if found is not None and set(found[1]) <= set(ops) else \
        _product_form(walk, ops, reads)
    linear = all(op.target in _LINEAR or op.target in SHAPE_ONLY or (
        op.target in _MULTILINEAR and sum(a in variable for a in operand_uses(op)) <= 1)
        for op in ops)
    return _Map(apply, [env[a] for a in reads], linear, form), ops, out, reads


def _map_form(walk: _Walk, out: fx.Node, a: fx.Node
              ) -> tuple[_Softmax | _Standardise, list[fx.Node]] | None:
    """The closed form of a map ``out = F(a)`` of one value whose ops, read back from
    ``out``, are a softmax's or a standardisation's decomposition (NOTE [softmax and
    standardisation] in ``chain_products.py``): ``(form, those ops)``, or None."""
    ndim = walk.env[a].dim()
    seen: list[fx.Node] = []

    def call(n: Any, *targets: Any) -> bool:
        found = isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets
        if found:
            seen.append(n)
        return found

    def axes(node: fx.Node) -> tuple[int, ...] | None:
        if argument(node, "keepdim") is not True:
            return None
        d = argument(node, "dim")
        d = range(ndim) if d is None or d == [] else [d] if isinstance(d, int) else d
        return tuple(sorted({i % ndim for i in d}))

    def inverse_root(n: Any) -> tuple[fx.Node, float] | None:  # rsqrt(v + eps)
        if call(n, aten.rsqrt.default) and call(n.args[0], aten.add.Tensor, aten.add.Scalar):
            v, eps = n.args[0].args
            if isinstance(eps, float | int) and not isinstance(eps, bool) and eps >= 0:
                return v, float(eps)
        return None

    form: _Softmax | _Standardise | None = None
    guarded = out  # attention's softmax: rows of a alone -inf give 0, not 0/0
    if call(out, aten.where.self) and call(out.args[0], aten.all.dim) and \
            call(out.args[0].args[0], aten.eq.Scalar) and out.args[0].args[0].args == \
            (a, -math.inf) and call(out.args[1], aten.zeros_like.default) and \
            out.args[1].args[0] is out.args[2]:
        guarded = out.args[2]
    if call(guarded, aten.div.Tensor) and len(guarded.args) == 2:
        e, s = guarded.args
        if call(e, aten.exp.default) and call(s, aten.sum.dim_IntList) and s.args[0] is e \
                and call(e.args[0], aten.sub.Tensor) and e.args[0].args[0] is a:
            m = e.args[0].args[1]  # the shift cancels: any value of a's rows
            if call(m, aten.amax.default) and m.args[0] is a and axes(m) is not None and \
                    axes(m) == axes(s) and (guarded is out or axes(out.args[0]) == axes(s)):
                form = _Softmax(axes(s))
    elif call(out, aten.mul.Tensor) and len(out.args) == 2:
        for left, right in (out.args, out.args[::-1]):
            root = inverse_root(right)
            if root is None:
                continue
            v, eps = root
            if left is a and call(v, aten.mean.dim) and call(v.args[0], aten.pow.Tensor_Scalar) \
                    and v.args[0].args == (a, 2) and axes(v) is not None:
                form = _Standardise(axes(v), eps, centred=False)
            elif call(left, aten.sub.Tensor) and left.args[0] is a and \
                    call(v, operator.getitem) and v.args[1] == 0 and \
                    call(left.args[1], operator.getitem) and left.args[1].args[1] == 1 and \
                    v.args[0] is left.args[1].args[0] and \
                    call(v.args[0], aten.var_mean.correction) and v.args[0].args[0] is a and \
                    argument(v.args[0], "correction") == 0 and axes(v.args[0]) is not None:
                form = _Standardise(axes(v.args[0]), eps, centred=True)
            break
    return None if form is None else (form, seen)


def _product_form(walk: _Walk, ops: list[fx.Node], reads: list[fx.Node]) -> _Product | None:
    """A map that is one ``bmm`` or ``mul`` of the two values it reads, in that order."""
    if len(ops) != 1 or len(reads) != 2 or list(ops[0].args) != reads or ops[0].kwargs:
        return None
    if ops[0].target is aten.bmm.default:
        return _Product(batched_matmul=True)
    if ops[0].target is aten.mul.Tensor and \
            walk.env[reads[0]].dim() == walk.env[reads[1]].dim() == walk.env[ops[0]].dim():
        return _Product(batched_matmul=False)
    return None


def _form_step(walk: _Walk, node: fx.Node, cur: fx.Node, taken: Collection[fx.Node]
               ) -> tuple[_Map | None, list[fx.Node], fx.Node] | str | None:
    """A softmax or an RMS normalisation of ``cur`` that starts at ``node`` (``amax``,
    ``pow``), as one map with its closed form: ``(step, its ops, its output)``; "loss"
    where it reaches no layer (the loss is never a map: the model ends before it); or
    None. Read as smallest closing regions, its ops would be several maps (``amax`` alone
    closes). Its inner values must be read by its own ops only."""
    if node.target not in (aten.amax.default, aten.pow.Tensor_Scalar):
        return None
    frontier, candidates = [node], []
    for _ in range(4):  # softmax: amax, sub, exp, div; RMS: pow, mean, add, rsqrt, mul
        frontier = [u for n in frontier for u in n.users if u.op == "call_function"]
        candidates += [u for u in frontier
                       if u.target in (aten.div.Tensor, aten.mul.Tensor, aten.where.self)]
    candidates.reverse()  # the widest first: a guarded softmax holds its division
    for out in candidates:
        found = _map_form(walk, out, cur)
        if found is None or node not in found[1] or any(n in taken for n in found[1]):
            continue
        ops = set(found[1])
        if any(u not in ops for n in ops - {out} for u in n.users):
            continue
        if not walk.feeds_layer(out):
            return "loss"
        order = [n for n in walk.gm.graph.nodes if n in ops]
        if not walk.values:
            return None, order, out

        def apply(a: Tensor, order: list[fx.Node] = order, out: fx.Node = out) -> Tensor:
            return replay(order, walk.env, {cur: a})[out]

        return _Map(apply, [walk.env[cur]], False, found[0]), order, out
    return None


def _one_value_step(walk: _Walk, node: fx.Node, cur: fx.Node, taken: set[fx.Node]
                    ) -> tuple[Any, list[fx.Node], fx.Node] | None:
    """:func:`_step_at` for an op that reads one of the model's values, ``cur``:
    ``(step, the nodes it takes, its output)`` or None."""
    env = walk.env
    if node.target in _VIEWS and node.args[0] is cur and env[cur].dim() > 2 and \
            env[node].dim() == 2 and env[node].shape[0] == env[cur].shape[0]:
        return _Flatten(tuple(env[cur].shape[1:])), [node], node
    linear = walk.linear(node, cur)
    if linear is not None:
        return linear
    step = walk.conv(node, cur) or walk.embedding(node, cur)
    if step is not None:
        return step, [node], node
    scale = walk.scale(node, cur)
    if scale is not None:
        return scale
    found = walk.shape_map(node, cur)
    if found is not None:
        return found
    step = walk.linear_map(node, cur)
    if step is not None:
        return step, [node], node
    run = walk.pointwise_run(cur, taken)  # also a map that reads cur at several ops
    if run is None or run[0][0] is not node:
        return None
    if not walk.values:
        return None, run[0], run[1]
    element = walk.elementwise(run[0], cur)
    return element, run[0], run[1]


def _chain_steps(walk: _Walk, placeholders: list[fx.Node], num_params: int,
                 names: dict[fx.Node, str]
                 ) -> tuple[list[Any], list[tuple[int, ...]], fx.Node] | str:
    """The model's steps from the input placeholder, the values each reads (NOTE [skip
    connections]) and its output value, or why not. With ``walk.values`` the walk holds
    the values (the activations' derivatives are computed), else only the trace's shapes."""
    env = walk.env
    x = placeholders[num_params]
    if env[x].dim() < 2:
        return "the inputs are not one tensor with a batch axis"
    steps: list[Any] = []
    sources: list[tuple[int, ...]] = []
    values = {x: 0}   # the model's values: the inputs, then each step's output
    claimed: set[fx.Node] = set()  # the ops of the steps so far
    taken_by: list[set[fx.Node]] = []  # each step's ops
    for node in walk.gm.graph.nodes:  # topological order: a step after those it reads
        if node.op != "call_function" or node in claimed or node.target in SHAPE_ONLY:
            continue
        live = [a for a in node.all_input_nodes if a in values]
        if not live:
            continue
        found = _step_at(walk, node, live, claimed, values)
        if found is None:
            break  # the loss, or an op without a rule
        step, nodes, end, reads = found
        if isinstance(step, str):
            return step
        sources.append(tuple(values[a] for a in reads))  # one value, two for an add
        steps.append(step)
        claimed.update(nodes)
        taken_by.append(set(nodes))
        values[end] = len(steps)
    # the output: the one value read outside the steps (by the loss); steps at the end
    # that reach no layer are the loss's when the loss also reads the value below them
    # (a binary cross-entropy reads the logits at several ops, some elementwise)
    while True:
        outside = {v: [u for u in v.users if u not in claimed and u.target not in SHAPE_ONLY]
                   for v in values}
        ends = [v for v, readers in outside.items() if readers]
        last = next((v for v, j in values.items() if j == len(steps)), None)
        if len(ends) < 2 or not steps or trainable(steps[-1]) or walk.feeds_layer(last):
            break
        steps.pop()
        sources.pop()
        claimed.difference_update(taken_by.pop())
        del values[last]
    if not ends:
        return "no layer with a parameter on a chain from the inputs"
    if len(ends) > 1:
        readers = [where(u) for v in ends[:-1] for u in outside[v]]
        return (f"values inside the model are read outside its layers, by "
                f"{', '.join(readers)} (an op that joins branches without a rule, or a "
                "loss that reads an activation)")
    cur = ends[0]
    if values[cur] != len(steps) or any(not v.users for v in values):
        return "a value of the model does not reach its output"
    users = outside[cur]
    entered = [n for st in steps for n in (getattr(st, "weight_name", None),
                                            getattr(st, "bias_name", None)) if n]
    taken = set(entered)
    tied = sorted({n for n in entered if entered.count(n) > 1})
    if tied:
        return f"parameters {tied} enter the chain at several layers (tied weights)"
    # a parameter that enters the model outside its layer: read by an op of the batch
    # other than its layer, or through values of the parameters alone that meet the
    # batch other than as terms added to the loss (NOTE [parameter terms])
    others = {p: [u for u in p.users if names[p] not in taken or
                  (u not in walk.operands and u not in walk.layers)]
              for p in placeholders[:num_params]}
    loss = set(_loss_nodes(walk.gm, cur)) if any(others.values()) else set()
    entering = _entering(walk, loss) if loss else set()
    stray = [names[p] for p, users in others.items()
             if any(_enters_at(walk, u, loss, entering) for u in users)]
    if stray:  # the walk stopped at cur: its one op, or the values that read it
        at = where(users[0]) if len(users) == 1 else \
            f"a value read by {len(users)} ops ({', '.join(where(u) for u in users)})"
        return f"parameters {stray} are used outside the chain of layers from the inputs, " \
               f"which stops at {at} (a regulariser, a tied weight, branches joined other " \
               "than by add, or an op without a chain rule)"
    if not any(trainable(s) for s in steps):
        return "no layer with a parameter on a chain from the inputs"
    if env[cur].dim() != 2:
        return "the chain does not end in an (N, C) output"
    for p in placeholders[:num_params]:  # unused parameters: zero rows, not a chain step
        if names[p] not in taken and not p.users:
            return f"parameter {names[p]!r} does not enter f"
    return steps, sources, cur


def chain_from_graph(captured: Any, params: dict[str, Tensor], inputs: list[Tensor],
                     per_sample: bool = False,
                     loss: Callable[[Tensor], Tensor] | None = None
                     ) -> tuple[ChainPlan | None, str]:
    """A :class:`hessfunc.graph.chain_plan.ChainPlan` from the captured graph of
    ``p -> f(p, x, ...)`` (``inputs``: the tensor leaves after ``p``, ``x`` first), or
    ``(None, why)``: NOTE [chains from the graph]. ``per_sample``: the graph is proved a
    sum over samples, so the loss's Hessian in ``o`` is its per-sample blocks, kept
    (within the chunk budget) instead of its gradient graph. ``loss``: the graph is the
    model's alone, ending at ``o``, and ``loss(o)`` is run as it is (NOTE [a loss the
    trace cannot take])."""
    gm = captured.graph_module
    leaves = list(params.values())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves) + len(inputs) or not inputs:
        return None, "the graph's inputs are not the parameters and the batch"
    names = dict(zip(placeholders, params, strict=False))

    def shape_walk() -> str | tuple[list[fx.Node], list[fx.Node], bool] | None:
        shapes = {n: n.meta.get("val") if n.op != "get_attr" else
                  operator.attrgetter(n.target)(gm) for n in gm.graph.nodes}
        walk = _Walk(gm, shapes, names, values=False)
        found = _chain_steps(walk, placeholders, len(leaves), names)
        if isinstance(found, str):
            return found
        terms = _terms_structure(walk, _loss_nodes(gm, found[2]))
        if terms is None or isinstance(terms, str):
            return terms
        return (*terms, _separable(walk, *terms))

    # the walk on the trace's shapes first, once per capture (its verdict: why not, or
    # the loss's terms of the parameters alone): a graph that is not a chain costs no
    # forward pass
    structure = captured.analysis(("chain", tuple(params), len(inputs)), shape_walk)
    if isinstance(structure, str):
        return None, structure
    env = _values(gm, leaves + inputs)
    walk = _Walk(gm, env, names, values=True)
    found = _chain_steps(walk, placeholders, len(leaves), names)
    if isinstance(found, str):
        return None, found
    steps, sources, cur = found
    o = env[cur]
    graph = _loss_graph(gm, env, cur, _loss_nodes(gm, cur), loss)
    if isinstance(graph, str):
        return None, graph
    o_leaf, g, loss = graph
    terms = None if structure is None else _parameter_terms(walk, *structure)
    rows_are_samples = o.shape[0] == inputs[0].shape[0]  # else rows of (sample, position)
    if ((per_sample and rows_are_samples) or o.shape[0] == 1) and \
            o.numel() * o.shape[1] * o.element_size() <= CHUNK_BUDGET_BYTES:
        return ChainPlan(steps, output_blocks(o_leaf, g), g.detach(), params, None, loss,
                         terms, o, sources), "ok"
    return ChainPlan(steps, None, g.detach(), params, (o_leaf, g), loss, terms, o,
                     sources), "ok"


_SCALINGS = {aten.mul.Tensor, aten.div.Tensor}  # linear when the divisor or a factor is constant


def _terms_structure(walk: _Walk, loss: list[fx.Node]
                     ) -> tuple[list[fx.Node], list[fx.Node]] | str | None:
    """The loss's terms of the parameters alone (NOTE [parameter terms]): ``(nodes that
    compute them and add them to the loss, in graph order; the parameter placeholders
    they read)``, None when there are none, or why they do not make ``L = l(o) + R(p)``;
    ``loss``: the ops after the chain's output ``o`` (:func:`_loss_nodes`)."""
    gm = walk.gm
    in_loss = set(loss)
    starts = []  # the loss's ops that read a value of the parameters alone
    for node in loss:
        for a in node.all_input_nodes:
            if walk.variable(a) and not walk.data(a) and a not in walk.operands:
                if node.target not in _SUMS:
                    return (f"the loss combines a term of the parameters alone with the model "
                            f"output other than by a sum, at {where(node)}")
                starts.append(node)
    if not starts:
        return None
    below, stack = set(starts), list(starts)  # the loss's ops the terms flow into
    while stack:
        for u in stack.pop().users:
            if u in in_loss and u not in below:
                below.add(u)
                stack.append(u)
    for node in loss:  # in graph order
        if node not in below:
            continue
        if node.target in _SCALINGS:  # by a constant: not a product of two variables
            a, b = node.args[:2]
            if not (walk.variable(b) if node.target is aten.div.Tensor else
                    walk.variable(a) and walk.variable(b)):
                continue
        if node.target not in _LINEAR:
            return (f"the loss is not a sum of a function of the model output and terms of "
                    f"the parameters alone: {where(node)} acts on their sum")
    # the terms' own ops: everything of the parameters alone they are computed from
    above, stack = set(), [a for n in starts for a in n.all_input_nodes
                           if walk.variable(a) and not walk.data(a)]
    while stack:
        node = stack.pop()
        if node not in above:
            above.add(node)
            stack.extend(a for a in node.all_input_nodes if walk.variable(a))
    order = [n for n in gm.graph.nodes
             if n.op == "call_function" and (n in above or n in below)]
    return order, [n for n in gm.graph.nodes if n.op == "placeholder" and n in above]


def _separable(walk: _Walk, order: list[fx.Node], placeholders: list[fx.Node]) -> bool:
    """Whether ``R`` is a sum over its parameters of full sums of elementwise functions
    of each (weight decay, ``sum p^4``): then ``H_R`` is diagonal. Each of ``R``'s ops is
    elementwise in one parameter (or reorders it), a full sum of such, or a sum,
    difference or constant multiple of those sums; ``R`` joins the loss as a scalar."""
    # node -> (its leaf, the reorderings applied to it): elementwise ops may combine
    # values of one leaf in one layout only (W * W.t() pairs different entries)
    elementwise: dict[fx.Node, tuple[fx.Node, tuple]] = {p: (p, ()) for p in placeholders}
    scalars: set[fx.Node] = set()
    for node in order:
        if walk.data(node):  # the loss's ops: linear (checked), R must arrive as a scalar
            if any(a in elementwise for a in node.all_input_nodes):
                return False
            continue
        inputs = [a for a in node.all_input_nodes if walk.variable(a)]
        if all(a in elementwise for a in inputs) and len({elementwise[a] for a in inputs}) == 1:
            leaf, layout = elementwise[inputs[0]]
            numel = walk.env[leaf].numel()
            if node.target in _FULL_SUMS:
                scalars.add(node)
                continue
            if walk.env[node].numel() != numel or any(
                    walk.env[a].numel() not in (1, numel) for a in node.all_input_nodes):
                return False
            if node.target in _PERMUTATIONS and len(inputs) == 1:
                elementwise[node] = (leaf, (*layout, node.target, str(node.args[1:])))
                continue
            if pointwise(node.target):
                elementwise[node] = (leaf, layout)
                continue
            return False
        if not all(a in scalars for a in inputs) or walk.env[node].dim() != 0:
            return False
        if node.target in (aten.add.Tensor, aten.sub.Tensor, aten.neg.default) or (
                node.target in _SCALINGS and sum(map(walk.variable, operand_uses(node))) == 1
                and not (node.target is aten.div.Tensor and node.args[1] in inputs)):
            scalars.add(node)
            continue
        return False
    return True


def _parameter_terms(walk: _Walk, order: list[fx.Node], placeholders: list[fx.Node],
                     separable: bool) -> ParameterTerms:
    """``R``'s gradient with its graph on fresh parameter leaves: the ops of
    :func:`_terms_structure` replayed, the rest of the loss held at its value (a constant
    added to ``R``, since the loss is ``l(o) + R(p)``); for a separable ``R``, its
    diagonal Hessian too: ``d/dp_j sum_i dR/dp_i = H_jj`` when ``H_R`` is diagonal."""
    gm, env, names = walk.gm, walk.env, walk.names
    leaves = {names[p]: env[p].detach().requires_grad_(True) for p in placeholders}
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    with torch.enable_grad():
        local = replay(order, env, {p: leaves[names[p]] for p in placeholders})
        total = fx.node.map_arg(out.args[0], lambda n: local.get(n, env[n]))
        grads = torch.autograd.grad(total, list(leaves.values()), create_graph=True,
                                    allow_unused=True, materialize_grads=True)
        diagonal = None
        if separable:  # :func:`_separable`
            # a linear R has constant gradients: nothing curved, an all-zero diagonal
            curved = [(k, g) for k, g in zip(leaves, grads, strict=True) if g.requires_grad]
            second = torch.autograd.grad(
                [g for _, g in curved], [leaves[k] for k, _ in curved],
                [torch.ones_like(g) for _, g in curved], allow_unused=True,
                materialize_grads=True) if curved else ()
            diagonal = {k: h.detach() for (k, _), h in zip(curved, second, strict=True)}
    return ParameterTerms(leaves, dict(zip(leaves, grads, strict=True)), diagonal)


def _loss_graph(gm: fx.GraphModule, env: dict[fx.Node, Any], o: fx.Node,
                loss_nodes: list[fx.Node], eager: Callable[[Tensor], Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor] | str:
    """``(o, dL/do with its graph, L)``: the graph after ``o`` (``loss_nodes``) replayed
    on a leaf, or ``eager(o)`` run on it."""
    leaf = env[o].detach().requires_grad_(True)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    with torch.enable_grad():
        if eager is not None:
            if out.args[0] is not o:
                return "the model's graph does not end at its output"
            loss = eager(leaf.clone())  # its own storage: a loss may write in place
        else:
            local = replay(loss_nodes, env, {o: leaf})
            loss = fx.node.map_arg(out.args[0], lambda n: local.get(n, env[n]))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            return "the loss is not a scalar"
        if not loss.requires_grad:
            return "the loss does not depend on the model output"
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    return leaf, g, loss.detach()


#: :func:`model_chain`'s reason for a model that draws random numbers
RANDOM_MODEL = "the model draws random numbers"


def _arguments_refused(params: Any, batch: tuple[Any, ...]) -> str | None:
    """Why ``p -> f(p, *batch)`` is not read for a chain, from its arguments alone, or
    None: the parameters must be a dict of floating-point tensors and the batch's first
    value (the inputs) one tensor, with no transform active and no input carrying a
    graph."""
    if not isinstance(params, dict) or not params or not all(
            isinstance(t, Tensor) and t.is_floating_point() for t in params.values()):
        return "the parameters are not a dict of floating-point tensors"
    if not use_autograd((params, *batch)):
        return "called inside a torch.func transform or with inputs that carry a graph"
    if not isinstance(batch[0], Tensor):
        return "the inputs are not one tensor"
    return None


def model_chain(model: Any, params: Any, x: Any, loss: Callable[[Tensor], Tensor]
                ) -> tuple[ChainPlan | None, str]:
    """:func:`chain_from_graph` for a model ``model(params, x) -> o`` captured alone
    (through its own trace cache), ``loss(o)`` run as it is (NOTE [a loss the trace
    cannot take]), or ``(None, why)``."""
    why = _arguments_refused(params, (x,))
    if why is not None:
        return None, why
    cache = _cache(model)
    if isinstance(cache, str):
        return None, cache
    try:
        captured = cache.get((params, x))
    except RandomOpError:  # random ops
        return None, RANDOM_MODEL
    if captured is None:
        return None, f"the model could not be captured as a graph: {cache.failure}"
    return chain_from_graph(captured, params, [x], loss=loss)


def graph_chain(f: Any, args: tuple[Any, ...], argnums: int, *, blocks: bool = True
                ) -> tuple[ChainPlan | None, str]:
    """:func:`chain_from_graph` for ``f(*args)``: captured through the parameter engine's
    trace cache, ``args[argnums]`` a dict of parameters followed by the batch. ``blocks``:
    keep the loss's per-sample blocks where the graph is proved a sum over samples (what
    the full Hessian and repeated products use); else its gradient graph serves."""
    if argnums != 0 or len(args) < 2:
        return None, "argnums is not 0 or f takes no batch after the parameters"
    why = _arguments_refused(args[0], args[1:])
    if why is not None:
        return None, why
    inputs = [t for t in torch.utils._pytree.tree_leaves(list(args[1:])) if
              isinstance(t, Tensor)]  # the inputs first
    cache = _cache(f)
    if isinstance(cache, str):
        return None, cache
    try:
        captured = cache.get(args)
    except Exception as e:  # noqa: BLE001 - a trace that fails: the graph route says so
        if isinstance(e, ArgumentError) and not isinstance(e, RandomOpError):
            raise  # f itself is refused
        return None, f"f could not be captured as a graph ({str(e)[:80]})"
    if captured is None:
        why = f"f could not be captured as a graph: {cache.failure}"
        model = model_output(f) if len(args) == 3 else None
        if model is None:
            return None, why
        targets = args[2]  # NOTE [a loss the trace cannot take]: the model alone
        plan, found = model_chain(model, args[0], args[1], lambda o: f.loss_fn(o, targets))
        if plan is None:
            return None, f"{why}; the model alone: {found}"
        why = f"the model's graph, its loss run as it is ({why})"
    else:
        proved = blocks and inputs[0].dim() >= 1 and inputs[0].shape[0] >= 2 and \
            sample_routes(captured, len(args[0]), inputs)[1] is not None  # memoised
        plan, why = chain_from_graph(captured, args[0], inputs, per_sample=proved)
    if plan is not None and isinstance(f, FunctionalModel) and f.check_finite:
        _report_non_finite(args[0], args[1], plan.value, "loss")  # as f itself would
    return plan, why
