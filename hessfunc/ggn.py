"""Generalized Gauss-Newton and Fisher curvature of ``loss_fn(g(params, inputs), targets)``.

For a model ``o = g(p, x)`` (outputs ``o`` of ``O`` numbers, Jacobian ``J = do/dp``,
``(O, P)``) and a loss ``L(o, y)``, the Hessian of ``L(g(p, x), y)`` splits as

    H = J^T H_o J + sum_k (dL/do_k) d^2 o_k / dp^2,        H_o = d^2 L / do^2  (O, O).

The generalized Gauss-Newton (GGN) is the first term, ``G = J^T H_o J``: it drops
the model's own curvature. It equals ``H`` for a model linear in its parameters, and is
positive semi-definite whenever the loss is convex in the outputs (``H_o`` PSD).

Fisher. When the loss is a negative log-likelihood of a distribution ``p(y | o)``, up to
a constant and a scale ``c``,

    L = c sum_n l(o_n, y_n),   l(o, y) = -log p(y | o) + const,

the Fisher is ``F = c sum_n E_{y ~ p(. | o_n)}[grad_p l(o_n, y) grad_p l(o_n, y)^T]``. For
the exponential families below, with ``o`` their natural parameters,
``E[grad_o l grad_o l^T] = d^2 l / do^2``, so **the exact Fisher equals the GGN** for
MSE, cross-entropy (with or without label smoothing: the smoothed targets still sum to
1) and BCE-with-logits. The supported likelihoods (:data:`LIKELIHOODS`):

========================  ==============================  =================================
loss                      ``p(y | o)``                    ``l(o, y)`` (one sample, summed)
========================  ==============================  =================================
MSE                       Gaussian, mean ``o``, var 1/2   ``sum (o - y)^2``
cross-entropy             categorical, ``softmax(o)``     ``-log softmax(o)_y``
NLL (``o`` log-probs)     categorical, ``exp(o)``         ``-o_y``
BCE-with-logits           Bernoulli, ``sigmoid(o)``       ``sum BCE(o, y)``
========================  ==============================  =================================

with ``c = 1/numel(outputs)`` for MSE and BCE with ``reduction="mean"``, ``c = 1/N`` for
cross-entropy and NLL with ``reduction="mean"`` (``N`` samples, outputs ``(N, C)``), and
``c = 1`` with ``reduction="sum"``. (NLL on log-probabilities is linear in its outputs: its
GGN is 0, and its Fisher, ``c sum_n J_n^T diag(exp(o_n)) J_n``, is not the GGN.)

* the Monte-Carlo Fisher draws ``mc_samples`` labels per sample from ``p(. | o_n)`` and
  averages the squared per-sample gradients: an unbiased estimate of ``diag(F)``;
* the empirical Fisher uses the true labels: ``c sum_n (grad_p l_n)^2`` with
  ``l_n = lambda_n / s``, ``lambda_n = loss_fn(o_n, y_n)`` the given loss on sample ``n``
  alone, ``s`` the loss's per-sample scale (``1 / elements per sample`` for MSE and BCE with
  mean reduction, else 1); equivalently ``(w / s) sum_n (grad_p lambda_n)^2``, ``w = 1/N``
  (mean) or 1 (sum). It is not an estimate of ``F`` away from a perfect fit.

Models here are ``g(params, inputs) -> outputs`` (e.g. ``g, params = functionalize(model)``)
with a tensor output whose first dimension indexes the samples; per-sample quantities
evaluate ``g`` on one sample at a time (``inputs[n:n+1]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.func
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ._autodiff import (
    batched_vjp,
    explain_missing_derivative,
    forward_ad_gap,
    second_order_kernels,
)
from ._checks import (
    check_callable,
    check_floating,
    check_like,
    check_loss_output,
    check_samples_first,
    describe,
)
from ._memory import CHUNK_BUDGET_BYTES, check_dense, itemsize, memory_limit
from ._tree import flat_spec, vector_to_tree
from .dense import _nest
from .errors import ArgumentError
from .graph.curvature import GGNLoss, padding_rows, plan_ggn_diagonal, through_checkpoints

__all__ = ["ggn_vp", "ggn", "ggn_diag", "fisher_diag", "LIKELIHOODS"]

#: The likelihoods the Fisher supports, by name.
LIKELIHOODS = ("gaussian", "categorical", "log-categorical", "bernoulli")


# ------------------------------------------------------------------ plumbing
def _unpack(primals: Any, call: str) -> tuple[Any, Any, Any]:
    if not (isinstance(primals, tuple) and len(primals) == 3):
        raise ArgumentError(f"{call}: `primals` must be the tuple (params, inputs, targets), "
                            f"got {describe(primals)}.")
    return primals


def _output(g: Callable[..., Any], params: Any, x: Any, call: str) -> torch.Tensor:
    out = g(params, x)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise ArgumentError(f"{call}: `g(params, inputs)` must return one floating tensor "
                            f"(the model's outputs), got {describe(out)}.")
    return out


def _loss_of(loss_fn: Callable[..., Any], y: Any, call: str) -> Callable[[torch.Tensor], Any]:
    def loss(o: torch.Tensor) -> torch.Tensor:
        value = loss_fn(o, y)
        check_loss_output(value, call)
        return value.reshape(())

    return loss


def _output_hvp(loss_fn: Callable[..., Any], out: torch.Tensor, y: Any, u: torch.Tensor,
                call: str) -> torch.Tensor:
    """``H_o u``, reverse-over-reverse (NOTE [ZeroTensor trap] in hessfunc/products.py: the
    forward-over-reverse product of ``F.mse_loss`` fails on torch 2.13)."""
    _, vjp_fn = torch.func.vjp(torch.func.grad(_loss_of(loss_fn, y, call)), out)
    return vjp_fn(u)[0]


def _checked(g: Any, loss_fn: Any, call: str) -> None:
    check_callable(g, "g", call)
    check_callable(loss_fn, "loss_fn", call)


# ---------------------------------------------------------------- transforms
def ggn_vp(g: Callable[..., Any], loss_fn: Callable[..., Any], primals: tuple[Any, Any, Any],
           v: Any) -> Any:
    """The GGN-vector product ``G v = J^T H_o J v``, structured like ``params``.

    ``J v`` by a forward-mode product through ``g``, ``H_o (J v)`` by reverse-over-reverse
    through the loss, ``J^T (.)`` by a vector-Jacobian product through ``g``.

    Args:
        g: ``g(params, inputs) -> outputs`` (a tensor).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        primals: ``(params, inputs, targets)``.
        v: a tangent structured like ``params``.

    Example (``g = w x``, ``L = sum (o - y)^2``: ``G = 2 x^2``, here ``2 * 3^2 = 18``):
        >>> g = lambda p, x: p["w"] * x
        >>> loss = lambda o, y: ((o - y) ** 2).sum()
        >>> p, x = {"w": torch.tensor(1.0)}, torch.tensor(3.0)
        >>> ggn_vp(g, loss, (p, x, torch.tensor(0.0)), {"w": torch.tensor(1.0)})
        {'w': tensor(18.)}
    """
    call = "ggn_vp"
    _checked(g, loss_fn, call)
    params, x, y = _unpack(primals, call)
    check_floating(params, "params", call)
    check_like(v, params, "v", call)

    v = without_rows(v, padding_rows(g, params, x))  # autograd's J: none from such rows
    with no_random_draws(call), second_order_kernels():  # J and J^T: a forward pass each
        model, (out, vjp_fn) = through_checkpoints(
            lambda g: torch.func.vjp(lambda p: _output(g, p, x, call), params), g, (params, x))
        try:
            _, Jv = torch.func.jvp(lambda p: _output(model, p, x, call), (params,), (v,))
        except (RuntimeError, NotImplementedError) as exc:
            if forward_ad_gap(exc) is None:
                raise
            Jv = reverse_jvp(vjp_fn, out, call)(v)
    return vjp_fn(_output_hvp(loss_fn, out, y, Jv, call))[0]


def without_rows(tree: Any, rows: list[tuple[int, int]]) -> Any:
    """``tree`` with row ``r`` of its leaf ``i`` zeroed for each ``(i, r)`` in ``rows``
    (embeddings' padding rows, :func:`hessfunc.graph.curvature.padding_rows`); under
    ``vmap`` too."""
    if not rows:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    for i, row in rows:
        keep = torch.ones(leaves[i].shape[0], *[1] * (leaves[i].dim() - 1),
                          dtype=leaves[i].dtype, device=leaves[i].device)
        keep[row] = 0
        leaves[i] = leaves[i] * keep
    return pytree.tree_unflatten(leaves, spec)


def reverse_jvp(vjp_fn: Callable[[torch.Tensor], tuple[Any]], out: torch.Tensor, call: str
                ) -> Callable[[Any], torch.Tensor]:
    """``v -> J v`` from ``vjp_fn: u -> (J^T u,)`` by reverse mode alone: ``u -> J^T u``
    is linear, so its vector-Jacobian product (at any ``u``, here 0) is ``v -> J v``. For
    models with an op that torch has no forward-mode rule for (weight normalisation's
    ``_weight_norm_interface``), at the cost of a second backward pass. An op with
    neither rule (``embedding_bag``'s backward has no derivative) is an
    :class:`ArgumentError` naming it."""
    _, transposed = torch.func.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(out))

    def jvp(v: Any) -> torch.Tensor:
        with explain_missing_derivative(call, _no_jvp_message):
            return transposed(v)[0]

    return jvp


def _no_jvp_message(op: str, call: str) -> str:
    return (f"{call}: J v needs a forward-mode rule or a differentiable backward for every op "
            f"of g, and torch has neither for {op} (from its backward); expected g to be "
            "differentiable in forward mode. The GGN's diagonal and dense matrix (ggn_diag, "
            "ggn) need J^T alone and apply; or replace the op (nn.EmbeddingBag: nn.Embedding "
            "followed by the bag's sum or mean).")


@contextlib.contextmanager
def no_random_draws(call: str) -> Iterator[None]:
    """Refuse a model that draws random numbers (the global RNG moves: dropout in training
    mode, a noise layer) where ``J`` and ``J^T`` come from separate passes: each would see
    its own draw. A model with one fixed draw (``randomness="fixed"``) forks the RNG."""
    state = torch.random.get_rng_state()
    yield
    if not torch.equal(state, torch.random.get_rng_state()):
        torch.random.set_rng_state(state)
        raise random_draws_error(call)


def random_draws_error(call: str) -> ArgumentError:
    """The error of :func:`no_random_draws`."""
    return ArgumentError(
        f"{call}: `g` drew random numbers in its forward pass (dropout in training mode, a "
        "noise layer), so J would change between its products. Evaluate the model without "
        "randomness (model.eval(), functionalize(..., training=False)) or fix one draw "
        "(functionalize(..., randomness='fixed')).")


def _jacobian_and_output_hessian(g: Any, loss_fn: Any, params: Any, x: Any, y: Any,
                                 call: str, max_memory: int | None, P_by_P: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``J`` ``(O, P)`` and ``H_o`` ``(O, O)``, memory-guarded."""
    spec = flat_spec(params)
    P = spec.numel
    g, out = through_checkpoints(lambda g: _output(g, params, x, call), g, (params, x))
    O = out.numel()
    if P_by_P:
        check_dense(P * P, spec.dtype, spec.device, what=f"the dense {P} x {P} GGN", call=call,
                    max_memory=max_memory, hint="use `ggn_vp`, `ggn_diag` or "
                    "`hessfunc.GGNOperator` (matrix-free) instead")
    check_dense(O * P + O * O, spec.dtype, spec.device,
                what=f"the {O} x {P} Jacobian and {O} x {O} output Hessian", call=call,
                max_memory=max_memory, hint="split the batch (the GGN is a sum over samples)")
    _, jac = through_checkpoints(
        lambda g: torch.func.jacrev(lambda p: _output(g, p, x, call))(params), g, (params, x))
    J = torch.cat([t.reshape(O, -1) for t in pytree.tree_leaves(jac)], dim=1)
    Ho = torch.func.jacrev(torch.func.grad(_loss_of(loss_fn, y, call)))(out).reshape(O, O)
    return J, Ho


def ggn(g: Callable[..., Any], loss_fn: Callable[..., Any], *, flat: bool = False,
        max_memory: int | None = None) -> Callable[..., Any]:
    """The dense GGN ``G = J^T H_o J`` of ``loss_fn(g(params, inputs), targets)``.

    Returns ``ggn_f(params, inputs, targets)``: nested blocks ``G[a][b]`` of shape
    ``a.shape + b.shape`` (as :func:`hessfunc.hessian`), or with ``flat=True`` the
    ``(P, P)`` matrix in ``params`` order. Refused before allocating when the ``P x P``
    result, or the ``O x P`` Jacobian with the ``O x O`` output Hessian, would exceed the
    memory limit (``max_memory`` bytes, NOTE [memory limit] in hessfunc/_memory.py).

    Example (``g = w x`` on two samples, mean squared error: ``G = 2 mean(x^2) = 5``):
        >>> g = lambda p, x: p["w"] * x
        >>> G = ggn(g, torch.nn.functional.mse_loss, flat=True)(
        ...     {"w": torch.tensor(1.0)}, torch.tensor([1.0, 2.0]), torch.zeros(2))
        >>> G
        tensor([[5.]])
    """
    call = "ggn"
    _checked(g, loss_fn, call)

    def ggn_f(params: Any, x: Any, y: Any) -> Any:
        check_floating(params, "params", call)
        J, Ho = _jacobian_and_output_hessian(g, loss_fn, params, x, y, call, max_memory, True)
        G = J.T @ (Ho @ J)
        return G if flat else _nest(G, params, flat_spec(params))

    return ggn_f


def ggn_blocks(g: Callable[..., Any], loss_fn: Callable[..., Any], *,
               max_memory: int | None = None) -> Callable[..., Any]:
    """Each parameter's own ``(numel, numel)`` GGN block ``J_p^T H_o J_p``, without the
    cross blocks: the GGN counterpart of :func:`hessfunc.hessian_blocks`.

    From the captured graph of ``loss_fn(g(params, inputs), targets)`` with ``g``'s own
    curvature left out (NOTE [Gauss-Newton factors] in ``hessfunc/graph/curvature.py``:
    the loss's per-sample output Hessian carried down as a factor, each parameter's
    block formed at its one linear place); parameters the graph does not take, and
    every ``g`` it does not cover, from the ``(O, P)`` Jacobian (memory-guarded).

    Returns ``blocks_f(params, inputs, targets)``: the structure of ``params`` with
    ``(numel, numel)`` leaves, flattened row-major.

    Example (``g = (w x, w^2)`` and ``L = sum o^2 / 2``: the block is ``x^2 + 4 w^2``):
        >>> g = lambda p, x: torch.stack([p["w"] * x, p["w"] ** 2])
        >>> loss = lambda o, y: 0.5 * (o ** 2).sum()
        >>> ggn_blocks(g, loss)({"w": torch.tensor(1.0)}, torch.tensor(2.0), None)
        {'w': tensor([[8.]])}
    """
    call = "ggn_blocks"
    _checked(g, loss_fn, call)
    composed = GGNLoss.of(g, loss_fn)

    def blocks_f(params: Any, x: Any, y: Any) -> Any:
        check_floating(params, "params", call)
        spec = flat_spec(params)
        check_dense(sum(n * n for n in spec.numels), spec.dtype, spec.device,
                    what="storing the diagonal blocks", call=call, max_memory=max_memory,
                    hint="use `ggn_diag` or `hessfunc.GGNOperator`")
        plan, _ = plan_ggn_diagonal(composed, (params, x, y), call=call)
        found = plan.blocks() if plan is not None else [None] * len(spec.numels)
        if any(b is None for b in found):
            J, Ho = _jacobian_and_output_hessian(g, loss_fn, params, x, y, call, max_memory,
                                                 False)
            for i, part in enumerate(spec.slices().values()):
                if found[i] is None:
                    found[i] = J[:, part].T @ (Ho @ J[:, part])
        return pytree.tree_unflatten(found, spec.treespec)

    return blocks_f


def _per_sample(fn: Callable[..., Any], params: Any, x: Any, y: Any,
                chunk_size: int | None = None) -> Any:
    """``fn(params, x[n:n+1], y[n:n+1])`` for every sample ``n``, stacked (vmap, over
    ``chunk_size`` samples at a time; one sample at a time where ``vmap`` cannot run
    ``fn``: a loss that checks its values, as ``F.gaussian_nll_loss`` does)."""
    def one(xi: Any, yi: Any) -> Any:
        return fn(params, pytree.tree_map(lambda t: t.unsqueeze(0), xi), yi.unsqueeze(0))

    try:
        return torch.func.vmap(one, chunk_size=chunk_size)(x, y)
    except RuntimeError as exc:
        if "vmap" not in str(exc):
            raise
        rows = [one(pytree.tree_map(lambda t, n=n: t[n], x), y[n]) for n in range(y.shape[0])]
        return pytree.tree_map(lambda *t: torch.stack(t), *rows)


def _samples_at_once(g: Callable[..., Any], params: Any, x: Any, n: int, call: str,
                     max_memory: int | None) -> int:
    """How many samples' ``(O_n, P)`` Jacobians and ``(O_n, O_n)`` output Hessians fit the
    memory limit together (at least one, else :class:`DenseMemoryError`): ``vmap`` over
    the samples holds them all at once."""
    spec = flat_spec(params)
    first = pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) else t, x)
    O = _output(g, params, first, call).numel()
    per = 3 * O * spec.numel + O * O  # J, H_o J and their product; H_o
    check_dense(per, spec.dtype, spec.device, call=call, max_memory=max_memory,
                what=f"one sample's {O} x {spec.numel} Jacobian (three arrays of its size) "
                f"and {O} x {O} output Hessian",
                hint="use per_sample=False (the batch's diagonal) or fewer parameters")
    return max(1, min(n, memory_limit(max_memory, spec.device, call)
                      // (per * itemsize(spec.dtype))))


def ggn_diag(g: Callable[..., Any], loss_fn: Callable[..., Any], *, per_sample: bool = False,
             max_memory: int | None = None) -> Callable[..., Any]:
    """The exact diagonal of the GGN, structured like ``params``.

    ``diag(G)_i = sum_(o, o') J_oi (H_o)_oo' J_o'i``, from the ``(O, P)`` Jacobian and
    the ``(O, O)`` output Hessian (memory-guarded). With ``per_sample=True`` the result has
    a leading dimension ``N``: row ``n`` is the GGN diagonal of sample ``n``'s own loss,
    ``loss_fn(g(params, inputs[n:n+1]), targets[n:n+1])``.

    Example (``g = (w x, w^2)`` and ``L = sum o^2 / 2``: ``H_o = I``, ``J = (x, 2w)``, so
    ``G = x^2 + 4 w^2 = 4 + 4``):
        >>> g = lambda p, x: torch.stack([p["w"] * x, p["w"] ** 2])
        >>> loss = lambda o, y: 0.5 * (o ** 2).sum()
        >>> ggn_diag(g, loss)({"w": torch.tensor(1.0)}, torch.tensor(2.0), None)
        {'w': tensor(8.)}
    """
    call = "ggn_diag"
    _checked(g, loss_fn, call)
    composed = GGNLoss.of(g, loss_fn)  # NOTE [Gauss-Newton over the graph]

    def dense_diag(params: Any, x: Any, y: Any) -> Any:
        J, Ho = _jacobian_and_output_hessian(g, loss_fn, params, x, y, call, max_memory, False)
        return vector_to_tree((J * (Ho @ J)).sum(0), flat_spec(params))

    def diag_f(params: Any, x: Any, y: Any) -> Any:
        check_floating(params, "params", call)
        if per_sample:
            n = check_samples_first((x, y), call)
        plan, _ = plan_ggn_diagonal(composed, (params, x, y), per_sample=per_sample, call=call)
        if plan is not None:
            if len(plan.model_outputs()) == 1:  # the loss's Hessian in closed form, if known
                plan.output_factor = lambda out: output_factor(loss_fn, out, y, per_sample)
            return pytree.tree_unflatten(plan.diagonal(), pytree.tree_structure(params))
        if per_sample:
            return _per_sample(dense_diag, params, x, y,
                               _samples_at_once(g, params, x, n, call, max_memory))
        return dense_diag(params, x, y)

    return diag_f


# -------------------------------------------------------------------- Fisher
_KNOWN: list[tuple[Any, str]] = [
    (nn.MSELoss, "gaussian"), (F.mse_loss, "gaussian"),
    (nn.CrossEntropyLoss, "categorical"), (F.cross_entropy, "categorical"),
    (nn.NLLLoss, "log-categorical"), (F.nll_loss, "log-categorical"),
    (nn.BCEWithLogitsLoss, "bernoulli"), (F.binary_cross_entropy_with_logits, "bernoulli"),
]


def _known(loss_fn: Any) -> str | None:
    """The likelihood of ``loss_fn`` when it is one of torch's losses above, else None."""
    return next((name for kind, name in _KNOWN
                 if (isinstance(kind, type) and isinstance(loss_fn, kind)) or loss_fn is kind),
                None)


def separable(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is one of torch's losses above (with any class weights and a
    mean or sum reduction): a sum of per-sample terms, so its Hessian at the outputs is
    block-diagonal over samples."""
    return _known(loss_fn) is not None and \
        getattr(loss_fn, "reduction", "mean") in ("mean", "sum")


def _closed_form(loss_fn: Any, out: torch.Tensor, y: Any, own: bool
                 ) -> tuple[str, float, torch.Tensor | None] | None:
    """``(likelihood, c, p)`` where :func:`output_factor` has a closed form (``p`` the
    softmax or sigmoid of the outputs, None for MSE), else None."""
    lik = _known(loss_fn)
    red = getattr(loss_fn, "reduction", "mean")
    if lik not in ("gaussian", "categorical", "bernoulli") or red not in ("mean", "sum") or \
            not isinstance(y, torch.Tensor) or out.dim() != 2 or \
            getattr(loss_fn, "weight", None) is not None or \
            getattr(loss_fn, "pos_weight", None) is not None:
        return None
    c, s = scale(lik, red, out)
    c = s if own else c
    if lik == "gaussian":
        return None if y.shape != out.shape else (lik, c, None)  # broadcasting targets
    if lik == "bernoulli":
        return lik, c, torch.sigmoid(out)
    if y.shape != (out.shape[0],) or y.is_floating_point() or \
            (y == getattr(loss_fn, "ignore_index", -100)).any():
        return None
    return lik, c, torch.softmax(out, dim=1)


def output_factor(loss_fn: Any, out: torch.Tensor, y: Any, own: bool = False
                  ) -> torch.Tensor | None:
    """``S`` ``(N, C, C)`` with ``S_n S_n^T`` the loss's Hessian at outputs ``(N, C)``
    (``c H(l_n)``, or with ``own`` the given loss of sample ``n`` alone, ``s H(l_n)``), in
    closed form for torch's MSE, cross-entropy with class targets (none ignored) and
    BCE-with-logits without weights; None for any other loss, shape or target:

    * MSE: ``H(l_n) = 2 I``, ``S_n = (2c)^(1/2) I``;
    * cross-entropy: ``H(l_n) = diag(p) - p p^T`` (``p = softmax(o_n)``; label smoothing
      leaves it, the smoothed targets summing to 1), ``S_n = c^(1/2) (diag(p^(1/2)) -
      p (p^(1/2))^T)``, since ``sum p = 1``;
    * BCE-with-logits: ``H(l_n) = diag(sigma (1 - sigma))``.
    """
    form = _closed_form(loss_fn, out, y, own)
    if form is None:
        return None
    lik, c, p = form
    n, width = out.shape
    if lik == "gaussian":
        eye = torch.eye(width, dtype=out.dtype, device=out.device)
        return (2 * c) ** 0.5 * eye.expand(n, width, width)
    if lik == "bernoulli":
        return torch.diag_embed((c * p * (1 - p)).sqrt())
    root = p.sqrt()
    return c ** 0.5 * (torch.diag_embed(root) - p[:, :, None] * root[:, None, :])


def output_product(loss_fn: Any, out: torch.Tensor, y: Any
                   ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``u -> c H(l_n) u_n`` for ``u`` ``(N, C)``, by the closed forms of
    :func:`output_factor` in ``O(N C)`` (the factor's ``S (S^T u)`` costs ``O(N C^2)``):
    ``2 c u`` (MSE), ``c (p u - p <p, u>)`` (cross-entropy), ``c sigma (1 - sigma) u``
    (BCE-with-logits); None where that has no closed form."""
    form = _closed_form(loss_fn, out, y, own=False)
    if form is None:
        return None
    lik, c, p = form
    if lik == "gaussian":
        return lambda u: (2 * c) * u
    if lik == "bernoulli":
        curvature = c * p * (1 - p)
        return lambda u: curvature * u
    return lambda u: c * p * (u - (p * u).sum(1, keepdim=True))


def output_hessian_blocks(loss: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor
                          ) -> torch.Tensor:
    """``(N, C, C)``: the diagonal blocks of ``loss``'s Hessian at outputs ``(N, C)``, for
    a loss that is a sum of per-sample terms (:func:`separable`): one batched double
    backward with the tangent ``e_c`` on every sample at once, ``C`` columns."""
    width = out[0].numel()
    basis = torch.eye(width, dtype=out.dtype, device=out.device).reshape(width, 1, *out.shape[1:])
    o = out.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(o), o, create_graph=True)
        if not grad.requires_grad:  # the loss is linear in its outputs
            return out.new_zeros(out.shape[0], width, width)
        (cols,) = batched_vjp(grad, [o], basis.expand(width, *out.shape))
    return cols.reshape(width, out.shape[0], width).permute(1, 2, 0)  # from (C, N, ...)


def likelihood_of(loss_fn: Any, likelihood: str | None, reduction: str | None, call: str
                  ) -> tuple[str, str]:
    """The likelihood and reduction of ``loss_fn``: recognised for torch's MSE,
    cross-entropy, NLL and BCE-with-logits losses (modules or functions), else stated."""
    found = _known(loss_fn)
    red = getattr(loss_fn, "reduction", "mean") if found is not None else None
    if found is not None and (getattr(loss_fn, "weight", None) is not None
                              or getattr(loss_fn, "pos_weight", None) is not None):
        raise ArgumentError(f"{call}: `loss_fn` {loss_fn!r} has class weights; the "
                            "Fisher needs a plain negative log-likelihood (no `weight` "
                            "or `pos_weight`).")
    if likelihood is not None:
        if likelihood not in LIKELIHOODS:
            raise ArgumentError(f"{call}: `likelihood` must be one of {LIKELIHOODS}, got "
                                f"{likelihood!r}.")
        found = likelihood
    red = reduction if reduction is not None else (red or "mean")
    if found is None:
        raise ArgumentError(
            f"{call}: `loss_fn` {loss_fn!r} has no probabilistic interpretation hessfunc "
            "knows; the Fisher is defined for negative log-likelihoods: MSE (Gaussian), "
            "cross-entropy (categorical), NLL of log-probabilities (categorical) and "
            "BCE-with-logits (Bernoulli), as torch.nn modules or torch.nn.functional "
            "functions. For a wrapper of one of those, pass `likelihood=` (one of "
            f"{LIKELIHOODS}) and `reduction=`."
        )
    if red not in ("mean", "sum"):
        raise ArgumentError(f"{call}: the loss's reduction must be 'mean' or 'sum', got {red!r}.")
    return found, red


def nll_gradient(likelihood: str, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d l(o, y) / d o`` for ``l = -log p(y | o) + const`` of each sample (summed over
    its elements), for outputs with leading sample axes (the class axis last for the
    categorical likelihoods), in closed form:

    - Gaussian, ``l = ||o - y||^2``: ``2 (o - y)``;
    - categorical (logits), ``l = -log softmax(o)_y``: ``softmax(o) - e_y``;
    - log-categorical (log-probabilities), ``l = -o_y``: ``-e_y``;
    - Bernoulli (logits), BCE-with-logits: ``sigmoid(o) - y``.
    """
    if likelihood == "gaussian":
        return 2 * (o - y)
    if likelihood == "bernoulli":
        return torch.sigmoid(o) - y
    onehot = F.one_hot(y.long(), o.shape[-1]).to(o.dtype)
    if likelihood == "categorical":
        return torch.softmax(o, dim=-1) - onehot
    return -onehot


def scale(likelihood: str, reduction: str, out: torch.Tensor) -> tuple[float, float]:
    """``(c, s)``: the loss is ``c sum_n l_n``, and the given loss of one sample alone is
    ``s l_n`` (module docstring)."""
    if reduction == "sum":
        return 1.0, 1.0
    if likelihood in ("categorical", "log-categorical"):
        return 1.0 / out.shape[0], 1.0
    per_sample = out[0].numel() if out.dim() > 0 else 1
    return 1.0 / out.numel(), 1.0 / per_sample


def draw(likelihood: str, out: torch.Tensor, generator: torch.Generator | None
         ) -> torch.Tensor:
    """One label per sample from ``p(. | o_n)``, for outputs ``(N, ...)`` (``(N, C)`` for the
    categorical likelihoods)."""
    if likelihood == "gaussian":
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        return out + noise * 0.5 ** 0.5
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(out), generator=generator)
    probs = torch.softmax(out, dim=1) if likelihood == "categorical" else out.exp()
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def draws(likelihood: str, out: torch.Tensor, mc_samples: int,
          generator: torch.Generator | None) -> torch.Tensor:
    """``mc_samples`` labels per sample, ``(mc_samples, *labels of one draw)``: draw ``k``
    is one label for every sample, in sample order."""
    return torch.stack([draw(likelihood, out, generator) for _ in range(mc_samples)])


def fisher_columns(loss_fn: Callable[..., Any], likelihood: str, reduction: str,
                   kind: Literal["mc", "empirical"], out: torch.Tensor, y: Any,
                   mc_samples: int, generator: torch.Generator | None,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The Fisher's factor at the outputs: ``E`` ``(K, *out.shape)`` and a weight ``w``
    with ``M_n = w sum_k E_kn E_kn^T`` (module docstring): ``K = mc_samples`` gradients
    of the negative log-likelihood at labels drawn from ``p(. | o_n)`` (:func:`draws`, or
    ``labels`` drawn before), or the given loss's gradient at the true labels (``K = 1``)."""
    c, s = scale(likelihood, reduction, out)
    out = out.detach()
    if kind == "empirical":
        def given(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return loss_fn(o.unsqueeze(0), t.unsqueeze(0)).reshape(())

        return torch.func.vmap(torch.func.grad(given))(out, y).unsqueeze(0), c / s ** 2
    if labels is None:
        labels = draws(likelihood, out, mc_samples, generator)
    E = nll_gradient(likelihood, out.expand(labels.shape[0], *out.shape), labels)
    return E, c / labels.shape[0]


def fisher_diag(g: Callable[..., Any], loss_fn: Callable[..., Any], *,
                kind: Literal["mc", "empirical"] = "mc", mc_samples: int = 1,
                generator: torch.Generator | None = None, likelihood: str | None = None,
                reduction: str | None = None) -> Callable[..., Any]:
    """The diagonal of the Monte-Carlo or the empirical Fisher, structured like ``params``.

    Definitions in the module docstring (:mod:`hessfunc.ggn`): with ``kind="mc"``,
    ``c sum_n (1/M) sum_m (grad_p l(o_n, yhat_nm))^2`` with ``yhat_nm ~ p(. | o_n)``
    drawn from ``generator`` (``M = mc_samples``; draw ``m`` is one label for every sample,
    in sample order); unbiased for ``diag(F)``, which equals ``diag(GGN)`` for MSE,
    cross-entropy and BCE-with-logits. With ``kind="empirical"``, the true labels in place
    of the draws, through the given loss: ``(w / s) sum_n (grad_p loss_fn(o_n, y_n))^2``.

    Args:
        g: ``g(params, inputs) -> outputs`` (first dimension: samples).
        loss_fn: a torch MSE, cross-entropy, NLL or BCE-with-logits loss (module or
            function); for another callable that is one of these, say which with
            ``likelihood`` (one of :data:`LIKELIHOODS`) and ``reduction``.
        kind: ``"mc"`` or ``"empirical"``.
        mc_samples: draws per sample (``kind="mc"``).
        generator: the source of the draws (reproducible for the same state).

    Example (``g = w x``, MSE on one sample at ``y = w x``: the empirical Fisher is 0, and
    the Fisher is ``2 x^2 = 8``):
        >>> g = lambda p, x: p["w"] * x
        >>> p, x = {"w": torch.tensor(1.0)}, torch.tensor([[2.0]])
        >>> fisher_diag(g, torch.nn.MSELoss(), kind="empirical")(p, x, x)
        {'w': tensor(0.)}
        >>> gen = torch.Generator().manual_seed(0)
        >>> est = fisher_diag(g, torch.nn.MSELoss(), mc_samples=20000, generator=gen)(p, x, x)
        >>> abs(float(est["w"]) - 8.0) < 0.3
        True
    """
    call = "fisher_diag"
    _checked(g, loss_fn, call)
    if kind not in ("mc", "empirical"):
        raise ArgumentError(f"{call}: `kind` must be 'mc' or 'empirical', got {kind!r}.")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ArgumentError(f"{call}: `mc_samples` must be an int >= 1 (draws per sample), got "
                            f"{mc_samples!r}.")
    lik, red = likelihood_of(loss_fn, likelihood, reduction, call)
    composed = GGNLoss.of(g, loss_fn)  # the captured graph, with the Fisher's factor at the outputs

    def columns(out: torch.Tensor, y: Any) -> tuple[torch.Tensor, float]:
        return fisher_columns(loss_fn, lik, red, kind, out.detach(), y, mc_samples, generator)

    def sample_grad_sq(params: Any, x: Any, y: Any) -> torch.Tensor:
        """``w sum_(n, k) (J_n^T E_kn)^2`` by per-sample vector-Jacobian products (by
        ``row_grad_sq`` where the output rows are not the samples, or where ``vmap``
        cannot evaluate the model one sample at a time)."""
        with torch.no_grad():
            out = _output(g, params, x, call)
        E, w = columns(out, y)
        if any(t.dim() == 0 or t.shape[0] != out.shape[0] for t in pytree.tree_leaves(x)):
            return row_grad_sq(params, x, E) * w

        def one(p: Any, xi: Any, e: torch.Tensor) -> torch.Tensor:
            _, pull = torch.func.vjp(
                lambda q: _output(g, q, pytree.tree_map(lambda t: t.unsqueeze(0), xi), call),
                p)
            (grad,) = pull(e.unsqueeze(0))
            return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(grad)])

        spec = flat_spec(params)
        chunk = max(1, CHUNK_BUDGET_BYTES // (4 * spec.numel * itemsize(spec.dtype)))
        total = 0
        try:
            for e in E:
                rows = torch.func.vmap(one, in_dims=(None, 0, 0), chunk_size=chunk)(params, x,
                                                                                    e)
                total = total + rows.square().sum(0)
        except (RuntimeError, ValueError):
            # a model vmap cannot run per sample (an LSTM's in-place ops), or one that
            # needs the batch (BatchNorm in training mode): each row through the batch
            return row_grad_sq(params, x, E) * w
        return total * w

    def row_grad_sq(params: Any, x: Any, E: torch.Tensor) -> torch.Tensor:
        """``sum_(r, k) (J_r^T E_kr)^2`` for output rows ``r`` that are not the samples (a
        sequence model's positions) or that depend on the whole batch: each row's
        gradient is a vector-Jacobian product of the whole batch's output with that
        row's column alone."""
        with second_order_kernels():  # attention's math kernel, which vmap batches
            _, pull = torch.func.vjp(lambda q: _output(g, q, x, call), params)
        R = E.shape[1]
        spec = flat_spec(params)
        chunk = max(1, CHUNK_BUDGET_BYTES // (4 * (spec.numel + E[0].numel())
                                               * itemsize(spec.dtype)))

        def one(cotangent: torch.Tensor) -> torch.Tensor:
            return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(pull(cotangent)[0])])

        total = 0
        for e in E:
            for lo in range(0, R, chunk):
                rows = torch.arange(lo, min(R, lo + chunk))
                cotangents = e.new_zeros(len(rows), *e.shape)
                cotangents[torch.arange(len(rows)), rows] = e[rows]
                total = total + torch.func.vmap(one)(cotangents).square().sum(0)
        return total

    def fisher_f(params: Any, x: Any, y: Any) -> Any:
        check_floating(params, "params", call)
        plan, _ = plan_ggn_diagonal(composed, (params, x, y), call=call)
        if plan is not None and len(plan.model_outputs()) == 1:
            def factor(out: torch.Tensor) -> torch.Tensor:
                E, w = columns(out, y)
                return E.movedim(0, -1) * w ** 0.5

            plan.output_factor = factor
            return pytree.tree_unflatten(plan.diagonal(), pytree.tree_structure(params))
        return vector_to_tree(sample_grad_sq(params, x, y), flat_spec(params))

    return fisher_f
