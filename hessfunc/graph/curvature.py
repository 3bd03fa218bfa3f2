"""Exact Hessian diagonals of any captured ``f(params, *batch)``: per-sample curvature
propagated backward over the frontier of a DAG.

NOTE [frontier propagation]
    Let ``L = f(p, batch)`` have the per-sample structure of NOTE [per-sample
    structure] (``samples.py``). Visit the per-sample values ``v`` of the graph
    in reverse order. The *frontier* ``F`` is the set of values visited by a
    consumer but not yet themselves; for it we hold the per-sample joint
    Hessian ``H[a, b]`` (``N x w_a x w_b`` blocks, ``w`` the per-sample width),
    the Hessian of ``L`` with the frontier's values as independent variables.
    Removing ``v = op(u_1..u_m, consts, params)`` (``u_i`` its per-sample
    operands, ``J_i`` their per-sample Jacobians, ``g = dL/dv``) gives
        H[u_i, u_j] += J_i^T H[v, v] J_j + sum_k g_k d^2 v_k / du_i du_j
        H[u_i, r]   += J_i^T H[v, r]            for the other frontier values r,
    exact on DAGs: a value used twice (a skip connection) collects the blocks
    of both uses, and the cross blocks carry their interaction. ``J^T`` is one
    ``vmap``-ed VJP of the op over the columns of a block; the curvature term
    is zero for linear ops, one double backward for an elementwise op of one
    operand (its Hessian is diagonal), and ``w`` batched ones otherwise.
    Cost per op: ``O(N w_v (w_v + sum_r w_r) w_u)``, against one Hessian-vector
    product per parameter on the generic route.

    A parameter ``p`` reaching the loss only through one per-sample op ``v``,
    linearly and through views that keep each element (``t``, ``view``,
    ``permute``), has ``d^2 L / dp^2 = diag(J_p^T H[v, v] J_p)``: values not
    downstream of ``v`` do not depend on ``p``. For ``v = x W^T (+ b)`` that is
    ``sum_n x_nj^2 H_n[i, i]`` (and ``sum_n H_n[i, i]``); other linear ops take
    ``J_p e_k`` for each element. Parameter-only terms of the loss that are sums
    of elementwise functions of single parameters (weight decay) add their own,
    diagonal, Hessian. Any other parameter (tied, transformed before use,
    inside a non-separable term) takes one-hot Hessian-vector products.

NOTE [weights shared over rows]
    A Linear layer on a sequence applies one ``W`` to the ``L`` rows of each sample:
    ``(N T, d)`` rows through ``mm``/``addmm``, or ``bmm`` by ``W`` expanded over the
    batch of matrices (a Linear on a non-contiguous ``(T, N, d)``, as in
    ``nn.MultiheadAttention``'s input projection). Per sample ``v = X W`` with ``X``
    ``(L, d_in)``, so ``diag_W[k, o] = sum_(l, m) X[l, k] X[m, k] H[(l, o), (m, o)]``,
    the weight sharing of a convolution over its positions, with ``X`` as the unfolded
    input: ``O(N L^2 d_in d_out)`` against one pushed tangent per weight element (and
    the copies of an expanded ``W`` must be summed with their cross terms, which a
    diagonal per copy cannot give).

NOTE [parameters read one element at a time]
    Where each element of ``v`` reads one element of the parameter ``p`` (``p`` broadcast
    into ``u + p``, ``-``, ``*``, ``/``: a LayerNorm's weight and bias, positional
    embeddings; or an embedding table looked up by the data), ``J_p[e, i] = D_e [i(e) =
    i]``: ``i(e)`` the element ``v_e`` reads (the op run on ``p``'s element numbers, or
    broadcast), ``D = dv/dp`` along all ones (one ``jvp`` of the op). So ``J_p^T S``
    sums ``D S``'s rows by ``i(e)``, and ``diag(J_p^T H J_p)_i = sum_(i(e) = i = i(e'))
    D_e H[e, e'] D_e'``: ``O(N w C)`` instead of one pushed tangent per element of ``p``,
    ``O(|p| N w C)`` (``C`` the factor's columns, or ``w``). Autograd gives an
    embedding's padding row no gradient, so the op as the sweep runs it
    (:meth:`GraphPlan.op`) leaves that row out of every derivative of the lookup, ``D``
    included (0 where it is read); the Gauss-Newton products' tangents too
    (:func:`padding_rows`).

NOTE [Gauss-Newton over the graph]
    The GGN of ``loss_fn(g(p, x), y)`` is ``J^T H_o J``: the Hessian with the curvature
    terms of ``g``'s own ops left out. The sweep is the same with those terms zero
    (``GraphPlan.linearised``): the loss's ops put ``H_o`` on the frontier at the
    outputs, and ``g``'s ops carry it down by ``J^T . J`` alone. ``g``'s ops are found
    by tracing ``g`` alone: they are the first ops of the composition, in order.

NOTE [Gauss-Newton factors]
    Below the loss, the GGN's blocks stay ``S_a diag(s) S_b^T`` with one per-sample
    factor ``S`` (``N x w x W``, ``W`` the width of the model's outputs): the loss's
    Hessian at the outputs, ``H_o = U diag(lambda) U^T``, gives ``S = U |lambda|^(1/2)``,
    ``s = sign(lambda)``, and a linearised op only maps ``S_u += J_u^T S_v`` (values
    used twice sum their factors). A parameter's diagonal needs ``sum_c s_c (J_p^T
    S)_c^2``. Per op that is ``O(N W w_v w_u)`` instead of ``O(N w_v^2 w_u)``: the
    factorisation BackPACK's ``DiagGGNExact`` propagates.

NOTE [rows of the output]
    A token-level loss reads the model's output as rows, ``T`` positions per sample,
    and is a sum over them: its Hessian there is block-diagonal by rows, ``(T V)^2``
    per sample of which only ``T V^2`` are non-zero. Where no closed form gives the
    loss's factor, the loss's ops alone are labelled with the rows as samples (NOTE
    [per-sample structure]); proved a sum over rows, the blocks come from ``V``
    tangents (entry ``j`` of every row at once) instead of ``T V``, and are factorised
    row by row (``eigh`` of ``V x V``, not of ``T V x T V``).

NOTE [per-sample losses]
    ``per_sample=True`` wants the diagonal of each sample's own loss,
    ``f(p, x[n:n+1], y[n:n+1])``, which is not the batch's per-sample block: a mean
    divides by the batch size, a weighted cross-entropy by the batch's total
    weight, and a loss may spell the count out (``.sum() / 512``). So ``f`` is
    traced on one sample too (the same ops in the same order are required, up to
    copies and the kind of reshape: one sample's slices are contiguous; below the sum,
    no value pooled from several samples' data and the same numbers, so no ``/ N``), and
    that graph, run on every sample under ``vmap`` with the batch's boundary
    values ``b`` (the per-sample values the loss sums, one or several positions per
    sample: per-token losses) substituted, gives each sample's coefficients
    ``dl_n / db``. The loss is linear in ``b``, so seeding the backward pass with them
    instead of ``dL/db`` makes every per-sample block of the sweep that sample's own
    loss Hessian, and the sites keep the sample axis. Where the one-sample trace cannot
    stand for the batch's (other ops on one sample: ``nn.MultiheadAttention``'s
    projection is an ``mm`` there and a ``bmm`` on the batch; a pooled value; other
    numbers), ``f`` on a batch of one runs on every sample under ``vmap`` and ``sum_n
    l_n`` is traced as one graph (:class:`_OwnLosses`): its per-sample blocks are each
    sample's own loss by construction, and its sweep keeps the rows (``each_sample``).

NOTE [the batch in parts]
    The frontier's blocks take ``O(N w^2)`` memory. Over the budget (a quarter of the
    free memory) the sweep runs on parts of the batch that fit, two samples or more
    each: ``f`` is captured again on each part's samples, and as ``L`` is linear in
    the values ``b`` it sums over samples, seeding a part's sweep with the batch's
    ``dL/db`` at the part's samples gives exactly that part's share of the batch's
    Hessian. The shares add up; the parameter-only terms are added once. Per-sample
    diagonals need no seeds from the batch: each part's rows are its samples' own. The
    Gauss-Newton sweep takes the batch's factor at the outputs cut to each part (a
    Fisher's draws stay the batch's), or each part's output Hessian so seeded.
    A part's values are the batch's only if nothing below the sum is pooled (NOTE
    [per-sample structure]) and both traces compute with the same numbers, else the
    parts are refused with the reason. Cost: the same sweep, one capture per part
    size (at most two) and one forward pass per part.

NOTE [rows of every sample]
    Targets are often passed flattened over the batch, ``(N T,)`` for ``(N T, V)``
    logits. Such an input (first axis ``k N``) is cut to a part only in a layout the
    proof checks: labelled with batch axis 0 and layout ``(1, k)`` (sample-major) or
    ``(k, 1)``, every op must pair its rows with the per-sample values' rows in that
    same layout (elementwise ops, ``gather``'s index) or pool them, and nothing pooled
    may lie below the sum. Then each part's rows of it are the batch's rows of the
    part's samples, whatever they mean to the user. Otherwise it stays whole (as a
    table read whole, or pooled, it is the same for every part).
"""

from __future__ import annotations

import itertools
import math
import operator
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.func
import torch.nn.functional as F
from torch import Tensor, fx
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointError

from .._autodiff import batched_vjp, use_autograd
from .._checks import check_loss_output, check_scalar_output
from .._memory import CHUNK_BUDGET_BYTES, available_bytes, format_bytes, itemsize
from .capture import (
    LOSS_DECOMPOSITIONS,
    Captured,
    RandomOpError,
    TraceCache,
    argument,
    op_name,
    operand_uses,
    run_nodes,
    tensor_leaves,
    where,
)
from .rules import Elementwise, Reorder, rule_for
from .samples import SampleStructure, Value, analyze_samples, pointwise

__all__ = ["GraphPlan", "checkpoint_twin", "padding_rows", "plan_diagonal",
           "through_checkpoints"]

aten = torch.ops.aten

#: Views that keep every element once (a permutation of the elements).
_PERMUTATIONS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.clone.default, aten.alias.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
}
#: Ops linear in all operands jointly (no curvature term).
_LINEAR = _PERMUTATIONS | {
    aten.expand.default, aten._to_copy.default, aten.add.Tensor, aten.sub.Tensor,
    aten.neg.default, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim,
    aten.mean.default, aten.cat.default, aten.stack.default, aten.select.int,
    aten.slice.Tensor, aten.narrow.default, aten.index_select.default, aten.gather.default,
    aten.constant_pad_nd.default, aten.where.self, aten.masked_fill.Scalar,
    aten.amax.default, aten.amin.default, aten.relu.default, aten.add.Scalar,
    aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.detach.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
}
#: Ops linear in each operand separately (bilinear in two live operands).
_MULTILINEAR = {aten.mul.Tensor, aten.mm.default, aten.addmm.default, aten.bmm.default,
                aten.convolution.default, aten.embedding.default}
#: Elementwise ops of two operands that broadcast (NOTE [parameters read one element at a
#: time]).
_BROADCAST_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
#: Reductions to a scalar that keep elementwise terms apart.
_FULL_SUMS = {aten.sum.default, aten.mean.default}


def _source(node: fx.Node) -> tuple[fx.Node, int | None]:
    """The op that computed ``node``: itself, or for ``out[i]`` of an op with several
    outputs that op and ``i``."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and \
            node.args[0].op == "call_function":
        return node.args[0], node.args[1]
    return node, None


def _linear_in(node: fx.Node, live: list[fx.Node]) -> bool:
    """Whether ``node`` is linear in the ``live`` operands jointly."""
    target = node.target
    if target in _LINEAR:
        return True
    if target in _MULTILINEAR:
        return len(live) == 1
    if target is aten.div.Tensor:
        return len(live) == 1 and live[0] is node.args[0] and node.args[1] is not node.args[0]
    return False


@dataclass
class _Site:
    """Where a parameter enters: per-sample op ``node``, through operand ``operand``
    (a chain of element-keeping views ``chain`` from the leaf)."""

    node: fx.Node
    operand: fx.Node
    chain: list[fx.Node]


@dataclass
class _Shared:
    """A weight applied alike at ``span`` positions of each sample: per sample
    ``v[o, l] = sum_k W[o, k] X[k, l] (+ b[o])``, a convolution (``X`` its unfolded
    input) or a Linear on the rows of a sequence (``X`` the rows, transposed)."""

    cols: Tensor | None           # X, (N, K, L); None for the bias
    c_out: int
    span: int
    positions_first: bool         # v's per-sample elements run (l, o), not (o, l)
    to_operand: Callable[[Tensor], Tensor]  # (*lead, C_out, K) -> the operand's layout
    site: _Site                   # the operand and chain the result goes back through


@dataclass
class _Part:
    """Samples ``lo:hi`` of the batch, ``f``'s plan on them, and the node of that plan for
    each of the batch's (whole-batch diagonals, whose sweep the batch's ``dL/db`` seeds)."""

    lo: int
    hi: int
    plan: GraphPlan
    counterpart: dict[fx.Node, fx.Node]


@dataclass
class GraphPlan:
    """The captured graph of one call, its labels and the route of every leaf."""

    gm: fx.GraphModule
    structure: SampleStructure
    leaves: list[Tensor]
    inputs: list[Any]
    sites: dict[int, _Site]           # leaf index -> its one per-sample site
    separable: set[int]               # leaves whose parameter-only terms are separable
    products: dict[int, str] = field(default_factory=dict)  # leaf -> why products route
    captured: Captured | None = None  # the trace this plan reads (its analyses memo)
    each_sample: bool = False  # rows per sample: each sample's own loss (per_sample=True)
    one_sample: fx.GraphModule | None = None  # per-sample losses: f traced on one sample
    counterpart: dict[fx.Node, fx.Node] = field(default_factory=dict)  # its node per node
    linearised: frozenset = frozenset()  # ops whose curvature is left out (the GGN's model)
    # in place of the loss's Hessian at the model's output: a factor ``(*out shape, K)``
    # of that output, ``M = S S^T`` per sample (a Fisher's sampled or true-label gradients,
    # a known loss's Hessian in closed form), or None from it: the Hessian by autograd
    output_factor: Callable[[Tensor], Tensor | None] | None = None
    env: dict[fx.Node, Any] = field(default_factory=dict)
    rules: dict[fx.Node, Any] = field(default_factory=dict)
    _seeds: dict[fx.Node, Tensor] | None = None  # per-sample losses' boundary coefficients
    parts: list[_Part] = field(default_factory=list)  # NOTE [the batch in parts]
    grads: dict[fx.Node, Tensor] = field(default_factory=dict)
    loss: Tensor | None = None

    @property
    def n(self) -> int:
        return self.structure.num_samples

    def label(self, node: fx.Node) -> Value:
        return _label(self.structure, node)

    @property
    def own_losses(self) -> bool:
        """Whether the graph is each sample's own loss under ``vmap``, summed
        (:class:`_OwnLosses`; NOTE [per-sample losses])."""
        return self.each_sample and self.one_sample is None

    # ---- evaluation -------------------------------------------------------
    def evaluate(self, seeds: dict[fx.Node, Tensor] | None = None) -> None:
        """Run the graph once with autograd, keep every value and ``dL/dv`` for the
        per-sample values and the parameter-only operands of the loss's sum. With
        ``seeds`` (boundary value -> coefficient), ``L`` is replaced by
        ``sum_b <seed_b, b>``: each sample's own loss (NOTE [per-sample losses])."""
        terms = self._terms()
        # the Gauss-Newton sweep reads no gradient inside the model, only at its terms (and,
        # taken in parts, at the values the loss sums: its parts' seeds)
        seeded = set(self.boundary()) if self.linearised and self.parts else set()
        need = not self.linearised or bool(terms) or bool(seeded)
        params = [leaf.detach().requires_grad_(need) for leaf in self.leaves]
        self.rules = {}
        with torch.set_grad_enabled(need):
            env = run_nodes(self.gm, params + self.inputs)
        (out,) = [nd for nd in self.gm.graph.nodes if nd.op == "output"]
        self.loss = env.pop(out)
        wanted = [nd for nd in env if isinstance(env[nd], Tensor) and env[nd].requires_grad
                  and (self.label(nd).per_sample and not self.linearised or nd in terms
                       or nd in seeded)]
        target = self.loss if seeds is None else sum(
            (env[b] * c).sum() for b, c in seeds.items())
        if isinstance(target, Tensor) and target.requires_grad and wanted:
            grads = torch.autograd.grad(target, [env[nd] for nd in wanted],
                                        allow_unused=True)
            self.grads = {nd: g for nd, g in zip(wanted, grads, strict=True) if g is not None}
        self.env = {nd: v.detach() if isinstance(v, Tensor) else v for nd, v in env.items()}

    def boundary(self) -> list[fx.Node]:
        """The per-sample values the loss's sum over samples reads."""
        return [nd for nd in self.gm.graph.nodes if nd.op == "call_function"
                and self.label(nd).per_sample
                and any(u.op == "output" or self.label(u).aggregate for u in nd.users)]

    def _one_sample_seeds(self) -> dict[fx.Node, Tensor]:
        """NOTE [per-sample losses]: ``dl_n / db`` for every boundary value ``b``, from
        ``f`` traced on one sample, run on each sample under ``vmap``."""
        gm1 = self.one_sample
        assert gm1 is not None
        boundary = self.boundary()
        where1 = [self.counterpart[b] for b in boundary]
        needed: set[fx.Node] = set()  # what the loss reads past the boundary values
        stack = [nd for nd in gm1.graph.nodes if nd.op == "output"]
        while stack:
            nd = stack.pop()
            if nd not in needed:
                needed.add(nd)
                if nd not in where1:
                    stack.extend(nd.all_input_nodes)

        def loss_of_one(data: list[Tensor], values: list[Tensor]) -> Tensor:
            fixed = dict(zip(where1, values, strict=True))
            feed = iter([*self.leaves, *data])
            env: dict[fx.Node, Any] = {}
            for node in gm1.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(feed)
                elif node not in needed:
                    continue
                elif node in fixed:
                    env[node] = fixed[node]
                elif node.op == "get_attr":
                    env[node] = operator.attrgetter(node.target)(gm1)
                elif node.op == "call_function":
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                    env[node] = node.target(*args, **kwargs)
                elif node.op == "output":
                    return env[node.args[0]]
            raise AssertionError("no output")

        # every input has its samples first (check_samples_first): one sample per vmap row
        data = [t.unsqueeze(1) for t in self.inputs]
        # the loss is linear in the boundary values: their gradient needs only their shapes
        values = [self.env[b].new_zeros((self.n, *self.counterpart[b].meta["val"].shape))
                  for b in boundary]
        grad = torch.func.grad(loss_of_one, argnums=1)
        seeds = torch.func.vmap(grad)(data, values)
        # each sample's value, its batch axis (outer, 1, inner) first, is its row of flat
        return {b: self.unflat(b, c.movedim(self.label(b).axis + 1, 1).reshape(
            1, self.n, -1))[0] for b, c in zip(boundary, seeds, strict=True)}

    def _terms(self) -> set[fx.Node]:
        """The loss's parameter terms: parameter-only values read by the aggregate, or by
        a per-sample op outside the model (broadcast into each sample's values: ``((o -
        y) ** 2 + (w ** 2).sum()).sum()``), other than a parameter reaching its site as
        itself (a leaf or its views)."""
        terms = set()
        for node in self.gm.graph.nodes:
            reads = node.op == "output" or node.op == "call_function" and (
                self.label(node).aggregate
                or self.label(node).per_sample and node not in self.linearised)
            for arg in node.all_input_nodes if reads else ():
                value = self.structure.values[arg]  # (a tuple for split's pieces)
                if isinstance(value, Value) and value.live and not value.aggregate and \
                        not value.per_sample and not _leaf_as_itself(arg):
                    terms.add(arg)
        return terms

    # ---- per-sample tensors ------------------------------------------------
    def flat(self, node: fx.Node, t: Tensor, lead: int = 0) -> Tensor:
        """``t`` shaped like ``node`` (after ``lead`` batch dims) as ``(*lead, N, w)``:
        the batch axis split as ``(outer, N, inner)`` and ``N`` moved first."""
        label = self.label(node)
        outer, _ = label.layout
        moved = t.movedim(lead + label.axis, lead)
        front = moved.shape[:lead]
        split = moved.reshape(*front, outer, self.n, -1).movedim(lead + 1, lead)
        return split.reshape(*front, self.n, -1)

    def unflat(self, node: fx.Node, t: Tensor) -> Tensor:
        """``(K, N, w)`` -> ``(K, *node's shape)``, the inverse of :meth:`flat`."""
        label = self.label(node)
        outer, _ = label.layout
        shape = list(self.env[node].shape)
        moved = [shape.pop(label.axis), *shape]
        split = t.reshape(t.shape[0], self.n, outer, -1).movedim(2, 1)
        return split.reshape(t.shape[0], *moved).movedim(1, label.axis + 1)

    def width(self, node: fx.Node) -> int:
        return self.env[node].numel() // self.n

    def op(self, node: fx.Node, inputs: list[fx.Node]) -> Callable[..., Tensor]:
        """``node``'s op as a function of ``inputs`` (other operands fixed); an output
        of an op with several is that op followed by the selection."""
        env = self.env
        source, index = _source(node)

        def fn(*values: Tensor) -> Tensor:
            bound = dict(zip(inputs, values, strict=True))
            args, kwargs = fx.node.map_arg((source.args, source.kwargs),
                                           lambda a: bound[a] if a in bound else env[a])
            padding = _padding_row(source) if source.target is aten.embedding.default else -1
            if padding >= 0:  # autograd gives the padding row no gradient: no derivative
                keep = torch.ones_like(args[0][:, :1])
                keep[padding] = 0
                args = (args[0] * keep + (args[0] * (1 - keep)).detach(), *args[1:])
            out = source.target(*args, **kwargs)
            return out if index is None else out[index]

        return fn

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        """The per-sample floating-point operands of ``node`` (of its source op)."""
        return [u for u in _source(node)[0].all_input_nodes if self.label(u).per_sample
                and isinstance(self.env[u], Tensor) and self.env[u].is_floating_point()]

    def chunks(self, k: int, per_column: int) -> Iterator[slice]:
        step = max(1, CHUNK_BUDGET_BYTES // max(1, per_column * itemsize(self.loss.dtype)))
        for lo in range(0, k, step):
            yield slice(lo, min(k, lo + step))

    def rule(self, node: fx.Node, inputs: list[fx.Node]) -> Any:
        """The rule of ``node`` (:mod:`.rules`), made once per evaluation."""
        if node not in self.rules:
            self.rules[node] = rule_for(self, node, inputs)
        return self.rules[node]

    def linear(self, node: fx.Node, inputs: list[fx.Node]) -> bool:
        """Whether ``node`` is linear in its per-sample operands ``inputs`` jointly."""
        return _linear_in(_source(node)[0], inputs)

    # ---- the sweep ---------------------------------------------------------
    def _per_sample_nodes(self) -> list[fx.Node]:
        return [nd for nd in self.gm.graph.nodes
                if nd.op == "call_function" and self.label(nd).per_sample
                and isinstance(self.env.get(nd), Tensor) and self.env[nd].is_floating_point()]

    def diagonal(self) -> list[Tensor | None]:
        """Per leaf: its exact diagonal (leaf-shaped; with ``each_sample``, ``(N,
        *leaf shape)``, each sample's own loss), None for the products route."""
        lead = (self.n,) if self.each_sample else ()
        out = self._swept(lambda plan: plan._site_diagonal, full=False)
        for i, term in self._separable_terms().items():
            out[i] = term if out[i] is None else out[i] + term
        return [leaf.new_zeros((*lead, *leaf.shape)) if d is None and i not in self.products
                else d for i, (leaf, d) in enumerate(zip(self.leaves, out, strict=True))]

    def blocks(self, leaves: set[int] | None = None) -> list[Tensor | None]:
        """Per leaf (of ``leaves`` only, if given; None for the others): its own
        ``(numel, numel)`` Hessian block, ``J_p^T H[v, v] J_p`` at its site plus its
        separable terms' diagonal; None for the products route and for sites whose
        Jacobian would not fit the chunk budget."""
        out = self._swept(lambda plan: plan._site_block, full=True, leaves=leaves)
        wanted = range(len(self.leaves)) if leaves is None else leaves
        for i in wanted:
            if out[i] is None and i not in self.products and (
                    i not in self.sites or self._site_block_fits(self.sites[i])):
                out[i] = self.leaves[i].new_zeros(self.leaves[i].numel(),
                                                  self.leaves[i].numel())
        for i, term in self._separable_terms().items():
            if out[i] is not None:
                out[i] = out[i] + torch.diag(term.reshape(-1))
        return out

    def _swept(self, site_rule: Callable[[GraphPlan], Callable[..., Tensor | None]],
               full: bool, leaves: set[int] | None = None) -> list[Tensor | None]:
        """:meth:`_sweep` with ``site_rule(plan)`` at the sites: of this plan, or of each
        of its parts in turn, summed (each sample's own loss: stacked)."""
        if not self.parts:
            return self._sweep(site_rule(self), full, leaves)
        if not self.env and (self.one_sample is None or self.linearised):
            # dL/db of the batch and its parameter-only terms (and its outputs, for the
            # factor); the one-sample trace seeds each part's rows itself
            self.evaluate()
        factor = None  # the Gauss-Newton sweep's given factor at the outputs, of the batch
        if self.linearised and self.output_factor is not None:
            (out,) = self.model_outputs()
            factor = self.output_factor(self.env[out])
        found: list[list[Tensor | None]] = []
        for part in self.parts:
            if self.one_sample is None:
                part.plan._seeds = {part.counterpart[b]: self._samples(b, self.grads[b], part)
                                    for b in self.boundary()}
                part.plan.evaluate(part.plan._seeds)
            if self.linearised:
                mine = None if factor is None else self._samples(out, factor, part)
                part.plan.output_factor = None if mine is None else lambda _, S=mine: S
            found.append(part.plan._sweep(site_rule(part.plan), full, leaves))
            part.plan.env, part.plan.grads, part.plan.rules = {}, {}, {}
        join = (lambda ts: torch.cat(ts)) if self.each_sample else sum
        return [None if any(t is None for t in ts) else join(ts)
                for ts in zip(*found, strict=True)]

    def _samples(self, node: fx.Node, t: Tensor, part: _Part) -> Tensor:
        """``part``'s samples of ``t``, shaped like ``node``'s value (trailing dims may
        follow): the batch axis read as ``(outer, N, inner)``."""
        label = self.label(node)
        taken = _rows_of(t.movedim(label.axis, 0), label.layout, self.n, part.lo, part.hi)
        return taken.movedim(0, label.axis)

    def _sweep(self, at_site: Callable[..., Tensor | None], full: bool,
               leaves: set[int] | None = None) -> list[Tensor | None]:
        """NOTE [frontier propagation]: the backward sweep, ``at_site(site, H[v, v])``
        collected per leaf (summed over sites; of ``leaves`` only, if given). ``full``: keep
        whole blocks everywhere (else values whose block is only read on its diagonal keep
        the diagonal)."""
        if not self.env:
            self.evaluate()
            if self.one_sample is not None and not self.linearised:
                self._seeds = self._one_sample_seeds()
                self.evaluate(self._seeds)
        out: list[Tensor | None] = [None] * len(self.leaves)

        def collect(i: int, part: Tensor | None) -> None:
            if part is not None:
                out[i] = part if out[i] is None else out[i] + part

        by_node: dict[fx.Node, list[int]] = {}
        for i, site in self.sites.items():
            if leaves is None or i in leaves:
                by_node.setdefault(site.node, []).append(i)
        H: dict[tuple[fx.Node, fx.Node], Tensor] = {}

        owned: set[Any] = set()  # keys of H and of factors whose sum was made here

        def accumulate(store: dict[Any, Tensor], key: Any, value: Tensor) -> None:
            """``store[key] += value``, in place only into a sum made here: a first value
            may be a rule's operand, a view shared with ``(b, a)``, or one factor handed
            to two operands at once."""
            if key not in store:
                store[key] = value
            elif key in owned:
                store[key].add_(value)
            else:
                store[key] = store[key] + value
                owned.add(key)

        def add(a: fx.Node, b: fx.Node, block: Tensor) -> None:
            accumulate(H, (a, b), block)

        nodes = self._per_sample_nodes()
        diagonal_only = set() if self.linearised or full else \
            self._diagonal_only(nodes, by_node)
        factors: dict[fx.Node, Tensor] | None = None  # NOTE [Gauss-Newton factors]
        signs = None
        if self.linearised:
            given = self._given_factor() if self.output_factor is not None else None
            if given is None:  # the loss's Hessian by autograd (of each sample's own loss)
                if self.one_sample is not None and self._seeds is None:
                    self._seeds = self._one_sample_seeds()
                given = self._row_factor() or self._factorise(self._output_hessian())
            factors, signs = given
        for v in reversed(nodes):
            if factors is not None:
                root = factors.pop(v, None)
                if root is None:
                    continue
                for i in by_node.get(v, ()):
                    collect(i, at_site(self.sites[i], root, signs))
                inputs = self._inputs(v)
                if inputs:
                    for u, pulled in zip(inputs, self.rule(v, inputs).pull_rows(root),
                                         strict=True):
                        accumulate(factors, u, pulled)
                continue
            row = {b: blk for (a, b), blk in H.items() if a is v}
            for key in [k for k in H if v in k]:
                del H[key]
                owned.discard(key)
            hvv = row.pop(v, None)
            for i in by_node.get(v, ()):
                if hvv is not None:
                    collect(i, at_site(self.sites[i], hvv))
            inputs = self._inputs(v)
            if not inputs:
                continue
            rule = self.rule(v, inputs)
            if not row and len(inputs) == 1 and inputs[0] in diagonal_only:
                (u,) = inputs
                if hvv is not None:
                    add(u, u, rule.sandwich_diagonal(hvv))
                elif (block := rule.sandwich(None).get((u, u))) is not None:
                    add(u, u, torch.diagonal(block, dim1=1, dim2=2))
                continue
            for r, blk in row.items():
                for u, block in zip(inputs, rule.pull_rows(blk), strict=True):
                    add(u, r, block)  # (N, w_u, w_r)
                    add(r, u, block.transpose(1, 2))
            for (u, x), block in rule.sandwich(hvv).items():
                add(u, x, block)
        return out

    def _closed_form(self, site: _Site) -> bool:
        """``x W`` or the bias of ``addmm`` on one row per sample: the parameter's diagonal
        needs only the diagonal of ``H[v, v]``."""
        v, o = site.node, site.operand
        if v.target not in (aten.mm.default, aten.addmm.default) or \
                self.label(v).axis != 0 or self.label(v).layout != (1, 1):
            return False
        x_node, w_node = v.args[-2:]
        if o is w_node:
            return isinstance(x_node, fx.Node) and self.env[x_node].dim() == 2
        return v.target is aten.addmm.default and o is v.args[0] and \
            self.env[o].numel() == self.env[v].shape[1]

    def _diagonal_only(self, nodes: list[fx.Node], by_node: dict[fx.Node, list[int]]
                       ) -> set[fx.Node]:
        """Values of which only the diagonal of their block is ever read: one consumer,
        closed-form parameter sites, and below them only elementwise or reordering ops
        into values of the same kind (the first layers of a network)."""
        found: set[fx.Node] = set()
        for u in nodes:
            if len(u.users) != 1 or not all(self._closed_form(self.sites[i])
                                            for i in by_node.get(u, ())):
                continue
            inputs = self._inputs(u)
            if inputs:
                if len(inputs) != 1 or inputs[0] not in found:
                    continue
                if not isinstance(self.rule(u, inputs), (Elementwise, Reorder)):
                    continue
            found.add(u)
        return found

    def model_outputs(self) -> list[fx.Node]:
        """The values of ``linearised`` ops that the loss reads: the model's outputs (per
        sample and floating; read from the trace, so known before :meth:`evaluate`)."""
        return [nd for nd in self.gm.graph.nodes if nd in self.linearised
                and any(u not in self.linearised for u in nd.users)
                and self.label(nd).per_sample and isinstance(nd.meta.get("val"), Tensor)
                and nd.meta["val"].is_floating_point()]

    def _given_factor(self) -> tuple[dict[fx.Node, Tensor], Tensor] | None:
        """``output_factor`` at the model's one output, as the sweep's ``(N, w, K)``
        factor with positive signs (None where it gives none)."""
        (out,) = self.model_outputs()
        S = self.output_factor(self.env[out])  # (*out shape, K)
        return None if S is None else self._at_output(out, S)

    def _at_output(self, out: fx.Node, S: Tensor, signs: Tensor | None = None
                   ) -> tuple[dict[fx.Node, Tensor], Tensor]:
        """A factor ``S`` ``(*out shape, K)`` of each row of ``out`` (its batch axis, with
        its positions) and the signs of its columns ``(rows, K)`` (positive if None), as
        the sweep's per-sample ``(N, w, reps K)`` factor and ``(N, reps K)`` signs."""
        label = self.label(out)
        reps = label.size(self.n) // self.n
        outer, inner = label.layout
        if reps > 1:  # several rows per sample (positions): each row's factor its own columns
            i = torch.arange(label.size(self.n), device=S.device)
            place = F.one_hot(i // (self.n * inner) * inner + i % inner, reps).to(S.dtype)
            shape = [1] * S.dim()
            shape[label.axis] = -1
            S = (S.unsqueeze(-2) * place.reshape(*shape[:-1], reps, 1)).flatten(-2)
        root = self.flat(out, S.movedim(-1, 0), 1).permute(1, 2, 0)
        if signs is None:
            return {out: root}, root.new_ones(self.n, root.shape[2])
        # rows (outer, N, inner): sample n's columns are its rows' in the order placed above
        signs = signs.reshape(outer, self.n, inner, -1).transpose(0, 1)
        return {out: root}, signs.reshape(self.n, -1)

    def _loss_ops(self) -> set[fx.Node]:
        """The ops after the model's outputs: the loss's."""
        outs = self.model_outputs()
        downstream: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if node not in self.linearised and any(
                    a in downstream or a in outs for a in node.all_input_nodes):
                downstream.add(node)
        return downstream

    def _loss_gradient(self) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """The model's outputs as fresh leaves, and the loss's gradient there with its
        graph (through the loss's ops alone; each sample's own loss with seeds)."""
        outs = self.model_outputs()
        downstream = self._loss_ops()
        seeds = self._seeds

        def loss_of(*values: Tensor) -> Tensor:
            env = dict(self.env)
            env.update(zip(outs, values, strict=True))
            for node in self.gm.graph.nodes:
                if node in downstream and node.op == "call_function":
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                    env[node] = node.target(*args, **kwargs)
            if seeds is not None:
                return sum((env[b] * c).sum() for b, c in seeds.items())
            (result,) = [env[nd.args[0]] for nd in self.gm.graph.nodes if nd.op == "output"]
            return result

        primals = [self.env[u].detach().requires_grad_() for u in outs]
        with torch.enable_grad():
            first = torch.autograd.grad(loss_of(*primals), primals, create_graph=True,
                                        allow_unused=True, materialize_grads=True)
        return primals, first

    def _output_hessian(self) -> dict[tuple[fx.Node, fx.Node], Tensor]:
        """The loss's per-sample Hessian with respect to the model's outputs (the values
        of ``linearised`` ops that the loss reads), from batched double backward passes
        through the loss's ops alone (one tangent per output column, on every sample)."""
        outs = self.model_outputs()
        primals, first = self._loss_gradient()
        H: dict[tuple[fx.Node, fx.Node], Tensor] = {}
        for x, gx in zip(outs, first, strict=True):
            w = self.width(x)
            basis = torch.eye(w, dtype=gx.dtype, device=gx.device)
            basis = self.unflat(x, basis[:, None, :].expand(w, self.n, w))
            if not gx.requires_grad:  # the loss is linear in x
                rows = tuple(p.new_zeros(w, *p.shape) for p in primals)
            else:
                rows = batched_vjp(gx, primals, basis)
            # d(dL/dx) / du along the unit tangents of x: the rows (x, .) of the Hessian,
            # which is symmetric, so these are its columns (., x) too
            for u, r in zip(outs, rows, strict=True):
                H[(u, x)] = self.flat(u, r, 1).permute(1, 2, 0)
        return H

    def _row_factor(self) -> tuple[dict[fx.Node, Tensor], Tensor] | None:
        """NOTE [rows of the output]: the factor of the loss's Hessian at the model's one
        output, row by row, where the loss is proved a sum over those rows; else None."""
        assert self.captured is not None
        if not self.captured.analysis("rows apart", lambda: _rows_apart(self)):
            return None
        (out,) = self.model_outputs()
        primals, (first,) = self._loss_gradient()
        axis = self.label(out).axis
        rows = primals[0].movedim(axis, 0)
        R, rest = rows.shape[0], rows.shape[1:]
        w = math.prod(rest)
        if not first.requires_grad:  # the loss is linear in the output
            blocks = rows.new_zeros(R, w, w)
        else:  # tangent j: entry j of every row at once, the blocks being apart
            eye = torch.eye(w, dtype=rows.dtype, device=rows.device)
            basis = eye[:, None, :].expand(w, R, w).reshape(w, R, *rest).movedim(1, axis + 1)
            (cols,) = batched_vjp(first, primals, basis)
            blocks = cols.movedim(axis + 1, 1).reshape(w, R, w).permute(1, 2, 0)
        values, vectors = torch.linalg.eigh((blocks + blocks.transpose(1, 2)) / 2)
        S = (vectors * values.abs().sqrt()[:, None, :]).reshape(R, *rest, w)
        return self._at_output(out, S.movedim(0, axis), values.sign())

    def _factorise(self, H: dict[tuple[fx.Node, fx.Node], Tensor]
                   ) -> tuple[dict[fx.Node, Tensor], Tensor]:
        """NOTE [Gauss-Newton factors]: the frontier's joint per-sample Hessian (the loss's,
        at the model's outputs) as ``S diag(signs) S^T``, ``S`` split by value."""
        frontier = sorted({a for a, _ in H}, key=lambda nd: nd.name)
        widths = [self.width(a) for a in frontier]
        joint = torch.cat([torch.cat([H[(a, b)] for b in frontier], dim=2) for a in frontier],
                          dim=1)  # (N, sum w, sum w)
        values, vectors = torch.linalg.eigh((joint + joint.transpose(1, 2)) / 2)
        root = vectors * values.abs().sqrt()[:, None, :]
        return dict(zip(frontier, root.split(widths, dim=1), strict=True)), values.sign()

    def _site_diagonal(self, site: _Site, hvv: Tensor, signs: Tensor | None = None) -> Tensor:
        """``diag(J_p^T H[v, v] J_p)`` of one parameter, leaf-shaped (``hvv`` may be held
        as its diagonal, or with ``signs`` as a factor ``S``, ``H = S diag(signs) S^T``)."""
        v, o = site.node, site.operand
        env = self.env
        each = self.each_sample
        if signs is not None and self._closed_form(site):
            hvv = (hvv * hvv * signs[:, None, :]).sum(-1)
        if self._closed_form(site):
            x_node, w_node = v.args[-2:]
            d = hvv if hvv.dim() == 2 else torch.diagonal(hvv, dim1=1, dim2=2)  # (N, out)
            if o is w_node:
                x2 = env[x_node] ** 2
                if each and [nd.target for nd in site.chain] == [aten.t.default]:
                    return d[:, :, None] * x2[:, None, :]  # W of x W^T, in its own layout
                diag_o = x2[:, :, None] * d[:, None, :] if each else x2.T @ d
            else:
                diag_o = d.reshape(-1, *env[o].shape) if each else \
                    d.sum(0).reshape(env[o].shape)
            return self._to_leaf(site, diag_o)
        shared = self._unfolded(site)
        if shared is not None:
            diag = self._shared_diagonal(shared, hvv, signs)
            return self._to_leaf(shared.site, diag if each else diag.sum(0))
        reads = self._reads(site)
        if reads is not None:
            diag = self._read_diagonal(site, reads, hvv, signs)  # (N, *operand shape)
            return self._to_leaf(site, diag if each else diag.sum(0))
        return self._pushed_diagonal(site, hvv, signs)

    def _pushed_diagonal(self, site: _Site, hvv: Tensor, signs: Tensor | None) -> Tensor:
        """:meth:`_site_diagonal` of any other site: one tangent pushed through ``v`` per
        element of its operand (chunked)."""
        v, o = site.node, site.operand
        env, each = self.env, self.each_sample
        k = env[o].numel()
        fn = self.op(v, [o])
        pieces = []
        for sl in self.chunks(k, self.n * self.width(v)):
            basis = torch.zeros(sl.stop - sl.start, k, dtype=hvv.dtype, device=hvv.device)
            basis[torch.arange(sl.stop - sl.start), torch.arange(sl.start, sl.stop)] = 1
            tangents = basis.reshape(-1, *env[o].shape)
            pushed = torch.func.vmap(lambda t: torch.func.jvp(fn, (env[o],), (t,))[1])(tangents)
            u = self.flat(v, pushed, 1)  # (K, N, w_v)
            if signs is not None:
                proj = torch.einsum("knv,nvc->knc", u, hvv)
                quad = (proj * proj * signs).sum(-1)  # (K, N)
                pieces.append(quad.T if each else quad.sum(1))
                continue
            pieces.append(torch.einsum("knv,nvw,knw->nk" if each else "knv,nvw,knw->k",
                                       u, hvv, u))
        if each:
            return self._to_leaf(site, torch.cat(pieces, 1).reshape(-1, *env[o].shape))
        return self._to_leaf(site, torch.cat(pieces).reshape(env[o].shape))

    def _reads(self, site: _Site) -> tuple[Tensor, Tensor] | None:
        """Where each element of ``v`` reads one element of its parameter operand (NOTE
        [parameters read one element at a time]): per sample, the element it reads and
        ``dv/dp`` there, ``(N, w_v)`` each; else None."""
        v, o = site.node, site.operand  # (a site: o is read once, linearly)
        operand, value = self.env[o], self.env[v]
        place = torch.arange(operand.numel(), device=operand.device).reshape(operand.shape)
        if v.target is aten.embedding.default:  # the table; the tokens are data
            index = aten.embedding.default(place, self.env[v.args[1]])
        elif v.target in _BROADCAST_OPS:  # o not per-sample: broadcast to v's shape
            index = place.broadcast_to(value.shape)
        else:
            return None
        # dv/dp as op gives it (0 where a lookup reads its padding row)
        _, slope = torch.func.jvp(self.op(v, [o]), (operand,), (torch.ones_like(operand),))
        return self.flat(v, index), self.flat(v, slope.broadcast_to(value.shape))

    def _read_diagonal(self, site: _Site, reads: tuple[Tensor, Tensor], hvv: Tensor,
                       signs: Tensor | None) -> Tensor:
        """NOTE [parameters read one element at a time]: ``(N, *operand shape)``, each
        sample's ``diag(J_p^T H[v, v] J_p)`` (``hvv`` whole, or with ``signs`` a factor)."""
        index, slope = reads
        operand = self.env[site.operand]
        k, (n, w, columns) = operand.numel(), hvv.shape
        keys = index + torch.arange(n, device=index.device)[:, None] * k  # (sample, element)
        found, which = torch.unique(keys, return_inverse=True)  # only the elements read
        total = hvv.new_zeros(len(found), columns).index_add_(  # rows of J_p^T S (or H)
            0, which.reshape(-1), (slope[:, :, None] * hvv).reshape(n * w, columns))
        if signs is not None:  # sum_c s_c (J_p^T S)_ic^2
            own = (total * total * signs[found // k]).sum(-1)
        else:  # (J_p^T H)_ie' J_p[e', i], read where e' reads i
            own = (total[which, torch.arange(w, device=hvv.device)] * slope).reshape(-1)
            found = keys.reshape(-1)
        diag = hvv.new_zeros(n * k).index_add_(0, found, own)
        return diag.reshape(self.n, *operand.shape)

    def _site_block_fits(self, site: _Site) -> bool:
        """Whether the site's block comes without one Jacobian column per element over
        the chunk budget (closed forms always do)."""
        k = self.env[site.operand].numel()
        return self._closed_form(site) or self._unfolded(site) is not None or \
            2 * k * self.n * self.width(site.node) * itemsize(self.loss.dtype) <= \
            CHUNK_BUDGET_BYTES

    def _site_block(self, site: _Site, hvv: Tensor, signs: Tensor | None = None
                    ) -> Tensor | None:
        """``J_p^T H[v, v] J_p`` of one parameter, ``(numel, numel)`` in the leaf's order
        (``hvv`` whole, or with ``signs`` as a factor); None where it does not fit."""
        if signs is not None:
            hvv = torch.einsum("nvc,nc,nwc->nvw", hvv, signs, hvv)
        v, o = site.node, site.operand
        env = self.env
        k = env[o].numel()
        if self._closed_form(site):
            x_node, w_node = v.args[-2:]
            if o is w_node:  # v = x o: block[(j, i), (l, m)] = sum_n x_nj x_nl H_n[i, m]
                x = env[x_node]
                d_in, d_out = x.shape[1], hvv.shape[1]
                cross = sum(((x[sl, :, None] * x[sl, None, :]).reshape(sl.stop - sl.start, -1).T
                             @ hvv[sl].reshape(sl.stop - sl.start, -1))
                            for sl in self.chunks(self.n, d_in * d_in))
                block = cross.reshape(d_in, d_in, d_out, d_out).permute(0, 2, 1, 3).reshape(k, k)
            else:  # the bias of addmm
                block = hvv.sum(0)
        elif (shared := self._unfolded(site)) is not None:
            block, site = self._shared_block(shared, hvv), shared.site
        elif self._site_block_fits(site):
            fn = self.op(v, [o])
            basis = torch.eye(k, dtype=hvv.dtype, device=hvv.device).reshape(k, *env[o].shape)
            pushed = torch.func.vmap(lambda t: torch.func.jvp(fn, (env[o],), (t,))[1])(basis)
            u = self.flat(v, pushed, 1)  # (K, N, w_v)
            hu = torch.einsum("nvw,knw->knv", hvv, u)
            block = u.reshape(k, -1) @ hu.reshape(k, -1).T
        else:
            return None
        if not site.chain:
            return block
        leaf = self.env[site.chain[0].args[0]]
        order = torch.arange(leaf.numel(), dtype=torch.float64, device=leaf.device)
        moved = self._op_chain(site.chain)(order.reshape(leaf.shape)).reshape(-1)
        back = torch.argsort(moved.long())  # leaf element -> its place in the operand
        return block[back][:, back]

    def _unfolded(self, site: _Site) -> _Shared | None:
        """The weight or bias of a weight shared over positions (:class:`_Shared`), or
        None where the site is not one."""
        return self._convolution_of(site) or self._rows_of(site)

    def _convolution_of(self, site: _Site) -> _Shared | None:
        """A 1-d/2-d convolution's weight or bias site (no groups, not transposed)."""
        v, o = site.node, site.operand
        if v.target is not aten.convolution.default or site.chain:
            return None
        x_node, w_node, b_node, stride, padding, dilation, transposed, _, groups = v.args[:9]
        weight = self.env[w_node]
        label = self.label(v)
        if transposed or groups != 1 or weight.dim() not in (3, 4) or label.axis != 0 \
                or label.layout != (1, 1) or o not in (w_node, b_node):
            return None
        span = self.env[v].shape[2:].numel()
        if o is b_node:
            return _Shared(None, weight.shape[0], span, False, lambda t: t, site)
        x = self.env[x_node]
        if weight.dim() == 3:  # 1-d as 2-d of height one
            x, kernel = x.unsqueeze(2), (1, weight.shape[2])
            stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
        else:
            kernel = tuple(weight.shape[2:])
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return _Shared(cols, weight.shape[0], span, False,
                       lambda t: t.reshape(*t.shape[:-2], *weight.shape), site)

    def _rows_of(self, site: _Site) -> _Shared | None:
        """``x W (+ b)`` on several rows of each sample: ``mm``/``addmm`` of rows that hold
        sequence positions, or ``bmm`` by a matrix expanded over its batch (NOTE [weights
        shared over rows])."""
        v, o = site.node, site.operand
        if v.target not in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            return None
        x_node, w_node = v.args[-2:]
        if not isinstance(x_node, fx.Node) or self.label(x_node).axis in (
                None, self.env[x_node].dim() - 1):
            return None
        cols = self.flat(x_node, self.env[x_node])
        d_in, d_out = self.env[w_node].shape[-2:]
        span = cols.shape[1] // d_in
        shared = _through_expand(site)
        if v.target is aten.bmm.default:
            if shared is None:
                return None
            site = shared
        elif shared is not None:
            return None
        shape = self.env[site.operand].shape
        if o is w_node or shared is not None:
            return _Shared(cols.reshape(self.n, span, d_in).transpose(1, 2), d_out, span,
                           True, lambda t: t.transpose(-1, -2).reshape(*t.shape[:-2], *shape),
                           site)
        if v.target is aten.addmm.default and o is v.args[0] and tuple(shape) == (d_out,):
            return _Shared(None, d_out, span, True, lambda t: t, site)
        return None

    def _shared_diagonal(self, parts: _Shared, hvv: Tensor, signs: Tensor | None) -> Tensor:
        """Per sample, the diagonal of a shared weight or bias (:class:`_Shared`), in the
        operand's layout: ``diag_W[o, k] = sum_(l, m) X[k, l] H[(o, l), (o, m)] X[k, m]``
        (with a factor ``S``: ``sum_c s_c (sum_l S[(o, l), c] X[k, l])^2``, or where the
        positions are fewer than the inputs, ``L < K``, ``H``'s own blocks from the factor
        first: ``O(N C O L^2)`` against ``O(N C O K L)``, and no ``(N, C, O, K)`` array)."""
        cols, c_out, span = parts.cols, parts.c_out, parts.span
        n = self.n
        if signs is not None:
            root = hvv.reshape(n, span, c_out, -1).transpose(1, 2) if parts.positions_first \
                else hvv.reshape(n, c_out, span, -1)  # (N, o, l, c)
            if cols is None:
                return parts.to_operand((root.sum(2) ** 2 * signs[:, None, :]).sum(-1))
            if span < cols.shape[1]:  # fewer positions than inputs: H's own blocks, l x l
                own = torch.matmul(root * signs[:, None, None, :], root.transpose(-1, -2))
                return parts.to_operand(torch.einsum("nkl,nolm,nkm->nok", cols, own, cols))
            g = torch.einsum("nolc,nkl->ncok", root, cols).square_()
            # sum_c s_c g_c^2 as one batched product (two elementwise passes cost 2x more)
            return parts.to_operand(torch.bmm(signs[:, None, :].to(g.dtype),
                                              g.reshape(n, g.shape[1], -1)
                                              ).reshape(n, c_out, -1))
        own = hvv.reshape(n, span, c_out, span, c_out).diagonal(dim1=2, dim2=4) \
            if parts.positions_first \
            else hvv.reshape(n, c_out, span, c_out, span).diagonal(dim1=1, dim2=3)
        own = own.permute(0, 3, 1, 2)  # (N, l, m, o) -> (N, o, l, m)
        if cols is None:
            return parts.to_operand(own.sum((2, 3)))
        return parts.to_operand(torch.einsum("nkl,nolm,nkm->nok", cols, own, cols))

    def _shared_block(self, parts: _Shared, hvv: Tensor) -> Tensor:
        """A shared weight's or bias's block (:class:`_Shared`), in the operand's order:
        ``sum_n sum_(l, m) X[k, l] H[(o, l), (p, m)] X[j, m]`` at ``((o, k), (p, j))``."""
        cols, c_out, span = parts.cols, parts.c_out, parts.span
        full = hvv.reshape(self.n, span, c_out, span, c_out).permute(0, 2, 1, 4, 3) \
            if parts.positions_first else hvv.reshape(self.n, c_out, span, c_out, span)
        if cols is None:
            return full.sum((0, 2, 4))
        k = cols.shape[1]
        block = sum(torch.einsum("nkopm,njm->okpj",
                                 torch.einsum("nkl,nolpm->nkopm", cols[sl], full[sl]), cols[sl])
                    for sl in self.chunks(self.n, k * c_out * c_out * span))
        if parts.positions_first:  # (o, k) pairs in the operand's (k, o) order
            return block.permute(1, 0, 3, 2).reshape(c_out * k, c_out * k)
        return block.reshape(c_out * k, c_out * k)

    def _to_leaf(self, site: _Site, diag_operand: Tensor) -> Tensor:
        """Carry a diagonal back through the element-keeping views from the leaf."""
        if not site.chain:
            return diag_operand
        if [nd.target for nd in site.chain] == [aten.t.default] and \
                self.env[site.operand].dim() == 2:
            return diag_operand.transpose(-1, -2)
        leaf_node = site.chain[0].args[0]
        fn = self._op_chain(site.chain)
        _, vjp = torch.func.vjp(fn, self.env[leaf_node])
        if self.each_sample:
            return torch.func.vmap(vjp)(diag_operand)[0]
        return vjp(diag_operand)[0]

    def _op_chain(self, chain: list[fx.Node]) -> Callable[[Tensor], Tensor]:
        def fn(x: Tensor) -> Tensor:
            for node in chain:
                first = node.args[0]
                args, kwargs = fx.node.map_arg(
                    (node.args, node.kwargs),
                    lambda a, x=x, first=first: x if a is first else self.env[a])
                x = node.target(*args, **kwargs)
            return x
        return fn

    def _separable_terms(self) -> dict[int, Tensor]:
        """The diagonal of the parameter-only terms' Hessian for the separable leaves."""
        terms = [t for t in self._terms() if t in self.grads]
        if not terms or not self.separable:
            return {}
        placeholders = [nd for nd in self.gm.graph.nodes if nd.op == "placeholder"]
        leaves = {placeholders[i]: self.leaves[i].detach().requires_grad_()
                  for i in sorted(self.separable)}
        env: dict[fx.Node, Any] = dict(leaves)
        needed = set()
        for t in terms:
            stack = [t]
            while stack:
                nd = stack.pop()
                if nd not in needed:
                    needed.add(nd)
                    stack.extend(nd.all_input_nodes)
        with torch.enable_grad():
            for node in self.gm.graph.nodes:
                if node in needed and node not in env:
                    if node.op == "call_function":
                        args, kwargs = fx.node.map_arg(
                            (node.args, node.kwargs),
                            lambda a: env[a] if a in env else self.env[a])
                        env[node] = node.target(*args, **kwargs)
                    else:
                        env[node] = self.env[node]
            total = sum((env[t] * self.grads[t]).sum() for t in terms)
            grads = torch.autograd.grad(total, list(leaves.values()), create_graph=True,
                                        allow_unused=True)
            pairs = [(leaf, g) for leaf, g in zip(leaves.values(), grads, strict=True)
                     if g is not None and g.requires_grad]
            second = torch.autograd.grad([g for _, g in pairs], [leaf for leaf, _ in pairs],
                                         [torch.ones_like(g) for _, g in pairs],
                                         allow_unused=True) if pairs else ()
        result = {}
        index = {id(leaf): i for i, leaf in zip(sorted(self.separable), leaves.values(),
                                                 strict=True)}
        for (leaf, _), s in zip(pairs, second, strict=True):
            if s is not None:
                result[index[id(leaf)]] = s.detach()
        return result


# ---- planning -----------------------------------------------------------------

#: why per-sample (and Gauss-Newton) plans are refused, shared by their routes
_TERMS = "the loss has terms of the parameters alone"
_PRODUCTS = "some parameters take one-hot products (see hessfunc.explain)"


def _label(structure: SampleStructure, node: fx.Node) -> Value:
    value = structure.values[node]
    return value if isinstance(value, Value) else Value(any(v.live for v in value))


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pure(f: Any) -> Callable[..., Any] | str:
    """What to trace for ``f``: a FunctionalModel without its value checks (the model
    alone where it has no loss)."""
    from ..functional import FunctionalModel

    if not isinstance(f, FunctionalModel):
        return f
    if f.seed is not None:
        return "f fixes its random draws with a seed"
    return _ModelOutput(f) if f.loss_fn is None else _FunctionalLoss(f)


class _FunctionalLoss:
    """``loss_fn(model(x), y)`` of a FunctionalModel, traceable (no data-dependent checks)."""

    _guard_targets: Any = ()  # the trace cache's fingerprint walks what the instance sets

    def __init__(self, f: Any) -> None:
        self.f = f
        self._guard_targets = (f.module, f.loss_fn)

    def __call__(self, params: dict[str, Tensor], inputs: Any, targets: Any) -> Any:
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return self.f.loss_fn(self.f._apply(params, args), targets)


class _ModelOutput:
    """``model(x)`` of a FunctionalModel alone, traceable: what the chain takes when the
    trace cannot take the loss (NOTE [a loss the trace cannot take])."""

    _guard_targets: Any = ()

    def __init__(self, f: Any) -> None:
        self.f = f
        self._guard_targets = (f.module,)

    def __call__(self, params: dict[str, Tensor], inputs: Any) -> Any:
        return self.f._apply(params, inputs if isinstance(inputs, tuple) else (inputs,))


def model_output(f: Any) -> _ModelOutput | None:
    """The model part of a FunctionalModel with a loss (one per ``f``, so one trace
    cache), or None for anything else or a model with fixed random draws."""
    from ..functional import FunctionalModel

    if not isinstance(f, FunctionalModel) or f.loss_fn is None or f.seed is not None:
        return None
    part = f.__dict__.get("_model_output")
    if part is None:
        part = f.__dict__["_model_output"] = _ModelOutput(f)
    return part


def _kept(table: weakref.WeakKeyDictionary, f: Any, make: Callable[[], Any]) -> Any:
    """``table``'s entry for ``f``, made by ``make()`` when missing: one per function
    object, or per code for a plain function (a lambda made afresh on each call shares
    it). An entry that is a string (why there is none) is not kept, nor one for an ``f``
    that cannot be a weak key."""
    key = f.__code__ if isinstance(f, types.FunctionType) else f
    try:
        found = table.get(key)
    except TypeError:  # not weakly referenceable, or unhashable
        return make()
    if found is None:
        found = make()
        if not isinstance(found, str):
            table[key] = found
    return found


def _cache(f: Any) -> TraceCache | str:
    """The trace cache of ``f``. A plain function's is shared by every function object of
    its code (a lambda made afresh on each call): the guard's fingerprint compares what
    this one reaches (NOTE [trace cache and its guard]), and the cache traces this one."""
    def make() -> TraceCache | str:
        fn = _pure(f)
        return fn if isinstance(fn, str) else TraceCache(
            fn, "hessfunc.hessian_diag", decompositions=LOSS_DECOMPOSITIONS, stack_traces=True)

    cache = _kept(_CACHES, f, make)
    if isinstance(f, types.FunctionType) and isinstance(cache, TraceCache):
        cache.fn = f
    return cache


#: Reshapes and copies: which of them a reshape takes depends on the strides (a batch of
#: one is contiguous where ``N`` samples are not); all keep every element in its place.
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_COPIES = {aten.clone.default}
_SAME_ELEMENTS = _RESHAPES | _COPIES | {aten.alias.default}


def _rows_apart(plan: GraphPlan) -> bool:
    """NOTE [rows of the output]: whether the loss is proved a sum of functions of single
    rows of the model's one output (rows: its batch axis, positions included, when a
    sample has several), the loss's ops alone labelled with the rows as samples."""
    outs = plan.model_outputs()
    if len(outs) != 1 or plan.label(outs[0]).size(plan.n) == plan.n:
        return False  # (one row per sample: the sample's block is the row's)
    (out,) = outs
    graph = fx.Graph()
    scale, rows = graph.placeholder("scale"), graph.placeholder("rows")
    scale.meta["val"] = out.meta["val"].new_ones(())
    rows.meta["val"] = out.meta["val"]
    env = {out: graph.call_function(aten.mul.Tensor, (rows, scale))}
    env[out].meta["val"] = out.meta["val"]
    loss_ops = plan._loss_ops()
    for node in plan.gm.graph.nodes:
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node) or node.args[0] not in env:
                return False
            graph.output(env[node.args[0]])
        elif node in loss_ops:
            for a in node.all_input_nodes:
                if a not in env:  # what else the loss reads: constants only
                    if plan.label(a).live:
                        return False
                    env[a] = graph.placeholder(a.name)
                    env[a].meta["val"] = a.meta.get("val")
            env[node] = graph.node_copy(node, env.__getitem__)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    n_rows = plan.label(out).size(plan.n)
    structure = analyze_samples(gm, {0}, {1: plan.label(out).axis}, n_rows)
    return structure.reason is None


def _captured(f: Any, args: tuple[Any, ...]) -> Captured | None:
    """``f``'s captured graph on ``args``, or None where there is none (no trace, or random
    ops: the caller's route steps aside)."""
    cache = _cache(f)
    try:
        return None if isinstance(cache, str) else cache.get(args)
    except RandomOpError:
        return None


def _padding_row(node: fx.Node) -> int:
    """An embedding's padding row (no gradient reaches it), or -1."""
    return argument(node, "padding_idx")


def padding_rows(model: Any, params: Any, x: Any) -> list[tuple[int, int]]:
    """``(leaf, row)`` for each embedding table of ``model(params, x)`` (its leaf's place
    in ``params``) looked up with a padding row, which autograd gives no gradient, so no
    forward-mode product may carry a tangent from it either (NOTE [parameters read one
    element at a time]). Where ``model`` cannot be captured, a
    :class:`~hessfunc.FunctionalModel`'s ``nn.Embedding`` modules say; none for any other
    function."""
    captured = _captured(model, (params, x))
    if captured is None:
        return _module_padding_rows(model, params)
    leaves = [nd for nd in captured.graph_module.graph.nodes if nd.op == "placeholder"]
    place = {nd: i for i, nd in enumerate(leaves[:len(pytree.tree_leaves(params))])}
    return sorted({(place[nd.args[0]], _padding_row(nd)) for nd in captured.graph_module.graph.nodes
                   if nd.target is aten.embedding.default and nd.args[0] in place
                   and _padding_row(nd) >= 0})


def _module_padding_rows(model: Any, params: Any) -> list[tuple[int, int]]:
    """:func:`padding_rows` of a :class:`~hessfunc.FunctionalModel` from its modules."""
    from ..functional import FunctionalModel

    if not isinstance(model, FunctionalModel) or not isinstance(params, dict):
        return []
    names = {id(q): n for n, q in model.module.named_parameters()}  # tied: the first name
    place = {n: i for i, n in enumerate(params)}
    return sorted({(place[names[id(m.weight)]], m.padding_idx)
                   for m in model.module.modules() if isinstance(m, torch.nn.Embedding)
                   and m.padding_idx is not None and names.get(id(m.weight)) in place})


#: What torch says where it cannot differentiate through activation checkpointing: the
#: non-reentrant form's saved-tensor hooks (no ``torch.func`` support; a recomputation in
#: the backward pass that reads the private copy's own parameters), the reentrant form's
#: ``Function`` (no ``.grad()``, no ``torch.func`` without ``setup_context``).
_CHECKPOINT_GAPS = ("support saved tensor hooks", "checkpoint is incompatible with .grad()",
                    "must override the setup_context staticmethod")


def checkpoint_twin(exc: BaseException, f: Any, args: tuple[Any, ...]) -> Callable[..., Any]:
    """``f`` as its captured graph, where ``exc`` says torch could not differentiate ``f``
    itself through activation checkpointing (``torch.utils.checkpoint``). The trace
    inlines the checkpointed function, whose values checkpointing leaves unchanged, so
    its twin ``twin(*args)`` runs the same ops with every route open; valid for arguments
    of ``args``' signature. A function is captured only if every ``Function`` it applies
    keeps its rules in the trace (NOTE [custom autograd.Functions]), so the twin never
    drops a rule. Re-raises ``exc`` for any other error, or where ``f`` cannot be
    captured."""
    if getattr(f, "twin_of", None) is not None or not (
            isinstance(exc, CheckpointError) or any(gap in str(exc) for gap in _CHECKPOINT_GAPS)):
        raise exc  # (a twin that fails as well: torch's error, not a twin of the twin)
    captured = _captured(f, args)
    if captured is None:
        raise exc
    gm = captured.graph_module

    def twin(*a: Any) -> Any:
        return gm(*tensor_leaves(a))

    twin.twin_of = f  # type: ignore[attr-defined]
    return twin


def through_checkpoints(run: Callable[[Any], Any], f: Any, args: tuple[Any, ...]
                        ) -> tuple[Any, Any]:
    """``(f, run(f))``, or ``(twin, run(twin))`` where torch cannot differentiate ``f``
    itself through activation checkpointing (:func:`checkpoint_twin`)."""
    try:
        return f, run(f)
    except RuntimeError as exc:
        twin = checkpoint_twin(exc, f, args)
        return twin, run(twin)


def _leaf_as_itself(node: fx.Node) -> bool:
    """A parameter or a view of one that keeps its elements (``t``, ``expand``, ...)."""
    while node.op != "placeholder":
        if node.target not in _PERMUTATIONS and node.target is not aten.expand.default:
            return False
        node = node.args[0]
    return True


def _through_expand(site: _Site) -> _Site | None:
    """A parameter reaching ``bmm`` as its right matrix ``W`` expanded over the batch of
    matrices (then viewed as the same shape): the site of ``W`` itself, its chain up to
    the expand. None for any other site."""
    at = [i for i, nd in enumerate(site.chain) if nd.target is aten.expand.default]
    if len(at) != 1 or site.node.target is not aten.bmm.default or \
            site.operand is not site.node.args[1]:
        return None
    expand = site.chain[at[0]]
    shape = expand.meta["val"].shape
    if any(nd.target not in _SAME_ELEMENTS or nd.meta["val"].shape != shape
           for nd in site.chain[at[0] + 1:]):
        return None
    source = expand.args[0].meta["val"].shape
    if len(shape) != 3 or tuple(source) not in (tuple(shape[1:]), (1, *shape[1:])):
        return None
    return _Site(site.node, expand.args[0], site.chain[:at[0]])


def _route_leaves(gm: fx.GraphModule, structure: SampleStructure, num_leaves: int
                  ) -> tuple[dict[int, _Site], set[int], dict[int, str]]:
    """Each leaf's route: one linear per-sample site, separable parameter terms, or
    one-hot products (with the reason)."""
    def label(node: fx.Node) -> Value:
        return _label(structure, node)

    placeholders = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
    sites: dict[int, _Site] = {}
    separable: set[int] = set()
    products: dict[int, str] = {}
    for i in range(num_leaves):
        leaf = placeholders[i]
        found: list[_Site] = []
        other: list[fx.Node] = []
        stack: list[tuple[fx.Node, list[fx.Node]]] = [(leaf, [])]
        while stack:
            node, chain = stack.pop()
            for user in node.users:
                lab = label(user)
                if lab.per_sample:
                    found.append(_Site(user, node, chain))
                elif (user.target in _PERMUTATIONS or user.target is aten.expand.default) \
                        and not lab.aggregate:
                    stack.append((user, [*chain, user]))
                else:
                    other.append(user)
        if len(found) > 1:
            places = "; ".join(where(site.node) for site in found)
            products[i] = f"used at {len(found)} places ({places})"
            continue
        if found:
            site = found[0]
            live = [u for u in site.node.all_input_nodes if label(u).live]
            uses = sum(a is site.operand for a in pytree.tree_leaves((site.node.args,
                                                                      site.node.kwargs)))
            if site.operand not in live or not _linear_in(site.node, [site.operand]) or \
                    uses != 1:
                products[i] = f"enters {where(site.node)} non-linearly"
                continue
            if site.node.target is aten.div.Tensor and site.operand is site.node.args[1]:
                products[i] = f"is a divisor in {where(site.node)}"
                continue
            if any(nd.target is aten.expand.default for nd in site.chain) and \
                    _through_expand(site) is None:
                products[i] = f"is expanded into {where(site.node)}, which is not bmm's " \
                    "right matrix"
                continue
            sites[i] = site
        if other:
            if all(_elementwise_term(u, leaf, label) for u in other):
                separable.add(i)
            else:
                bad = next(u for u in other if not _elementwise_term(u, leaf, label))
                products[i] = (f"reaches the loss through {where(bad)}, which is neither one "
                               "linear per-sample use nor a sum of elementwise terms")
                sites.pop(i, None)
    return sites, separable, products


def _elementwise_term(node: fx.Node, leaf: fx.Node, label: Callable[[fx.Node], Value]) -> bool:
    """``node`` (a user of ``leaf`` or of its views) is elementwise in ``leaf`` up to a
    full sum, then linear up to the aggregate (a separable parameter-only term)."""
    same = tuple(leaf.meta["val"].shape)

    def elementwise(nd: fx.Node) -> bool:
        shape = tuple(nd.meta["val"].shape) if isinstance(nd.meta.get("val"), Tensor) else None
        if nd is leaf:
            return True
        if not pointwise(nd.target) or shape is None or \
                math.prod(shape) != math.prod(same):
            return False
        # (a constant operand is no larger than the output, which is the leaf's size)
        return all(elementwise(a) or not label(a).live for a in nd.all_input_nodes)

    def linear_to_loss(nd: fx.Node) -> bool:
        for user in nd.users:
            if user.op == "output" or label(user).aggregate:
                continue
            one_live = sum(label(a).live for a in operand_uses(user)) == 1
            ok = (user.target in _LINEAR or user.target is aten.mul.Tensor and one_live
                  or user.target is aten.div.Tensor and one_live and user.args[0] is nd)
            if not ok or not linear_to_loss(user):
                return False
        return True

    nd = node
    while pointwise(nd.target) and elementwise(nd):
        users = list(nd.users)
        if len(users) != 1:
            return False
        nd = users[0]
    return nd.target in _FULL_SUMS and elementwise(nd.args[0]) and linear_to_loss(nd)


def plan_diagonal(f: Any, args: tuple[Any, ...], argnums: int = 0, per_sample: bool = False,
                  check_memory: bool = True,
                  check_output: Callable[[Any], None] | None = None, call: str = "hessfunc"
                  ) -> tuple[GraphPlan | None, str]:
    """A :class:`GraphPlan` for ``hessian_diag(f, argnums, per_sample=...)(*args)``, or
    ``(None, why)``. ``check_memory=False`` leaves the frontier's memory to the caller
    (the Gauss-Newton sweep holds factors, not blocks). The captured output is checked
    before the proof: by ``check_output`` if given (the Gauss-Newton callers check
    ``loss_fn``'s), else as ``f``'s one scalar, an :class:`ArgumentError` naming ``call``."""
    if per_sample:
        return _plan_per_sample(f, args, argnums, check_memory, check_output, call)
    if argnums != 0:
        return None, "argnums is not 0 (the batch must follow the parameters)"
    if not use_autograd(args):
        return None, "called inside a torch.func transform or with inputs that carry a graph"
    if len(args) < 2:
        return None, "f takes no batch after the parameters"
    leaves, _ = pytree.tree_flatten(args[0])
    if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
        return None, "the parameters are not floating-point tensors"
    inputs = [t for t in pytree.tree_leaves(list(args[1:])) if isinstance(t, Tensor)]
    first = next((t for t in inputs if t.dim() >= 1), None)
    if first is None or first.shape[0] < 2:
        return None, "no batch of at least two samples after the parameters"
    cache = _cache(f)
    if isinstance(cache, str):
        return None, cache
    try:
        captured = cache.get(args)
    except RandomOpError as e:
        return None, str(e)
    if captured is None:
        return None, f"f could not be captured as a graph: {cache.failure}"
    if check_output is None:
        check_scalar_output(captured.output, call)
    else:
        check_output(captured.output)
    structure, routes = sample_routes(captured, len(leaves), inputs)
    if routes is None:
        return None, structure.reason
    plan = GraphPlan(captured.graph_module, structure, leaves, inputs, *routes,
                     captured=captured)
    if not check_memory:
        return plan, "ok"
    need = captured.analysis("bytes", lambda: _frontier_bytes(plan))
    return _within_budget(plan, need, f, args, check_output, call)


def sample_routes(captured: Captured, num_leaves: int, inputs: list[Tensor]
                  ) -> tuple[SampleStructure, Any]:
    """The captured graph's sample structure (the batch: the inputs' leading axis of the
    first input's size) and each leaf's route, or None for the routes when the graph is
    not proved a sum over samples; memoised with the capture. Some input must have an
    axis (the callers check first)."""
    n = next(t for t in inputs if t.dim() >= 1).shape[0]
    gm = captured.graph_module
    batch = _batch_inputs(num_leaves, inputs, n)

    def routes_of() -> tuple[SampleStructure, Any]:  # the graph's alone: once per capture
        structure = analyze_samples(gm, set(range(num_leaves)), batch, n)
        return structure, (None if structure.reason is not None else
                           _route_leaves(gm, structure, num_leaves))

    return captured.analysis(("routes", num_leaves, tuple(batch), n), routes_of)


def _batch_inputs(num_leaves: int, inputs: list[Tensor], n: int) -> dict[int, int]:
    """The placeholders of the inputs whose first axis is the batch's (``n``), each
    with batch axis 0 (the parameters' ``num_leaves`` placeholders come first)."""
    return {num_leaves + j: 0 for j, t in enumerate(inputs) if t.dim() >= 1 and t.shape[0] == n}


def _budget(plan: GraphPlan) -> int:
    return available_bytes(plan.leaves[0].device) // 4


def _over_budget(plan: GraphPlan, need: int) -> str | None:
    budget = _budget(plan)
    if need > budget:
        return (f"the per-sample curvature over the widest frontier needs "
                f"{format_bytes(need)}, over the budget of {format_bytes(budget)}")
    return None


def _within_budget(plan: GraphPlan, need: int, f: Any, args: tuple[Any, ...],
                   check_output: Callable[[Any], None] | None, call: str,
                   prepare: Callable[[GraphPlan, tuple[Any, ...]], str | None] | None = None
                   ) -> tuple[GraphPlan | None, str]:
    """``plan`` as it is if its sweep's ``need`` of memory fits the budget, else swept
    over parts of the batch that fit (NOTE [the batch in parts]; ``prepare(part, its
    args)`` readies each part's plan, or says why not), else ``(None, why)``."""
    over = _over_budget(plan, need)
    if over is None:
        return plan, "ok"
    size = _budget(plan) * plan.n // need  # samples per part
    if size < 2:
        return None, f"{over}, even for two samples at a time"
    parts = min(-(-plan.n // size), plan.n // 2)
    if parts < 2:
        return None, f"{over}, and {plan.n} samples do not split into parts of two or more"
    bounds = [(plan.n * i // parts, plan.n * (i + 1) // parts) for i in range(parts)]
    why = _take_parts(plan, f, args, bounds, check_output, call, prepare)
    if why is not None:
        return None, f"{over}, and the batch cannot be taken in parts: {why}"
    return plan, "ok"


def _take_parts(plan: GraphPlan, f: Any, args: tuple[Any, ...], bounds: list[tuple[int, int]],
                check_output: Callable[[Any], None] | None, call: str,
                prepare: Callable[[GraphPlan, tuple[Any, ...]], str | None] | None
                ) -> str | None:
    """Set ``plan.parts``, a plan of ``f`` on each range of samples in ``bounds``, or say
    why the parts would not add up to the batch's diagonal."""
    n, per_sample = plan.n, plan.one_sample is not None  # else seeded with the batch's dL/db
    rows = {} if per_sample else plan.captured.analysis("rows of inputs",
                                                         lambda: _rows_of_inputs(plan))
    parts = []
    for lo, hi in bounds:
        data = _cut(list(args[1:]), n, lo, hi, rows)
        part_args = (args[0], *data)
        part, why = plan_diagonal(f, part_args, per_sample=per_sample, check_memory=False,
                                  check_output=check_output, call=call)
        if part is None:
            return (f"{why} (f on part of the batch gets the inputs whose first axis has the "
                    f"batch's size, {n}, cut to the part, and those whose first axis holds "
                    "rows of every sample where their rows are proved, the others whole)")
        if prepare is not None and (why := prepare(part, part_args)) is not None:
            return why
        if set(part.products) != set(plan.products):
            return "f on part of the batch takes other routes for its parameters"
        counterpart: dict[fx.Node, fx.Node] | str = {}
        if not per_sample:  # its sweep is seeded with the batch's dL/db
            counterpart = _counterparts(plan.gm, part.gm)
            if isinstance(counterpart, str):
                return f"f on part of the batch runs other ops than on the batch: {counterpart}"
            if set(part.boundary()) != {counterpart.get(b) for b in plan.boundary()}:
                return "f on part of the batch sums other values"
            why = _separable_samples(plan, part.gm, counterpart, "part of the batch")
            if why is not None:
                return why
        part.each_sample = plan.each_sample
        parts.append(_Part(lo, hi, part, counterpart))
    plan.parts = parts
    return None


def _rows_of_inputs(plan: GraphPlan) -> dict[int, tuple[int, int]]:
    """NOTE [rows of every sample]: for each input whose first axis is ``k N`` long
    (``k >= 2``: targets flattened over the batch), the layout ``(1, k)`` (sample-major)
    or ``(k, 1)`` under which the proof pairs its rows with the per-sample values' and
    nothing below the loss's sum pools them, keyed by its place among the inputs."""
    n, first = plan.n, len(plan.leaves)
    batch, below = _batch_inputs(first, plan.inputs, n), _below(plan)
    rows: dict[int, tuple[int, int]] = {}
    for j, t in enumerate(plan.inputs):
        if t.dim() == 0 or t.shape[0] <= n or t.shape[0] % n:
            continue
        k = t.shape[0] // n
        for layout in ((1, k), (k, 1)):
            layouts = {first + i: lay for i, lay in (rows | {j: layout}).items()}
            trial = analyze_samples(plan.gm, set(range(first)),
                                    batch | dict.fromkeys(layouts, 0), n, layouts)
            if trial.reason is None and _pooled_below(below, trial) is None:
                rows[j] = layout
                break
    return rows


def _cut(data: list[Any], n: int, lo: int, hi: int, rows: dict[Any, Any]) -> list[Any]:
    """Samples ``lo:hi`` of the batch's inputs: their first axis cut where it has the
    batch's size, or holds rows of every sample in a proved layout (``rows``)."""
    place = itertools.count()  # the place of each tensor among the inputs

    def cut(t: Any) -> Any:
        j = next(place) if isinstance(t, Tensor) else None
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        if j in rows:
            return _rows_of(t, rows[j], n, lo, hi)
        return t[lo:hi] if t.shape[0] == n else t

    return pytree.tree_map(cut, data)


def _rows_of(t: Tensor, layout: tuple[int, int], n: int, lo: int, hi: int) -> Tensor:
    """Samples ``lo:hi`` of ``t``'s first axis, read as ``(outer, N, inner)`` rows."""
    outer, inner = layout
    rest = t.shape[1:]
    return t.reshape(outer, n, inner, *rest)[:, lo:hi].reshape(-1, *rest)


class GGNLoss:
    """``loss_fn(g(params, x), y)``, traceable; one per ``(g, loss_fn)`` while both live
    (:meth:`of`), so that its trace cache serves every ``ggn_diag(g, loss_fn)`` built
    on them, also one built inline on every call. It holds ``g`` and ``loss_fn`` weakly:
    the functions built on it hold them."""

    _made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, g: Callable[..., Any], loss_fn: Callable[..., Any]) -> None:
        self._g, self._loss_fn = weakref.ref(g), weakref.ref(loss_fn)
        self.model = _Model(g)

    @classmethod
    def of(cls, g: Callable[..., Any], loss_fn: Callable[..., Any]) -> GGNLoss:
        try:
            made = cls._made.setdefault(g, weakref.WeakKeyDictionary())
            found = made.get(loss_fn)
            if found is None:
                found = made[loss_fn] = cls(g, loss_fn)
        except TypeError:  # not weakly referenceable, or unhashable: a plain wrapper
            found = cls.__new__(cls)
            found._g, found._loss_fn = (lambda: g), (lambda: loss_fn)
            found.model = _Model(g)
        return found

    @property
    def _guard_targets(self) -> tuple[Any, Any]:
        return self._g(), self._loss_fn()

    def __call__(self, params: Any, x: Any, y: Any) -> Any:
        return self._loss_fn()(self._g()(params, x), y)


class _Model:
    """``g(params, x)`` alone, for finding its ops in the composition (``g`` weakly)."""

    def __init__(self, g: Callable[..., Any]) -> None:
        try:
            ref = weakref.ref(g)
        except TypeError:
            ref = lambda: g  # noqa: E731
        self._g = ref

    @property
    def _guard_targets(self) -> tuple[Any]:
        return (self._g(),)

    def __call__(self, params: Any, x: Any) -> Any:
        return self._g()(params, x)


def plan_ggn_diagonal(f: GGNLoss, args: tuple[Any, ...], per_sample: bool = False,
                      call: str = "ggn_diag") -> tuple[GraphPlan | None, str]:
    """The plan of ``f``'s diagonal with ``g``'s curvature left out (NOTE [Gauss-Newton
    over the graph]), or ``(None, why)``; ``loss_fn``'s output checked, naming ``call``."""
    def check(out: Any) -> None:
        check_loss_output(out, call)

    plan, why = plan_diagonal(f, args, 0, per_sample=per_sample, check_memory=False,
                              check_output=check)
    if plan is None:
        return None, why
    if plan.products:
        return None, _PRODUCTS
    traced, model = f, f.model
    if plan.own_losses:  # g's ops are found in g on each sample under vmap
        traced, model = _own_losses(f), _own_losses(f.model, summed=False)
        if isinstance(model, str):
            return None, model
    # f's capture is keyed by what g and loss_fn reach, so g's ops found once hold for it
    linearised = plan.captured.analysis("model ops", lambda: _model_ops(model, args, plan))
    if isinstance(linearised, str):
        return None, linearised
    plan.linearised = linearised
    need = plan.captured.analysis("ggn bytes", lambda: _frontier_bytes(plan, columns=sum(
        nd.meta["val"].numel() // plan.n for nd in plan.model_outputs())))

    def linearise(part: GraphPlan, part_args: tuple[Any, ...]) -> str | None:
        found = part.captured.analysis("model ops",
                                       lambda: _model_ops(model, part_args, part))
        if isinstance(found, str):
            return found
        part.linearised = found
        return None

    return _within_budget(plan, need, traced, args, check, call, linearise)


def _model_ops(model: Any, args: tuple[Any, ...], plan: GraphPlan) -> frozenset | str:
    """The ops of ``plan`` that ``model`` (``g``, traced alone) computes (they come
    first), or why not found."""
    cache = _cache(model)
    if isinstance(cache, str):
        return cache
    try:
        captured = cache.get(args[:2])
    except RandomOpError as e:
        return str(e)
    if captured is None:
        return f"g could not be captured as a graph: {cache.failure}"
    model_ops = [nd.target for nd in captured.graph_module.graph.nodes
                 if nd.op == "call_function"]
    placeholders = [nd for nd in plan.gm.graph.nodes if nd.op == "placeholder"]
    of_x = sum(isinstance(t, Tensor) for t in pytree.tree_leaves(args[1]))
    of_y = set(placeholders[len(plan.leaves) + of_x:])
    calls = []
    for nd in plan.gm.graph.nodes:
        if nd.op != "call_function":
            continue
        if nd.all_input_nodes and all(a in of_y for a in nd.all_input_nodes):
            of_y.add(nd)  # the targets' own ops (under vmap y's view may come before g's)
        else:
            calls.append(nd)
    first = frozenset(calls[:len(model_ops)])
    # g runs before loss_fn, so its ops come first, in an order that may differ between
    # independent ones (two traces may record t(w) and view(x) of a Linear either way)
    if Counter(nd.target for nd in first) != Counter(model_ops):
        return "g's ops are not the first ops of loss_fn(g(params, x), y)"
    return first


def _plan_per_sample(f: Any, args: tuple[Any, ...], argnums: int, check_memory: bool = True,
                     check_output: Callable[[Any], None] | None = None, call: str = "hessfunc"
                     ) -> tuple[GraphPlan | None, str]:
    """The plan of the batch, with ``f`` also traced on one sample (NOTE [per-sample
    losses]): the two graphs must have the same ops in the same order."""
    plan, why = plan_diagonal(f, args, argnums, check_memory=False,
                              check_output=check_output, call=call)
    if plan is None:
        return None, why
    if plan.products:
        return None, _PRODUCTS
    # the batch's capture is keyed by what f reaches, so its one-sample graph holds for it
    found = plan.captured.analysis("one sample", lambda: _one_sample_graph(f, args, plan))
    if isinstance(found, str):
        # each sample's own loss has the terms too
        return (None, found) if found == _TERMS else \
            _plan_own_losses(f, args, check_memory, check_output, call, found)
    plan.one_sample, plan.counterpart = found
    plan.each_sample = True
    if not check_memory:
        return plan, "ok"
    need = plan.captured.analysis("bytes", lambda: _frontier_bytes(plan))
    return _within_budget(plan, need, f, args, check_output, call)


def _plan_own_losses(f: Any, args: tuple[Any, ...], check_memory: bool,
                     check_output: Callable[[Any], None] | None, call: str, why_not_seeded: str
                     ) -> tuple[GraphPlan | None, str]:
    """The plan of :class:`_OwnLosses` of ``f`` with rows per sample (NOTE [per-sample
    losses]), where the one-sample trace cannot seed the batch's (``why_not_seeded``)."""
    own = _own_losses(f)
    plan, why = (None, own) if isinstance(own, str) else plan_diagonal(
        own, args, check_memory=False, check_output=check_output, call=call)
    if plan is not None and plan.products:
        plan, why = None, _PRODUCTS
    if plan is not None and plan._terms():  # their curvature is in every sample's loss
        plan, why = None, _TERMS
    if plan is not None:
        plan.each_sample = True
        if check_memory:
            need = plan.captured.analysis("bytes", lambda: _frontier_bytes(plan))
            plan, why = _within_budget(plan, need, own, args, check_output, call)
    if plan is None:
        return None, f"{why_not_seeded}; and each sample's loss under vmap: {why}"
    return plan, f"each sample's loss traced under vmap ({why_not_seeded})"


class _OwnLosses:
    """``sum_n f(p, *batch[n:n+1])``: each sample's own loss, as ``per_sample=True``
    defines it (``f`` on a batch of one, under ``vmap``), summed into one traceable
    function; one per ``f`` (:func:`_own_losses`), so one trace cache. Not ``summed``:
    the stacked ``f(p, *batch[n:n+1])`` (``g``'s outputs, to find its ops in the
    Gauss-Newton sweep of the summed losses, NOTE [Gauss-Newton over the graph])."""

    def __init__(self, f: Any, summed: bool = True) -> None:
        self.f, self.summed = f, summed

    @property
    def _guard_targets(self) -> tuple[Any, ...]:
        """What the trace cache's fingerprint walks: what ``f`` wraps, where ``f`` is one of
        hessfunc's wrappers (a level less: within the walk's depth), else ``f``."""
        inner = getattr(self.f, "_guard_targets", None)
        return (self.f,) if inner is None else inner

    def __call__(self, params: Any, *batch: Any) -> Any:
        leaves, spec = pytree.tree_flatten(list(batch))

        def own(*sample: Any) -> Any:
            one = [t.unsqueeze(0) if isinstance(t, Tensor) else t for t in sample]
            return self.f(params, *pytree.tree_unflatten(one, spec))

        dims = tuple(0 if isinstance(t, Tensor) else None for t in leaves)
        each = torch.func.vmap(own, in_dims=dims)(*leaves)
        return each.sum() if self.summed else each


_OWN: dict[bool, weakref.WeakKeyDictionary] = {
    True: weakref.WeakKeyDictionary(), False: weakref.WeakKeyDictionary()}


def _own_losses(f: Any, summed: bool = True) -> _OwnLosses | str:
    """The :class:`_OwnLosses` of ``f`` (of what it traces, :func:`_pure`), kept as
    :func:`_cache` keeps trace caches (:func:`_kept`)."""
    fn = _pure(f)
    if isinstance(fn, str):
        return fn
    own = _kept(_OWN[summed], f, lambda: _OwnLosses(fn, summed))
    own.f = fn
    return own


def _one_sample_graph(f: Any, args: tuple[Any, ...], plan: GraphPlan
                      ) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]] | str:
    """``f`` traced on the first sample, with the same ops as ``plan``'s, and the node of
    that trace for each of ``plan``'s (or why not)."""
    if plan._terms():
        return _TERMS
    n = plan.n
    one = _cut(list(args[1:]), n, 0, 1, {})
    cache = _cache(f)
    if isinstance(cache, str):
        return cache
    try:
        captured = cache.get((args[0], *one))
    except RandomOpError as e:
        return str(e)
    if captured is None:
        return f"f could not be captured on one sample: {cache.failure}"
    gm1 = captured.graph_module
    counterpart = _counterparts(plan.gm, gm1)
    if isinstance(counterpart, str):
        return f"f on one sample runs other ops than on the batch: {counterpart}"
    if any(b not in counterpart for b in plan.boundary()):
        return "f on one sample runs other ops than on the batch: a value the loss sums " \
            "over is a copy"
    why = _separable_samples(plan, gm1, counterpart, "one sample")
    return (gm1, counterpart) if why is None else why


def _separable_samples(plan: GraphPlan, gm1: fx.GraphModule, counterpart: dict[fx.Node, fx.Node],
                       other: str) -> str | None:
    """Why the values the loss sums over, computed by ``gm1`` (``f`` traced on ``other``:
    one sample, or part of the batch), are not the batch's values of those samples, or
    None. They are when no value below them is pooled (NOTE [per-sample structure]) and
    every number in the ops that compute them (``/ 512``, a fill value, a lifted tensor)
    is the same in both traces; sizes and shapes may differ."""
    below = _below(plan)
    pooled = _pooled_below(below, plan.structure)
    if pooled is not None:
        return (f"{where(pooled)} computes from the data of several samples at once, and "
                f"the values the loss sums over depend on it; f on {other} would see "
                "other data")
    for nd in below:
        nd1 = counterpart.get(nd)
        if nd1 is None:
            continue
        if nd.op == "get_attr":
            t, t1 = operator.attrgetter(nd.target)(plan.gm), operator.attrgetter(nd1.target)(gm1)
            if not isinstance(t, Tensor) or t.shape == t1.shape and torch.equal(t, t1):
                continue
            return f"f on {other} computes with other numbers: the constant {nd.target} " \
                "differs from the batch's"
        numbers, numbers1 = _literals(nd), _literals(nd1)
        if len(numbers) != len(numbers1) or any(
                a != a1 and not (a != a and a1 != a1)  # (nan is nan)
                for a, a1 in zip(numbers, numbers1, strict=True)):
            return (f"f on {other} computes with other numbers: {where(nd)} takes "
                    f"{_listed(numbers)} on the batch and {_listed(numbers1)} on {other}")
    return None


def _below(plan: GraphPlan) -> list[fx.Node]:
    """The nodes the values the loss sums over are computed from, in graph order."""
    below: set[fx.Node] = set()
    stack = plan.boundary()
    while stack:
        nd = stack.pop()
        if nd not in below:
            below.add(nd)
            stack.extend(nd.all_input_nodes)
    return [nd for nd in plan.gm.graph.nodes if nd in below]


def _pooled_below(below: list[fx.Node], structure: SampleStructure) -> fx.Node | None:
    """The first node of ``below`` (:func:`_below`) that pools the data of several
    samples (its operands do not), under ``structure``'s labels; or None."""
    return next((nd for nd in below if _label(structure, nd).pooled
                 and not any(_label(structure, a).pooled for a in nd.all_input_nodes)), None)


def _listed(numbers: list[Any]) -> str:
    return ", ".join(map(repr, numbers)) or "none"


def _literals(node: fx.Node) -> list[Any]:
    """The numbers and flags among a node's operands, not in lists (shapes, dims)."""
    return [a for a in (*node.args, *node.kwargs.values())
            if not isinstance(a, (fx.Node, list, tuple))]


def _counterparts(gm: fx.GraphModule, gm1: fx.GraphModule) -> dict[fx.Node, fx.Node] | str:
    """Each node of ``gm`` -> the node of ``gm1`` that computes the same value, when the
    two graphs run the same ops in the same order up to copies and the kind of reshape
    (otherwise the first op where they part)."""
    def ops(g: fx.GraphModule) -> list[tuple[fx.Node, tuple[str, Any]]]:
        return [(nd, (nd.op, "reshape" if nd.target in _RESHAPES else nd.target))
                for nd in g.graph.nodes if nd.target not in _COPIES]

    batch, one = ops(gm), ops(gm1)
    for (nd, op), (nd1, op1) in zip(batch, one, strict=False):
        if op != op1:
            return f"{op_name(nd1)} where the batch runs {where(nd)}"
    if len(batch) != len(one):
        return "the two traces have different lengths"
    return {nd: nd1 for (nd, _), (nd1, _) in zip(batch, one, strict=True)}



def _frontier_bytes(plan: GraphPlan, columns: int | None = None) -> int:
    """Largest sum of per-sample blocks held during the sweep, before evaluating; with
    ``columns``, of per-sample factors of that many columns (the Gauss-Newton sweep)."""
    values = plan.structure.values
    n = plan.n

    def width(node: fx.Node) -> int:
        val = node.meta.get("val")
        return val.numel() // n if isinstance(val, Tensor) else 0

    frontier: set[fx.Node] = set()
    widest = 0
    nodes = [nd for nd in plan.gm.graph.nodes if isinstance(values.get(nd), Value)
             and values[nd].per_sample and nd.op == "call_function"]
    for v in reversed(nodes):
        frontier.discard(v)
        frontier.update(u for u in _source(v)[0].all_input_nodes
                        if isinstance(values.get(u), Value)
                        and values[u].per_sample)
        total = sum(width(u) for u in frontier) + width(v)
        widest = max(widest, total)
    dtype = plan.leaves[0].dtype
    return 3 * n * widest * (widest if columns is None else columns) * itemsize(dtype)
