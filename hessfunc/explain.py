"""Which route each quantity takes for a call, and why: ``hessfunc.explain``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._checks import check_argnums, check_callable
from ._tree import flat_spec
from .graph.chain import graph_chain
from .graph.curvature import GraphPlan, plan_diagonal
from .products import route_is_measured

__all__ = ["explain", "Explanation", "Route"]


@dataclass(frozen=True)
class Route:
    """The route of one quantity: ``name`` (``"structured"``, ``"graph"`` or
    ``"generic"``), ``engine`` (what computes it) and ``why`` (the reason for a
    fallback, how a structured route runs, or the empty string)."""

    quantity: str
    name: str
    engine: str
    why: str = ""


@dataclass(frozen=True)
class Explanation:
    """The routes of a call, and for the diagonal and the blocks the route of every
    parameter that does not take the captured graph (``parameters``: name -> why)."""

    routes: tuple[Route, ...]
    parameters: dict[str, str]

    def __getitem__(self, quantity: str) -> Route:
        for route in self.routes:
            if route.quantity == quantity:
                return route
        raise KeyError(f"no quantity {quantity!r}; one of {[r.quantity for r in self.routes]}")

    def __str__(self) -> str:
        width = max(len(r.quantity) for r in self.routes) + 2
        lines = []
        for r in self.routes:
            lines.append(f"{r.quantity:<{width}}{r.name} ({r.engine})"
                         + (f": {r.why}" if r.why else ""))
            if r.quantity in ("hessian_diag", "hessian_blocks") and r.engine == "captured graph":
                for name, why in self.parameters.items():
                    lines.append(f"{'':<{width}}  parameter {name!r}: one-hot products, {why}")
        return "\n".join(lines)


def explain(f: Callable[..., Any], *args: Any, argnums: int = 0) -> Explanation:
    """Say which route every hessfunc quantity takes for ``f(*args)``, and why.

    Nothing is computed beyond tracing ``f`` and one evaluation of its graph. Routes:
    ``"structured"`` (exact, from the structure of the captured graph),
    ``"graph"`` (products through one cached gradient graph) and ``"generic"``
    (one-hot products). Where the captured graph cannot take the diagonal, the
    reason names the op and the line of ``f`` that stopped it.

    Args:
        f: scalar-valued function, ``f(params, *batch)``.
        *args: the arguments ``f`` will be called with.
        argnums: the argument differentiated.

    Returns:
        an :class:`Explanation`; ``print`` it, or index it by quantity
        (``"hessian_diag"``, ``"hessian_diag(per_sample=True)"``,
        ``"hvp, hvp_fn, HessianOperator"``, ``"hessian_blocks"``, ``"hessian"``).

    Example:
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 1))
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> f = lambda p, x, y: F.mse_loss(torch.func.functional_call(model, p, (x,)), y)
        >>> route = explain(f, params, torch.randn(8, 3), torch.randn(8, 1))["hessian_diag"]
        >>> route.name, route.engine
        ('structured', 'captured graph')
    """
    check_callable(f, "f", "hessfunc.explain")
    check_argnums(argnums, len(args), "hessfunc.explain", allow_tuple=False)
    routes = []
    parameters: dict[str, str] = {}
    plan, why = plan_diagonal(f, args, argnums)
    if plan is not None:
        names = flat_spec(args[argnums]).names
        parameters = {names[i]: reason for i, reason in plan.products.items()}
        routes.append(Route("hessian_diag", "structured", "captured graph", _parts(plan)))
    else:
        routes.append(Route("hessian_diag", "generic", "one-hot products", why))
    graph_each, graph_each_why = plan_diagonal(f, args, argnums, per_sample=True) \
        if len(args) == 3 else (None, "f is not called as f(params, inputs, targets)")
    if graph_each is not None:
        notes = [graph_each_why if graph_each_why != "ok" else "", _parts(graph_each)]
        routes.append(Route("hessian_diag(per_sample=True)", "structured", "captured graph",
                            "; ".join(filter(None, notes))))
    else:
        routes.append(Route("hessian_diag(per_sample=True)", "generic",
                            "vmap of one-hot products", graph_each_why))
    chain, chain_why = graph_chain(f, args, argnums)  # NOTE [chains from the graph]
    layers = "chain" if chain is None or chain.chain else "layers and their skip connections"
    if chain is not None and chain.curved_maps:  # NOTE [maps without a rule]
        routes.append(Route("hvp, hvp_fn, HessianOperator", "graph", "cached gradient graph",
                            f"the R-operator takes {chain.curved_maps} map(s) without a rule "
                            "or closed form (a product of branches, a normalisation other "
                            "than LayerNorm's, BatchNorm's or RMSNorm's) through their own "
                            "double backward, "
                            "slower than the cached gradient graph; method='structured' "
                            "takes it"))
    else:
        timed = "; method='auto' times it against the cached gradient graph on its first " \
            "products (maps, shape ops or lookups) and keeps the faster" \
            if chain is not None and route_is_measured(chain) else ""
        routes.append(Route("hvp, hvp_fn, HessianOperator",
                            *(("structured", f"R-operator on the {layers} in the captured "
                               f"graph (hvp: with method='structured'{timed})",
                               "" if chain_why == "ok" else chain_why) if chain is not None
                              else ("graph", "cached gradient graph", chain_why))))
    if plan is not None:
        routes.append(Route("hessian_blocks", "structured", "captured graph", _parts(plan)))
    else:
        routes.append(Route("hessian_blocks", "generic", "one-hot products", why))
    if chain is not None:
        chain_why = chain.why_not_per_sample()
    if chain is not None and chain_why is None:
        routes.append(Route("hessian", "structured", "chain in the captured graph"))
    elif plan is not None and len(plan.products) < len(plan.leaves):
        routes.append(Route("hessian", "structured", "captured graph",
                            "the largest parameter's block from the graph, one-hot products "
                            f"for the others; chain route: {chain_why}"))
    else:
        routes.append(Route("hessian", "generic", "one-hot products",
                            f"{why}; chain route: {chain_why}"))
    return Explanation(tuple(routes), parameters)


def _parts(plan: GraphPlan) -> str:
    """How the plan splits the batch (NOTE [the batch in parts]), or nothing."""
    if not plan.parts:
        return ""
    sizes = sorted({part.hi - part.lo for part in plan.parts})
    return (f"the batch in {len(plan.parts)} parts of {' or '.join(map(str, sizes))} samples, "
            "to fit the frontier's per-sample curvature in the memory budget")
