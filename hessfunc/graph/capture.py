"""Capture a function as an ATen-level FX graph, once per input signature.

Shared by both engines: the forward engine (``hessfunc/forward``) traces a
per-point function ``u`` on a *fake* example of one point, the parameter engine
(:mod:`hessfunc.graph.curvature`) traces ``p -> f(p, *batch)``. Both use
:func:`torch.fx.experimental.proxy_tensor.make_fx`, so methods (``x.sin()``), functional
calls and composite ops all arrive as ATen ops, and in-place ops are removed by
:func:`torch.func.functionalize`. Tensors captured by closure (the parameters of an
``nn.Module`` called inside ``u``) become ``get_attr`` constants of the graph that point
to the very same tensor objects, so in-place parameter updates and autograd through
them both work.

NOTE [trace cache and its guard]
    Tracing costs milliseconds, so a graph is reused across calls. Reuse is
    only safe if nothing the graph froze has changed. The cache key holds the
    signature of every argument (shape, strides, dtype, device; other values by value)
    and a *fingerprint* of what ``u`` can reach: closure cells, defaults, bound
    ``self``, referenced globals, containers, modules (parameters, buffers,
    plain attributes, training flags), by identity for tensors and objects and
    by value for scalars; torch's own functions (``F.cross_entropy``) by name,
    their code being fixed; other functions by their code object and what they
    reach (so a lambda made afresh over the same objects matches, one over other
    objects does not). A graph is cached only if every external tensor
    constant in it was found by that walk; otherwise ``u`` is re-traced on
    every call (slower, never stale). Rebinding ``params = new_params`` in a
    closure therefore re-traces instead of silently using old parameters.

NOTE [tracing inside transforms]
    ``vmap(forward_laplacian(u))(X)`` calls the engine with a BatchedTensor.
    The trace is taken on a plain fake tensor of the *logical* per-point shape
    with the functorch interpreter stack and all dispatch modes temporarily
    removed (otherwise the transform would wrap the example and the trace
    would silently treat ``x`` as a constant). If a closure holds a tensor
    wrapped by an active transform (``grad`` over parameters captured by
    closure), the trace cannot be trusted and the caller takes the exact
    generic path instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
import os
import threading
import traceback
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch._decomp import get_decompositions
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import (
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_leaves,
    tree_unflatten,
)

from .._autodiff import second_order_kernels
from ..errors import ArgumentError

__all__ = ["Captured", "TraceCache", "capture", "fingerprint", "tensor_leaves",
           "run_nodes", "replay", "LOSS_DECOMPOSITIONS", "RandomOpError"]

aten = torch.ops.aten

# Composite ops whose pieces all have fast rules (layer/group/batch norm become
# mean, var, rsqrt and affine ops; softmax becomes exp, sum and div). This also
# matters for exactness: torch's own higher derivatives of the fused
# native_layer_norm are wrong (nested jvp from order 2, pytorch/pytorch#196700;
# nested backward from order 3, #175754), the decomposed ops' are not.
_DECOMPOSITIONS = get_decompositions(
    [
        aten.native_layer_norm,
        aten.native_group_norm,
        aten._native_batch_norm_legit_no_training,
        aten._softmax,
        aten._log_softmax,
        aten.addcmul,
        aten.addcdiv,
        aten.logsumexp,
        aten.elu,
    ]
)

#: Also decompose the losses, BatchNorm and attention's softmax, so that the parameter
#: engine sees elementwise ops and reductions it has batch-axis rules for (and
#: hardsigmoid, whose backward has no derivative and is 5e-9 off in float64).
LOSS_DECOMPOSITIONS = {
    **_DECOMPOSITIONS,
    **get_decompositions([
        aten.mse_loss, aten.huber_loss, aten.smooth_l1_loss, aten.soft_margin_loss,
        aten.binary_cross_entropy_with_logits, aten.binary_cross_entropy,
        aten.nll_loss_forward, aten.nll_loss2d_forward, aten._safe_softmax,
        aten.log_sigmoid_forward, aten.native_batch_norm, aten.hardsigmoid,
        aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit,
    ]),
}


def _smooth_log_sigmoid_forward(x: Tensor) -> tuple[Tensor, Tensor]:
    """``log sigmoid(x)`` (what BCE-with-logits and ``F.logsigmoid`` decompose into) from
    pieces whose derivatives are smooth at every ``x``. torch's own decomposition,
    ``min(0, x) - log1p(exp(-|x|))``, is exact in value, but autograd takes the
    derivatives of ``|x|`` and ``min`` at ``x = 0`` as 0 and 1/2, so a logit that is
    exactly 0 lost its curvature 1/4. Here each branch sees ``x`` only where it is
    taken: ``-log1p(exp(-x))`` for ``x >= 0`` and ``x - log1p(exp(x))`` below."""
    up = x >= 0
    zero = x.new_zeros(())
    xp, xn = torch.where(up, x, zero), torch.where(up, zero, x)
    mask = up.to(x.dtype)
    value = mask * -torch.log1p(torch.exp(-xp)) + (1 - mask) * (xn - torch.log1p(torch.exp(xn)))
    return value, x.new_zeros((0,))


LOSS_DECOMPOSITIONS[aten.log_sigmoid_forward.default] = _smooth_log_sigmoid_forward

_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_MAX_DEPTH = 6
_MAX_ITEMS = 20_000


class RandomOpError(ArgumentError):
    """``fn`` draws random numbers: the callers' structured routes step aside for the
    generic path, which refuses or accepts such a function on its own terms."""


@dataclass(frozen=True)
class Captured:
    """A traced per-point function: its graph and the fake meta of its output.

    ``analyses`` holds what callers derive from the graph alone (its sample structure,
    the leaves' routes), keyed by the caller, so a cache hit skips that work too."""

    graph_module: torch.fx.GraphModule
    output: Any  # FakeTensor (or pytree of them) describing u's per-point output
    analyses: dict = field(default_factory=dict, compare=False)

    def analysis(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per capture: kept under ``key`` in :attr:`analyses`."""
        if key not in self.analyses:
            self.analyses[key] = compute()
        return self.analyses[key]


def _is_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or (
        torch._C._functorch.is_batchedtensor(t)
    )


#: NOTE [custom autograd.Functions]: the trace runs a ``torch.autograd.Function``'s
#: ``forward`` and keeps its ops, not its ``backward`` or ``jvp``, so the captured graph
#: would differentiate the forward's ops where autograd follows the rules the Function
#: states (a straight-through estimator's identity, a hand-written kernel's gradient):
#: 1.5-3 off the oracle on a small model. A function that applies one is not captured
#: (its generic routes follow the rules), except torch's own reentrant checkpoint, whose
#: backward recomputes the forward and differentiates it. Every application makes the
#: Function's context object, ``Function.apply`` called inline or through an alias
#: (``cube = Cube.apply``) alike: that is where the applied classes are recorded.
_FAITHFUL_FUNCTIONS = frozenset({torch.utils.checkpoint.CheckpointFunction})
_APPLIED: contextvars.ContextVar[list[type] | None] = contextvars.ContextVar(
    "hessfunc_applied_functions", default=None)
_CONTEXT = torch.autograd.function.BackwardCFunction
_OWN_INIT = _CONTEXT.__dict__.get("__init__")  # None: inherited, as in torch 2.13
_PATCH: dict[str, Any] = {"depth": 0, "init": _CONTEXT.__init__}
_PATCH_LOCK = threading.Lock()


def _recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
    applied = _APPLIED.get()
    if applied is not None:
        applied.append(type(self)._forward_cls)
    _PATCH["init"](self, *args, **kwargs)


@contextlib.contextmanager
def _functions_applied() -> Iterator[list[type]]:
    """The ``torch.autograd.Function`` classes applied in this context within the block.
    Their context objects' ``__init__`` is wrapped while any block is open, and the
    wrapper only records for the context that opened one: other threads' applications
    pass through unchanged."""
    with _PATCH_LOCK:
        if _PATCH["depth"] == 0:
            _CONTEXT.__init__ = _recording_init  # type: ignore[method-assign]
        _PATCH["depth"] += 1
    applied: list[type] = []
    token = _APPLIED.set(applied)
    try:
        yield applied
    finally:
        _APPLIED.reset(token)
        with _PATCH_LOCK:
            _PATCH["depth"] -= 1
            if _PATCH["depth"] == 0:
                if _OWN_INIT is None:
                    del _CONTEXT.__init__  # the inherited one again
                else:
                    _CONTEXT.__init__ = _OWN_INIT  # type: ignore[method-assign]


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Leave every active transform and dispatch mode while tracing."""
    with temporarily_clear_interpreter_stack(), _disable_current_modes(), torch.no_grad():
        yield


def capture(fn: Callable[..., Any], args: Sequence[Any], caller: str,
            decompositions: dict | None = None, stack_traces: bool = False) -> Captured:
    """Trace ``fn(*args)``: tensor leaves of ``args`` become placeholders (in
    :func:`tensor_leaves` order), other leaves stay fixed.

    Raises :class:`RandomOpError` when ``fn`` uses a random operation (its
    derivatives along different directions would see different samples), and
    :class:`ArgumentError` when it differentiates a lookup whose gradient torch scales
    by the tokens' counts (:func:`_refuse_counted_lookups`). Any other failure propagates; the
    caller then takes the generic path.
    """
    leaves, treedef = tree_flatten(list(args))
    is_tensor = [isinstance(a, Tensor) for a in leaves]
    # the arguments' own strides: a graph traced on contiguous examples records views that
    # a channels-last input cannot take
    metas = [(a.shape, _strides(a), a.dtype, a.device) for a in leaves if isinstance(a, Tensor)]

    def flat_fn(*tensors: Tensor) -> Any:
        it = iter(tensors)
        filled = [next(it) if t else a for a, t in zip(leaves, is_tensor, strict=True)]
        return fn(*tree_unflatten(filled, treedef))

    def trace(f: Callable[..., Any]) -> torch.fx.GraphModule:
        # attention as plain ops, which have forward-mode rules (NOTE [attention kernels])
        with _isolated(), second_order_kernels(), warnings.catch_warnings():
            # tracing runs without grad: torch's reentrant checkpoint warns of that
            warnings.filterwarnings("ignore", "None of the inputs have requires_grad")
            examples = [torch.empty_strided(s, st, dtype=dt, device=dev)
                        for s, st, dt, dev in metas]
            return make_fx(
                f,
                decomposition_table=_DECOMPOSITIONS if decompositions is None
                else decompositions,
                tracing_mode="fake",
                _allow_non_fake_inputs=True,
                record_stack_traces=stack_traces,
            )(*examples)

    with _functions_applied() as applied:
        gm = trace(flat_fn)
    unfaithful = sorted({cls.__qualname__ for cls in applied
                         if cls not in _FAITHFUL_FUNCTIONS})
    if unfaithful:  # NOTE [custom autograd.Functions]
        raise RuntimeError(f"the function applies the custom torch.autograd.Function "
                           f"{unfaithful}, whose derivative rules a trace of its forward "
                           "would not follow")
    if any(_is_mutating(n) for n in gm.graph.nodes):
        # NOTE: functionalize only when needed: it also rewrites linear layers on
        # 1-D inputs into unsqueeze/mm/squeeze_ instead of a single addmm.
        gm = trace(torch.func.functionalize(flat_fn, remove="mutations"))
        _rewrite_inplace(gm)
    _drop_unit_scalings(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for node in gm.graph.nodes:
        target = node.target
        if _is_random(node):
            raise RandomOpError(
                f"{caller}: u calls the random operation {target}; its derivatives "
                "along different directions would see different random samples. "
                "Put the model in eval mode (no dropout) or remove the randomness from u."
            )
    _refuse_counted_lookups(gm, args)
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    output = torch.fx.node.map_arg(out_node.args[0], lambda n: n.meta.get("val"))
    return Captured(gm, output)


def run_nodes(gm: torch.fx.GraphModule, placeholders: Sequence[Any],
              adjust: Callable[[torch.fx.Node, Any], Any] | None = None
              ) -> dict[torch.fx.Node, Any]:
    """Evaluate ``gm`` on ``placeholders`` (in order), keeping every node's value; the
    output node maps to what the graph returns. Under the caller's grad mode (and
    transforms). ``adjust(node, value)``: what a call node's value becomes before later
    nodes read it (a perturbation)."""
    env: dict[torch.fx.Node, Any] = {}
    feed = iter(placeholders)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(feed)
        elif node.op == "get_attr":
            env[node] = operator.attrgetter(node.target)(gm)
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            value = node.target(*args, **kwargs)
            env[node] = value if adjust is None else adjust(node, value)
        elif node.op == "output":
            env[node] = torch.fx.node.map_arg(node.args[0], env.__getitem__)
    return env


def replay(nodes: Iterable[torch.fx.Node], env: Mapping[torch.fx.Node, Any],
           values: dict[torch.fx.Node, Any]) -> dict[torch.fx.Node, Any]:
    """Evaluate the call nodes ``nodes`` (in graph order) again, each operand read from
    ``values`` before ``env``, the results added to ``values``: a part of a captured graph
    on new values of some of its nodes (``values``), the rest as they were (``env``)."""
    for node in nodes:
        args, kwargs = torch.fx.node.map_arg(
            (node.args, node.kwargs), lambda n: values[n] if n in values else env[n])
        values[node] = node.target(*args, **kwargs)
    return values


def argument(node: torch.fx.Node, name: str) -> Any:
    """The value of argument ``name`` of a call node: positional, keyword or the
    schema's default; None when the op has no such argument or no default."""
    schema = node.target._schema.arguments
    for i, arg in enumerate(schema):
        if arg.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if i < len(node.args):
                return node.args[i]
            return arg.default_value if arg.has_default_value() else None
    return None


def operand_uses(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes among a call's arguments, once per use: ``mul(s, s)`` gives ``[s, s]``
    where ``node.all_input_nodes`` gives ``[s]`` (a product of one value with itself is
    not linear in it)."""
    return [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]


def _is_random(node: torch.fx.Node) -> bool:
    """An op that draws random numbers here: tagged ``nondeterministic_seeded`` (dropout,
    rand, bernoulli, and every attention kernel, which takes a ``dropout_p``), unless
    its dropout probability is 0 (attention in eval mode or built without dropout)."""
    if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(
            node.target, "tags", ()):
        return False
    names = {a.name for a in node.target._schema.arguments}
    for name in ("dropout_p", "p"):
        if name in names and isinstance(argument(node, name), (int, float)):
            if argument(node, name) == 0 or argument(node, "train") is False:
                return False
    return True


def _refuse_counted_lookups(gm: torch.fx.GraphModule, args: Sequence[Any]) -> None:
    """Refuse a lookup (``embedding``, ``embedding_bag``) with ``scale_grad_by_freq=True``
    whose table depends on an argument: autograd divides that table's gradient by each
    token's count in the batch, which is no derivative of the function, so its "Hessian"
    is not symmetric and every route (double backward, forward mode, the oracle's rows)
    gives another matrix."""
    lookups = [n for n in gm.graph.nodes if n.op == "call_function"
               and isinstance(n.target, torch._ops.OpOverload)
               and argument(n, "scale_grad_by_freq") is True]
    if not lookups:
        return
    reads: dict[torch.fx.Node, set[int]] = {}  # the arguments' tensors each value reads
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        reads[node] = {i}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            reads[node] = set().union(*(reads[a] for a in node.all_input_nodes))
    paths = [keystr(path) for path, a in tree_flatten_with_path(list(args))[0]
             if isinstance(a, Tensor)]
    for node in lookups:
        weight = argument(node, "weight")
        if isinstance(weight, torch.fx.Node) and reads[weight]:
            table = ", ".join(f"args{paths[i]}" for i in sorted(reads[weight]))
            raise ArgumentError(
                f"hessfunc: the function looks up a table computed from {table} (its "
                "arguments counted from 0) with scale_grad_by_freq=True. Autograd divides "
                "that table's gradient by the tokens' counts in the batch, which is no "
                "derivative of the function, so its second derivatives are not defined. "
                "Build the embedding with scale_grad_by_freq=False (the function is the "
                "same), or freeze the table."
            )


def _is_mutating(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def op_name(node: torch.fx.Node) -> str:
    """The op of a node as torch names it (``mm.default``)."""
    return str(getattr(node.target, "__name__", node.target))


def where(node: torch.fx.Node) -> str:
    """``op at file:line``: the op and the last frame of the user's code that made it."""
    text = op_name(node)
    stack = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in stack.splitlines() if ln.strip().startswith("File ")]
    user = [ln for ln in lines if "/torch/" not in ln and "/hessfunc/" not in ln] or lines
    if user:
        text += " at " + user[-1].removeprefix("File ")
    return text


def _is_view(node: torch.fx.Node) -> bool:
    """An op whose result aliases its first argument (a view, not an in-place op)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _read_after(node: torch.fx.Node, mutated: torch.fx.Node, order: dict[torch.fx.Node, int]
                ) -> bool:
    """Whether anything after ``node`` reads the storage ``mutated`` shares (its base
    through views, and every view of that base); ``order``: each node's place in the
    graph."""
    def view(n: torch.fx.Node) -> bool:  # also one piece of a split or unbind
        return _is_view(n) or (n.target is operator.getitem and
                               isinstance(n.args[0], torch.fx.Node) and _is_view(n.args[0]))

    root = mutated
    while view(root) and isinstance(root.args[0], torch.fx.Node):
        root = root.args[0]
    aliases, stack = set(), [root]
    while stack:
        alias = stack.pop()
        if alias not in aliases:
            aliases.add(alias)
            stack.extend(u for u in alias.users if view(u) and u.args[0] is alias)
    return any(order[u] > order[node] and u not in aliases
               for alias in aliases for u in alias.users)


def _drop_unit_scalings(gm: torch.fx.GraphModule) -> None:
    """Read ``t`` where the graph computes ``t * 1`` of the same dtype, exactly ``t``
    (``vmap``'s rule for ``addmm`` scales the bias by its ``beta``, one): a parameter so
    scaled still reaches its layer as itself."""
    for node in gm.graph.nodes:
        if node.target is not aten.mul.Scalar or node.args[1] != 1 or \
                isinstance(node.args[1], bool):
            continue
        (t,) = node.all_input_nodes
        val, val_t = node.meta.get("val"), t.meta.get("val")
        if isinstance(val, Tensor) and isinstance(val_t, Tensor) and val.dtype == val_t.dtype:
            node.replace_all_uses_with(t)


def _rewrite_inplace(gm: torch.fx.GraphModule) -> None:
    """Replace in-place ops left after functionalization by their functional twin.

    Only safe when nothing reads the mutated tensor afterwards: an in-place ``squeeze_``
    on a fresh intermediate, as matmul's decomposition emits, or BatchNorm's update of
    ``num_batches_tracked``, which the result does not read. A write that is read later
    (circular padding's ``copy_`` into slices of the padded tensor, which
    functionalization leaves) is refused, and the caller uses the generic path: the
    twin's result would be unused, and the write lost.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if not _is_mutating(node):
            continue
        op = node.target
        name = op._schema.name.split("::")[-1]
        mutated = node.args[0] if node.args else None
        functional = None
        if name.endswith("_") and isinstance(mutated, torch.fx.Node):
            packet = getattr(aten, name[:-1], None)
            functional = getattr(packet, op._overloadname, None) if packet else None
        if functional is None or len(mutated.users) != 1:
            raise RuntimeError(f"cannot remove the mutation {op} from the captured graph")
        if torch.Tag.inplace_view not in getattr(op, "tags", ()) and \
                _read_after(node, mutated, order):
            raise RuntimeError(f"{where(node)} writes into a tensor that is read later, which "
                               "the captured graph cannot express")
        node.target = functional


def external_constants(gm: torch.fx.GraphModule) -> list[Tensor]:
    """Tensor constants of ``gm`` that came from outside ``u`` (not tensor literals)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = operator.attrgetter(node.target)(gm)
        if not isinstance(value, Tensor):
            continue
        if node.users and all(user.target is aten.lift_fresh_copy.default for user in node.users):
            continue  # a literal such as torch.tensor([1.0, 2.0]) written inside u
        found.append(value)
    return found


@dataclass(frozen=True)
class Fingerprint:
    """What ``fn`` can reach: ``items`` to compare, ``tensor_ids`` seen, ``wrapped`` flag."""

    items: tuple
    tensor_ids: frozenset
    wrapped: bool
    complete: bool


def fingerprint(fn: Any) -> Fingerprint:
    """Walk the objects ``fn`` can reach (see NOTE [trace cache and its guard])."""
    items: list = []
    seen: dict[int, int] = {}  # id -> order of first visit (ids of temporaries vary)
    tensor_ids: set[int] = set()
    state = {"wrapped": False, "complete": True}

    def visit(obj: Any, depth: int) -> None:
        if len(items) > _MAX_ITEMS:
            state["complete"] = False
            return
        if isinstance(obj, _SCALARS):
            items.append((type(obj).__name__, obj))
            return
        oid = id(obj)
        if oid in seen:
            items.append(("seen", seen[oid]))
            return
        seen[oid] = len(seen)
        if isinstance(obj, Tensor):
            items.append(("tensor", oid))
            tensor_ids.add(oid)
            if _is_wrapped(obj):
                state["wrapped"] = True
            return
        if depth > _MAX_DEPTH:
            items.append(("deep", oid))
            state["complete"] = False
            return
        own = vars(obj).get("_guard_targets") if isinstance(obj, types.FunctionType) else None
        if own is not None or getattr(type(obj), "_guard_targets", None) is not None:
            # hessfunc's own callables: walk only what they wrap
            items.append(("guarded", oid))
            visit(obj._guard_targets, depth + 1)
            return
        if isinstance(obj, torch.nn.Module):
            items.append(("module", oid))
            for module in obj.modules():
                items.append(module.training)
                for key, value in vars(module).items():
                    if isinstance(value, (Tensor, *_SCALARS)):
                        items.append(key)
                        visit(value, depth + 1)
                for group in ("_parameters", "_buffers"):
                    for key, value in getattr(module, group).items():
                        items.append(key)
                        visit(value, depth + 1)
            return
        if isinstance(obj, (list, tuple)):
            items.append(("seq", len(obj)))
            for value in obj:
                visit(value, depth + 1)
            return
        if isinstance(obj, dict):
            items.append(("dict", len(obj)))
            for key, value in obj.items():
                visit(key, depth + 1)
                visit(value, depth + 1)
            return
        if isinstance(obj, functools.partial):
            items.append(("partial", oid))
            visit((obj.func, obj.args, obj.keywords), depth + 1)
            return
        if isinstance(obj, types.MethodType):
            items.append(("method",))
            visit((obj.__self__, obj.__func__), depth + 1)
            return
        package = (getattr(obj, "__module__", None) or "").split(".")[0]
        if isinstance(obj, types.FunctionType) and (package == "torch" or (
                package == "hessfunc" and obj.__closure__ is None
                and getattr(obj, "_guard_targets", None) is None)):
            # a library function (F.cross_entropy): its code is fixed, and walking the
            # globals of torch's internals would only hit the depth limit
            items.append(("library", obj.__module__, obj.__qualname__))
            return
        if isinstance(obj, types.FunctionType):  # by its code: a fresh closure may match
            items.append(("function", id(obj.__code__)))
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    items.append(("empty",))
            visit((obj.__defaults__, obj.__kwdefaults__), depth + 1)
            for name in _global_names(obj.__code__):
                if name in obj.__globals__:
                    value = obj.__globals__[name]
                    if not isinstance(value, (types.ModuleType, type)):
                        items.append(name)
                        visit(value, depth + 1)
            return
        items.append(("object", oid))
        if isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType)):
            return
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            visit(attrs, depth + 1)

    visit(fn, 0)
    return Fingerprint(tuple(items), frozenset(tensor_ids), state["wrapped"], state["complete"])


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return tuple(names)


def tensor_leaves(args: Sequence[Any]) -> list[Tensor]:
    """The tensors in ``args`` (a pytree), in placeholder order."""
    return [a for a in tree_leaves(list(args)) if isinstance(a, Tensor)]


def _strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides, or a contiguous tensor's where it has none (a sparse layout)."""
    if t.layout == torch.strided:
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def _signature(args: Sequence[Any]) -> tuple | None:
    leaves, treedef = tree_flatten(list(args))
    sig: list = [treedef]
    for a in leaves:
        if isinstance(a, Tensor):
            sig.append(("tensor", tuple(a.shape), _strides(a), a.dtype, a.device))
        else:
            try:
                hash(a)
            except TypeError:
                return None
            sig.append(("value", type(a), a))
    return tuple(sig)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# torch's files whose frames name the op a user called (not the dispatch machinery)
_TORCH_API = ("nn" + os.sep + "functional.py", "functional.py", "nn" + os.sep + "modules" + os.sep)


def capture_failure(exc: BaseException) -> str:
    """Why tracing failed, and where: the deepest frame of the user's code in the
    traceback, and the torch function it called there when that is where the trace
    stopped (``F.gaussian_nll_loss`` checking ``torch.any(var < 0)``)."""
    if "DataDependent" in type(exc).__name__:
        what = "Python reads a tensor's value (data-dependent control flow or .item())"
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        what = f"{type(exc).__name__}: {first[:300]}"
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [i for i, fr in enumerate(frames)
            if not fr.filename.startswith((_TORCH_DIR, _OWN_DIR, "<"))]
    start = mine[-1] + 1 if mine else 0
    api = [fr for fr in frames[start:] if fr.filename.startswith(_TORCH_DIR)
           and fr.filename[len(_TORCH_DIR):].startswith(_TORCH_API)
           and not fr.filename.endswith("module.py")]
    where = []
    if api:
        fr = api[-1]
        name = fr.filename[len(_TORCH_DIR):-3].replace(os.sep, ".")
        where.append(f"in torch.{name}.{fr.name} (`{fr.line}`)")
    if mine:
        fr = frames[mine[-1]]
        where.append(f"{'called ' if api else ''}at {fr.filename}:{fr.lineno} in {fr.name} "
                     f"(`{fr.line}`)")
    return what + (" " + ", ".join(where) if where else "")


_WRAPPED = "its closure holds tensors of an active torch.func transform"


class TraceCache:
    """Graphs of ``fn`` keyed by argument signature and fingerprint (small LRU).

    :meth:`get` returns a :class:`Captured`, or ``None`` when ``fn`` cannot be
    traced faithfully (data-dependent control flow, tensors wrapped by an
    active transform in its closure, an op make_fx cannot trace): the caller
    then uses the exact generic path, and :attr:`failure` says why and where.
    """

    def __init__(self, fn: Callable[..., Any], caller: str, maxsize: int = 8,
                 decompositions: dict | None = None, stack_traces: bool = False) -> None:
        self.fn = fn
        self.caller = caller
        self.decompositions = decompositions
        self.stack_traces = stack_traces
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, Captured | str] = OrderedDict()
        #: why the last :meth:`get` returned None (:func:`capture_failure`), else None
        self.failure: str | None = None

    def get(self, args: Sequence[Any]) -> Captured | None:
        self.failure = None
        sig = _signature(args)
        fp = fingerprint(self.fn)
        if fp.wrapped:
            self.failure = _WRAPPED
            return None
        key = None if sig is None or not fp.complete else (sig, fp.items)
        if key is not None and key in self._entries:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            if isinstance(entry, str):
                self.failure = entry
                return None
            return entry
        try:
            captured: Captured | str = capture(self.fn, args, self.caller,
                                               self.decompositions, self.stack_traces)
        except ArgumentError:
            raise
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use the generic path
            captured = capture_failure(e)
        if isinstance(captured, str):
            self.failure = captured
        else:
            constants = external_constants(captured.graph_module)
            if any(_is_wrapped(c) for c in constants):
                self.failure = _WRAPPED
                return None
            if any(id(c) not in fp.tensor_ids for c in constants):
                # Not found by the walk: under an active transform it may be a
                # wrapped tensor seen through the cleared stack, so refuse the
                # trace; outside transforms it is exact now but must not be reused.
                if torch._C._functorch.peek_interpreter_stack() is not None:
                    self.failure = _WRAPPED
                    return None
                return captured
        if key is not None:
            self._entries[key] = captured
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return None if isinstance(captured, str) else captured
