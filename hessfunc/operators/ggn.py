"""``GGNOperator`` and ``FisherOperator``: Gauss-Newton and Fisher matrices over a data set.

Both are :class:`hessfunc.operators.base.CurvatureOperator` subclasses (the base of
:class:`hessfunc.HessianOperator`): the same data handling, batch weights, process group,
estimators, ``solve`` and scipy adapter. Each batch ``b`` contributes ``J_b^T M_b J_b``
(``J_b`` the Jacobian of the model's outputs on the batch), applied matrix-free as a
forward-mode product, the output matrix ``M_b``, and a reverse-mode product (where the
model's captured graph is a chain of layers, the chain's R-operator without its
second-order terms, NOTE [structured products]; else the model linearised once):

* GGN: ``M_b = d^2 f_b / do^2``, the loss's Hessian in its outputs (reverse-over-reverse,
  NOTE [ZeroTensor trap] in hessfunc/products.py);
* Fisher (definitions and scales in :mod:`hessfunc.ggn`):
  ``M_b = alpha sum_k diag_n(e_kn e_kn^T)``, block-diagonal over samples, with
  ``e_kn = d l(o_n, yhat_kn) / do_n`` for ``K = mc_samples`` draws
  ``yhat_kn ~ p(. | o_n)`` and ``alpha = c / K`` (``kind="mc"``), or ``K = 1`` and
  ``e_n = d loss_fn(o_n, y_n) / do_n`` with ``alpha = c / s^2`` (``kind="empirical"``).

The Monte-Carlo draws are made once per batch, on first use, from the operator's
``generator`` (``seed``), in the order :func:`hessfunc.fisher_diag` draws them, and kept: the
operator is one fixed symmetric positive semi-definite matrix, the same on every pass.
Under a process group every rank draws for its own shard from the same seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.func
from torch import nn
from torch.utils import _pytree as pytree

from .._autodiff import forward_ad_gap, second_order_kernels
from .._checks import check_callable
from .._memory import check_dense
from .._tree import flat_spec, vector_to_tree
from ..errors import ArgumentError
from ..functional import functionalize
from ..ggn import (
    _loss_of,
    draws,
    fisher_columns,
    ggn,
    ggn_diag,
    likelihood_of,
    no_random_draws,
    output_product,
    random_draws_error,
    reverse_jvp,
    without_rows,
)
from ..graph.chain import RANDOM_MODEL, model_chain
from ..graph.chain_plan import _Add, _Conv, _Elementwise, _Flatten, _Linear
from ..graph.chain_products import ChainProducts
from ..graph.curvature import padding_rows, through_checkpoints
from .base import CurvatureOperator

__all__ = ["GGNOperator", "FisherOperator"]


class _BatchProduct:
    """``v -> J^T M J v`` on one batch, ``M`` given by ``output_product(u)``.

    ``J v`` comes from the model linearised once (``torch.func.linearize``: the primal
    values are kept and each product runs the tangent ops alone, 0.5-0.6 gradients
    against 1.1-1.6 for a fresh ``jvp``, which recomputes the primal); ``J^T u`` from the
    kept ``vjp``. Where the model cannot be traced for that, or draws its fixed random
    numbers inside each call (``randomness="fixed"``: a trace would not replay that
    draw), a fresh ``jvp`` each time."""

    def __init__(self, g: Callable[..., Any], params: Any, x: Any,
                 output_product: Callable[[torch.Tensor], torch.Tensor], call: str):
        self._params, self._call = params, call
        with no_random_draws(call), second_order_kernels():
            model, (self._out, self._vjp) = through_checkpoints(
                lambda g: torch.func.vjp(lambda p: g(p, x), params), g, (params, x))
        self._model = lambda p: model(p, x)
        self._output_product = output_product
        self._rows = padding_rows(g, params, x)  # tangents autograd's J has no column for
        self._jvp: Callable[[Any], torch.Tensor] | None = None
        self._transposed: Callable[[Any], torch.Tensor] | None = None
        if getattr(g, "seed", None) is not None:  # a FunctionalModel with a fixed draw
            self._jvp = self._fresh_jvp

    def _tangent(self, tree: Any) -> torch.Tensor:
        if self._jvp is None:
            try:
                with warnings.catch_warnings(), second_order_kernels():
                    # torch's own constant folding inside
                    warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node")
                    _, self._jvp = torch.func.linearize(self._model, self._params)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                self._jvp = self._fresh_jvp
        try:
            return self._jvp(tree)
        except (RuntimeError, NotImplementedError) as exc:
            if forward_ad_gap(exc) is None:
                raise
            self._jvp = self._reverse_jvp
            return self._jvp(tree)

    def _fresh_jvp(self, tree: Any) -> torch.Tensor:
        with second_order_kernels():
            return torch.func.jvp(self._model, (self._params,), (tree,))[1]

    def _reverse_jvp(self, tree: Any) -> torch.Tensor:
        """``J v`` without forward mode, for models with an op torch has no forward-mode
        rule for (weight normalisation): ``u -> J^T u`` is linear, its own vector-Jacobian
        product at any ``u`` is ``J`` (:func:`hessfunc.ggn.reverse_jvp`)."""
        if self._transposed is None:
            self._transposed = reverse_jvp(self._vjp, self._out, self._call)
        return self._transposed(tree)

    def _product(self, tree: Any) -> Any:
        return self._vjp(self._output_product(self._tangent(without_rows(tree, self._rows))))[0]

    def batched(self, trees: Any) -> Any:
        # a model with one fixed draw (randomness="fixed") seeds it inside each call
        try:
            return torch.func.vmap(self._product, randomness="same")(trees)
        except (RuntimeError, NotImplementedError):
            # torch without a batched rule for an op of the model (GroupNorm's tangents on
            # torch 2.13): the same products one column at a time
            k = pytree.tree_leaves(trees)[0].shape[0]
            columns = [self._product(pytree.tree_map(lambda t, j=j: t[j], trees))
                       for j in range(k)]
            return pytree.tree_map(lambda *c: torch.stack(c), *columns)


#: the chain steps whose Gauss-Newton products beat the linearised model's
_GAUSS_NEWTON_STEPS = (_Linear, _Conv, _Flatten, _Elementwise, _Add)


class _ChainProduct:
    """``v -> J^T M J v`` on one batch by the chain of layers in the model's captured
    graph (NOTE [structured products], in its Gauss-Newton form): the tangent forward
    pass and the backward pass on cached activations, without the linearised model's op
    by op replay (docs/benchmarks.md). ``_output_product`` is ``M``, set by the operator."""

    def __init__(self, plan: Any):
        self._out = plan.output
        self._plan = plan
        self._output_product: Callable[[torch.Tensor], torch.Tensor] = lambda u: u
        self._chain: ChainProducts | None = None

    def _product(self, tree: Any) -> Any:
        if self._chain is None:
            self._chain = ChainProducts(self._plan, output_matrix=lambda u: self._output_product(u))
        return self._chain(tree)

    batched = _product  # ``{name: (k, *shape)}``: the same products with a k axis


def _batch_product(g: Callable[..., Any], loss_fn: Callable[..., Any], params: Any, x: Any,
                   y: Any, call: str) -> _ChainProduct | _BatchProduct:
    """The chain's products where ``g(params, x)`` is a chain of Linear layers,
    convolutions, flattening views, elementwise maps and skip connections (parameters a
    dict, ``x`` one tensor), else the linearised model's. A chain with the other steps
    (scales, linear maps, maps without a rule) takes the linearised model too: its
    Gauss-Newton products measured faster there (per product, in gradients, chain against
    linearised: the benchmark ResNet in eval mode 1.94 / 1.54, in training mode 2.49 /
    1.52, two LayerNorms 2.52 / 1.81; docs/benchmarks.md)."""
    plan, why = model_chain(g, params, x, lambda o: loss_fn(o, y))
    if plan is not None and all(isinstance(s, _GAUSS_NEWTON_STEPS) for s in plan.steps):
        return _ChainProduct(plan)
    if why == RANDOM_MODEL:
        raise random_draws_error(call)
    return _BatchProduct(g, params, x, lambda u: u, call)


class GGNOperator(CurvatureOperator):
    """The data-set generalized Gauss-Newton ``G = sum_b w_b J_b^T H_o,b J_b`` as a
    ``(P, P)`` linear operator, with :class:`hessfunc.HessianOperator`'s interface.

    Args:
        g: ``g(params, inputs) -> outputs`` (e.g. ``functionalize(model)``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` of one batch.
        params: the point, a dict (or tree) of floating tensors.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        **kwargs: ``reduction`` (the loss's, ``"mean"`` or ``"sum"``), ``progress``,
            ``cache``, ``process_group``: as for :class:`hessfunc.HessianOperator`.

    Example (a linear model ``o = w x`` with a squared error: ``G = H = 2 sum x^2``):
        >>> g = lambda p, x: p["w"] * x
        >>> loss = lambda o, y: ((o - y) ** 2).sum()
        >>> G = GGNOperator(g, loss, {"w": torch.ones(1)}, (torch.tensor([1.0, 2.0]),
        ...                 torch.zeros(2)), reduction="sum")
        >>> G @ torch.ones(1), G.to_dense()
        (tensor([10.]), tensor([[10.]]))
    """

    _what = "GGN"

    def __init__(self, g: Callable[..., Any], loss_fn: Callable[..., Any], params: Any,
                 data: Any, **kwargs: Any):
        check_callable(g, "g", type(self).__name__)
        check_callable(loss_fn, "loss_fn", type(self).__name__)
        self.g, self.loss_fn = g, loss_fn

        def f(p: Any, x: Any, y: Any) -> torch.Tensor:
            return loss_fn(g(p, x), y)

        super().__init__(f, params, data, **kwargs)

    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[..., Any], data: Any,
                   **kwargs: Any) -> Any:
        """The operator of ``loss_fn(model(inputs), targets)`` at the model's parameters."""
        g, params = functionalize(model)
        return cls(g, loss_fn, params, data, **kwargs)

    def _build_product(self, index: int, x: Any, y: Any) -> _ChainProduct | _BatchProduct:
        batch = _batch_product(self.g, self.loss_fn, self.params, x, y, self._name)
        product = output_product(self.loss_fn, batch._out.detach(), y)  # H_o u, O(N C)
        if product is not None:
            batch._output_product = product
            return batch
        _, hvp = torch.func.vjp(torch.func.grad(_loss_of(self.loss_fn, y, self._name)),
                                batch._out)
        batch._output_product = lambda u: hvp(u)[0]
        return batch

    def _dense_function(self, chunk_size: int | None, max_memory: int | None
                        ) -> Callable[[Any, Any, Any, int], torch.Tensor]:
        dense = ggn(self.g, self.loss_fn, flat=True, max_memory=max_memory)
        return lambda p, x, y, i: dense(p, x, y)

    def _diagonal_function(self, chunk_size: int | None) -> Callable[[Any, Any, Any, int], Any]:
        diag = ggn_diag(self.g, self.loss_fn)
        return lambda p, x, y, i: diag(p, x, y)


class FisherOperator(GGNOperator):
    """The data-set Fisher (Monte-Carlo or empirical) as a ``(P, P)`` linear operator, with
    :class:`hessfunc.HessianOperator`'s interface (module docstring for the matrix).

    Args:
        g: ``g(params, inputs) -> outputs``, as for :class:`GGNOperator`.
        loss_fn: a torch MSE, cross-entropy, NLL or BCE-with-logits loss.
        params: the point, as for :class:`GGNOperator`.
        data: the batches, as for :class:`GGNOperator`.
        kind: ``"mc"`` (labels drawn from the model's predictive distribution; its
            expectation is the Fisher, which is the GGN for MSE, cross-entropy and
            BCE-with-logits) or ``"empirical"`` (the true labels).
        mc_samples: draws per sample (``kind="mc"``).
        generator: the source of the draws.
        seed: or a seed for a fresh generator (not both).
        likelihood: for a loss hessfunc does not recognise (:func:`hessfunc.fisher_diag`).
        reduction: the loss's reduction, which also weighs the batches (default: the
            loss's own).
        **kwargs: ``progress``, ``cache``, ``process_group`` (:class:`GGNOperator`).

    Example (``o = w x`` with MSE on one sample at ``y = w x``: the empirical Fisher is 0):
        >>> g = lambda p, x: p["w"] * x
        >>> x = torch.tensor([[2.0]])
        >>> F = FisherOperator(g, torch.nn.MSELoss(), {"w": torch.tensor(1.0)}, (x, x),
        ...                    kind="empirical")
        >>> F.to_dense()
        tensor([[0.]])
    """

    _what = "Fisher"

    def __init__(self, g: Callable[..., Any], loss_fn: Callable[..., Any], params: Any,
                 data: Any, *, kind: Literal["mc", "empirical"] = "mc", mc_samples: int = 1,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 likelihood: str | None = None, reduction: str | None = None,
                 **kwargs: Any):
        call = type(self).__name__
        if kind not in ("mc", "empirical"):
            raise ArgumentError(f"{call}: `kind` must be 'mc' or 'empirical', got {kind!r}.")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ArgumentError(f"{call}: `mc_samples` must be an int >= 1 (draws per sample), "
                                f"got {mc_samples!r}.")
        if generator is not None and seed is not None:
            raise ArgumentError(f"{call}: pass `generator` or `seed`, not both.")
        self.kind, self.mc_samples = kind, mc_samples
        self._likelihood, self._loss_reduction = likelihood_of(loss_fn, likelihood, reduction,
                                                               call)
        self._draw_generator = generator
        self._seed = seed
        self._labels: dict[int, torch.Tensor] = {}
        kwargs.setdefault("reduction", self._loss_reduction)  # the batches weigh as the loss
        super().__init__(g, loss_fn, params, data, **kwargs)
        if seed is not None:
            self._draw_generator = torch.Generator(device=self.device).manual_seed(seed)

    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[..., Any], data: Any,
                   **kwargs: Any) -> Any:
        """The operator of ``loss_fn(model(inputs), targets)`` at the model's parameters."""
        g, params = functionalize(model)
        return cls(g, loss_fn, params, data, **kwargs)

    def _directions(self, index: int, out: torch.Tensor, y: Any
                    ) -> tuple[torch.Tensor, float]:
        """``E`` ``(K, *out.shape)``: the output gradients ``e_kn``, and ``alpha``."""
        if self.kind == "mc" and index not in self._labels:  # fixed per batch
            self._labels[index] = draws(self._likelihood, out.detach(), self.mc_samples,
                                        self._draw_generator)
        return fisher_columns(self.loss_fn, self._likelihood, self._loss_reduction, self.kind,
                              out, y, self.mc_samples, None, labels=self._labels.get(index))

    def _build_product(self, index: int, x: Any, y: Any) -> _ChainProduct | _BatchProduct:
        batch = _batch_product(self.g, self.loss_fn, self.params, x, y, self._name)
        E, alpha = self._directions(index, batch._out, y)
        n = E.shape[1]

        def fisher_product(u: torch.Tensor) -> torch.Tensor:
            dots = (E * u).reshape(E.shape[0], n, -1).sum(-1)  # (K, N)
            return alpha * (E * dots.reshape(dots.shape + (1,) * (E.dim() - 2))).sum(0)

        batch._output_product = fisher_product
        return batch

    def _per_sample_rows(self, p: Any, x: Any, y: Any, i: int, max_memory: int | None
                         ) -> tuple[torch.Tensor, float]:
        """``R`` ``(K, N, P)`` with ``R_kn = J_n^T e_kn``, and ``alpha``."""
        spec = flat_spec(p)
        out = self.g(p, x)
        O, P = out.numel(), spec.numel
        check_dense(O * P, spec.dtype, spec.device, what=f"the {O} x {P} Jacobian",
                    call=f"{self._name}", max_memory=max_memory,
                    hint="split the data into smaller batches")
        _, jac = through_checkpoints(lambda g: torch.func.jacrev(lambda q: g(q, x))(p),
                                     self.g, (p, x))
        J = torch.cat([t.reshape(O, -1) for t in pytree.tree_leaves(jac)], dim=1)
        E, alpha = self._directions(i, out, y)
        n = out.shape[0]
        R = (E.reshape(E.shape[0], n, -1, 1) * J.reshape(1, n, -1, P)).sum(2)
        return R, alpha

    def _dense_function(self, chunk_size: int | None, max_memory: int | None
                        ) -> Callable[[Any, Any, Any, int], torch.Tensor]:
        def dense(p: Any, x: Any, y: Any, i: int) -> torch.Tensor:
            R, alpha = self._per_sample_rows(p, x, y, i, max_memory)
            R = R.reshape(-1, R.shape[-1])
            return alpha * (R.T @ R)

        return dense

    def _diagonal_function(self, chunk_size: int | None) -> Callable[[Any, Any, Any, int], Any]:
        def diagonal(p: Any, x: Any, y: Any, i: int) -> Any:
            R, alpha = self._per_sample_rows(p, x, y, i, None)
            return vector_to_tree(alpha * R.square().sum((0, 1)), flat_spec(p))

        return diagonal
