"""Hessian-vector products: ``hvp`` (one product) and ``hvp_fn`` (many at one point).

For a scalar ``f`` and ``p = primals[argnums]``, ``hvp`` returns
``H v = d/dp <grad_p f(p), v>`` with the structure of ``p``.

NOTE [HVP modes, chosen by measurement]: two compositions give the same H v.
``"reverse-over-reverse"`` differentiates the dot product of the gradient with
``v`` once more (Pearlmutter's double backward); ``"forward-over-reverse"``
pushes ``v`` forward through the gradient (``jvp(grad(f))``). On torch 2.13 CPU
reverse-over-reverse measured 2.2-2.7x a gradient against 4.1-6.7x for
forward-over-reverse (``python -m benchmarks.bench_hvp``), so it is the default.
Both are the graph route; ``method="structured"`` takes the R-operator on a chain
read off the captured graph instead (NOTE [structured products] in
``hessfunc/graph/chain_products.py``), as :func:`hvp_fn` does by default.

NOTE [ZeroTensor trap]: on torch 2.13 (pytorch/pytorch#123996)
``jvp(grad(f))`` raises "ZeroTensors are immutable" when ``f`` uses
``F.mse_loss`` with mean reduction (the forward-mode rule of
``mse_loss_backward`` writes into the zero tangent of the constant target).
Forward-over-reverse catches exactly that error and computes the same product
reverse-over-reverse instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.func
from torch.utils import _pytree as pytree

from . import _thresholds
from ._autodiff import (
    dense_embedding_gradients,
    explain_missing_derivative,
    forward_ad_gap,
    leaf_copies,
    missing_derivative,
    missing_derivative_message,
    reaches_other_leaves,
    second_order_kernels,
    use_autograd,
    warn_forward_gap_once,
    zeros_for_none,
)
from ._checks import (
    check_argnums,
    check_callable,
    check_floating,
    check_like,
    check_primals,
    check_scalar_output,
    wrap_scalar,
)
from ._tree import tree_leaves
from .errors import ArgumentError
from .graph.chain import graph_chain
from .graph.chain_plan import _Embedding, _Map, _ShapeMap
from .graph.chain_products import ChainProducts
from .graph.curvature import checkpoint_twin

__all__ = ["hvp", "hvp_fn", "HVPFunction", "HVP_MODES", "PRODUCT_METHODS"]

Mode = Literal["reverse-over-reverse", "forward-over-reverse"]
HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")
PRODUCT_METHODS = ("auto", "structured", "graph")
_ZERO_TENSOR_BUG = "ZeroTensors are immutable"
#: plan steps whose R-operator products may lose to the cached gradient graph's
#: (NOTE [route by measurement])
_MEASURED_STEPS = (_Map, _ShapeMap, _Embedding)


def route_is_measured(plan: Any) -> bool:
    """Whether ``method="auto"`` times the R-operator against the cached graph on
    ``plan`` (NOTE [route by measurement]): it holds maps, shape ops or lookups."""
    return any(isinstance(s, _MEASURED_STEPS) for s in plan.steps)


def _check_mode(mode: Any, call: str) -> None:
    if mode not in HVP_MODES:
        raise ArgumentError(f"{call}: `mode` must be one of {HVP_MODES}, got {mode!r}.")


def _check_method(method: Any, call: str) -> None:
    if method not in PRODUCT_METHODS:
        raise ArgumentError(f"{call}: `method` must be one of {PRODUCT_METHODS}, got {method!r}.")


def _partial(f: Callable[..., Any], primals: tuple[Any, ...], argnums: int
             ) -> Callable[[Any], Any]:
    """``p -> f(*primals with primals[argnums] = p)``."""

    def f_of(p: Any) -> Any:
        args = list(primals)
        args[argnums] = p
        return f(*args)

    return f_of


def _validate(f: Any, primals: Any, argnums: Any, call: str) -> tuple[tuple[Any, ...], int]:
    check_callable(f, "f", call)
    primals = check_primals(primals, call)
    check_argnums(argnums, len(primals), call, allow_tuple=False)
    argnums = argnums % len(primals)
    check_floating(primals[argnums], f"primals[{argnums}]", call)
    return primals, argnums


def _first_order_graph(f: Callable[..., Any], primals: tuple[Any, ...], argnums: int, call: str
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], Any] | None:
    """Autograd path: fresh leaves, and the gradient built with ``create_graph=True``.

    None when ``f`` captures tensors requiring grad (their graph must be kept: the
    caller takes the torch.func path)."""
    new_args, leaves = leaf_copies(primals, (argnums,))
    with torch.enable_grad():
        out = f(*new_args)
        check_scalar_output(out, call)
        if reaches_other_leaves(f, out, leaves):
            return None
        if not out.requires_grad:
            return leaves, [None] * len(leaves), out
        grads = list(torch.autograd.grad(out, leaves, create_graph=True, allow_unused=True))
        if any(g is not None and g.layout != torch.strided for g in grads):
            with dense_embedding_gradients():  # NOTE [sparse embedding gradients]
                out = f(*new_args)
            grads = list(torch.autograd.grad(out, leaves, create_graph=True,
                                             allow_unused=True))
    return leaves, grads, out


def _second_backward(leaves: list[torch.Tensor], grads: list[torch.Tensor | None],
                     vs: list[torch.Tensor], *, retain_graph: bool, batched: bool = False
                     ) -> list[torch.Tensor]:
    pairs = [(g, v) for g, v in zip(grads, vs, strict=True)
             if g is not None and g.requires_grad]
    if not pairs:  # f is at most linear in p: H = 0
        shape_of = (lambda t, v: v.shape) if batched else (lambda t, v: t.shape)
        return [torch.zeros(shape_of(t, v), dtype=t.dtype, device=t.device)
                for t, v in zip(leaves, vs, strict=True)]
    gs, ws = zip(*pairs, strict=True)
    with torch.enable_grad():
        hv = torch.autograd.grad(gs, leaves, grad_outputs=ws, retain_graph=retain_graph,
                                 allow_unused=True, is_grads_batched=batched)
    if batched:
        return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs, strict=True)]
    return zeros_for_none(hv, leaves)


def hvp(f: Callable[..., Any], primals: tuple[Any, ...], tangent: Any, *, argnums: int = 0,
        mode: Mode = "reverse-over-reverse",
        method: Literal["auto", "structured", "graph"] = "auto") -> Any:
    """Hessian-vector product ``H v`` of a scalar function at ``primals``.

    Args:
        f: scalar-valued function.
        primals: tuple of f's arguments, e.g. ``(params, x, y)``.
        tangent: ``v``, with the structure, shapes and dtype of ``primals[argnums]``.
        argnums: which argument the Hessian is taken with respect to.
        mode: how the graph route composes autodiff: ``"reverse-over-reverse"``
            (default, measured fastest on CPU) or ``"forward-over-reverse"``; see
            NOTE [HVP modes].
        method: ``"auto"`` (default) and ``"graph"``: the graph route (one product
            does not repay finding a chain; for many, :func:`hvp_fn`). Where torch has
            no second derivative of an op that the captured graph decomposes
            (hardsigmoid), ``"auto"`` takes the chain in the graph.
            ``"structured"``: the R-operator on layers read off the captured graph
            (NOTE [structured products]); it raises, saying why, where that does not
            apply.

    Returns:
        ``H v`` with the structure of ``primals[argnums]``.

    Works under ``torch.func.vmap`` (batched tangents or batched samples).

    Example:
        >>> f = lambda x: (x ** 3).sum()          # H = diag(6 x)
        >>> hvp(f, (torch.tensor([1.0, 2.0]),), torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
    """
    call = "hessfunc.hvp"
    _check_mode(mode, call)
    _check_method(method, call)
    primals, argnums = _validate(f, primals, argnums, call)
    check_like(tangent, primals[argnums], "tangent", call)
    if method == "structured":
        product, reason = _chain_product(f, primals, argnums, tangent, call)
        if reason is None:
            return product
        raise ArgumentError(f"{call}: method='structured' does not apply here: {reason}; "
                            "use method='auto' or 'graph'.")
    try:
        with second_order_kernels():
            return _graph_hvp(f, primals, tangent, argnums, mode, call)
    except (RuntimeError, NotImplementedError) as exc:
        op = missing_derivative(exc)
        if op is None:  # f checkpoints activations: its captured graph, or exc
            twin = checkpoint_twin(exc, f, primals)
            with second_order_kernels():
                return _graph_hvp(twin, primals, tangent, argnums, mode, call)
        # NOTE [ops differentiable once]: the captured graph's decompositions may have the
        # second derivative torch's kernel lacks (hardsigmoid: a clamp), and a chain in it
        # gives the product
        if method == "auto" and use_autograd((tangent,)):
            product, reason = _chain_product(f, primals, argnums, tangent, call)
            if reason is None:
                return product
        raise ArgumentError(missing_derivative_message(op, call)) from None


def _chain_product(f: Callable[..., Any], primals: tuple[Any, ...], argnums: int,
                   tangent: Any, call: str) -> tuple[Any, str | None]:
    """One R-operator product on the chain read off the captured graph, with the loss's
    gradient graph rather than its per-sample blocks: ``(H v, None)``, or ``(None, why
    not)``."""
    plan, reason = graph_chain(f, primals, argnums, blocks=False)
    if plan is None:
        return None, reason
    if not use_autograd((tangent,)):
        return None, "the tangent carries a graph"
    with explain_missing_derivative(call):  # the loss's own second derivatives
        return ChainProducts(plan, patches=False)(tangent), None


def _graph_hvp(f: Callable[..., Any], primals: tuple[Any, ...], tangent: Any, argnums: int,
               mode: str, call: str) -> Any:
    """``H v`` through autograd (the graph route), composed as ``mode`` says."""
    if mode == "forward-over-reverse":
        grad_fn = torch.func.grad(wrap_scalar(_partial(f, primals, argnums), call))
        try:
            return torch.func.jvp(grad_fn, (primals[argnums],), (tangent,))[1]
        except (RuntimeError, NotImplementedError) as exc:
            op = forward_ad_gap(exc)
            if op is not None:
                warn_forward_gap_once(op)
            elif _ZERO_TENSOR_BUG not in str(exc):
                raise
            # NOTE [ZeroTensor trap] / forward-mode gap: same product, reverse-over-reverse.
    graph = (_first_order_graph(f, primals, argnums, call)
             if use_autograd(primals + (tangent,)) else None)
    if graph is not None:
        leaves, grads, _ = graph
        spec = pytree.tree_structure(primals[argnums])
        flat = _second_backward(leaves, grads, tree_leaves(tangent), retain_graph=False)
        return pytree.tree_unflatten(flat, spec)
    grad_fn = torch.func.grad(wrap_scalar(_partial(f, primals, argnums), call))
    _, vjp_fn = torch.func.vjp(grad_fn, primals[argnums])
    return vjp_fn(tangent)[0]


@dataclass(frozen=True)
class _Choice:
    """NOTE [batched or looped products]: the best batched width found so far and its
    seconds per column (None, inf before any), a single product's, and whether the
    probing is over."""

    width: int | None
    per_column: float
    per_single: float
    settled: bool

    @property
    def loop(self) -> bool:
        return self.width is None or not self.per_column < 0.9 * self.per_single


class HVPFunction:
    """``v -> H v`` at a fixed point, with everything but ``v`` computed once.

    Two routes, both exact. ``"structured"``: for a chain of Linear layers,
    convolutions, scales (BatchNorm in eval mode), linear maps (pooling, views) and
    elementwise maps, or a DAG of them with skip connections, read off the captured graph
    of ``f`` (NOTE [chains from the graph] in ``hessfunc/graph/chain.py``; a
    :func:`hessfunc.functionalize` model or any function), activations, their
    derivatives and the loss's output Hessian are cached and each product is a few
    dense matrix products (NOTE [structured products]). Softmax and the normalisations of
    LayerNorm, BatchNorm in training mode and RMSNorm have closed forms (NOTE [softmax
    and standardisation]), as have products of two values (NOTE [products of two
    values]); embedding lookups, Linear layers on ``(N, T, d)`` values and ops that move
    entries (attention's heads and positions, NOTE [shape maps]) have rules. Another map
    that is not linear sends ``method="auto"`` to the cached graph, measured faster there
    (NOTE [maps without a rule]); where the plan holds maps, shape ops or lookups, its
    first products time both routes and keep the faster (NOTE [route by measurement]).
    ``"graph"``: the gradient's autograd graph is built once and each product is one
    backward pass through it (on the ``torch.func`` path inside transforms). Repeated
    products (what Lanczos and Hutchinson need) cost about one gradient each or less;
    see docs/benchmarks.md.

    Attributes:
        method: the route taken, ``"structured"`` or ``"graph"``.

    ``gradient`` and ``value`` (properties) give the gradient and ``f`` at the point;
    ``value`` is None when built on the torch.func path (inside a transform, or when an
    input or a tensor captured by ``f`` requires grad).
    """

    def __init__(self, f: Callable[..., Any], primals: tuple[Any, ...], argnums: int,
                 method: str = "auto", call: str = "hessfunc.hvp_fn",
                 choices: dict[Any, Any] | None = None, plan: Any = None):
        self._primal = primals[argnums]
        self._call = call
        self._spec = pytree.tree_structure(self._primal)
        self._chain: ChainProducts | None = None
        self._vjp = None
        self._gradient: Any = None
        self._value: torch.Tensor | None = None
        # NOTE [batched or looped products]; shared by the batches of one operator and by
        # operators on the same function object and shapes
        self._choices: dict[Any, Any] = {} if choices is None else choices
        #: ``(f, primals, argnums)`` while the first products time both routes
        self._pending: tuple[Any, ...] | None = None
        #: the cached graph's leaves and gradients (graph route, autograd path), or None
        self._leaves: list[torch.Tensor] | None = None
        self._grads: list[torch.Tensor | None] | None = None
        self._route_times: dict[str, list[float]] = {"structured": [], "graph": []}
        if method != "graph":
            # ``plan``: a chain the caller already found at these primals (``hessian``)
            plan, reason = (plan, "ok") if plan is not None else \
                graph_chain(f, primals, argnums)
            if plan is not None and method == "auto" and (
                    plan.curved_maps or self._choices.get("route") == "graph"):
                plan = None  # NOTE [maps without a rule]: the cached graph is faster there
            if plan is not None:
                self._chain = ChainProducts(plan)
                self._value = plan.value
                self.method = "structured"
                if method == "auto" and "route" not in self._choices and \
                        route_is_measured(plan):
                    self._pending = (f, primals, argnums)  # NOTE [route by measurement]
                return
            if method == "structured":
                raise ArgumentError(f"{call}: method='structured' does not apply here: {reason}; "
                                    "use method='auto' or 'graph'.")
        self.method = "graph"
        with second_order_kernels():
            self._build(f, primals, argnums, call)

    @property
    def gradient(self) -> Any:
        """The gradient at the point, structured like the argument (on the structured
        route computed on first use: the products need none of it)."""
        if self._gradient is None and self._chain is not None:
            self._gradient = self._chain.gradient
        return self._gradient

    @property
    def value(self) -> torch.Tensor | None:
        """f at the point, or None (see the class docstring)."""
        return self._value

    @property
    def chain_products(self) -> ChainProducts | None:
        """The structured products (``method == "structured"``), else None."""
        return self._chain

    def _build(self, f: Callable[..., Any], primals: tuple[Any, ...], argnums: int, call: str
               ) -> None:
        graph = _first_order_graph(f, primals, argnums, call) if use_autograd(primals) else None
        if graph is not None:
            self._leaves, self._grads, out = graph
            self._value = out.detach()
            flat_g = zeros_for_none([None if g is None else g.detach() for g in self._grads],
                                    self._leaves)
            self._gradient = pytree.tree_unflatten(flat_g, self._spec)
        else:
            grad_fn = torch.func.grad(wrap_scalar(_partial(f, primals, argnums), call),
                                      has_aux=False)
            self._gradient, self._vjp = torch.func.vjp(grad_fn, self._primal)

    def __call__(self, tangent: Any) -> Any:
        """``H v`` for one tangent structured like the argument."""
        check_like(tangent, self._primal, "tangent", "HVPFunction")
        return self._product(tangent)

    def _product(self, tangent: Any) -> Any:
        """``H v`` for a tangent already checked (or built here) to match the argument."""
        with explain_missing_derivative(self._call):
            return self._product_unchecked(tangent)

    def _product_unchecked(self, tangent: Any) -> Any:
        if self._pending is not None:
            return self._timed_product(tangent)
        if self._chain is not None:
            return self._chain(tangent)
        return self._graph_product(tangent)

    def _timed_product(self, tangent: Any) -> Any:
        """NOTE [route by measurement]: the R-operator is exact on every plan, but where
        a plan holds maps, shape ops or lookups (attention, normalisations) the cached
        gradient graph may be faster or slower, by the model (stop 30 in
        docs/benchmarks.md: the Transformer's graph is faster, the normalised MLPs' and
        the ResNet's in training mode slower). So the first four
        products of ``method="auto"`` on such a plan time the routes, two each (the
        faster of two: the first warms up), the graph built after the R-operator's two;
        the faster route serves the rest and is kept in the shared choices, so the
        other batches of an operator build only it. Every product is exact either way."""
        times = self._route_times
        route = "structured" if len(times["structured"]) < 2 else "graph"
        if route == "graph" and self._vjp is None and self._leaves is None:
            f, primals, argnums = self._pending
            gradient = self._gradient
            try:
                with second_order_kernels():
                    self._build(f, primals, argnums, self._call)
            except Exception:  # noqa: BLE001 - no graph route here: the R-operator serves
                self._choices["route"], self._pending = "structured", None
                return self._chain(tangent)
            self._gradient = gradient if gradient is not None else self._gradient
        start = time.perf_counter()
        out = self._chain(tangent) if route == "structured" else self._graph_product(tangent)
        times[route].append(time.perf_counter() - start)
        if len(times["graph"]) == 2:
            winner = "graph" if min(times["graph"]) < min(times["structured"]) else \
                "structured"
            self._choices["route"] = winner
            self._pending = None
            if winner == "graph":
                self._chain, self.method = None, "graph"
            else:
                self._vjp = self._leaves = self._grads = None
        return out

    def _chain_probe_width(self) -> int:
        """The R-operator's first batched pass: 8 columns, fewer where the tangents of its
        widest value would pass ``_thresholds.CHAIN_PROBE_BYTES`` (a ResNet's first
        block, 4 MiB a column: docs/benchmarks.md, stop 30)."""
        widest = max((g.numel() * g.element_size() for g in self._chain._grads
                      if g is not None), default=1)
        return max(2, min(_thresholds.CHAIN_PROBE_COLUMNS,
                          _thresholds.CHAIN_PROBE_BYTES // max(widest, 1)))

    def _graph_product(self, tangent: Any) -> Any:
        if self._vjp is not None:
            return self._vjp(tangent)[0]
        flat = _second_backward(self._leaves, self._grads, tree_leaves(tangent),
                                retain_graph=True)
        return pytree.tree_unflatten(flat, self._spec)

    def block_rows(self, index: int, tangents: torch.Tensor) -> torch.Tensor:
        """Rows of one leaf's own Hessian block: ``H[leaf, leaf] @ T`` for batched ``T``.

        ``index`` is the leaf's position in flat order and ``tangents`` has shape
        ``(k, *leaf.shape)``; the result has the same shape. Only the leaf's own
        gradient is differentiated, and only with respect to that leaf.
        """
        with explain_missing_derivative(self._call):
            return self._block_rows(index, tangents)

    def _block_rows(self, index: int, tangents: torch.Tensor) -> torch.Tensor:
        if self._chain is not None:  # the other leaves' tangents are zero and not wanted
            name = list(self._primal)[index]
            return self._batched_or_looped(
                "rows", tangents.shape[0],
                lambda lo, hi: self._chain({name: tangents[lo:hi]}, wanted=(name,))[name],
                lambda i: self._chain({name: tangents[i]}, wanted=(name,))[name].unsqueeze(0),
                torch.cat, first_width=self._chain_probe_width(), clip=True)
        if self._vjp is not None:
            leaves, spec = pytree.tree_flatten(self._primal)

            def one(t: torch.Tensor) -> torch.Tensor:
                tree = [t if i == index else torch.zeros_like(p) for i, p in enumerate(leaves)]
                return pytree.tree_leaves(self._vjp(pytree.tree_unflatten(tree, spec))[0])[index]

            return torch.func.vmap(one)(tangents)
        g, leaf = self._grads[index], self._leaves[index]
        if g is None or not g.requires_grad:
            return torch.zeros_like(tangents)

        def rows(t: torch.Tensor, batched: bool) -> torch.Tensor:
            with torch.enable_grad():
                (r,) = torch.autograd.grad(g, leaf, grad_outputs=t, retain_graph=True,
                                           allow_unused=True, is_grads_batched=batched)
            return torch.zeros_like(t) if r is None else r

        return self._batched_or_looped(
            "rows", tangents.shape[0], lambda lo, hi: rows(tangents[lo:hi], True),
            lambda i: rows(tangents[i], False).unsqueeze(0), lambda parts: torch.cat(parts))

    def _batched_or_looped(self, kind: Any, k: int,
                           batched: Callable[[int, int], Any],
                           single: Callable[[int], Any], join: Callable[[list[Any]], Any],
                           first_width: int | None = None, clip: bool = False) -> Any:
        """NOTE [batched or looped products]: ``k`` products through the cached gradient
        graph, as backward passes over batches of cotangents (``vmap`` inside autograd,
        ``batched(lo, hi)`` for columns ``lo:hi``) or as a loop of single backward passes
        (``single(i)``), whichever is faster per column for this graph. Neither is faster
        everywhere: batching wins on small layers (one kernel launch for many columns;
        the wider, the cheaper per column), but its rules can be slower per column than
        the plain kernels (on a ResNet with BatchNorm, at every width) and wide batches
        fall out of cache. So the calls time their own columns: two single products (the
        faster; a first one warms up), then a batched pass of 2 columns, four times wider
        while each pass is 10% cheaper per column than the last and cheaper than a single
        product (a pass that loses to the loop ends the probing: wider passes after a
        losing one cost several products' time and never won, docs/benchmarks.md). Then
        the choice is settled: batching at the best width if that is 10% cheaper per
        column than a single product, else the loop. Columns left when the next width
        does not fit go by the best route so far, and the next call of the same kind
        (products; rows of any leaf's block) goes on probing where this one stopped; the
        other batches of a :class:`hessfunc.HessianOperator` (the same graph on other
        data) share it, and so do operators built again on the same function object and
        shapes (a torch.func-style ``f`` kept across epochs; not
        ``from_model``, which makes a new function on each call). Choosing costs no
        extra product, only the slower route's time on the probing passes.

        The chain's R-operator is timed the same way from a first probe of 8 columns,
        or of the columns left if fewer (``clip``; at least 2): its cost per column falls
        with the width long after 2 columns where kernel launches dominate (a CNN: 1.3x
        a single product at 2 wide, 0.5x at 10), and where its ``(N, k, d)`` activations
        fall out of cache it loses at every width (a residual MLP of 512 samples: 1.6
        against 1.2 gradients per column; a ResNet's 64 images). A first pass over every
        column left, as this route took before, cost a ResNet's first Hutchinson round 2.9
        times a later one's: 47 columns of its activations at once.
        """
        if first_width is None:
            first_width = _thresholds.PROBE_COLUMNS
        if k == 1:
            return single(0)
        state = self._choices.get(kind)
        if state is None and k <= 3:
            return join([single(i) for i in range(k)])
        parts: list[Any] = []
        lo = 0
        if state is None:
            parts.append(single(0))  # the first pass over the graph warms up: untimed
            per_single = math.inf
            for i in (1, 2):
                start = time.perf_counter()
                parts.append(single(i))
                per_single = min(per_single, time.perf_counter() - start)
            state = _Choice(None, math.inf, per_single, settled=False)
            lo = 3
        if state.width:
            width = 4 * state.width
        else:
            width = min(first_width, k - lo) if clip else first_width
        while not state.settled and k - lo >= width >= (2 if clip else 1):
            start = time.perf_counter()
            try:
                parts.append(batched(lo, lo + width))
            except (RuntimeError, NotImplementedError):
                # torch without a batched rule for an op of this graph (GroupNorm's double
                # backward on torch 2.13): the loop gives the same products
                state = _Choice(None, math.inf, state.per_single, settled=True)
                break
            per_column = (time.perf_counter() - start) / width
            lo += width
            if per_column < 0.9 * state.per_column:
                state = _Choice(width, per_column, state.per_single,
                                settled=not per_column < state.per_single)
                width *= 4
            else:
                state = _Choice(state.width, state.per_column, state.per_single, settled=True)
        self._choices[kind] = state
        if state.loop:
            parts.extend(single(i) for i in range(lo, k))
        elif lo < k:
            step = state.width
            parts.extend(batched(j, min(k, j + step)) for j in range(lo, k, step))
        return join(parts)

    def batched(self, tangents: Any) -> Any:
        """``H V`` for tangents whose leaves carry a leading batch dimension ``k``."""
        with explain_missing_derivative(self._call):
            return self._batched(tangents)

    def _batched(self, tangents: Any) -> Any:
        k, done = tree_leaves(tangents)[0].shape[0], []
        while self._pending is not None and len(done) < k:  # the first columns time the routes
            i = len(done)
            done.append(self._timed_product(pytree.tree_map(lambda t, i=i: t[i], tangents)))
        if done:
            parts = [pytree.tree_map(lambda t: t.unsqueeze(0), d) for d in done]
            if len(done) < k:
                parts.append(self._batched(pytree.tree_map(lambda t: t[len(done):], tangents)))
            return pytree.tree_map(lambda *t: torch.cat(t), *parts)
        if self._chain is not None:  # k tangents in one pass, or one at a time: measured
            k = next(iter(tangents.values())).shape[0]
            return self._batched_or_looped(
                "products", k, lambda lo, hi: self._chain({n: t[lo:hi] for n, t in
                                                           tangents.items()}),
                lambda i: {n: t.unsqueeze(0) for n, t in
                           self._chain({n: t[i] for n, t in tangents.items()}).items()},
                lambda parts: {n: torch.cat([p[n] for p in parts]) for n in parts[0]},
                first_width=self._chain_probe_width(), clip=True)
        if self._vjp is not None:
            return torch.func.vmap(lambda t: self._vjp(t)[0])(tangents)
        leaves = tree_leaves(tangents)

        def single(i: int) -> list[torch.Tensor]:
            flat = _second_backward(self._leaves, self._grads, [t[i] for t in leaves],
                                    retain_graph=True)
            return [t.unsqueeze(0) for t in flat]

        flat = self._batched_or_looped(
            "products", leaves[0].shape[0],
            lambda lo, hi: _second_backward(self._leaves, self._grads,
                                            [t[lo:hi] for t in leaves], retain_graph=True,
                                            batched=True),
            single, lambda parts: [torch.cat(c) for c in zip(*parts, strict=True)])
        return pytree.tree_unflatten(flat, self._spec)


def hvp_fn(f: Callable[..., Any], primals: tuple[Any, ...], *, argnums: int = 0,
           method: Literal["auto", "structured", "graph"] = "auto") -> HVPFunction:
    """Linearise the gradient once; return ``v -> H v`` at ``primals``.

    Args:
        f: scalar-valued function.
        primals: tuple of f's arguments, e.g. ``(params, x, y)``.
        argnums: which argument the Hessian is taken with respect to.
        method: ``"auto"`` (structured products where they apply, else the cached
            gradient graph), ``"structured"`` (raise, saying why, where they do not
            apply) or ``"graph"``; see :class:`HVPFunction`.

    Example:
        >>> f = lambda x: (x ** 3).sum()
        >>> H = hvp_fn(f, (torch.tensor([1.0, 2.0]),))
        >>> H(torch.tensor([1.0, 0.0])), H(torch.tensor([0.0, 1.0]))
        (tensor([6., 0.]), tensor([ 0., 12.]))
    """
    primals, argnums = _validate(f, primals, argnums, "hessfunc.hvp_fn")
    _check_method(method, "hessfunc.hvp_fn")
    return HVPFunction(f, primals, argnums, method)
