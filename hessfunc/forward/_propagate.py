"""Run jets through a captured graph: the forward engine's interpreter.

:class:`ForwardEngine` is what every public function in
:mod:`hessfunc.forward` builds on. Given ``u``, the differentiated argument and
a set of seed directions it returns the Taylor coefficients of ``u`` along
those directions (:meth:`ForwardEngine.jet`), or the Hessian diagonal by the
forward-then-backward variant (:meth:`ForwardEngine.hessian_diag`).

Every op of the graph goes through one rule of :mod:`._rules` (the generic
rule of :mod:`._fallback` for ops without one); values are freed after their
last use, so at most a couple of layers of ``(k, *s)`` coefficients are alive
at once. All work is plain torch ops, so the engine runs under ``vmap``,
``grad`` and ``jvp`` and records autograd through closure parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..graph.capture import TraceCache, run_nodes, tensor_leaves
from ._fallback import generic
from ._rules import NotApplicable, floating_outputs, lookup
from ._series import Contracted, Jet, JetSpec, contract

__all__ = ["ForwardEngine", "apply_op", "rule_report", "run_graph"]

Record = list[tuple[str, str]] | None


def _has_jet(tree: Any) -> bool:
    return any(isinstance(a, Jet) for a in torch.utils._pytree.tree_leaves(tree))


def _values(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda a: a.value if isinstance(a, Jet) else a, tree)


def _wrap(out: Any, coeffs: Any) -> Any:
    """Pair an op's output value(s) with the coefficients a rule returned."""
    if coeffs is None:
        return out
    if isinstance(out, Tensor):
        return Jet(out, coeffs)
    return type(out)(o if c is None else Jet(o, c) for o, c in zip(out, coeffs, strict=True))


def apply_op(spec: JetSpec, op: Any, args: tuple, kwargs: dict, record: Record = None) -> Any:
    """Apply ``op`` to arguments that may hold jets; returns values and/or jets."""
    out = op(*_values(args), **_values(kwargs))
    if not _has_jet((args, kwargs)) or not floating_outputs(out):
        return out
    rule = lookup(op)
    name = "generic"
    coeffs = None
    if rule is not None:
        try:
            coeffs = rule(spec, op, args, kwargs, out)
            name = rule.__name__
        except NotApplicable:
            rule = None
    if rule is None:
        coeffs = generic(spec, op, args, kwargs, out)
    if record is not None:
        record.append((str(op), name))
    return _wrap(out, coeffs)


def _last_uses(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """For each node, the values whose last reader it is (to free them)."""
    last: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            last[inp] = node
    freed: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for value, user in last.items():
        freed.setdefault(user, []).append(value)
    return freed


def run_graph(
    gm: torch.fx.GraphModule,
    inputs: Sequence[Any],
    spec: JetSpec,
    *,
    record: Record = None,
    adjoints: dict[torch.fx.Node, Tensor] | None = None,
    sunk: list[Tensor] | None = None,
) -> Any:
    """Interpret ``gm`` on ``inputs`` (values and jets); returns the output.

    With ``adjoints`` (forward-then-backward mode) each node's top coefficient
    is contracted with the node's adjoint, appended to ``sunk`` (shape ``(k,)``)
    and removed from the jet, so it never propagates.
    """
    env: dict[torch.fx.Node, Any] = {}
    freed = _last_uses(gm.graph)
    placeholders = iter(inputs)
    result = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":
            env[node] = operator.attrgetter(node.target)(gm)
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            g = None if adjoints is None else adjoints.get(node)
            if node.target is operator.getitem:
                out = args[0][args[1]]
            else:
                node_spec = spec if g is None else spec._replace(adjoint=g)
                out = apply_op(node_spec, node.target, args, kwargs, record)
            if g is not None and isinstance(out, Jet) and out.coeffs[-1] is not None:
                top = out.coeffs[-1]
                assert sunk is not None
                sunk.append(top.total if isinstance(top, Contracted) else contract(top, g))
                out.coeffs[-1] = None
            env[node] = out
        elif node.op == "output":
            result = torch.fx.node.map_arg(node.args[0], env.__getitem__)
        else:  # call_module / call_method never appear in make_fx graphs
            raise RuntimeError(f"unexpected node {node.op} in a captured graph")
        for value in freed.get(node, ()):
            env.pop(value, None)
    return result


def _dependent_nodes(gm: torch.fx.GraphModule, seed: int) -> set[torch.fx.Node]:
    """Nodes whose value depends on the ``seed``-th placeholder."""
    dep: set[torch.fx.Node] = set()
    i = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if i == seed:
                dep.add(node)
            i += 1
        elif any(inp in dep for inp in node.all_input_nodes):
            dep.add(node)
    return dep


def _adjoints(
    gm: torch.fx.GraphModule, inputs: Sequence[Any], seed: int
) -> dict[torch.fx.Node, Tensor]:
    """``du/dy`` for every x-dependent single-tensor node ``y`` (one reverse pass).

    The primal graph is re-evaluated with a zero perturbation added to each
    such node; the vjp of ``u`` with respect to the perturbations is the adjoint.
    """
    dep = _dependent_nodes(gm, seed)
    nodes = [
        n
        for n in gm.graph.nodes
        if n in dep
        and n.op == "call_function"
        and isinstance(n.meta.get("val"), Tensor)
        and n.meta["val"].is_floating_point()
    ]
    x = inputs[seed]
    eps = tuple(
        torch.zeros(n.meta["val"].shape, dtype=n.meta["val"].dtype, device=x.device) for n in nodes
    )
    index = {n: i for i, n in enumerate(nodes)}

    (output,) = [n for n in gm.graph.nodes if n.op == "output"]

    def perturbed(*e: Tensor) -> Tensor:
        return run_nodes(gm, inputs, lambda node, value: value + e[index[node]]
                         if node in index else value)[output]

    out, pullback = torch.func.vjp(perturbed, *eps)
    grads = pullback(torch.ones_like(out))
    return dict(zip(nodes, grads, strict=True))


class ForwardEngine:
    """Taylor coefficients of ``u`` with respect to ``args[argnums]`` along directions.

    ``u`` is traced once per argument signature (see :mod:`hessfunc.graph.capture`); when it
    cannot be traced faithfully the whole of ``u`` goes through the generic
    rule instead: slower, still exact.
    """

    def __init__(self, u: Callable[..., Tensor], argnums: int, caller: str) -> None:
        if not callable(u):
            raise ArgumentError(
                f"{caller}: u must be a callable mapping one point x to a scalar, "
                f"got {type(u).__name__}."
            )
        if isinstance(argnums, bool) or not isinstance(argnums, int):
            raise ArgumentError(
                f"{caller}: argnums must be an int (the position of x among u's "
                f"arguments), got {argnums!r}; differentiate one argument at a time."
            )
        self.u = u
        self.argnums = argnums
        self.caller = caller
        self.cache = TraceCache(u, caller)

    @property
    def _guard_targets(self) -> tuple:
        return (self.u, self.argnums)

    def point(self, args: Sequence[Any]) -> Tensor:
        """Validate the call and return ``x = args[argnums]``."""
        n = len(args)
        if not -n <= self.argnums < n:
            raise ArgumentError(
                f"{self.caller}: argnums={self.argnums} is out of range for a call "
                f"with {n} positional argument(s); pass x at that position."
            )
        x = args[self.argnums]
        if not isinstance(x, Tensor):
            raise ArgumentError(
                f"{self.caller}: argument x (argnums={self.argnums}) must be a tensor, "
                f"got {type(x).__name__}; wrap it with torch.as_tensor(..., dtype=torch.float64)."
            )
        if not x.is_floating_point():
            raise ArgumentError(
                f"{self.caller}: argument x (argnums={self.argnums}) must be a floating-point "
                f"tensor, got dtype {x.dtype}; convert it with x.double() or x.float()."
            )
        return x

    def _check_output(self, out: Any, scalar: bool) -> None:
        ok = isinstance(out, Tensor) and out.is_floating_point()
        if ok and scalar:
            ok = out.dim() == 0
        if not ok:
            what = (
                f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}"
                if isinstance(out, Tensor)
                else type(out).__name__
            )
            want = "a 0-d floating tensor (one scalar per point)" if scalar else "a floating tensor"
            fix = (
                "reduce the output (e.g. .sum() or .squeeze()) and batch points with "
                "torch.func.vmap"
                if scalar
                else "return a floating tensor"
            )
            raise ArgumentError(f"{self.caller}: u must return {want}, got {what}; {fix}.")

    def jet(
        self,
        args: Sequence[Any],
        directions: Tensor,
        spec: JetSpec,
        *,
        scalar: bool = True,
        record: Record = None,
    ) -> Any:
        """Output of ``u`` as a :class:`Jet` (or a plain tensor if it ignores ``x``).

        ``directions`` has shape ``(k, *x.shape)``; the seed is
        ``Jet(x, [directions, 0, ..., 0])``.
        """
        args = list(args)
        argnum = self.argnums % len(args)
        x = args[argnum]
        seed = Jet(x, [directions] + [None] * (spec.order - 1))
        captured = self.cache.get(args)
        if captured is not None:
            self._check_output(captured.output, scalar)
            inputs = tensor_leaves(args)
            inputs[len(tensor_leaves(args[:argnum]))] = seed
            return run_graph(captured.graph_module, inputs, spec, record=record)
        # NOTE [generic path]: u as one opaque op under the generic rule.
        out = self.u(*args)
        self._check_output(out, scalar)
        if record is not None:
            record.append(("u", f"generic (untraceable u: {self.cache.failure})"))
        call_args = list(args)
        call_args[argnum] = seed
        call = _Call(self.u)
        try:
            coeffs = generic(spec, call, tuple(call_args), {}, out)
        except RuntimeError:  # e.g. control flow on values, which vmap refuses
            coeffs = generic(spec, call, tuple(call_args), {}, out, vectorize=False)
        return Jet(out, coeffs)

    def hessian_diag(
        self, args: Sequence[Any], directions: Tensor, record: Record = None
    ) -> Tensor:
        """``v_i^T H v_i`` for each direction row, forward-then-backward.

        See NOTE [forward-then-backward diagonal] in :mod:`hessfunc.forward.diagonal`.
        """
        args = list(args)
        argnum = self.argnums % len(args)
        captured = self.cache.get(args)
        spec = JetSpec(2, directions.shape[0], collapsed=False)
        if captured is None:
            out = self.jet(args, directions, spec, record=record)
            return _second(out, directions)
        self._check_output(captured.output, scalar=True)
        seed_index = len(tensor_leaves(args[:argnum]))
        values = tensor_leaves(args)
        adjoints = _adjoints(captured.graph_module, values, seed_index)
        acc: list[Tensor] = []
        inputs = list(values)
        inputs[seed_index] = Jet(args[argnum], [directions, None])
        run_graph(captured.graph_module, inputs, spec, record=record, adjoints=adjoints, sunk=acc)
        if not acc:
            return directions.new_zeros(directions.shape[0])
        return 2 * torch.stack(acc).sum(0)


def _second(out: Any, directions: Tensor) -> Tensor:
    """``2 y_2`` per direction from an output jet (zeros if ``u`` ignores ``x``)."""
    k = directions.shape[0]
    if isinstance(out, Jet) and out.coeffs[1] is not None:
        return 2 * out.coeffs[1].reshape(k)
    ref = out.value if isinstance(out, Jet) else out
    return torch.zeros(k, dtype=ref.dtype, device=ref.device)


class _Call:
    """``u`` presented as an op to the generic rule (its name in rule reports)."""

    def __init__(self, u: Callable[..., Any]) -> None:
        self.u = u

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.u(*args, **kwargs)

    def __str__(self) -> str:
        return "u"


def rule_report(
    u: Callable[..., Tensor], args: Sequence[Any], argnums: int = 0, order: int = 2
) -> list[tuple[str, str]]:
    """``(op, rule)`` pairs the engine used for a collapsed order-``order`` pass.

    A debugging aid (and what the tests use to check that an op really went
    through the generic rule): ``("u", "generic (untraceable u: why, where)")`` means
    ``u`` could not be traced and ran whole under the generic rule.
    """
    engine = ForwardEngine(u, argnums, "rule_report")
    x = engine.point(args)
    n = x.numel()
    directions = torch.eye(n, dtype=x.dtype, device=x.device).reshape((n, *x.shape))
    record: list[tuple[str, str]] = []
    engine.jet(args, directions, JetSpec(order, n, collapsed=True), record=record)
    return record
