"""``HessianOperator``: the Hessian of a loss over a whole data set as a linear operator.

For data split into batches ``B_1..B_m`` of sizes ``N_1..N_m`` (``N = sum N_b``)
and ``f(params, x_b, y_b)`` the loss of one batch,

* ``reduction="mean"`` (``f`` averages over its batch): the data-set loss is
  ``L = sum_b (N_b / N) f_b``, exactly the full-batch loss even when the batches
  have unequal sizes, provided ``f`` is a plain mean over the samples of its batch
  (not, e.g., cross-entropy with class weights or ``ignore_index``, whose mean
  divides by a data-dependent total: use ``reduction="sum"`` with a summed loss);
* ``reduction="sum"`` (``f`` sums over its batch): ``L = sum_b f_b``.

``H = d^2 L / d params^2`` acts on flat vectors of length ``P`` laid out in
``named_parameters`` order (``flat_to_params`` / ``params_to_flat`` convert).

NOTE [cached linearisation]: for data held in memory (one batch, or a list or
tuple of batches), every batch's :class:`hessfunc.HVPFunction` is built once, on
first use: structured products for chains of known layers (0.8-1.3x a gradient per
product, NOTE [structured products]), else the gradient graph, one backward pass
through it per product (1.1-2.1x). Iterables that are re-read on every pass (a
``DataLoader``) are not cached unless ``cache=True``: each product then costs a
fresh set-up per batch. ``cache=False`` frees that memory.

NOTE [data span]: when every batch takes the structured route (a chain of Linear
layers and activations, NOTE [structured products]), the first trainable layer's
weight ``W`` (``d_out x d_in``) enters the loss only through ``a W^T``, with ``a``
its inputs, which do not depend on the parameters. Let ``U`` (``d_in x r``) have
orthonormal columns spanning the rows of all batches' ``a`` stacked (``r <= N``),
and ``B`` map ``W -> W U``, leaving the other parameters alone; ``B B^T = I``. Then
``H = B^T H_r B``, where ``H_r`` is the Hessian in the coordinates ``W U``: the
eigenvalues of ``H`` are those of ``H_r`` and ``P - P_r`` zeros, and an eigenvector
``v`` of ``H_r`` gives the eigenvector ``B^T v`` of ``H``. When the data set has
fewer samples than the layer has inputs (``N <= 0.7 d_in``), ``eigenvalues`` runs
Lanczos on ``H_r``: each product then costs ``r / d_in`` of the first layer's
share, and the Krylov basis is ``P_r / P`` as long. It falls back to ``H`` itself
when the zeros could be among the wanted eigenvalues (the ``k``-th wanted
eigenvalue of ``H_r`` is not on the wanted side of 0). ``spectral_density`` runs
its quadrature on ``H_r`` too, and adds the zeros as one exact node of weight
``(P - P_r) / P``. ``data_span=False`` turns both off.

NOTE [sharded data]: with ``process_group=``, each of the ``W`` ranks passes its shard
and every data-dependent step sums its local share over the group
(``hessfunc._distributed``): batch counts and sizes once at set-up (so weights use the
global ``N``), then each product, diagonal, gradient and dense matrix in one
``all_reduce``. The data-span basis is decided from every rank's answer and built from
all ranks' first-layer inputs, gathered in rank order: every rank holds the same ``U``.
At set-up the ranks also compare the parameters' exact fingerprints, the layout, the
reduction and the samples' structure, and evaluate ``f`` on their first batch, so that
a bad shard is refused there on every rank. Rank ``r``'s shard is the ``r``-th part of
the data set: the operator equals the one-process operator over the shards concatenated
in rank order.

NOTE [replicated estimators]: the estimators run whole on every rank, on the reduced
products, which are bitwise equal on all ranks; with the same seed the probes are equal
too, so every rank follows the same path and no step but the products communicates.
Scattering the Krylov basis (``P / W`` rows a rank) sends the same ``~2 b P`` bytes a
product (all_reduce = reduce_scatter + all_gather, and the HVP needs all of ``v`` on every
rank), plus one latency-bound all_reduce of ``m`` coefficients per Lanczos step. It saves
the replicated reorthogonalisation, ``~4 m P`` flops a step against the product's
``~12 s P N / W`` (``s``: uses of a weight per sample), and the ``m P`` numbers of the
basis on each rank. Flops favour replication while ``m < 3 s N / W``; memory ends it when
the basis no longer fits beside the model: ``P > ~10^8`` for ``m = 100`` float32 vectors
on an 80 GB device (figures in docs/distributed.md).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._checks import check_positive_int, describe
from ._distributed import Group, check_shards, shard_summary
from ._memory import auto_chunk_size, check_dense
from ._tree import FlatSpec, flat_spec, tree_to_vector, vector_to_tree
from .dense import hessian
from .diagonal import hessian_diag
from .errors import ArgumentError
from .estimators import (
    EigenResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenvalues,
    spectral_density,
)
from .estimators.krylov import conjugate_gradient, minres
from .functional import functionalize
from .gradient import grad
from .graph.chain_products import ChainProducts
from .products import HVPFunction

__all__ = ["CurvatureOperator", "HessianOperator"]

#: Default cap on the Krylov dimension of eigenvalues(); the basis takes (P, steps) memory.
DEFAULT_MAX_LANCZOS_STEPS = 500

Batch = tuple[Any, Any]


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


def _is_single_batch(data: Any) -> bool:
    """``(inputs, targets)`` with tensor targets (a list of two batches has tuple items);
    the inputs may be a tensor, a tuple or a dict of tensors."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[1], torch.Tensor)
            and bool(pytree.tree_leaves(data[0]))
            and all(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(data[0])))


def _batch_size(inputs: Any) -> int:
    first = pytree.tree_leaves(inputs)[0]
    return int(first.shape[0]) if first.dim() > 0 else 1


def _fingerprint(batch: Batch) -> tuple[Any, ...]:
    prints = []
    for t in pytree.tree_leaves(batch):
        if isinstance(t, torch.Tensor):
            v = torch.nan_to_num(t.detach().reshape(-1).double())  # NaN != NaN
            w = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
            prints.append((tuple(t.shape), float(v.sum()), float((v * w).sum())))
    return tuple(prints)


def _check_not_shuffling(data: Any, name: str = "HessianOperator", what: str = "Hessian"
                         ) -> None:
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ArgumentError(
            f"{name}: `data` is a DataLoader with shuffle=True; the {what} must see "
            "the same batches on every pass. Build it with shuffle=False."
        )


class CurvatureOperator:
    """A curvature matrix ``A = sum_b w_b A_b`` of a loss over a data set, as a ``(P, P)``
    linear operator: the base of :class:`HessianOperator`, :class:`hessfunc.GGNOperator`
    and :class:`hessfunc.FisherOperator`.

    It holds what they share: the data (one batch or an iterable, checked to be the same
    on every pass), the batch weights ``w_b`` (``N_b / N`` for ``reduction="mean"``, 1 for
    ``"sum"``), the optional process group (NOTE [sharded data]), and everything built on
    products (``@``, ``matmat``, ``diagonal``, ``trace``, ``eigenvalues``,
    ``spectral_density``, ``to_dense``, ``to_scipy``, ``solve``). A subclass says how one
    batch's product is made (``_build_product``: an object with ``_product(tree)`` and
    ``batched(trees)``), its dense matrix (``_dense_function``) and exact diagonal
    (``_diagonal_function``).
    """

    #: what the matrix is called in messages
    _what = "matrix"

    @property
    def _name(self) -> str:
        return type(self).__name__


    def __init__(self, f: Callable[..., Any], params: Any, data: Any, *,
                 reduction: Literal["mean", "sum"] = "mean", progress: bool = False,
                 cache: bool | None = None, process_group: Any = None):
        call = self._name
        if not callable(f):
            raise ArgumentError(f"{call}: `f` must be callable f(params, inputs, targets), "
                                f"got {describe(f)}.")
        if reduction not in ("mean", "sum"):
            raise ArgumentError(f"{call}: `reduction` must be 'mean' or 'sum', got {reduction!r}.")
        try:
            self._spec: FlatSpec = flat_spec(params)
        except (ValueError, TypeError) as exc:
            raise ArgumentError(f"{call}: `params` must be a dict or tree of tensors ({exc}).") \
                from None
        for t in pytree.tree_leaves(params):
            if not t.is_floating_point():
                raise ArgumentError(f"{call}: `params` holds a tensor of dtype {t.dtype}; "
                                    "expected floating point.")
        self._group = Group(process_group, call)
        self._group.check_device(self.device)
        self.f = f
        self.params = params
        self.reduction = reduction
        self.progress = progress and self._group.rank == 0
        self._single = _is_single_batch(data)
        self._data = data
        in_memory = self._single or isinstance(data, (list, tuple))
        self._cache_enabled = in_memory if cache is None else bool(cache)
        self._cached: list[tuple[float, Any]] | None = None
        self._span: _DataSpan | None | bool = False  # False: not looked for yet
        self._prints: list[tuple[Any, ...]] | None = None
        self._weights = self._first_pass()

    # ------------------------------------------------------------------ data
    @property
    def world_size(self) -> int:
        """The number of ranks whose shards make up the data (1 without a process group)."""
        return self._group.size

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` process group, or None."""
        return self._group.process_group

    def _check_data(self) -> None:
        if self._single:
            return
        _check_not_shuffling(self._data, self._name, self._what)
        if isinstance(self._data, (torch.Tensor, str, bytes)) or not isinstance(self._data,
                                                                                Iterable):
            raise ArgumentError(f"{self._name}: `data` must be one (inputs, targets) batch or "
                                f"an iterable of them, got {describe(self._data)}.")

    def _iter_batches(self) -> Iterator[Batch]:
        if self._single:
            yield tuple(self._data)  # type: ignore[misc]
            return
        for i, batch in enumerate(self._data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ArgumentError(
                    f"{self._name}: batch {i} of `data` must be an (inputs, targets) pair, "
                    f"got {describe(batch)}."
                )
            yield tuple(batch)  # type: ignore[misc]

    def _scan(self) -> dict[str, Any]:
        """This rank's first pass: batch sizes and fingerprints (later passes must match);
        with a process group also what the ranks compare (NOTE [sharded data])."""
        self._check_data()
        sizes, prints, first = [], [], None
        for i, batch in enumerate(self._iter_batches()):
            sizes.append(_batch_size(batch[0]))
            if sizes[-1] == 0:
                raise ArgumentError(f"{self._name}: batch {i} of `data` has no samples; "
                                    "drop empty batches.")
            if not self._single:  # one batch is never re-read
                prints.append(_fingerprint(batch))
            first = batch if first is None else first
        if not sizes and not self._group.distributed:
            raise ArgumentError(f"{self._name}: `data` is empty; pass at least one "
                                "(inputs, targets) batch.")
        self._sizes, self._prints = sizes, prints
        if not self._group.distributed:
            return {"samples": sum(sizes), "batches": len(sizes)}
        if first is not None:
            self._check_fit(first)
        return shard_summary(self.f, self.params, self.reduction, sum(sizes), len(sizes), first)

    def _check_fit(self, batch: Batch) -> None:
        """``f`` evaluates on the batch (a shard that does not fit is refused at set-up)."""
        try:  # not under no_grad: f may take derivatives of its own (a PDE residual)
            self.f(self.params, *batch)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's f
            first = (str(exc).splitlines() or [""])[0]
            raise ArgumentError(
                f"{self._group.where('set-up')}: the samples of this rank's shard of `data` do "
                f"not fit `f`: f(params, inputs, targets) on its first batch (inputs "
                f"{describe(batch[0])}, targets {describe(batch[1])}) raised "
                f"{type(exc).__name__}: {first}; every rank must pass a shard of the same "
                "data set, shaped as the model expects."
            ) from exc

    def _first_pass(self) -> list[float]:
        summaries = self._group.exchange("set-up", self._scan)
        if self._group.distributed:
            check_shards(f"{self._name}", summaries)
        self.num_samples = sum(s["samples"] for s in summaries)
        self.num_batches = sum(s["batches"] for s in summaries)
        if self.reduction == "sum":
            return [1.0] * len(self._sizes)
        return [n / self.num_samples for n in self._sizes]

    def _passes(self, desc: str) -> Iterator[tuple[int, float, Batch]]:
        """One deterministic pass: (index, weight, batch), checked against the first pass."""
        batches: Iterable[Batch] = self._iter_batches()
        local = len(self._weights)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=local, desc=desc, leave=False)
        count = 0
        for i, batch in enumerate(batches):
            if i >= local or (not self._single and self._prints is not None
                              and _fingerprint(batch) != self._prints[i]):
                raise ArgumentError(
                    f"{self._name}: `data` gave different batches on a later pass (a "
                    "shuffling loader or a random transform?); iteration must be deterministic: "
                    "use shuffle=False and fixed data."
                )
            count += 1
            yield i, self._weights[i], batch
        if count != local:
            raise ArgumentError(f"{self._name}: `data` gave {count} batches on a later pass, "
                                f"{local} on the first; iteration must be deterministic.")

    def _batch_products(self, desc: str) -> Iterator[tuple[float, Any]]:
        """``(w_b, A_b)`` for this rank's batches, ``A_b`` from ``_build_product`` (built
        once and kept when caching, NOTE [cached linearisation])."""
        if self._cached is not None:
            yield from self._cached
            return
        built = []
        for i, w, (x, y) in self._passes(desc):
            A = self._build_product(i, x, y)
            if self._cache_enabled:
                built.append((w, A))
            yield w, A
        if self._cache_enabled:
            self._cached = built

    # ------------------------------------------------------ what subclasses say
    def _build_product(self, index: int, x: Any, y: Any) -> Any:
        """Batch ``index``'s product: an object with ``_product(tree)`` and
        ``batched(trees)`` (leading dimension ``k``), both in ``params``' structure."""
        raise NotImplementedError

    def _dense_function(self, chunk_size: int | None, max_memory: int | None
                        ) -> Callable[[Any, Any, Any, int], torch.Tensor]:
        """``(params, x, y, index) -> (P, P)`` matrix of one batch."""
        raise NotImplementedError

    def _diagonal_function(self, chunk_size: int | None) -> Callable[[Any, Any, Any, int], Any]:
        """``(params, x, y, index) -> diagonal`` of one batch, structured like ``params``."""
        raise NotImplementedError

    def _data_span(self) -> Any:
        """A restricted operator where one is exact and cheaper (NOTE [data span]); None."""
        return None

    # ------------------------------------------------------------ structure
    @property
    def shape(self) -> tuple[int, int]:
        return (self._spec.numel, self._spec.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self._spec.dtype

    @property
    def device(self) -> torch.device:
        return self._spec.device

    def flat_to_params(self, vector: torch.Tensor) -> Any:
        """A flat ``(P,)`` (or ``(..., P)``) vector as a tree structured like ``params``."""
        return vector_to_tree(self._check_vector(vector, "vector", ndim=(1, 2)), self._spec)

    def params_to_flat(self, tree: Any) -> torch.Tensor:
        """A tree structured like ``params`` as one flat ``(P,)`` vector."""
        return tree_to_vector(tree)

    def _check_vector(self, v: Any, name: str, ndim: tuple[int, ...]) -> torch.Tensor:
        P = self._spec.numel
        if not isinstance(v, torch.Tensor):
            raise ArgumentError(f"{self._name}: `{name}` must be a tensor, got {describe(v)}.")
        if v.dim() not in ndim or v.shape[-1 if name == "vector" else 0] != P:
            want = "(P,)" if ndim == (1,) else "(P, k)"
            raise ArgumentError(f"{self._name}: `{name}` must have shape {want} with P={P}, "
                                f"got {tuple(v.shape)}.")
        if v.dtype != self.dtype or v.device != self.device:
            raise ArgumentError(
                f"{self._name}: `{name}` has dtype {v.dtype} on {v.device}, expected "
                f"{self.dtype} on {self.device}; convert it with `.to(dtype, device)`."
            )
        return v

    # ------------------------------------------------------------- products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of shape ``(P,)`` (the same on every rank)."""
        return self._product(self._check_vector(v, "v", ndim=(1,)))

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        tree = vector_to_tree(v, self._spec)

        def fill(total: torch.Tensor) -> None:
            for w, H in self._batch_products("H @ v"):
                out = tree_to_vector(H._product(tree))
                total.add_(out if w == 1.0 else out.mul_(w))

        return self._group.sum("H @ v", v.shape, v, fill, inputs=v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``(P, k)``: batched backward passes of up to
        ``MAX_AUTO_CHUNK`` columns (NOTE [chunk cap] in ``hessfunc._memory``)."""
        V = self._check_vector(V, "V", ndim=(2,))
        if V.shape[1] == 1:  # one column (Lanczos): the unbatched product is cheaper
            return self._product(V[:, 0]).unsqueeze(1)
        step = auto_chunk_size(V.shape[1], 0)
        # each column's leaves contiguous: a backward pass through the gradient graph
        # is slower with strided cotangents (docs/benchmarks.md). The estimators' probes
        # already are; a row-major V is copied once (P k more numbers at the peak)
        chunks = [(lo, vector_to_tree(V[:, lo:lo + step].T.contiguous(), self._spec))
                  for lo in range(0, V.shape[1], step)]

        def fill(total: torch.Tensor) -> None:
            for w, H in self._batch_products("H @ V"):
                for lo, trees in chunks:
                    out = pytree.tree_leaves(H.batched(trees))
                    cols = torch.cat([t.reshape(t.shape[0], -1) for t in out], dim=1).T
                    total[:, lo:lo + cols.shape[1]].add_(cols, alpha=w)

        return self._group.sum("H @ V", V.shape, V, fill, inputs=V)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if isinstance(other, torch.Tensor) and other.dim() == 2:
            return self.matmat(other)
        return self.matvec(other)

    def grad_and_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient ``(P,)`` and the value ``()`` of the data-set loss
        ``L = sum_b w_b f_b`` (weights as for ``H``), in one pass over the data.

        Example:
            >>> f = lambda p, x, y: ((p["w"] * x - y) ** 2).mean()
            >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
            >>> HessianOperator(f, {"w": torch.tensor(1.0)}, [(x[:1], y[:1]), (x[1:], y[1:])]
            ...                 ).grad_and_value()                  # mean of w^2 x^2
            (tensor([5.]), tensor(2.5000))
        """
        P = self._spec.numel

        def value_and_loss(p: Any, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
            value = self.f(p, x, y)
            return value, value.detach()

        grad_and_loss = grad(value_and_loss, has_aux=True)  # one forward pass for both

        def fill(total: torch.Tensor) -> None:
            for _, w, (x, y) in self._passes("gradient"):
                g, value = grad_and_loss(self.params, x, y)
                total[:P] += w * tree_to_vector(g)
                total[P] += w * value

        total = self._group.sum("gradient", (P + 1,), self._spec_like(), fill)
        return total[:P], total[P]

    def _spec_like(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype, device=self.device)

    def to_dense(self, *, chunk_size: int | None = None, max_memory: int | None = None
                 ) -> torch.Tensor:
        """The dense ``(P, P)`` Hessian (refused before allocating if over the memory limit),
        batch by batch through :func:`hessfunc.hessian` (structured when it applies)."""
        P = self._spec.numel
        check_dense(P * P, self.dtype, self.device, what=f"the dense {P} x {P} {self._what}",
                    call=f"{self._name}.to_dense", max_memory=max_memory,
                    hint="use the operator's matvec, diagonal or eigenvalues instead")
        if chunk_size is not None:
            check_positive_int(chunk_size, "chunk_size", f"{self._name}.to_dense")
        dense_fn = self._dense_function(chunk_size, max_memory)

        def fill(total: torch.Tensor) -> None:
            for i, w, (x, y) in self._passes("to_dense"):
                total += w * dense_fn(self.params, x, y, i)

        return self._group.sum("to_dense", (P, P), self._spec_like(), fill)

    def diagonal(self, method: Literal["exact", "hutchinson"] = "exact", *,
                 chunk_size: int | None = None, num_samples: int = 100,
                 generator: torch.Generator | None = None, seed: int | None = None
                 ) -> torch.Tensor:
        """The diagonal ``(P,)``: exact (batch by batch through :func:`hessfunc.hessian_diag`,
        per-sample propagation where it applies) or Hutchinson's estimate from
        ``num_samples`` Rademacher products."""
        if method == "hutchinson":
            check_positive_int(num_samples, "num_samples", f"{self._name}.diagonal")
            return hutchinson_diagonal(self.matmat, self._spec.numel, num_samples=num_samples,
                                       generator=self._generator(generator, seed),
                                       dtype=self.dtype, device=self.device)
        if method != "exact":
            raise ArgumentError(f"{self._name}.diagonal: `method` must be 'exact' or "
                                f"'hutchinson', got {method!r}.")
        diag_fn = self._diagonal_function(chunk_size)

        def fill(total: torch.Tensor) -> None:
            for i, w, (x, y) in self._passes("diagonal"):
                total += w * tree_to_vector(diag_fn(self.params, x, y, i))

        return self._group.sum("diagonal", (self._spec.numel,), self._spec_like(), fill)

    # ----------------------------------------------------------- estimators
    def _generator(self, generator: torch.Generator | None, seed: int | None
                   ) -> torch.Generator | None:
        if generator is not None and seed is not None:
            raise ArgumentError(f"{self._name}: pass `generator` or `seed`, not both.")
        if seed is not None:
            return torch.Generator(device=self.device).manual_seed(seed)
        return generator

    def trace(self, method: Literal["exact", "hutchinson", "hutch++"] = "exact", *,
              num_samples: int = 100, distribution: str = "rademacher",
              generator: torch.Generator | None = None, seed: int | None = None
              ) -> torch.Tensor | TraceEstimate:
        """``tr(H)``: exact (sum of the exact diagonal) or a stochastic estimate.

        ``"hutchinson"`` and ``"hutch++"`` return a :class:`TraceEstimate` with the
        standard error; ``num_samples`` is their number of matvecs.
        """
        if method == "exact":
            return self.diagonal().sum()
        check_positive_int(num_samples, "num_samples", f"{self._name}.trace")
        gen = self._generator(generator, seed)
        kw = dict(size=self._spec.numel, distribution=distribution, generator=gen,
                  dtype=self.dtype, device=self.device)
        if method == "hutchinson":
            return hutchinson_trace(self.matmat, num_samples=num_samples, **kw)
        if method == "hutch++":
            return hutchpp_trace(self.matmat, num_matvecs=num_samples, **kw)
        raise ArgumentError(f"{self._name}.trace: `method` must be 'exact', 'hutchinson' or "
                            f"'hutch++', got {method!r}.")

    def eigenvalues(self, k: int = 1, *, which: str = "largest", tol: float = 1e-8,
                    max_steps: int | None = None, return_vectors: bool = False,
                    generator: torch.Generator | None = None, seed: int | None = None,
                    data_span: bool = True
                    ) -> torch.Tensor | tuple[torch.Tensor, list[Any]]:
        """The ``k`` extreme eigenvalues by Lanczos with reorthogonalisation (NOTE
        [semi-orthogonality] in ``hessfunc/estimators/lanczos.py``).

        ``tol`` bounds each eigenvalue's residual relative to it, and so its relative
        error (NOTE [convergence test] in :func:`hessfunc.estimators.lanczos_eigenvalues`).
        With ``return_vectors=True``
        also the eigenvectors, each as a tree like ``params``. ``data_span``: work in the
        span of the data where that is exact and cheaper (NOTE [data span]).
        """
        res = self.eigen(k, which=which, tol=tol, max_steps=max_steps,
                         return_vectors=return_vectors, generator=generator, seed=seed,
                         data_span=data_span)
        if not return_vectors:
            return res.eigenvalues
        vecs = [vector_to_tree(res.eigenvectors[:, i], self._spec) for i in range(k)]
        return res.eigenvalues, vecs

    def eigenvectors(self, k: int = 1, **kwargs: Any) -> list[Any]:
        """The eigenvectors of the ``k`` extreme eigenvalues, each a tree like ``params``."""
        return self.eigenvalues(k, return_vectors=True, **kwargs)[1]  # type: ignore[index]

    def eigen(self, k: int = 1, *, which: str = "largest", tol: float = 1e-8,
              max_steps: int | None = None, return_vectors: bool = False,
              generator: torch.Generator | None = None, seed: int | None = None,
              data_span: bool = True) -> EigenResult:
        """The full Lanczos result (eigenvalues, vectors, matvecs spent, convergence)."""
        P = self._spec.numel
        if isinstance(k, int) and not isinstance(k, bool) and k >= P:
            raise ArgumentError(f"{self._name}.eigenvalues: `k`={k} must be < P={P}; for all "
                                "eigenvalues use torch.linalg.eigvalsh(H.to_dense()).")
        gen = self._generator(generator, seed)
        kw = dict(k=k, which=which, tol=tol, return_vectors=return_vectors, generator=gen,
                  dtype=self.dtype, device=self.device)
        span = self._data_span() if data_span else None
        spent = 0
        if span is not None and isinstance(k, int) and k < span.size:
            steps = min(span.size, DEFAULT_MAX_LANCZOS_STEPS) if max_steps is None else max_steps
            res = lanczos_eigenvalues(span.matmat, span.size, max_steps=steps, **kw)
            kth = float(res.eigenvalues[-1])
            if {"largest": kth > 0, "smallest": kth < 0, "magnitude": kth != 0}.get(which):
                if return_vectors:
                    res = res._replace(eigenvectors=span.lift(res.eigenvectors))
                return self._warn_unconverged(res, tol, steps)
            spent = res.num_matvecs  # the zeros could be wanted: H itself, products counted
        steps = min(P, DEFAULT_MAX_LANCZOS_STEPS) if max_steps is None else max_steps
        res = lanczos_eigenvalues(self.matmat, P, max_steps=steps, **kw)
        return self._warn_unconverged(res._replace(num_matvecs=res.num_matvecs + spent), tol,
                                      steps)

    def _warn_unconverged(self, res: EigenResult, tol: float, steps: int) -> EigenResult:
        if not res.converged:
            warnings.warn(f"{self._name}.eigenvalues: Lanczos did not reach tol={tol} in "
                          f"{steps} steps; raise `max_steps` or loosen `tol`.", RuntimeWarning,
                          stacklevel=4)
        return res

    def spectral_density(self, *, num_probes: int | None = None, num_steps: int = 64,
                         generator: torch.Generator | None = None, seed: int | None = None,
                         data_span: bool = True, **kwargs: Any) -> SpectralDensity:
        """Eigenvalue density by stochastic Lanczos quadrature (grid, density, nodes, weights).

        ``num_probes`` defaults to 10 random probes; ``kwargs`` go to
        :func:`hessfunc.estimators.spectral_density` (``sigma``, ``num_points``, ``probes``...).
        ``data_span``: where NOTE [data span] applies (and no ``probes`` are given), run the
        quadrature on ``H_r`` and add the ``P - P_r`` known zero eigenvalues exactly.
        """
        gen = self._generator(generator, seed)
        span = self._data_span() if data_span and "probes" not in kwargs else None
        if span is not None:
            return spectral_density(span.matmat, span.size, num_probes=num_probes,
                                    num_steps=num_steps, generator=gen, dtype=self.dtype,
                                    device=self.device, num_zeros=self._spec.numel - span.size,
                                    **kwargs)
        return spectral_density(self.matmat, self._spec.numel, num_probes=num_probes,
                                num_steps=num_steps, generator=gen, dtype=self.dtype,
                                device=self.device, **kwargs)

    # ------------------------------------------------------- inverse products
    def solve(self, b: Any, damping: float = 0.0, method: Literal["cg", "minres"] = "cg", *,
              tol: float | None = None, max_steps: int | None = None,
              return_info: bool = False) -> Any:
        """``x = (A + damping I)^-1 b``: an inverse product with this operator ``A``.

        Krylov methods on the operator's products (:mod:`hessfunc.estimators.krylov`):
        ``"cg"`` (conjugate gradients) for a positive definite ``A + damping I`` (a GGN or
        Fisher with damping, a Hessian at a strict minimum), ``"minres"`` for any symmetric
        one (a Hessian anywhere). CG refuses ``damping < 0`` and stops with an
        :class:`~hessfunc.ArgumentError` on a direction of curvature ``<= 0``. Under a
        process group every rank runs the same iteration on the reduced products.

        Args:
            b: a flat ``(P,)`` vector, or a tree structured like ``params``.
            damping: added to the diagonal.
            method: ``"cg"`` or ``"minres"``.
            tol: the relative residual ``||b - (A + damping I) x|| / ||b||`` to reach
                (default ``1e-10`` in float64, ``1e-5`` otherwise).
            max_steps: cap on products (default ``10 P + 10``); a warning if reached.
            return_info: also return the :class:`hessfunc.estimators.SolveResult`
                (true residual, products spent, convergence).

        Returns:
            ``x`` in ``b``'s form (flat, or a tree like ``params``); with
            ``return_info=True`` the pair ``(x, info)``.

        Example (``H = diag(1, 2, 3)``, so ``(H + I)^-1 1 = (1/2, 1/3, 1/4)``):
            >>> a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
            >>> f = lambda p, x, y: 0.5 * (a * p["w"] ** 2).sum() + 0 * x.sum()
            >>> H = HessianOperator(f, {"w": torch.ones(3, dtype=torch.float64)},
            ...                     (torch.zeros(1), torch.zeros(1)))
            >>> x, info = H.solve({"w": torch.ones(3, dtype=torch.float64)}, damping=1.0,
            ...                   return_info=True)
            >>> torch.allclose(x["w"], 1 / (a + 1)), info.converged
            (True, True)
        """
        call = f"{type(self).__name__}.solve"
        flat = self._solve_rhs(b, call)
        if method not in ("cg", "minres"):
            raise ArgumentError(f"{call}: `method` must be 'cg' (positive definite) or 'minres' "
                                f"(any symmetric operator), got {method!r}.")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise ArgumentError(f"{call}: `damping` must be a number, got {describe(damping)}.")
        if method == "cg" and damping < 0:
            raise ArgumentError(f"{call}: `damping` must be >= 0 with method='cg', got {damping};"
                                " a negative shift can make the operator indefinite: use "
                                "method='minres'.")
        solver = conjugate_gradient if method == "cg" else minres
        try:
            info = solver(self._product, flat, damping=damping, tol=tol, max_steps=max_steps)
        except ArgumentError as exc:
            raise ArgumentError(f"{call}: {exc}") from None
        if not info.converged:
            warnings.warn(f"{call}: {method} reached a relative residual of "
                          f"{float(info.relative_residual):.2e}, not tol, in {info.num_matvecs} "
                          "products; raise `max_steps`, add damping or loosen `tol`.",
                          RuntimeWarning, stacklevel=2)
        x = info.solution if isinstance(b, torch.Tensor) else vector_to_tree(info.solution,
                                                                             self._spec)
        return (x, info) if return_info else x

    def _solve_rhs(self, b: Any, call: str) -> torch.Tensor:
        """``b`` as a flat ``(P,)`` vector of the operator's dtype and device."""
        P = self._spec.numel
        if isinstance(b, torch.Tensor):
            if b.shape != (P,):
                raise ArgumentError(f"{call}: `b` must be a flat ({P},) vector or a tree like "
                                    f"`params`, got a tensor of shape {tuple(b.shape)}; flatten "
                                    "a tree with `params_to_flat`.")
            leaves = [b]
        else:
            try:
                spec = flat_spec(b)
            except (ValueError, TypeError):
                spec = None
            if spec is None or spec.treespec != self._spec.treespec \
                    or spec.shapes != self._spec.shapes:
                want = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(
                    self._spec.names, self._spec.shapes, strict=True))
                raise ArgumentError(f"{call}: `b` must be a flat ({P},) vector or a tree "
                                    f"structured like `params` ({{{want}}}), got "
                                    f"{describe(b)}.")
            leaves = pytree.tree_leaves(b)
        for t in leaves:
            if t.dtype != self.dtype or t.device != self.device:
                raise ArgumentError(f"{call}: `b` has dtype {t.dtype} on {t.device}, expected "
                                    f"{self.dtype} on {self.device}; convert it with "
                                    "`.to(dtype, device)`.")
        return b if isinstance(b, torch.Tensor) else tree_to_vector(b)

    # ---------------------------------------------------------------- scipy
    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for ``eigsh``."""
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ArgumentError(f"{self._name}.to_scipy needs scipy: pip install scipy") \
                from exc
        import numpy as np

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(v).detach().cpu().double().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(V).detach().cpu().double().numpy()

        P = self._spec.numel
        return LinearOperator((P, P), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)

    def __repr__(self) -> str:
        ranks = f", world_size={self.world_size}" if self._group.distributed else ""
        return (f"{self._name}(P={self._spec.numel}, batches={self.num_batches}, "
                f"samples={self.num_samples}, reduction={self.reduction!r}, dtype={self.dtype}"
                f"{ranks})")


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
        if 10 * n > 7 * d_in:
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
