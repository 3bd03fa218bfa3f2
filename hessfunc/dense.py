"""Full Hessians and per-parameter Hessian blocks.

``hessian(f)(*args)`` is the matrix of second derivatives of a scalar ``f`` with
respect to ``args[argnums]``; ``hessian_blocks(f)(*args)`` keeps only each
leaf's own block (the seed's "diagonal + off-diagonal terms" of one parameter),
never computing the cross blocks.

Both are built from Hessian rows ``H e_i`` of one-hot tangents pushed in chunks
through a gradient graph that is built once (``hvp_fn``), so a chunk of ``k``
rows costs one batched backward pass; the blocks of parameters that enter a
captured graph once, linearly, come from the per-sample curvature at that place
instead (NOTE [frontier propagation] in ``hessfunc/graph/curvature.py``): all of them
for ``hessian_blocks``, the largest for ``hessian``.
``chunk_size`` bounds the rows in flight; ``None`` sizes chunks to a fixed working
budget (``_memory.CHUNK_BUDGET_BYTES``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._autodiff import missing_derivative
from ._checks import check_argnums, check_callable, check_chunk_size, check_floating
from ._memory import auto_chunk_size, check_dense, itemsize
from ._tree import FlatSpec, flat_spec, one_hot_chunks
from .functional import FunctionalModel, _report_non_finite
from .graph.chain import graph_chain
from .graph.curvature import GraphPlan, plan_diagonal
from .products import HVPFunction

__all__ = ["hessian", "hessian_blocks"]


def _prepare(f: Any, args: tuple[Any, ...], argnums: Any, chunk_size: Any, call: str
             ) -> tuple[int, FlatSpec]:
    check_callable(f, "f", call)
    check_chunk_size(chunk_size, call)
    check_argnums(argnums, len(args), call, allow_tuple=False)
    argnums = argnums % len(args)
    check_floating(args[argnums], f"args[{argnums}]", call)
    return argnums, flat_spec(args[argnums])


def _nest(M: torch.Tensor, primal: Any, spec: FlatSpec) -> Any:
    """Nested blocks ``H[a][b]`` of shape ``a.shape + b.shape`` (torch.func convention)."""
    if isinstance(primal, torch.Tensor):
        return M.reshape(primal.shape + primal.shape)
    slices = list(spec.slices().values())
    outer = []
    for sa, shape_a in zip(slices, spec.shapes, strict=True):
        inner = [M[sa, sb].reshape(shape_a + shape_b)
                 for sb, shape_b in zip(slices, spec.shapes, strict=True)]
        outer.append(pytree.tree_unflatten(inner, spec.treespec))
    return pytree.tree_unflatten(outer, spec.treespec)


def hessian(f: Callable[..., Any], argnums: int = 0, *, flat: bool = False,
            chunk_size: int | None = None, max_memory: int | None = None) -> Callable[..., Any]:
    """The Hessian of a scalar function, as a function with ``f``'s arguments.

    Args:
        f: scalar-valued function.
        argnums: the argument ``p`` to differentiate twice (P scalars in all).
        flat: return the ``(P, P)`` matrix, leaves in flat (``named_parameters``) order.
        chunk_size: Hessian rows computed per batched backward pass (or, on the
            structured route, samples per block).
        max_memory: refuse (before allocating) a result over this many bytes;
            default half of the memory available (see ``hessfunc._memory``).

    For a chain of Linear layers, elementwise maps, per-feature scales (LayerNorm's
    affine part, BatchNorm in eval mode) and softmaxes or normalisations over the
    features (LayerNorm, RMSNorm) with a loss that is a sum over samples (any ``f``
    whose captured graph is one, a :func:`hessfunc.functionalize` model included: NOTE
    [chains from the graph]), the whole matrix is assembled from
    per-sample Hessians propagated backward (NOTE [full Hessian] in
    ``hessfunc/graph/chain_plan.py``); otherwise from
    batched Hessian rows ``H e_i`` of :func:`hessfunc.hvp_fn` (structured products on
    chains with convolutions, else a gradient graph built once). Where the captured
    graph gives the largest parameter's own block (any DAG whose samples stay apart:
    NOTE [frontier propagation] in ``hessfunc/graph/curvature.py``), that block comes
    from there and only the other parameters' rows are computed: they hold every cross
    block (on a 20-64-64-1 MLP, 1,409 rows instead of 5,569).

    Returns:
        For a tensor ``p``: shape ``p.shape + p.shape``. For a dict or tuple of
        tensors: nested blocks ``H[a][b]`` of shape ``a.shape + b.shape``. With
        ``flat=True``: ``(P, P)``.

    Example:
        >>> f = lambda x: x[0] ** 2 * x[1]           # H = [[2 x1, 2 x0], [2 x0, 0]]
        >>> hessian(f)(torch.tensor([1.0, 3.0]))
        tensor([[6., 2.],
                [2., 0.]])
    """
    call = "hessfunc.hessian"

    def hess_f(*args: Any) -> Any:
        a, spec = _prepare(f, args, argnums, chunk_size, call)
        P = spec.numel
        # NOTE: assembling holds the rows (or the structured route's block sums) and the
        # result at once, hence two copies
        check_dense(P * P, spec.dtype, spec.device, what=f"the dense {P} x {P} Hessian",
                    call=call, max_memory=max_memory, copies=2,
                    hint="use `hessian_blocks`, `hessian_diag` or `hessfunc.HessianOperator`")
        # NOTE [chains from the graph]: a chain that is not per-sample serves the rows
        found = graph_chain(f, args, a)[0] if isinstance(args[a], dict) else None
        if found is not None and found.per_sample_blocks():
            M = found.full(chunk_size)
            return M if flat else _nest(M, args[a], spec)
        skip, block = _largest_block(f, args, a, spec, call)
        # structured products where they apply
        H = HVPFunction(f, args, a, call=call, plan=found)
        M = rows_and_block(H, spec, chunk_size, skip, block)
        return M if flat else _nest(M, args[a], spec)

    return hess_f


def rows_and_block(H: HVPFunction, spec: FlatSpec, chunk_size: int | None,
                   skip: int | None = None, block: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The ``(P, P)`` Hessian from batched rows ``H e_i``; with a leaf ``skip`` and its
    own ``block``, only the other leaves' rows (``skip``'s rows are their columns, by
    symmetry, and ``block``)."""
    P = spec.numel
    lo = 0 if skip is None else spec.offsets[skip]
    hi = lo if skip is None else lo + spec.numels[skip]
    chunk = chunk_size or auto_chunk_size(P, 4 * P * itemsize(spec.dtype))
    parts: list[torch.Tensor | None] = []  # rows 0..lo, lo..hi (None: to come), hi..P
    for start, stop in ((0, lo), (hi, P)):
        for _, _, basis in one_hot_chunks(spec, chunk, start=start, stop=stop):
            out = pytree.tree_leaves(H.batched(basis))
            parts.append(torch.cat([t.reshape(t.shape[0], -1) for t in out], dim=1))
        if block is not None and start == 0:
            parts.append(None)
    if block is not None:  # not in place: the rows may be vmapped or carry a graph
        mid = parts.index(None)
        parts[mid] = torch.cat([p[:, lo:hi] for p in parts[:mid]] + [block] +
                               [p[:, lo:hi] for p in parts[mid + 1:]]).T
    return torch.cat(parts)


def _largest_block(f: Callable[..., Any], args: tuple[Any, ...], argnums: int,
                   spec: FlatSpec, call: str = "hessfunc.hessian"
                   ) -> tuple[int | None, torch.Tensor | None]:
    """The largest leaf whose own block the captured graph gives (NOTE [frontier
    propagation]), with that block: the full Hessian then needs Hessian rows of the
    other leaves only, their rows holding every cross block. ``(None, None)`` where the
    graph gives none."""
    graph, _ = plan_diagonal(f, args, argnums, call=call)
    if graph is None:
        return None, None
    order = sorted((i for i in range(len(spec.numels)) if i not in graph.products),
                   key=lambda i: -spec.numels[i])
    if not order:
        return None, None
    try:
        block = graph.blocks({order[0]})[order[0]]
    except RuntimeError as e:  # an op without a second derivative in torch
        if missing_derivative(e) is None:
            raise
        return None, None
    return (None, None) if block is None else (order[0], block)


def leaf_block_rows(H: HVPFunction, spec: FlatSpec, chunk_size: int | None,
                    leaves: Iterable[int] | None = None
                    ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Rows of every leaf's (or of ``leaves``') own Hessian block, ``chunk_size``
    one-hot tangents at a time.

    Yields ``(leaf index, lo, hi, rows)`` with ``rows`` of shape ``(hi - lo, numel)``:
    row ``r`` is ``H[leaf, leaf] e_{lo + r}``.
    """
    for index, (shape, n) in enumerate(zip(spec.shapes, spec.numels, strict=True)):
        if leaves is not None and index not in leaves:
            continue
        chunk = chunk_size or auto_chunk_size(n, 4 * n * itemsize(spec.dtype))
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            basis = torch.zeros(hi - lo, n, dtype=spec.dtype, device=spec.device)
            r = torch.arange(hi - lo, device=spec.device)
            basis[r, r + lo] = 1
            rows = H.block_rows(index, basis.reshape((hi - lo, *shape))).reshape(hi - lo, n)
            yield index, lo, hi, rows


def _generic_blocks(H: HVPFunction, spec: FlatSpec, chunk_size: int | None,
                    leaves: set[int] | None = None) -> list[torch.Tensor | None]:
    """Each leaf's own block (of ``leaves`` only, None for the others) from Hessian rows."""
    rows: list[list[torch.Tensor]] = [[] for _ in spec.numels]
    for index, _, _, r in leaf_block_rows(H, spec, chunk_size, leaves):
        rows[index].append(r)
    return [torch.cat(r) if r else None for r in rows]


def graph_route(values: list[torch.Tensor | None], plan: GraphPlan, f: Callable[..., Any],
                args: tuple[Any, ...], spec: FlatSpec, chunk_size: int | None, call: str,
                generic: Callable[..., list[torch.Tensor | None]]) -> Any:
    """The captured graph's per-leaf ``values`` as a tree like the argument; the leaves it
    has no rule for (None) from ``generic(H, spec, chunk_size, leaves)`` on Hessian rows."""
    if isinstance(f, FunctionalModel) and f.check_finite:
        _report_non_finite(args[0], args[1], plan.loss, "loss")
    rest = {i for i, v in enumerate(values) if v is None}
    if rest:
        H = HVPFunction(f, args, 0, call=call)
        for i, v in enumerate(generic(H, spec, chunk_size, rest)):
            if v is not None:
                values[i] = v
    return pytree.tree_unflatten(values, spec.treespec)


def hessian_blocks(f: Callable[..., Any], argnums: int = 0, *, chunk_size: int | None = None,
                   max_memory: int | None = None) -> Callable[..., Any]:
    """Each leaf's own ``(numel, numel)`` Hessian block, without the cross blocks.

    For a parameter dict ``p``, ``hessian_blocks(f)(p, ...)[name]`` is
    ``d^2 f / d p[name]^2`` flattened row-major: diagonal and off-diagonal terms
    of that parameter. For ``f(params, inputs, targets)`` whose captured graph keeps
    its samples apart (any DAG: skip connections, LayerNorm, attention, weight
    decay), the block of a parameter used once, linearly, is ``J_p^T H_v J_p`` with
    ``H_v`` the per-sample curvature at its place in the graph (NOTE [frontier
    propagation] in ``hessfunc/graph/curvature.py``; closed form for ``x W^T + b``);
    other parameters, and every ``f`` the graph does not cover, take batched
    Hessian rows. ``hessfunc.explain`` says which.

    Returns:
        The structure of ``args[argnums]`` with ``(numel, numel)`` leaves.

    Example:
        >>> f = lambda p: (p["a"] ** 3).sum() + (p["a"].sum() * p["b"]).sum()
        >>> blocks = hessian_blocks(f)({"a": torch.tensor([1.0, 2.0]), "b": torch.ones(1)})
        >>> blocks["a"], blocks["b"]
        (tensor([[ 6.,  0.],
                [ 0., 12.]]), tensor([[0.]]))
    """
    call = "hessfunc.hessian_blocks"

    def blocks_f(*args: Any) -> Any:
        a, spec = _prepare(f, args, argnums, chunk_size, call)
        check_dense(sum(n * n for n in spec.numels), spec.dtype, spec.device,
                    what="storing the diagonal blocks", call=call, max_memory=max_memory,
                    hint="use `hessian_diag` or `hessfunc.HessianOperator`")
        graph, _ = plan_diagonal(f, args, a, call=call)
        if graph is not None:
            try:
                return graph_route(graph.blocks(), graph, f, args, spec, chunk_size, call,
                                   _generic_blocks)
            except RuntimeError as e:  # an op without a second derivative in torch
                if missing_derivative(e) is None:
                    raise
        H = HVPFunction(f, args, a, call=call)  # structured products where they apply
        return pytree.tree_unflatten(_generic_blocks(H, spec, chunk_size), spec.treespec)

    return blocks_f
