"""``HessianOperator``: the Hessian of a loss over a whole data set as a linear operator.

For data split into batches ``B_1..B_m`` and ``f(params, x_b, y_b)`` the loss of one
batch, ``H = d^2 L / d params^2`` of ``L = sum_b w_b f_b`` (weights and their caveats in
:mod:`hessfunc.operators.data`): with ``reduction="mean"`` exactly the full-batch loss's
Hessian when ``f`` is a plain mean over its samples (not, e.g., cross-entropy with class
weights or ``ignore_index``, whose mean divides by a data-dependent total: use
``reduction="sum"`` with a summed loss).

NOTE [data span]: when every batch takes the structured route (a chain of Linear
layers and activations, NOTE [structured products]), the first trainable layer's
weight ``W`` (``d_out x d_in``) enters the loss only through ``a W^T``, with ``a``
its inputs, which do not depend on the parameters. Let ``U`` (``d_in x r``) have
orthonormal columns spanning the rows of all batches' ``a`` stacked (``r <= N``),
and ``B`` map ``W -> W U``, leaving the other parameters alone; ``B B^T = I``. Then
``H = B^T H_r B``, where ``H_r`` is the Hessian in the coordinates ``W U``: the
eigenvalues of ``H`` are those of ``H_r`` and ``P - P_r`` zeros, and an eigenvector
``v`` of ``H_r`` gives the eigenvector ``B^T v`` of ``H``. When the data set has
fewer samples than the layer has inputs (``N <= 0.7 d_in``, the ratio in
``hessfunc._thresholds``), ``eigenvalues`` runs Lanczos on ``H_r``: each product then
costs ``r / d_in`` of the first layer's share, and the Krylov basis is ``P_r / P`` as
long. It falls back to ``H`` itself
when the zeros could be among the wanted eigenvalues (the ``k``-th wanted
eigenvalue of ``H_r`` is not on the wanted side of 0). ``spectral_density`` runs
its quadrature on ``H_r`` too, and adds the zeros as one exact node of weight
``(P - P_r) / P``. ``data_span=False`` turns both off.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import _thresholds
from .._distributed import Group
from .._tree import FlatSpec, flat_spec, tree_to_vector, vector_to_tree
from ..dense import hessian
from ..diagonal import hessian_diag
from ..functional import functionalize
from ..graph.chain_products import ChainProducts
from ..products import HVPFunction
from .base import CurvatureOperator

__all__ = ["HessianOperator"]


class _DataSpan(NamedTuple):
    """The restricted Hessian ``H_r`` of NOTE [data span]."""

    name: str                                   # the first layer's weight
    reflectors: tuple[torch.Tensor, torch.Tensor]  # geqrf of the stacked inputs^T: U, lazily
    spec: FlatSpec                              # of the restricted parameters
    products: list[tuple[float, ChainProducts]]  # (batch weight, H_r of this rank's batch)
    group: Group                                # the ranks H_r sums over

    @property
    def basis(self) -> torch.Tensor:
        """``U`` ``(d_in, r)``, formed from the Householder reflectors when needed (only
        eigenvectors need it: the products use ``a U = R^T``)."""
        return torch.linalg.householder_product(*self.reflectors)

    @property
    def size(self) -> int:
        return self.spec.numel

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H_r V`` for ``V`` of shape ``(P_r, k)``."""
        k = V.shape[1]
        trees = vector_to_tree(V[:, 0] if k == 1 else V.T, self.spec)

        def fill(total: torch.Tensor) -> None:
            for w, H in self.products:
                out = tree_to_vector(H(trees)) if k == 1 else torch.cat(
                    [t.reshape(k, -1) for t in pytree.tree_leaves(H(trees))], dim=1).T
                total += w * out.reshape(total.shape)

        return self.group.sum("H_r @ V", V.shape, V, fill, inputs=V)

    def lift(self, V: torch.Tensor) -> torch.Tensor:
        """``B^T V``: ``(P_r, k)`` restricted vectors as ``(P, k)`` vectors of ``H``."""
        k = V.shape[1]
        trees = vector_to_tree(V.T, self.spec)
        trees[self.name] = trees[self.name] @ self.basis.T
        return torch.cat([t.reshape(k, -1) for t in pytree.tree_leaves(trees)], dim=1).T


#: NOTE [batched or looped products] for each ``f`` (the function object, while it lives)
#: and shapes of the point and the first batch: operators built again on the same function
#: (a fresh operator per epoch or per call) reuse the measurement instead of paying its
#: slower passes again.
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _choices_of(f: Any, params: Any, x: Any, y: Any) -> dict[Any, Any]:
    key = tuple((tuple(t.shape), t.dtype, t.device) for t in pytree.tree_leaves((params, x, y))
                if isinstance(t, torch.Tensor))
    try:
        return _CHOICES.setdefault(f, {}).setdefault(key, {})
    except TypeError:  # f cannot be weakly referenced or hashed: this operator's own
        return {}


class HessianOperator(CurvatureOperator):
    """The data-set Hessian ``H`` of a loss as a ``(P, P)`` linear operator.

    Args:
        f: ``f(params, inputs, targets) -> scalar`` loss of one batch, e.g. from
            :func:`hessfunc.functionalize`.
        params: the point, a dict (or tree) of floating tensors.
        data: one ``(inputs, targets)`` batch or an iterable of them (a
            ``DataLoader`` with ``shuffle=False`` included). Iteration must be
            deterministic: a loader whose batches change between passes is refused.
        reduction: ``"mean"`` (``f`` averages over its batch) or ``"sum"``.
        progress: show a tqdm progress bar over batches on each pass (on rank 0 only).
        cache: keep every batch's gradient graph for fast repeated products; default
            True for data in memory, False for other iterables.
        process_group: a ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``): ``data`` is then this rank's shard, and
            the operator on every rank is the Hessian of the whole data set, the shards
            concatenated in rank order (NOTE [sharded data]). Every rank must make the
            same calls with the same arguments; the estimators' ``seed=`` makes their
            probes equal everywhere (NOTE [replicated estimators]).

    Attributes:
        num_samples, num_batches: of the whole data set (over all ranks).
        world_size: the number of ranks (1 without a process group).

    Example (a quadratic loss ``0.5 * sum(a * w^2)`` has ``H = diag(a)``):
        >>> a = torch.tensor([1.0, 2.0, 3.0])
        >>> f = lambda p, x, y: 0.5 * (a * p["w"] ** 2).sum() + 0 * x.sum()
        >>> H = HessianOperator(f, {"w": torch.ones(3)}, (torch.zeros(1), torch.zeros(1)))
        >>> H @ torch.ones(3), H.trace()
        (tensor([1., 2., 3.]), tensor(6.))
        >>> torch.allclose(H.eigenvalues(k=1, seed=0), torch.tensor([3.0]))
        True

    Sharded over processes (run under ``torchrun``; docs/distributed.md)::

        torch.distributed.init_process_group("gloo")       # "nccl" on GPUs
        H = HessianOperator.from_model(model, loss_fn, my_shard,
                                       process_group=torch.distributed.group.WORLD)
        H.eigenvalues(k=5, seed=0)                          # the same on every rank
    """

    _what = "Hessian"

    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[..., Any], data: Any,
                   **kwargs: Any) -> HessianOperator:
        """The operator of ``loss_fn(model(inputs), targets)`` at the model's parameters."""
        f, params = functionalize(model, loss_fn)
        return cls(f, params, data, **kwargs)

    def _build_product(self, index: int, x: Any, y: Any) -> HVPFunction:
        if not hasattr(self, "_choices"):
            self._choices: dict[Any, Any] = _choices_of(self.f, self.params, x, y)
        return HVPFunction(self.f, (self.params, x, y), 0, choices=self._choices)

    def _dense_function(self, chunk_size: int | None, max_memory: int | None
                        ) -> Callable[[Any, Any, Any, int], torch.Tensor]:
        dense = hessian(self.f, flat=True, chunk_size=chunk_size, max_memory=max_memory)
        return lambda p, x, y, i: dense(p, x, y)

    def _diagonal_function(self, chunk_size: int | None) -> Callable[[Any, Any, Any, int], Any]:
        diag = hessian_diag(self.f, chunk_size=chunk_size)
        return lambda p, x, y, i: diag(p, x, y)

    def _input_layers(self) -> tuple[list[Any], list[Any], list[Any]] | None:
        """This rank's batch functions, chains and first-layer ``(name, inputs)``, when
        every batch is a structured chain with the same first trainable layer."""
        if not self._cache_enabled:
            return None
        functions = list(self._batch_products("H @ v"))
        chains = [H.chain_products for _, H in functions]
        layers = [None if c is None else c.input_layer() for c in chains]
        if any(layer is None for layer in layers) or len({lay[0] for lay in layers}) != 1:
            return None
        return functions, chains, layers

    def _data_span(self) -> _DataSpan | None:
        """The restricted Hessian of NOTE [data span], when it applies and pays; over a
        process group decided from every rank's answer (NOTE [sharded data])."""
        if self._span is not False:
            return self._span  # type: ignore[return-value]
        self._span = None
        mine: list[Any] = []

        def local() -> tuple[str, int, int] | None:
            found = self._input_layers()
            if found is None:
                return None
            mine.extend(found)
            layers = found[2]
            return layers[0][0], layers[0][1].shape[1], sum(lay[1].shape[0] for lay in layers)

        answers = self._group.exchange("data span", local)
        if any(a is None for a in answers) or len({a[:2] for a in answers}) != 1:
            return None
        name, d_in = answers[0][:2]
        counts = [a[2] for a in answers]
        n = sum(counts)
        if n > _thresholds.DATA_SPAN_RATIO * d_in:
            return None
        functions, chains, layers = mine
        # a^T = U R over all ranks' inputs in rank order: U has orthonormal columns spanning
        # (a superset of) the rows of the inputs, and a U = R^T, split back into this rank's
        # batches; U itself stays in Householder form (geqrf), half the cost of forming it
        inputs = self._group.gather_rows("data span", torch.cat([lay[1] for lay in layers]),
                                         counts)
        reflectors = torch.geqrf(inputs.T.to(self.dtype))
        R = reflectors[0][:n].triu()
        lo = sum(counts[:self._group.rank])
        restricted = R.T[lo:lo + counts[self._group.rank]].split(
            [lay[1].shape[0] for lay in layers])
        template = {k: (v.new_empty(v.shape[0], n) if k == name else v)
                    for k, v in self.params.items()}
        self._span = _DataSpan(name, reflectors, flat_spec(template),
                               [(w, c.restricted(a)) for (w, _), c, a in zip(
                                   functions, chains, restricted, strict=True)], self._group)
        return self._span
